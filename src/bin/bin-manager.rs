//! `bin-manager`: parse the command line, start the server (or run an admin
//! subcommand against a running one). Exit code 2 for usage and
//! configuration errors, 1 when it cannot start or the subcommand failed.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args = match bin_proxy::cli::parse_manager(std::env::args_os().skip(1)) {
        Ok(args) => args,
        Err(e) => {
            bin_proxy::error!("{e}");
            return ExitCode::from(e.exit_code());
        }
    };
    if args.help {
        print!("{}", bin_proxy::cli::MANAGER_HELP);
        return ExitCode::SUCCESS;
    }
    if args.version {
        println!("bin-manager {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    if matches!(
        args.command,
        bin_proxy::cli::ManagerCommand::Keygen
            | bin_proxy::cli::ManagerCommand::Sign(_)
            | bin_proxy::cli::ManagerCommand::Trust(_)
            | bin_proxy::cli::ManagerCommand::Revoke(_)
    ) {
        return match bin_proxy::manager::keytool::run(&args) {
            Ok(line) => {
                println!("{line}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                bin_proxy::error!("{e}");
                ExitCode::from(e.exit_code())
            }
        };
    }
    if args.command != bin_proxy::cli::ManagerCommand::Serve {
        return match bin_proxy::manager::admin::run(&args, &bin_proxy::cli::process_env) {
            Ok(done) => {
                println!("{done}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                bin_proxy::error!("{e}");
                ExitCode::from(e.exit_code())
            }
        };
    }
    match bin_proxy::manager::run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            bin_proxy::error!("{e}");
            ExitCode::from(e.exit_code())
        }
    }
}
