//! `vmm-hostd`: the host-wide exporter and dashboard. See `vmm-hostd --help`.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = vmm_hostd::Cli::parse();
    match cli.into_config().and_then(vmm_hostd::run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmm-hostd: {}", vmm::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
