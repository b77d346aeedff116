use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    match blk_bench::main(blk_bench::Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blk-bench: {}", backends::daemon::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
