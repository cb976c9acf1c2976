//! `GET /api/dns` and `POST /api/dns`, as edgevpn's: the records of the ledger's `dns` bucket
//! that the DNS service ([`crate::dns`]) answers from.
//!
//! - `GET`: `[{"Regex": "<expression>", "Records": {"A": "10.1.0.5", ...}}]` (edgevpn's
//!   `api/types.DNS`), in key order; types by name (miekg's `TypeToString`).
//! - `POST` with that object as its body: stores `dns/<Regex>` = `{"<type number>": "<text>"}`
//!   (edgevpn's `types.DNS` as Go marshals it) and answers `{"State": "Announcing"}`. Unlike
//!   edgevpn (which stores whatever it gets, an unknown type as type 0), an expression that does
//!   not compile, an unknown type or a record text that does not parse for its type is a 400:
//!   the record could never answer. `POST` is a write (it changes the ledger).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::http::{Response, Status};
use super::routes::Outcome;
use crate::cluster::Write;
use crate::dns::{DNS_BUCKET, wire};
use crate::ledger::{Ledger, MAX_KEY_LEN, edgevpn};

/// Most records in one `POST`.
pub const MAX_RECORDS_PER_NAME: usize = 16;

/// edgevpn's `api/types.DNS`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsEntry {
    /// The expression names are matched against.
    #[serde(rename = "Regex", alias = "regex")]
    pub regex: String,
    /// Record text by type name.
    #[serde(rename = "Records", alias = "records", default)]
    pub records: BTreeMap<String, String>,
}

/// `GET /api/dns`.
pub fn list(ledger: &Ledger) -> Response {
    let entries: Vec<DnsEntry> = ledger
        .bucket(DNS_BUCKET)
        .map(|(key, value)| {
            let text = edgevpn::text(&String::from_utf8_lossy(value));
            let by_number: BTreeMap<String, String> =
                serde_json::from_str(&text).unwrap_or_default();
            let records = by_number
                .into_iter()
                .map(|(number, text)| {
                    let name = number
                        .parse::<u16>()
                        .ok()
                        .and_then(wire::type_name)
                        .map_or(number, str::to_string);
                    (name, text)
                })
                .collect();
            DnsEntry {
                regex: key.to_string(),
                records,
            }
        })
        .collect();
    Response::json(Status::Ok, &entries)
}

/// `POST /api/dns`: the write that stores the record set in `body`.
pub fn announce(ledger: &Ledger, body: &[u8]) -> Result<Write, Response> {
    let bad = |message: String| Response::error(Status::BadRequest, &message);
    let entry: DnsEntry = serde_json::from_slice(body).map_err(|e| {
        bad(format!(
            "expected {{\"Regex\": ..., \"Records\": {{...}}}}: {e}"
        ))
    })?;
    if entry.regex.is_empty() || entry.regex.len() > MAX_KEY_LEN {
        return Err(bad(format!("Regex must be 1 to {MAX_KEY_LEN} bytes")));
    }
    if entry.regex.chars().any(char::is_control) {
        return Err(bad("Regex holds a control character".to_string()));
    }
    if let Err(e) = crate::dns::check_expression(&entry.regex) {
        return Err(bad(format!("Regex does not compile: {e}")));
    }
    if entry.records.is_empty() || entry.records.len() > MAX_RECORDS_PER_NAME {
        return Err(bad(format!(
            "Records must hold 1 to {MAX_RECORDS_PER_NAME} records"
        )));
    }
    let mut by_number = BTreeMap::new();
    for (name, text) in &entry.records {
        let number = wire::type_number(name).ok_or_else(|| {
            let known: Vec<&str> = wire::TYPE_NAMES.iter().map(|(n, _)| *n).collect();
            bad(format!(
                "record type {name:?} is not one of {}",
                known.join(", ")
            ))
        })?;
        if wire::rdata(number, text).is_none() {
            return Err(bad(format!("{name} record {text:?} does not parse")));
        }
        by_number.insert(number.to_string(), text.trim().to_string());
    }
    let value = serde_json::to_vec(&by_number).unwrap_or_default();
    if value.len() > ledger.limits().max_value_bytes {
        return Err(Response::error(
            Status::ContentTooLarge,
            "records over the ledger's limit",
        ));
    }
    Ok(Write::put(DNS_BUCKET, &entry.regex, value))
}

/// `POST /api/dns` as an [`Outcome`].
pub fn post(ledger: &Ledger, body: &[u8]) -> Outcome {
    match announce(ledger, body) {
        Ok(write) => {
            let unchanged = ledger.get(DNS_BUCKET, &write.key) == write.value.as_deref();
            super::routes::announcing(if unchanged { Vec::new() } else { vec![write] })
        }
        Err(response) => response.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;
    use crate::ledger::{Clock, Limits};

    fn apply(ledger: &mut Ledger, w: &Write) {
        let id = Identity::from_seed([9; 32]);
        let mut clock = Clock::new();
        ledger
            .put(
                &id,
                &mut clock,
                &w.bucket,
                &w.key,
                w.value.as_deref().unwrap(),
                1_700_000_000_000,
            )
            .unwrap();
    }

    #[test]
    fn posted_records_list_back_as_edgevpn_shows_them() {
        let mut l = Ledger::new(Limits::for_max_message_size(1 << 20));
        let body = br#"{"Regex":"^web\\.vpn\\.$","Records":{"A":"10.1.0.5","txt":"hi"}}"#;
        let w = announce(&l, body).unwrap();
        assert_eq!(w.key, r"^web\.vpn\.$");
        assert_eq!(
            w.value.as_deref(),
            Some(&br#"{"1":"10.1.0.5","16":"hi"}"#[..])
        );
        apply(&mut l, &w);
        let listed: serde_json::Value = serde_json::from_slice(&list(&l).body).unwrap();
        assert_eq!(
            listed,
            serde_json::json!([{"Regex": "^web\\.vpn\\.$", "Records": {"A": "10.1.0.5", "TXT": "hi"}}])
        );
        assert!(
            post(&l, body).writes.is_empty(),
            "the same records: nothing written"
        );
    }

    #[test]
    fn bad_record_sets_are_400() {
        let l = Ledger::new(Limits::for_max_message_size(1 << 20));
        for body in [
            &br#"not json"#[..],
            br#"{"Regex":"(open","Records":{"A":"10.1.0.5"}}"#,
            br#"{"Regex":"x","Records":{"BOGUS":"1"}}"#,
            br#"{"Regex":"x","Records":{"A":"not an address"}}"#,
            br#"{"Regex":"x","Records":{}}"#,
            br#"{"Regex":"","Records":{"A":"10.1.0.5"}}"#,
        ] {
            let outcome = post(&l, body);
            assert_eq!(
                outcome.response.status,
                Status::BadRequest,
                "{}",
                String::from_utf8_lossy(body)
            );
            assert!(outcome.writes.is_empty());
        }
    }
}
