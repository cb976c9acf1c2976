//! The client commands: fetch from the API, hand over to the pure parts, print.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Display;
use std::process::ExitCode;

use super::args::{GetKubeconfigArgs, RoleArgs, RoleCommand, StatusArgs};
use super::client::{Api, ClientError, segment};
use super::kubeconfig::{self, KubeconfigError};
use super::roles;
use super::status::{self, Bandwidth, Machine, Node, Summary};
use super::{EXIT_FAILURE, EXIT_USAGE};
use crate::ledger::{edgevpn, names};

/// `get-kubeconfig`.
pub fn get_kubeconfig(args: &GetKubeconfigArgs) -> ExitCode {
    let bucket = names::network_bucket(&args.network_id);
    let result = connect(&args.api).and_then(|api| {
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
pub fn role(args: &RoleArgs) -> ExitCode {
    let result = match &args.command {
        RoleCommand::List(list) => connect(&list.api).and_then(|api| {
            let bucket = names::network_bucket(&list.network_id);
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
                let api = connect(&set.api)?;
                let bucket = names::network_bucket(&set.network_id);
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
pub fn status(args: &StatusArgs) -> ExitCode {
    let result = connect(&args.api).and_then(|api| {
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

fn connect(url: &str) -> Result<Api, Failure> {
    Api::new(url).map_err(|e| match e {
        ClientError::BadUrl(_) => usage(e),
        other => failure(other),
    })
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
