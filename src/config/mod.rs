//! Kairos cloud-config: loading, merging, defaults and validation.
//!
//! [`load`] reads cloud-config files, later files overriding earlier ones key by key (mappings
//! merge, scalars and lists replace), reads the blocks kairos-p2p uses (`p2p`, `kubevip`, `k3s`,
//! `k3s-agent` and the legacy `kairos`), checks every value and returns a typed [`Config`] with
//! every default resolved, or every problem found ([`ConfigErrors`]), each naming the file, the
//! line when it can be located, and the key path. Other top-level blocks (`install`, `users`,
//! `stages`, `hostname`, ...) belong to the OS and are ignored, templates in them included.
//! [`Config::render_effective`] prints the result.
//!
//! Rules where Kairos leaves room:
//! - Every file is checked on its own, even where a later file overrides the value.
//! - A key without a value (`key:` / `key: ~`) counts as unset; an empty string sets the default
//!   (`network_id: ""` is `kairos`, `network_token: ""` turns p2p off, with a warning: Kairos
//!   refuses it). A top-level `network_token` (outside `p2p`) is a warning.
//! - An empty file, or one with only comments such as `#cloud-config`, is an empty
//!   configuration, not an error. Files named explicitly need no `#cloud-config` header.
//! - Unknown keys inside our blocks are errors (with the closest known key when one is close);
//!   unknown keys in the legacy `kairos` block and unused `p2p.vpn.env` variables are warnings.
//! - Go-template expressions (see `template.rs` for the subset) are expanded, with the
//!   [`HostFacts`] given, in every string value kairos-p2p reads, before it is checked.
//! - `kairos.network_token` is used when `p2p.network_token` is unset or empty after merging.
//! - `p2p.ha` is an alias of `p2p.auto.ha`: in one file `p2p.auto.ha` wins key by key; a note
//!   says Kairos reads only `p2p.auto.ha`. `p2p.vpn.auto` is ignored with a warning.
//! - `kubevip.eip` must be an IP address; `kubevip.manifest_url` an http(s) URL;
//!   `kubevip.enable: true` without an `eip` is an error.
//! - `p2p.network_id` may not contain `/`, blanks or control characters (it appears in API
//!   paths); at most 64 bytes.
//! - Values: strings also take numbers and booleans; booleans take YAML booleans or the YAML 1.1
//!   words y/yes/on, n/no/off (as Kairos' yaml.v3 does; `"true"` in quotes is a string, an
//!   error, as in Kairos; after a template any of the words); integers must be YAML integers
//!   (`"2"` is a string, an error); `role` is lower case (`master/clusterinit` and `master/ha`
//!   read as `master`, with a note), `loglevel` is case-insensitive. Values bound for k3s or
//!   KubeVIP (args, env, `external_db`, image, version) may not contain control characters.
//! - `p2p.vpn.env` (see [`VpnSettings`]): `DHCP` defaults to true unless `ADDRESS` is set;
//!   `ADDRESS` needs a prefix of /8 to /30; `EDGEVPNMTU` 576 to 9000; `APILISTEN` must be a
//!   loopback address (default `127.0.0.1:8080`; the API is plain HTTP, see `api::trust`);
//!   `p2p.disable_dht: true` turns the DHT off whatever `EDGEVPNDHT` says.
//! - Files larger than [`MAX_FILE_SIZE`] and files that are not UTF-8 are errors; at most 50
//!   errors (and 50 warnings) are listed per file, and one error per key. A pipe or FIFO must
//!   deliver its whole text within [`MAX_PIPE_WAIT`].
//! - Every file's YAML is checked against [`budget::CONFIG_BUDGET`] (nesting depth, nodes and
//!   text once aliases are expanded) before it is loaded: alias bombs and deep nesting are errors
//!   found in milliseconds, in a few MB.

pub mod budget;
mod diag;
mod effective;
mod error;
mod keypath;
mod layer;
mod locate;
mod model;
mod read;
mod schema;
mod sources;
mod template;
mod vpn_env;

use std::path::{Path, PathBuf};

use serde_yaml::Value;

use diag::{Ctx, Diagnostics, FileText};
use keypath::KeyPath;
use layer::Layer;
use sources::SourceError;

pub use error::{ConfigError, ConfigErrors};
pub use model::{
    AutoConfig, Config, DEFAULT_KUBEVIP_IMAGE, DEFAULT_LIVENESS_TIMEOUT_SECS,
    DEFAULT_MERGE_WINDOW_SECS, DEFAULT_MINIMUM_NODES, DEFAULT_NETWORK_ID, HaConfig, K3sConfig,
    KubeVipConfig, LogLevel, P2pConfig, Role, VpnConfig,
};
pub use sources::{DEFAULT_DIRS, MAX_FILE_SIZE, MAX_PIPE_WAIT, default_sources, sources_in};
pub use vpn_env::{
    DEFAULT_ADDRESS, DEFAULT_API_LISTEN, DEFAULT_IFACE, DEFAULT_MTU, Ipv4Cidr, MTU_RANGE,
    PREFIX_RANGE, VpnSettings,
};

/// Facts about this machine that templates may use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFacts {
    /// `.MachineID`: the contents of /etc/machine-id.
    pub machine_id: String,
    /// `.Hostname`: the host name.
    pub hostname: String,
}

/// Reads and merges the cloud-config files at `paths`, in order.
pub fn load(paths: &[PathBuf], host: &HostFacts) -> Result<Config, ConfigErrors> {
    let texts: Vec<Result<String, SourceError>> =
        paths.iter().map(|p| sources::read_source(p)).collect();
    let texts: Vec<Result<&str, &SourceError>> = texts.iter().map(Result::as_deref).collect();
    build(paths.to_vec(), &texts, host)
}

/// Like [`load`], from texts in memory: `(file name, text)` pairs, in order.
pub fn parse(sources: &[(&Path, &str)], host: &HostFacts) -> Result<Config, ConfigErrors> {
    let paths = sources.iter().map(|(p, _)| p.to_path_buf()).collect();
    let texts: Vec<Result<&str, &SourceError>> = sources.iter().map(|(_, t)| Ok(*t)).collect();
    build(paths, &texts, host)
}

/// Like [`load`], where some sources were read already (`validate URL` downloads them): a
/// `(name, None)` is read from the file `name`, a `(name, Some(text))` is `text`, named `name`.
pub fn load_with_texts(
    sources: &[(PathBuf, Option<String>)],
    host: &HostFacts,
) -> Result<Config, ConfigErrors> {
    let texts: Vec<Result<String, SourceError>> = sources
        .iter()
        .map(|(path, text)| match text {
            Some(text) => Ok(text.clone()),
            None => sources::read_source(path),
        })
        .collect();
    let texts: Vec<Result<&str, &SourceError>> = texts.iter().map(Result::as_deref).collect();
    build(
        sources.iter().map(|(p, _)| p.clone()).collect(),
        &texts,
        host,
    )
}

fn build(
    paths: Vec<PathBuf>,
    texts: &[Result<&str, &SourceError>],
    host: &HostFacts,
) -> Result<Config, ConfigErrors> {
    let mut diags = Diagnostics::default();
    let mut merged = Layer::default();
    for (i, text) in texts.iter().enumerate() {
        match text {
            Ok(text) => merged.overlay(parse_file(&mut Ctx::new(i, &mut diags, host), text)),
            Err(e) => diags.file_error(i, e.line, e.message.clone()),
        }
    }
    let mut config = model::resolve(merged, paths, &mut diags);
    let files: Vec<FileText<'_>> = config
        .sources
        .iter()
        .zip(texts)
        .map(|(path, text)| FileText {
            path,
            text: text.ok(),
        })
        .collect();
    let (errors, warnings) = diags.finish(&files);
    if errors.is_empty() {
        config.warnings = warnings;
        Ok(config)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// One file's settings.
fn parse_file(ctx: &mut Ctx<'_>, text: &str) -> Layer {
    let root = KeyPath::default();
    if let Err(e) = budget::check(text.as_bytes(), budget::CONFIG_BUDGET) {
        ctx.error_at_line(e.line(), format!("not accepted: {e}"));
        return Layer::default();
    }
    let mut doc: Value = match serde_yaml::from_str(text) {
        Ok(doc) => doc,
        Err(e) => {
            ctx.error(&root, format!("not valid YAML: {e}"));
            return Layer::default();
        }
    };
    if let Err(e) = doc.apply_merge() {
        ctx.error(&root, format!("not valid YAML: {e}"));
        return Layer::default();
    }
    Layer::read(ctx, &doc)
}
