//! The `kairos-p2p` executable (also installed as `kairosctl`).

use std::process::ExitCode;

fn main() -> ExitCode {
    let argv: Vec<String> = match std::env::args_os().map(|a| a.into_string()).collect() {
        Ok(argv) => argv,
        Err(bad) => {
            kairos_p2p::errln!("argument is not valid UTF-8: {}", bad.to_string_lossy());
            return ExitCode::from(2);
        }
    };
    kairos_p2p::cli::main_with_args(&argv)
}
