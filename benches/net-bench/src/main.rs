use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    match net_bench::run(&net_bench::Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("net-bench: {}", backends::daemon::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
