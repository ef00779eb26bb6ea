//! `squall`: the command-line entry point. It only parses arguments and wires the crates
//! together; every mechanism lives in a crate of its own.
#![forbid(unsafe_code)]

mod forkd_cmd;

use std::process::ExitCode;

use clap::Parser;

/// Squall: an HTTP load balancer and autoscaler that forks warm workers for flash crowds.
#[derive(Debug, Parser)]
#[command(name = "squall", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Run the per-host fork daemon: templates, clones, and the HTTP API to manage them.
    Forkd(forkd_cmd::ForkdArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Forkd(args) => forkd_cmd::run(args),
    }
}
