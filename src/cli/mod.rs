//! The command-line front end: parses arguments and runs one subcommand.

mod agent;
mod args;
mod bridge;
mod client;
mod commands;
pub(crate) mod kubeconfig;
mod roles;
mod status;
mod table;

use std::path::PathBuf;
use std::process::ExitCode;

use argh::FromArgs;

pub use args::{Cli, Command};

use crate::config::{self, Config, HostFacts};
use crate::token::{NEVER_ROTATE, NetworkToken};
use crate::{host, logging};

/// Exit status for a configuration or usage error.
const EXIT_USAGE: u8 = 2;
/// Exit status for a failure at run time.
const EXIT_FAILURE: u8 = 1;

/// Parses `argv` (its first element names the program, `kairos-p2p` or `kairosctl`) and runs
/// the chosen subcommand.
pub fn main_with_args(argv: &[String]) -> ExitCode {
    let program = argv
        .first()
        .map(|p| p.rsplit('/').next().unwrap_or(p))
        .unwrap_or("kairos-p2p");
    let rest: Vec<&str> = argv.iter().skip(1).map(String::as_str).collect();
    let cli = match Cli::from_args(&[program], &rest) {
        Ok(cli) => cli,
        Err(early) => {
            return match early.status {
                Ok(()) => {
                    println!("{}", early.output);
                    ExitCode::SUCCESS
                }
                Err(()) => {
                    eprintln!(
                        "{}\nRun {program} --help for more information.",
                        early.output
                    );
                    ExitCode::from(EXIT_USAGE)
                }
            };
        }
    };
    logging::init(logging::effective_level(
        log::LevelFilter::Warn,
        std::env::var(logging::LOG_ENV).ok().as_deref(),
    ));
    run(cli)
}

fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::GenerateToken(args) => match new_token(args.interval) {
            Ok(token) => {
                println!("{}", token.encode());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::CreateConfig(args) => match new_token(args.interval) {
            Ok(token) => {
                print!("{}", starter_config(&token));
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Validate(args) => validate(args.config),
        Command::Agent(args) => agent::run(&args, cli.state_dir),
        Command::Bridge(args) => bridge::run(&args, cli.state_dir),
        Command::Version(_) => {
            println!("{}", version_line());
            ExitCode::SUCCESS
        }
        Command::GetKubeconfig(args) => commands::get_kubeconfig(&args, cli.state_dir),
        Command::Role(args) => commands::role(&args, cli.state_dir),
        Command::Status(args) => commands::status(&args, cli.state_dir),
    }
}

/// `kairos-p2p <version> (<arch>-<os>)`.
pub fn version_line() -> String {
    format!(
        "kairos-p2p {} ({}-{})",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::ARCH,
        std::env::consts::OS
    )
}

fn new_token(interval: Option<u64>) -> Result<NetworkToken, ExitCode> {
    let interval = interval.unwrap_or(NEVER_ROTATE);
    if interval == 0 {
        eprintln!("--interval: must be at least 1 second");
        return Err(ExitCode::from(EXIT_USAGE));
    }
    NetworkToken::generate(interval).map_err(|e| {
        eprintln!("cannot generate a token: system random generator failed: {e}");
        ExitCode::from(EXIT_FAILURE)
    })
}

/// The cloud-config `create-config` prints: the smallest file that forms a cluster.
pub fn starter_config(token: &NetworkToken) -> String {
    format!(
        "#cloud-config\n\
         # Give this same file to every node. Keep it secret: the token admits a node to the network.\n\
         p2p:\n  network_token: \"{}\"\n  # network_id: kairos\n  # minimum_nodes: 2\n",
        token.encode()
    )
}

fn validate(files: Vec<PathBuf>) -> ExitCode {
    match load_config(files) {
        Ok((cfg, _)) => {
            print!("{}", cfg.render_effective());
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// Loads the configuration from `files` (or Kairos' directories) and prints its warnings; on
/// errors prints them and gives the exit code.
fn load_config(files: Vec<PathBuf>) -> Result<(Config, HostFacts), ExitCode> {
    let sources = if files.is_empty() {
        config::default_sources()
    } else {
        files
    };
    if sources.is_empty() {
        eprintln!("no cloud-config found in /oem or /usr/local/cloud-config; pass --config FILE");
        return Err(ExitCode::from(EXIT_USAGE));
    }
    let host = host::read_host_facts().unwrap_or_else(|e| {
        log::warn!(
            "cannot read this machine's id or hostname ({e}); templates expand to empty strings"
        );
        HostFacts {
            machine_id: String::new(),
            hostname: String::new(),
        }
    });
    match config::load(&sources, &host) {
        Ok(cfg) => {
            for warning in &cfg.warnings {
                eprintln!("warning: {warning}");
            }
            Ok((cfg, host))
        }
        Err(errors) => {
            eprintln!("{errors}");
            Err(ExitCode::from(EXIT_USAGE))
        }
    }
}
