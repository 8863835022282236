//! Log setup: tracing to stderr, human or JSON lines.

use std::io::IsTerminal;

use anyhow::Context;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

pub fn init(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(filter).with_context(|| {
        format!("--log-level {filter:?} is not a valid filter (try `info` or `debug`)")
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only help a human at a terminal; in files they are noise.
        .with_ansi(std::io::stderr().is_terminal());
    let result = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            // Our connection lines have a `target` field (the upstream);
            // tracing's own `target` (module path) would clash with it.
            .with_target(false)
            .try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot install logger: {e}"))
}
