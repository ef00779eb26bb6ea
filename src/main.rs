//! `squall`: the command-line entry point. It only parses arguments and wires the crates
//! together; every mechanism lives in a crate of its own.
#![forbid(unsafe_code)]

mod balance_cmd;

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
    /// Run the load balancer in front of a fixed set of workers.
    Balance(balance_cmd::BalanceArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Balance(args) => balance_cmd::run(args),
    }
}
