//! Writes the proxy's man page (roff, from its clap definition) to stdout:
//! `cargo run -p proxy-user --example manpage > proxy.1`. `cargo xtask
//! package` ships it; an example rather than a flag of the proxy, so the
//! binary does not carry a man page generator.

use clap::CommandFactory;

fn main() -> std::io::Result<()> {
    let man = clap_mangen::Man::new(proxy_user::cli::Cli::command());
    man.render(&mut std::io::stdout().lock())
}
