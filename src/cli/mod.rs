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
use std::time::Duration;

use argh::FromArgs;

pub use args::{Cli, Command};

use crate::config::{self, Config, HostFacts};
use crate::token::{NEVER_ROTATE, NetworkToken};
use crate::{console, download, host, logging};

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
    let rest = kairosctl_spellings(&rest);
    let cli = match Cli::from_args(&[program], &rest) {
        Ok(cli) => cli,
        Err(early) => {
            return match early.status {
                Ok(()) => {
                    crate::outln!("{}", early.output);
                    ExitCode::SUCCESS
                }
                Err(()) => {
                    crate::errln!(
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
    let code = run(cli);
    match console::stdout_failure() {
        Some(e) => {
            crate::errln!("error: cannot write to standard output: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
        None => code,
    }
}

/// `args` with kairosctl's spellings replaced by ours where the subcommand goes (after the
/// top-level options): `g` and `c` (urfave/cli aliases of generate-token and create-config),
/// `--version` and `-v` (urfave/cli's version flag).
fn kairosctl_spellings<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut out = args.to_vec();
    let mut i = 0;
    while i < out.len() {
        match out[i] {
            // The one top-level option, and its value.
            "--state-dir" => i += 2,
            "g" => {
                out[i] = "generate-token";
                break;
            }
            "c" => {
                out[i] = "create-config";
                break;
            }
            "--version" | "-v" => {
                out[i] = "version";
                break;
            }
            _ => break,
        }
    }
    out
}

/// The rotation interval of `generate-token`/`create-config`, from the argument or `--interval`.
fn interval(seconds: Option<u64>, option: Option<u64>) -> Result<Option<u64>, ExitCode> {
    match (seconds, option) {
        (Some(a), Some(b)) if a != b => {
            crate::errln!("the interval is given twice ({a} and --interval {b}): give it once");
            Err(ExitCode::from(EXIT_USAGE))
        }
        (a, b) => Ok(a.or(b)),
    }
}

fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::GenerateToken(args) => {
            match interval(args.seconds, args.interval).and_then(new_token) {
                Ok(token) => {
                    crate::outln!("{}", token.encode());
                    ExitCode::SUCCESS
                }
                Err(code) => code,
            }
        }
        Command::CreateConfig(args) => {
            match interval(args.seconds, args.interval).and_then(new_token) {
                Ok(token) => {
                    crate::out!("{}", starter_config(&token));
                    ExitCode::SUCCESS
                }
                Err(code) => code,
            }
        }
        Command::Validate(args) => validate(args.sources, args.config),
        Command::Agent(args) => agent::run(&args, cli.state_dir),
        Command::Bridge(args) => bridge::run(&args, cli.state_dir),
        Command::Version(_) => {
            crate::outln!("{}", version_line());
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
        crate::errln!("the interval must be at least 1 second");
        return Err(ExitCode::from(EXIT_USAGE));
    }
    NetworkToken::generate(interval).map_err(|e| {
        crate::errln!("cannot generate a token: system random generator failed: {e}");
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

/// `validate`: the sources given as arguments (files or URLs, as kairosctl takes them) or with
/// `--config` (files), else Kairos' directories.
fn validate(sources: Vec<String>, files: Vec<PathBuf>) -> ExitCode {
    if sources.is_empty() {
        return match load_config(files) {
            Ok((cfg, _)) => {
                crate::out!("{}", cfg.render_effective());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        };
    }
    if !files.is_empty() {
        crate::errln!(
            "validate: give the files either as arguments or with --config, not both (the \
             order in which they override each other would be ambiguous)"
        );
        return ExitCode::from(EXIT_USAGE);
    }
    let mut read = Vec::with_capacity(sources.len());
    for source in sources {
        if download::is_url(&source) {
            let limits = download::Limits {
                max_bytes: config::MAX_FILE_SIZE,
                timeout: VALIDATE_URL_TIMEOUT,
            };
            match download::text(&source, limits) {
                Ok(text) => read.push((PathBuf::from(source), Some(text))),
                Err(e) => {
                    crate::errln!("validate: {e}");
                    return ExitCode::from(EXIT_FAILURE);
                }
            }
        } else if source.contains("://") {
            crate::errln!("validate: {source}: only files and http:// or https:// URLs are read");
            return ExitCode::from(EXIT_USAGE);
        } else {
            read.push((PathBuf::from(source), None));
        }
    }
    match config::load_with_texts(&read, &host_facts()) {
        Ok(cfg) => {
            for warning in &cfg.warnings {
                crate::errln!("warning: {warning}");
            }
            crate::out!("{}", cfg.render_effective());
            ExitCode::SUCCESS
        }
        Err(errors) => {
            crate::errln!("{errors}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

/// Time allowed to download a cloud-config given to `validate` as a URL.
const VALIDATE_URL_TIMEOUT: Duration = Duration::from_secs(30);

fn host_facts() -> HostFacts {
    host::read_host_facts().unwrap_or_else(|e| {
        log::warn!(
            "cannot read this machine's id or hostname ({e}); templates expand to empty strings"
        );
        HostFacts {
            machine_id: String::new(),
            hostname: String::new(),
        }
    })
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
        crate::errln!(
            "no cloud-config found in /oem or /usr/local/cloud-config; pass --config FILE"
        );
        return Err(ExitCode::from(EXIT_USAGE));
    }
    let host = host_facts();
    match config::load(&sources, &host) {
        Ok(cfg) => {
            for warning in &cfg.warnings {
                crate::errln!("warning: {warning}");
            }
            Ok((cfg, host))
        }
        Err(errors) => {
            crate::errln!("{errors}");
            Err(ExitCode::from(EXIT_USAGE))
        }
    }
}
