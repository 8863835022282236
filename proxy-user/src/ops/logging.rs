//! Log setup: tracing, human or JSON lines.

use std::io::IsTerminal;

use anyhow::Context;
use tracing::Dispatch;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

/// Installs the process-wide logger: stderr, `format`, `filter`.
pub fn init(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    // Colour codes only help a human at a terminal; in files they are noise.
    let ansi = std::io::stderr().is_terminal();
    let dispatch = build(format, filter, std::io::stderr, ansi)?;
    // try_init also routes the `log` facade (aya-log's BPF records) here.
    dispatch
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot install logger: {e}"))
}

/// One error line in the JSON log's shape, for errors met before the
/// logger exists (a bad flag, a bad `--log-level`): with `--log-format
/// json` every line of stderr is JSON, the first one included.
pub fn json_error_line(message: &str, error: &str) -> String {
    serde_json::json!({
        "timestamp": humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
        "level": "ERROR",
        "message": message,
        "error": error,
    })
    .to_string()
}

/// Whether `args` ask for JSON logs, read before (or without) clap, so an
/// error in parsing the rest can still be written as JSON.
pub fn wants_json(args: &[std::ffi::OsString]) -> bool {
    let args: Vec<&str> = args.iter().filter_map(|a| a.to_str()).collect();
    args.windows(2)
        .any(|w| w[0] == "--log-format" && w[1] == "json")
        || args.contains(&"--log-format=json")
}

/// A logger writing to `writer` instead of stderr, without colour: how a
/// server started in-process (the tests) keeps a log of its own.
pub fn dispatch<W>(format: LogFormat, filter: &str, writer: W) -> anyhow::Result<Dispatch>
where
    W: std::io::Write + Send + 'static,
{
    build(format, filter, std::sync::Mutex::new(writer), false)
}

fn build<W>(format: LogFormat, filter: &str, writer: W, ansi: bool) -> anyhow::Result<Dispatch>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_new(filter).with_context(|| {
        format!("--log-level {filter:?} is not a valid filter (try `info` or `debug`)")
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    Ok(match format {
        LogFormat::Human => Dispatch::new(builder.finish()),
        LogFormat::Json => Dispatch::new(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                // Our connection lines have a `target` field (the upstream);
                // tracing's own `target` (module path) would clash with it.
                .with_target(false)
                .finish(),
        ),
    })
}
