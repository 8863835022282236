use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use proxy_user::cli::Cli;
use proxy_user::{logging, server};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = logging::init(cli.log_format, &cli.log_level) {
        eprintln!("proxy: error: {e:#}");
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("proxy: error: cannot start tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(file) = &cli.check {
        let mut settings = cli.settings();
        if let Some(file) = file {
            settings.config = file.clone();
        }
        return match rt.block_on(server::check(&settings)) {
            Ok(summary) => {
                println!(
                    "proxy: {}: config ok ({summary})",
                    settings.config.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("proxy: error: {e:#}");
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
            // Plain stderr, not the logger: startup errors (config problems
            // above all) must read well whatever the log format.
            eprintln!("proxy: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
