//! One file's settings: only what the file sets (every field optional), read and checked with
//! messages pointing into that file; and how a later file overrides an earlier one, key by key
//! (lists replace, maps such as `env` merge entry by entry).
//!
//! `p2p.ha` is an alias of `p2p.auto.ha`: within one file `p2p.auto.ha` wins key by key, and the
//! result then overrides earlier files like any other key.

use crate::node::bootstrap::{self, BootstrapPeer};
use std::collections::BTreeMap;
use std::net::IpAddr;

use serde_yaml::Value;

use super::diag::{Ctx, Sourced};
use super::keypath::KeyPath;
use super::model::{LogLevel, Role};
use super::read::{self, boolean, count, text};
use super::schema;
use super::vpn_env::{self, EnvLayer};
use crate::token::NetworkToken;

/// Replaces `slot` with `later` when `later` is set.
pub(super) fn set<T>(slot: &mut Option<T>, later: Option<T>) {
    if later.is_some() {
        *slot = later;
    }
}

/// Everything one file sets in the blocks kairos-p2p reads.
#[derive(Default)]
pub(super) struct Layer {
    pub(super) p2p: P2pLayer,
    /// `kairos.network_token`; the inner `None` is an empty token.
    pub(super) kairos_token: Option<Sourced<Option<NetworkToken>>>,
    pub(super) kubevip: KubeVipLayer,
    pub(super) k3s: K3sLayer,
    pub(super) k3s_agent: K3sLayer,
}

/// `p2p`.
#[derive(Default)]
pub(super) struct P2pLayer {
    /// The inner `None` is an empty token (p2p off).
    pub(super) network_token: Option<Option<NetworkToken>>,
    pub(super) network_id: Option<String>,
    pub(super) role: Option<Role>,
    pub(super) disable_dht: Option<bool>,
    pub(super) bootstrap_peers: Option<Vec<BootstrapPeer>>,
    pub(super) minimum_nodes: Option<u32>,
    pub(super) dynamic_roles: Option<bool>,
    pub(super) liveness_timeout: Option<u32>,
    pub(super) dns: Option<bool>,
    pub(super) loglevel: Option<LogLevel>,
    pub(super) vpn_create: Option<bool>,
    pub(super) vpn_use: Option<Sourced<bool>>,
    pub(super) vpn_env: EnvLayer,
    pub(super) auto_enable: Option<bool>,
    pub(super) merge_window: Option<u32>,
    pub(super) ha: HaLayer,
}

/// `p2p.auto.ha` (or `p2p.ha`).
#[derive(Default)]
pub(super) struct HaLayer {
    pub(super) enable: Option<bool>,
    pub(super) master_nodes: Option<u32>,
    pub(super) external_db: Option<String>,
}

/// `kubevip`.
#[derive(Default)]
pub(super) struct KubeVipLayer {
    /// The inner `None` is an empty `eip`.
    pub(super) eip: Option<Option<IpAddr>>,
    pub(super) enable: Option<Sourced<bool>>,
    pub(super) interface: Option<String>,
    pub(super) manifest_url: Option<String>,
    pub(super) static_pod: Option<bool>,
    pub(super) version: Option<String>,
    pub(super) image: Option<String>,
}

/// `k3s` or `k3s-agent`.
#[derive(Default)]
pub(super) struct K3sLayer {
    pub(super) enabled: Option<bool>,
    pub(super) args: Option<Vec<String>>,
    pub(super) env: BTreeMap<String, String>,
    pub(super) replace_args: Option<bool>,
    pub(super) replace_env: Option<bool>,
    pub(super) embedded_registry: Option<bool>,
}

impl Layer {
    /// Reads one parsed file. Blocks other than ours are ignored (a warning when the name looks
    /// like a misspelling of ours).
    pub(super) fn read(ctx: &mut Ctx<'_>, doc: &Value) -> Layer {
        let mut layer = Layer::default();
        let root = KeyPath::default();
        let blocks = match doc {
            Value::Null => return layer,
            Value::Mapping(m) => m,
            other => {
                let found = read::describe(other);
                ctx.error(
                    &root,
                    format!("expected a mapping of blocks, found {found}"),
                );
                return layer;
            }
        };
        for (key, value) in blocks {
            let Value::String(key) = key else { continue };
            let path = root.key(key);
            match key.as_str() {
                "p2p" => layer.p2p = P2pLayer::read(ctx, value, &path),
                "kubevip" => layer.kubevip = KubeVipLayer::read(ctx, value, &path),
                "k3s" => layer.k3s = K3sLayer::read(ctx, value, &path),
                "k3s-agent" => layer.k3s_agent = K3sLayer::read(ctx, value, &path),
                "kairos" => layer.kairos_token = read_kairos(ctx, value, &path),
                "network_token" => ctx.warn(
                    &path,
                    "not read (by Kairos either): the token belongs in the p2p block, as \
                     p2p.network_token; without it P2P is off",
                ),
                _ => {
                    if let Some(s) = schema::suggest(key, schema::BLOCKS) {
                        if !schema::OTHER_BLOCKS.contains(&key.as_str()) {
                            ctx.warn(&path, format!("not read by kairos-p2p; did you mean {s}?"));
                        }
                    }
                }
            }
        }
        layer
    }

    /// Applies a later file over this one.
    pub(super) fn overlay(&mut self, later: Layer) {
        self.p2p.overlay(later.p2p);
        set(&mut self.kairos_token, later.kairos_token);
        self.kubevip.overlay(later.kubevip);
        self.k3s.overlay(later.k3s);
        self.k3s_agent.overlay(later.k3s_agent);
    }
}

/// A network token: decoded and checked; the inner `None` is an empty string.
fn token(ctx: &mut Ctx<'_>, v: &Value, path: &KeyPath) -> Option<Option<NetworkToken>> {
    let s = text(ctx, v, path)?;
    let s = s.trim();
    if s.is_empty() {
        ctx.warn(
            path,
            "empty: P2P is off here (the agent starts no VPN and no k3s, and exits); Kairos \
             refuses this configuration (\"No network token provided\"). Set a token \
             (kairos-p2p generate-token) or remove the key",
        );
        return Some(None);
    }
    match NetworkToken::decode(s) {
        Ok(t) => Some(Some(t)),
        Err(e) => {
            ctx.error(path, e.to_string());
            None
        }
    }
}

/// The legacy `kairos` block: only `network_token` is read; the block is shared with older
/// Kairos versions, so its other keys are warnings, not errors.
fn read_kairos(
    ctx: &mut Ctx<'_>,
    v: &Value,
    path: &KeyPath,
) -> Option<Sourced<Option<NetworkToken>>> {
    let mut out = None;
    for (key, value) in read::mapping(ctx, v, path) {
        let p = path.key(&key);
        if key == "network_token" {
            out = token(ctx, value, &p).map(|t| ctx.sourced(&p, t));
        } else if schema::KAIROS_LEGACY.contains(&key.as_str()) {
            ctx.warn(&p, format!("not read by kairos-p2p; use p2p.{key}"));
        } else {
            ctx.warn(&p, schema::unknown_key(&key, schema::KAIROS));
        }
    }
    out
}

fn unknown(ctx: &mut Ctx<'_>, path: &KeyPath, key: &str, known: &[&str]) {
    ctx.error(path, schema::unknown_key(key, known));
}

impl P2pLayer {
    fn read(ctx: &mut Ctx<'_>, v: &Value, path: &KeyPath) -> P2pLayer {
        let mut out = P2pLayer::default();
        let mut alias = HaLayer::default();
        for (key, value) in read::mapping(ctx, v, path) {
            let p = path.key(&key);
            match key.as_str() {
                "network_token" => out.network_token = token(ctx, value, &p),
                "network_id" => {
                    out.network_id = text(ctx, value, &p).and_then(|s| {
                        let checked = network_id(&s).map(|()| s);
                        ctx.check(&p, checked)
                    });
                }
                "role" => {
                    out.role = parsed(ctx, value, &p);
                    let spelled = text(ctx, value, &p).unwrap_or_default();
                    if out.role.is_some() && spelled.trim().starts_with("master/") {
                        ctx.warn(
                            &p,
                            format!(
                                "note: read as master: the election makes this node the \
                                 cluster-init master when there is none yet, else an HA master \
                                 (Kairos runs {} as given)",
                                read::quote(spelled.trim())
                            ),
                        );
                    }
                }
                "disable_dht" => out.disable_dht = boolean(ctx, value, &p),
                "bootstrap_peers" => {
                    out.bootstrap_peers = read::text_list(ctx, value, &p).map(|entries| {
                        entries
                            .iter()
                            .enumerate()
                            .filter_map(|(i, e)| {
                                let parsed = bootstrap::parse(e).map_err(|e| e.to_string());
                                ctx.check(&p.index(i), parsed)
                            })
                            .collect()
                    });
                }
                "minimum_nodes" => out.minimum_nodes = count(ctx, value, &p),
                "dynamic_roles" => out.dynamic_roles = boolean(ctx, value, &p),
                "liveness_timeout" => out.liveness_timeout = count(ctx, value, &p),
                "dns" => out.dns = boolean(ctx, value, &p),
                "loglevel" => out.loglevel = parsed(ctx, value, &p),
                "vpn" => out.read_vpn(ctx, value, &p),
                "auto" => {
                    for (key, value) in read::mapping(ctx, value, &p) {
                        let q = p.key(&key);
                        match key.as_str() {
                            "enable" => out.auto_enable = boolean(ctx, value, &q),
                            "merge_window" => out.merge_window = count(ctx, value, &q),
                            "ha" => out.ha = HaLayer::read(ctx, value, &q),
                            _ => unknown(ctx, &q, &key, schema::AUTO),
                        }
                    }
                }
                "ha" => {
                    alias = HaLayer::read(ctx, value, &p);
                    ctx.warn(
                        &p,
                        "note: Kairos reads only p2p.auto.ha and builds a single master from \
                         this config; kairos-p2p follows its intent (HA masters as asked). Write \
                         p2p.auto.ha for the same cluster under both",
                    );
                }
                _ => unknown(ctx, &p, &key, schema::P2P),
            }
        }
        out.ha.fill_from(alias);
        out
    }

    fn read_vpn(&mut self, ctx: &mut Ctx<'_>, v: &Value, path: &KeyPath) {
        for (key, value) in read::mapping(ctx, v, path) {
            let p = path.key(&key);
            match key.as_str() {
                "create" => self.vpn_create = boolean(ctx, value, &p),
                "use" => self.vpn_use = boolean(ctx, value, &p).map(|b| ctx.sourced(&p, b)),
                "env" => self.vpn_env = EnvLayer::read(ctx, value, &p),
                "auto" => ctx.warn(&p, "not read (by Kairos either): ignored"),
                _ => unknown(ctx, &p, &key, schema::VPN),
            }
        }
    }

    fn overlay(&mut self, later: P2pLayer) {
        set(&mut self.network_token, later.network_token);
        set(&mut self.network_id, later.network_id);
        set(&mut self.role, later.role);
        set(&mut self.disable_dht, later.disable_dht);
        set(&mut self.bootstrap_peers, later.bootstrap_peers);
        set(&mut self.minimum_nodes, later.minimum_nodes);
        set(&mut self.dynamic_roles, later.dynamic_roles);
        set(&mut self.liveness_timeout, later.liveness_timeout);
        set(&mut self.dns, later.dns);
        set(&mut self.loglevel, later.loglevel);
        set(&mut self.vpn_create, later.vpn_create);
        set(&mut self.vpn_use, later.vpn_use);
        self.vpn_env.overlay(later.vpn_env);
        set(&mut self.auto_enable, later.auto_enable);
        set(&mut self.merge_window, later.merge_window);
        self.ha.overlay(later.ha);
    }
}

/// A string value parsed with `FromStr` (role, log level).
fn parsed<T: std::str::FromStr<Err = String>>(
    ctx: &mut Ctx<'_>,
    v: &Value,
    path: &KeyPath,
) -> Option<T> {
    let s = text(ctx, v, path)?;
    ctx.check(path, s.parse())
}

/// The network id names a ledger bucket and appears in API paths: no `/`, blanks or control
/// characters, at most 64 bytes. Empty means the default.
fn network_id(s: &str) -> Result<(), String> {
    if s.len() > 64 {
        Err(format!("must be at most 64 bytes, found {} bytes", s.len()))
    } else if s.contains(|c: char| c == '/' || c.is_whitespace() || c.is_control()) {
        Err(format!(
            "must not contain '/', blanks or control characters, found {}",
            read::quote(s)
        ))
    } else {
        Ok(())
    }
}

impl HaLayer {
    fn read(ctx: &mut Ctx<'_>, v: &Value, path: &KeyPath) -> HaLayer {
        let mut out = HaLayer::default();
        for (key, value) in read::mapping(ctx, v, path) {
            let p = path.key(&key);
            match key.as_str() {
                "enable" => out.enable = boolean(ctx, value, &p),
                "master_nodes" => out.master_nodes = count(ctx, value, &p),
                "external_db" => out.external_db = read::line(ctx, value, &p),
                _ => unknown(ctx, &p, &key, schema::HA),
            }
        }
        out
    }

    /// Takes from `alias` what this one does not set (this one wins).
    fn fill_from(&mut self, alias: HaLayer) {
        self.enable = self.enable.or(alias.enable);
        self.master_nodes = self.master_nodes.or(alias.master_nodes);
        self.external_db = self.external_db.take().or(alias.external_db);
    }

    /// Takes from `later` what it sets (`later` wins).
    fn overlay(&mut self, later: HaLayer) {
        set(&mut self.enable, later.enable);
        set(&mut self.master_nodes, later.master_nodes);
        set(&mut self.external_db, later.external_db);
    }
}

impl KubeVipLayer {
    fn read(ctx: &mut Ctx<'_>, v: &Value, path: &KeyPath) -> KubeVipLayer {
        let mut out = KubeVipLayer::default();
        for (key, value) in read::mapping(ctx, v, path) {
            let p = path.key(&key);
            match key.as_str() {
                "eip" => {
                    out.eip = text(ctx, value, &p).and_then(|s| {
                        let ip = match s.trim() {
                            "" => Ok(None),
                            s => s.parse().map(Some).map_err(|_| {
                                format!("expected an IP address, found {}", read::quote(s))
                            }),
                        };
                        ctx.check(&p, ip)
                    });
                }
                "enable" => out.enable = boolean(ctx, value, &p).map(|b| ctx.sourced(&p, b)),
                "interface" => {
                    out.interface = text(ctx, value, &p).and_then(|s| {
                        if s.is_empty() {
                            Some(s)
                        } else {
                            ctx.check(&p, vpn_env::interface_name(&s))
                        }
                    });
                }
                "manifest_url" => {
                    out.manifest_url = text(ctx, value, &p).and_then(|s| {
                        let url = if s.is_empty()
                            || s.starts_with("http://")
                            || s.starts_with("https://")
                        {
                            Ok(s)
                        } else {
                            Err(format!(
                                "expected an http:// or https:// URL, found {}",
                                read::quote(&s)
                            ))
                        };
                        ctx.check(&p, url)
                    });
                }
                "static_pod" => out.static_pod = boolean(ctx, value, &p),
                "version" => out.version = read::line(ctx, value, &p),
                "image" => out.image = read::line(ctx, value, &p),
                _ => unknown(ctx, &p, &key, schema::KUBEVIP),
            }
        }
        out
    }

    fn overlay(&mut self, later: KubeVipLayer) {
        set(&mut self.eip, later.eip);
        set(&mut self.enable, later.enable);
        set(&mut self.interface, later.interface);
        set(&mut self.manifest_url, later.manifest_url);
        set(&mut self.static_pod, later.static_pod);
        set(&mut self.version, later.version);
        set(&mut self.image, later.image);
    }
}

impl K3sLayer {
    fn read(ctx: &mut Ctx<'_>, v: &Value, path: &KeyPath) -> K3sLayer {
        let mut out = K3sLayer::default();
        for (key, value) in read::mapping(ctx, v, path) {
            let p = path.key(&key);
            match key.as_str() {
                "enabled" => out.enabled = boolean(ctx, value, &p),
                "args" => out.args = read::text_list(ctx, value, &p),
                "env" => {
                    out.env = read::env_map(ctx, value, &p, read::line)
                        .into_iter()
                        .map(|e| (e.name, e.value))
                        .collect();
                }
                "replace_args" => out.replace_args = boolean(ctx, value, &p),
                "replace_env" => out.replace_env = boolean(ctx, value, &p),
                "embedded_registry" => out.embedded_registry = boolean(ctx, value, &p),
                _ => unknown(ctx, &p, &key, schema::K3S),
            }
        }
        out
    }

    fn overlay(&mut self, later: K3sLayer) {
        set(&mut self.enabled, later.enabled);
        set(&mut self.args, later.args);
        self.env.extend(later.env);
        set(&mut self.replace_args, later.replace_args);
        set(&mut self.replace_env, later.replace_env);
        set(&mut self.embedded_registry, later.embedded_registry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HostFacts;
    use crate::config::diag::{Diagnostics, FileText};
    use std::path::Path;

    /// Every key the schema lists is read (set to null: unset, so no value errors either).
    #[test]
    fn schema_lists_match_the_readers() {
        let block = |keys: &[&str]| {
            let entries: Vec<String> = keys.iter().map(|k| format!("{k:?}: null")).collect();
            format!("{{{}}}", entries.join(", "))
        };
        let yaml = format!(
            "p2p: {}\nkubevip: {}\nk3s: {}\nk3s-agent: {}\nkairos: {}\nextra: {}\n",
            block(schema::P2P),
            block(schema::KUBEVIP),
            block(schema::K3S),
            block(schema::K3S),
            block(schema::KAIROS),
            block(schema::BLOCKS),
        )
        .replace(
            "\"vpn\": null",
            &format!("\"vpn\": {}", block(schema::VPN)).replace(
                "\"env\": null",
                &format!("\"env\": {}", block(schema::VPN_ENV)),
            ),
        )
        .replace(
            "\"auto\": null",
            &format!("\"auto\": {}", block(schema::AUTO))
                .replace("\"ha\": null", &format!("\"ha\": {}", block(schema::HA))),
        )
        .replace("\"ha\": null", &format!("\"ha\": {}", block(schema::HA)));
        let doc: Value = serde_yaml::from_str(&yaml).unwrap();
        let mut diags = Diagnostics::default();
        let host = HostFacts::default();
        Layer::read(&mut Ctx::new(0, &mut diags, &host), &doc);
        let files = [FileText {
            path: Path::new("all.yaml"),
            text: Some(&yaml),
        }];
        // Only the note every `p2p.ha` block gets.
        let (errors, warnings) = diags.finish(&files);
        assert_eq!(errors, vec![], "{yaml}");
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("p2p.ha: note:"), "{warnings:?}");
    }
}
