//! Small text downloads over http(s), bounded in size and time: `validate URL` and
//! `kubevip.manifest_url`.
//!
//! TLS is rustls with ring (already in the binary for QUIC). Servers are verified against the
//! system's CA bundle: `$SSL_CERT_FILE` when set, else the first of [`CA_BUNDLES`] that exists,
//! read once per download (at most [`MAX_CA_BUNDLE_BYTES`]). No certificates are built into
//! the binary. Redirects are followed up to [`MAX_REDIRECTS`] times, http to https included;
//! proxies come from the usual environment variables (`HTTPS_PROXY`, `NO_PROXY`...).

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig, TlsProvider};

/// Where Linux distributions keep their CA bundle, tried in order (Debian/Ubuntu/Alpine/Arch,
/// Fedora/RHEL, openSUSE, the RHEL extracted one, Alpine/BSD).
pub const CA_BUNDLES: [&str; 5] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/cert.pem",
];
/// The environment variable naming another CA bundle (OpenSSL's convention).
pub const CA_BUNDLE_ENV: &str = "SSL_CERT_FILE";
/// Largest CA bundle read (a distribution's full bundle is about 200 KiB).
pub const MAX_CA_BUNDLE_BYTES: u64 = 4 * 1024 * 1024;
/// Redirects followed at most.
pub const MAX_REDIRECTS: u32 = 5;

/// The bounds of one download.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest body accepted, in bytes.
    pub max_bytes: u64,
    /// Time allowed for the whole download: resolving, connecting, TLS, redirects, body.
    pub timeout: Duration,
}

/// Whether `text` is an http(s) URL (the scheme in any case).
pub fn is_url(text: &str) -> bool {
    let lower = text.get(..8).unwrap_or(text).to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

/// The body of `url` as UTF-8 text, or why not (a message that names the URL).
pub fn text(url: &str, limits: Limits) -> Result<String, String> {
    if !is_url(url) {
        return Err(format!(
            "{url}: only http:// and https:// URLs can be downloaded"
        ));
    }
    let roots = system_roots();
    let tls = TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .root_certs(RootCerts::Specific(Arc::new(
            roots.as_ref().map(|(_, c)| c.clone()).unwrap_or_default(),
        )))
        .build();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(limits.timeout))
        .max_redirects(MAX_REDIRECTS)
        .http_status_as_error(false)
        .tls_config(tls)
        .build()
        .into();
    let mut response = agent.get(url).call().map_err(|e| {
        let mut message = format!("cannot download {url}: {e}");
        // rustls' verdicts come wrapped in io errors: say which roots were used.
        if message.contains("certificate") {
            match &roots {
                Ok((path, certs)) => message.push_str(&format!(
                    " (server certificates are checked against the {} CA certificates of {})",
                    certs.len(),
                    path.display()
                )),
                Err(why) => message.push_str(&format!(" ({why})")),
            }
        }
        message
    })?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!(
            "cannot download {url}: the server answered {status}"
        ));
    }
    response
        .body_mut()
        .with_config()
        .limit(limits.max_bytes)
        .read_to_string()
        .map_err(|e| match e {
            ureq::Error::BodyExceedsLimit(_) => format!(
                "cannot download {url}: larger than the {} byte limit",
                limits.max_bytes
            ),
            other => format!("cannot read {url}: {other}"),
        })
}

/// The system's CA certificates and the file they came from, or why there are none.
fn system_roots() -> Result<(PathBuf, Vec<Certificate<'static>>), String> {
    let path = match std::env::var_os(CA_BUNDLE_ENV) {
        Some(path) => PathBuf::from(path),
        None => CA_BUNDLES
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .ok_or_else(|| {
                format!(
                    "no CA bundle found in {}; install ca-certificates or set {CA_BUNDLE_ENV}",
                    CA_BUNDLES.join(", ")
                )
            })?,
    };
    let certs = read_bundle(&path).map_err(|e| format!("CA bundle {}: {e}", path.display()))?;
    Ok((path, certs))
}

fn read_bundle(path: &Path) -> Result<Vec<Certificate<'static>>, String> {
    let mut pem = Vec::new();
    File::open(path)
        .and_then(|f| f.take(MAX_CA_BUNDLE_BYTES + 1).read_to_end(&mut pem))
        .map_err(|e| e.to_string())?;
    if pem.len() as u64 > MAX_CA_BUNDLE_BYTES {
        return Err(format!("larger than the {MAX_CA_BUNDLE_BYTES} byte limit"));
    }
    let certs: Vec<Certificate<'static>> = ureq::tls::parse_pem(&pem)
        .filter_map(|item| match item {
            Ok(PemItem::Certificate(c)) => Some(c),
            _ => None,
        })
        .collect();
    if certs.is_empty() {
        return Err("no PEM certificate in it".to_string());
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_http_or_https_only() {
        for url in ["http://a/b", "HTTPS://a", "https://10.0.0.1:8443/x.yaml"] {
            assert!(is_url(url), "{url}");
        }
        for text in [
            "/oem/a.yaml",
            "ftp://a/b",
            "file:///etc/x",
            "http:/a",
            "",
            "h",
        ] {
            assert!(!is_url(text), "{text}");
        }
        let limits = Limits {
            max_bytes: 10,
            timeout: Duration::from_secs(1),
        };
        assert!(text("ftp://x/y", limits).unwrap_err().contains("only http"));
    }

    #[test]
    fn a_bundle_without_certificates_is_refused() {
        let dir = std::env::temp_dir().join(format!("kairos-p2p-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("empty.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        assert!(
            read_bundle(&path)
                .unwrap_err()
                .contains("no PEM certificate")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
