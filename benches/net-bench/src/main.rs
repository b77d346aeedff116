use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    match net_bench::run(&net_bench::Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                src = s.source();
            }
            eprintln!("net-bench: {msg}");
            ExitCode::FAILURE
        }
    }
}
