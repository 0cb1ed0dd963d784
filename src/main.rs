//! `bin-proxy`: parse the command line, run the agent, map the outcome to an
//! exit code (0 ok, 1 something failed, 2 usage or manifest error).

use std::process::ExitCode;

fn main() -> ExitCode {
    match bin_proxy::cli::parse(std::env::args_os().skip(1)) {
        Ok(args) => ExitCode::from(bin_proxy::agent::main(&args)),
        Err(e) => {
            bin_proxy::error!("{e}");
            ExitCode::from(e.exit_code())
        }
    }
}
