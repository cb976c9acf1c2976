//! The client commands: fetch from the API, hand over to the pure parts, print.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Display;
use std::path::PathBuf;
use std::process::ExitCode;

use super::args::{GetKubeconfigArgs, RoleArgs, RoleCommand, StatusArgs};
use super::client::{
    API_ENV, Api, ClientError, NETWORK_ID_ENV, choose_api, choose_network_id, kairos_socket,
    readable_bearer_tokens, segment,
};
use super::kubeconfig::{self, KubeconfigError};
use super::roles;
use super::status::{self, Bandwidth, Machine, Node, Summary};
use super::{EXIT_FAILURE, EXIT_USAGE};
use crate::ledger::{edgevpn, names};

/// `get-kubeconfig`.
pub fn get_kubeconfig(args: &GetKubeconfigArgs, state_dir: Option<PathBuf>) -> ExitCode {
    let network_id = network_id(args.network_id.as_deref());
    let bucket = names::network_bucket(&network_id);
    let result = connect(args.api.as_deref(), state_dir).and_then(|api| {
        let mut outcome = Err(KubeconfigError::NotYet);
        for (config_key, address_key) in kubeconfig::KEYS {
            let stored = api.ledger_text(bucket, config_key).map_err(failure)?;
            if stored.trim().is_empty() {
                continue;
            }
            let address = api.ledger_text(bucket, address_key).map_err(failure)?;
            outcome = kubeconfig::kubeconfig(&stored, &address);
            break;
        }
        outcome.map_err(failure)
    });
    finish(result.map(|yaml| crate::out!("{}", with_newline(&yaml))))
}

/// `role list` and `role set`.
pub fn role(args: &RoleArgs, state_dir: Option<PathBuf>) -> ExitCode {
    let result = match &args.command {
        RoleCommand::List(list) => connect(list.api.as_deref(), state_dir).and_then(|api| {
            let network_id = network_id(list.network_id.as_deref());
            let bucket = names::network_bucket(&network_id);
            let values: Option<BTreeMap<String, String>> = api
                .get_json(&format!("/api/ledger/{}", segment(bucket)))
                .map_err(failure)?;
            let online: Vec<Node> = api.get_json("/api/nodes").map_err(failure)?;
            let online: BTreeSet<String> = online.into_iter().map(|n| n.uuid).collect();
            let rows = roles::rows(&values.unwrap_or_default(), &online);
            crate::out!("{}", roles::render(&rows));
            Ok(())
        }),
        RoleCommand::Set(set) => roles::role_key(&set.uuid, &set.role)
            .map_err(usage)
            .and_then(|(key, role)| {
                let api = connect(set.api.as_deref(), state_dir)?;
                let network_id = network_id(set.network_id.as_deref());
                let bucket = names::network_bucket(&network_id);
                // As edgevpn's Go client writes it, so Kairos' tools read it too.
                let path = format!(
                    "/api/ledger/{}/{}/{}",
                    segment(bucket),
                    segment(&key),
                    segment(&edgevpn::client_segment(role))
                );
                api.put(&path).map_err(failure)?;
                crate::outln!("{}: role {role} set in network {bucket}", set.uuid);
                Ok(())
            }),
    };
    finish(result)
}

/// `status`.
pub fn status(args: &StatusArgs, state_dir: Option<PathBuf>) -> ExitCode {
    let result = connect(args.api.as_deref(), state_dir).and_then(|api| {
        let summary: Summary = api.get_json("/api/summary").map_err(failure)?;
        let nodes: Vec<Node> = api.get_json("/api/nodes").map_err(failure)?;
        let machines: Vec<Machine> = api.get_json("/api/machines").map_err(failure)?;
        let traffic: Bandwidth = api.get_json("/api/metrics").map_err(failure)?;
        crate::out!("{}", status::render(&summary, &nodes, &machines, &traffic));
        Ok(())
    });
    finish(result)
}

/// An error message and the exit code it ends with.
type Failure = (String, u8);

fn failure(e: impl Display) -> Failure {
    (e.to_string(), EXIT_FAILURE)
}

fn usage(e: impl Display) -> Failure {
    (e.to_string(), EXIT_USAGE)
}

/// The API client: `--api`, `$EDGEVPN_API`, Kairos' socket or loopback TCP (see
/// [`choose_api`]), with the bearer tokens this user can read from the state directory.
fn connect(flag: Option<&str>, state_dir: Option<PathBuf>) -> Result<Api, Failure> {
    let url = choose_api(flag, std::env::var(API_ENV).ok(), &kairos_socket());
    let state_dir = crate::identity::resolve_state_dir(
        state_dir,
        std::env::var(crate::identity::STATE_DIR_ENV).ok(),
    );
    Api::new(&url, readable_bearer_tokens(&state_dir)).map_err(|e| match e {
        ClientError::BadUrl(_) => usage(e),
        other => failure(other),
    })
}

fn network_id(flag: Option<&str>) -> String {
    choose_network_id(flag, std::env::var(NETWORK_ID_ENV).ok())
}

fn finish(result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err((message, code)) => {
            crate::errln!("error: {message}");
            ExitCode::from(code)
        }
    }
}

fn with_newline(text: &str) -> String {
    if text.ends_with('\n') {
        text.to_string()
    } else {
        format!("{text}\n")
    }
}
