//! The effective configuration as a cloud-config document: every modelled key with its resolved
//! value, secrets redacted. This is what `kairos-p2p validate` prints.
//!
//! Redacted: the network token (`"<redacted>"`), credentials in `external_db` and in
//! datastore-endpoint values (`mysql://<redacted>@tcp(db:3306)/k3s`), and the values of
//! environment variables and k3s flags whose name mentions a token, secret, password or key.
//! Without secrets, the output reads back as the same configuration.

use std::collections::BTreeMap;

use super::model::{Config, K3sConfig};

/// Shown instead of a secret.
const REDACTED: &str = "<redacted>";

impl Config {
    /// The effective configuration as a YAML document with a `#cloud-config` header and a
    /// comment listing the sources in order.
    pub fn render_effective(&self) -> String {
        let mut d = Doc::default();
        d.line(0, "#cloud-config");
        d.line(
            0,
            "# Effective kairos-p2p configuration: every key with its resolved value, secrets redacted.",
        );
        let sources: Vec<String> = self
            .sources
            .iter()
            .map(|p| quote(&p.display().to_string()))
            .collect();
        if sources.is_empty() {
            d.line(0, "# Sources: none (all defaults).");
        } else {
            d.line(
                0,
                &format!("# Sources, later override earlier: {}", sources.join(", ")),
            );
        }

        let p = &self.p2p;
        d.line(0, "p2p:");
        match p.network_token {
            Some(_) => d.kv(1, "network_token", &quote(REDACTED)),
            None => d.kv(1, "network_token", "\"\"  # not set: p2p is off"),
        }
        d.kv(1, "network_id", &quote(&p.network_id));
        d.kv(1, "role", &quote(p.role.as_str()));
        d.kv(1, "disable_dht", &p.disable_dht.to_string());
        let peers: Vec<String> = p
            .bootstrap_peers
            .iter()
            .map(|b| quote(&b.to_string()))
            .collect();
        d.kv(1, "bootstrap_peers", &format!("[{}]", peers.join(", ")));
        d.kv(1, "minimum_nodes", &p.minimum_nodes.to_string());
        d.kv(1, "dynamic_roles", &p.dynamic_roles.to_string());
        d.kv(1, "liveness_timeout", &p.liveness_timeout.to_string());
        d.kv(1, "dns", &p.dns.to_string());
        d.kv(1, "loglevel", &quote(p.loglevel.as_str()));
        d.line(1, "vpn:");
        d.kv(2, "create", &p.vpn.create.to_string());
        d.kv(2, "use", &p.vpn.use_vpn.to_string());
        d.line(2, "env:");
        let s = &p.vpn.settings;
        let address = quote(&s.address.to_string());
        if s.address_explicit {
            d.kv(3, "ADDRESS", &address);
        } else {
            d.kv(
                3,
                "ADDRESS",
                &format!("{address}  # default, not set explicitly"),
            );
        }
        d.kv(3, "IFACE", &quote(&s.iface));
        d.kv(3, "DHCP", &quote(&s.dhcp.to_string()));
        d.kv(3, "EDGEVPNMTU", &quote(&s.mtu.to_string()));
        d.kv(3, "EDGEVPNDHT", &quote(&s.dht.to_string()));
        d.kv(3, "EDGEVPNMDNS", &quote(&s.mdns.to_string()));
        d.kv(
            3,
            "EDGEVPNBOOTSTRAPPEERS",
            &quote(
                &s.bootstrap_peers
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            ),
        );
        d.kv(3, "APILISTEN", &quote(&s.api_listen.to_string()));
        match (s.dns_address, p.dns_listen()) {
            (Some(a), _) => d.kv(3, "DNSADDRESS", &quote(&a.to_string())),
            (None, Some(a)) => d.kv(3, "DNSADDRESS", &format!("\"\"  # p2p.dns: {a}")),
            (None, None) => d.kv(3, "DNSADDRESS", "\"\"  # no DNS service"),
        }
        d.kv(3, "DNSFORWARD", &quote(&s.dns_forward.to_string()));
        let servers: Vec<String> = s
            .dns_forward_servers
            .iter()
            .map(ToString::to_string)
            .collect();
        d.kv(3, "DNSFORWARDSERVER", &quote(&servers.join(",")));
        d.kv(3, "DNSCACHESIZE", &quote(&s.dns_cache_size.to_string()));
        if !s.extra.is_empty() {
            d.line(3, "# not used by kairos-p2p:");
            d.env_entries(3, &s.extra);
        }
        d.line(1, "auto:");
        d.kv(2, "enable", &p.auto.enable.to_string());
        d.kv(2, "merge_window", &p.auto.merge_window.to_string());
        d.line(2, "ha:");
        d.kv(3, "enable", &p.auto.ha.enable.to_string());
        d.kv(3, "master_nodes", &p.auto.ha.master_nodes.to_string());
        let db = p.auto.ha.external_db.as_deref().map(redact_dsn);
        d.kv(3, "external_db", &quote(db.as_deref().unwrap_or("")));

        let k = &self.kubevip;
        d.line(0, "kubevip:");
        d.kv(1, "enable", &k.enable.to_string());
        let eip = k.eip.map(|ip| ip.to_string()).unwrap_or_default();
        d.kv(1, "eip", &quote(&eip));
        d.kv(1, "interface", &quote(k.interface.as_deref().unwrap_or("")));
        d.kv(
            1,
            "manifest_url",
            &quote(k.manifest_url.as_deref().unwrap_or("")),
        );
        d.kv(1, "static_pod", &k.static_pod.to_string());
        d.kv(1, "version", &quote(k.version.as_deref().unwrap_or("")));
        d.kv(1, "image", &quote(&k.image));

        d.k3s("k3s", &self.k3s);
        d.k3s("k3s-agent", &self.k3s_agent);
        d.out
    }
}

#[derive(Default)]
struct Doc {
    out: String,
}

impl Doc {
    fn line(&mut self, indent: usize, text: &str) {
        for _ in 0..indent {
            self.out.push_str("  ");
        }
        self.out.push_str(text);
        self.out.push('\n');
    }

    fn kv(&mut self, indent: usize, key: &str, value: &str) {
        self.line(indent, &format!("{}: {value}", yaml_key(key)));
    }

    fn env_entries(&mut self, indent: usize, env: &BTreeMap<String, String>) {
        for (name, value) in env {
            self.kv(indent, name, &quote(&redact_value(name, value)));
        }
    }

    fn k3s(&mut self, name: &str, k: &K3sConfig) {
        self.line(0, &format!("{name}:"));
        self.kv(1, "enabled", &k.enabled.to_string());
        if k.args.is_empty() {
            self.kv(1, "args", "[]");
        } else {
            self.line(1, "args:");
            for arg in redact_args(&k.args) {
                self.line(2, &format!("- {}", quote(&arg)));
            }
        }
        if k.env.is_empty() {
            self.kv(1, "env", "{}");
        } else {
            self.line(1, "env:");
            self.env_entries(2, &k.env);
        }
        self.kv(1, "replace_args", &k.replace_args.to_string());
        self.kv(1, "replace_env", &k.replace_env.to_string());
        self.kv(1, "embedded_registry", &k.embedded_registry.to_string());
    }
}

/// A YAML double-quoted scalar: every string comes out as exactly one line, whatever it holds.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{feff}') => {
                out.push_str(&format!("\\u{:04x}", u32::from(c)));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A mapping key: plain when it is a simple identifier, quoted otherwise.
fn yaml_key(key: &str) -> String {
    let simple = key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if simple { key.to_owned() } else { quote(key) }
}

/// How a value must be hidden, judging by the name of its variable or flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Secret {
    /// The whole value.
    Whole,
    /// The credentials of a datastore endpoint.
    Dsn,
}

fn secret_kind(name: &str) -> Option<Secret> {
    let name = name.trim_start_matches('-').to_ascii_lowercase();
    if name == "t"
        || ["token", "secret", "password", "passwd", "key"]
            .iter()
            .any(|w| name.contains(w))
    {
        Some(Secret::Whole)
    } else if name.contains("datastore") {
        Some(Secret::Dsn)
    } else {
        None
    }
}

fn hide(kind: Secret, value: &str) -> String {
    match kind {
        Secret::Whole => REDACTED.to_owned(),
        Secret::Dsn => redact_dsn(value),
    }
}

pub(super) fn redact_value(name: &str, value: &str) -> String {
    match secret_kind(name) {
        Some(kind) => hide(kind, value),
        None => value.to_owned(),
    }
}

/// `--flag=value` and `--flag value` with secret values hidden.
pub(super) fn redact_args(args: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut pending = None;
    for arg in args {
        if let Some(kind) = pending.take() {
            out.push(hide(kind, arg));
            continue;
        }
        if !arg.starts_with('-') {
            out.push(arg.clone());
            continue;
        }
        match arg.split_once('=') {
            Some((flag, value)) => match secret_kind(flag) {
                Some(kind) => out.push(format!("{flag}={}", hide(kind, value))),
                None => out.push(arg.clone()),
            },
            None => {
                pending = secret_kind(arg);
                out.push(arg.clone());
            }
        }
    }
    out
}

/// A datastore endpoint with the credentials (everything before the last `@`, after the
/// scheme) replaced: `postgres://<redacted>@db:5432/k3s`, `<redacted>@tcp(db:3306)/k3s`.
pub(super) fn redact_dsn(dsn: &str) -> String {
    let Some(at) = dsn.rfind('@') else {
        return dsn.to_owned();
    };
    let start = match dsn.find("://") {
        Some(i) if i + 3 <= at => i + 3,
        _ => 0,
    };
    format!(
        "{}{REDACTED}{}",
        dsn.get(..start).unwrap_or(""),
        dsn.get(at..).unwrap_or("")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(
            quote("a\"b\\c\nd\u{1}\u{2028}é"),
            "\"a\\\"b\\\\c\\nd\\u0001\\u2028é\""
        );
        assert_eq!(yaml_key("ADDRESS"), "ADDRESS");
        assert_eq!(yaml_key("a: b"), "\"a: b\"");
        assert_eq!(yaml_key("1x"), "\"1x\"");
    }

    #[test]
    fn dsns() {
        assert_eq!(redact_dsn("external-db-string"), "external-db-string");
        assert_eq!(
            redact_dsn("postgres://user:pw@db:5432/k3s"),
            "postgres://<redacted>@db:5432/k3s"
        );
        assert_eq!(
            redact_dsn("user:p@ss@tcp(db:3306)/k3s"),
            "<redacted>@tcp(db:3306)/k3s"
        );
        assert_eq!(redact_dsn("a@b://c"), "<redacted>@b://c");
    }

    #[test]
    fn args_and_env() {
        let args: Vec<String> = [
            "--token=abc",
            "--node-name=x",
            "--agent-token",
            "def",
            "-t",
            "ghi",
            "--datastore-endpoint=mysql://u:p@tcp(h)/k",
            "positional",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            redact_args(&args),
            [
                "--token=<redacted>",
                "--node-name=x",
                "--agent-token",
                "<redacted>",
                "-t",
                "<redacted>",
                "--datastore-endpoint=mysql://<redacted>@tcp(h)/k",
                "positional"
            ]
        );
        assert_eq!(redact_value("K3S_TOKEN", "s3cret"), REDACTED);
        assert_eq!(redact_value("EDGEVPNTOKEN", "s3cret"), REDACTED);
        assert_eq!(
            redact_value("K3S_DATASTORE_ENDPOINT", "postgres://u:p@h/db"),
            "postgres://<redacted>@h/db"
        );
        assert_eq!(redact_value("K3S_NODE_NAME", "n1"), "n1");
    }
}
