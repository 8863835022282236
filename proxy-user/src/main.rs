use std::process::ExitCode;

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
    match rt.block_on(server::run(cli.settings())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Plain stderr, not the logger: startup errors (config problems
            // above all) must read well whatever the log format.
            eprintln!("proxy: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
