use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use proxy_user::cli::Cli;
use proxy_user::logging::{self, LogFormat};
use proxy_user::server;

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        // --help and --version are not errors, and are for a person.
        Err(e) if !e.use_stderr() || !logging::wants_json(&args) => e.exit(),
        Err(e) => {
            let text = e.render().to_string();
            eprintln!(
                "{}",
                logging::json_error_line("invalid command line", text.trim())
            );
            return ExitCode::from(2);
        }
    };
    let json = cli.log_format == LogFormat::Json;
    // With JSON logs, every stderr line is JSON, this one included.
    let fail = |message: &str, e: &anyhow::Error| {
        if json {
            eprintln!("{}", logging::json_error_line(message, &format!("{e:#}")));
        } else {
            eprintln!("proxy: error: {e:#}");
        }
    };
    if let Err(e) = logging::init(cli.log_format, &cli.log_level) {
        fail("cannot set up logging", &e);
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            fail(
                "cannot start",
                &anyhow::Error::new(e).context("cannot start tokio runtime"),
            );
            return ExitCode::FAILURE;
        }
    };
    if let Some(file) = cli.check_file() {
        let mut settings = cli.settings();
        settings.config = file;
        return match rt.block_on(server::check(&settings)) {
            Ok(summary) => {
                println!("{summary}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                fail("config check failed", &e);
                ExitCode::FAILURE
            }
        };
    }
    let result = rt.block_on(server::run(cli.settings()));
    // Not the runtime's drop, which waits for every blocking task: a stop
    // during start-up can leave one stuck (an open() on a FIFO nobody
    // reads), and waiting for it would undo the prompt exit.
    rt.shutdown_timeout(Duration::from_millis(100));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Not through the logger: its human format would prefix and
            // indent a multi-line config error.
            fail("exiting on error", &e);
            ExitCode::FAILURE
        }
    }
}
