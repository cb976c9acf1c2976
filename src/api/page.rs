//! The status page served at `GET /`: one self-contained HTML file (inline CSS and script, no
//! external assets) that polls `api/summary`, `api/machines`, `api/nodes` and `api/metrics`
//! every 2 s (URLs relative to the page, so it works through any listen address or proxy prefix)
//! and shows this node and its peers. Below 40rem wide each peer is a block of labelled cells.
//! When a poll fails the page says `API unreachable (...)` in `status` and dims the last data it
//! showed.
//!
//! Stable element ids for tests: `node` (this node; fields `node-id`, `node-hostname`,
//! `node-uuid`, `node-role`, `node-k3s`, `node-address`, `node-network`, `node-version`, `node-uptime`,
//! `node-peers`, `node-traffic`), `peers` (the table; one `tr` per peer in `peers-body`, classed
//! `peer online` or `peer offline`, with `data-peer` set to the full peer id and cells classed
//! `hostname` (with a `uuid` line), `peer-id` (shortened; the full id in `title`), `vpn-address`,
//! `role`, `state` (`online` or `offline`, in a span classed `yes` or `no`), `link`
//! (direct/relayed and RTT), `traffic-in`, `traffic-out`, `addresses`; each cell's text is in a
//! `span`), `peers-empty` (shown while there are no peers) and `status` (last update, or the
//! error; class `ok` or `err`).

use super::http::{CONTENT_TYPE_HTML, Response};

/// The page.
pub const STATUS_PAGE: &str = include_str!("status.html");

/// The page as a response.
#[must_use]
pub fn status_page() -> Response {
    Response::content(CONTENT_TYPE_HTML, STATUS_PAGE.as_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_is_small_and_self_contained() {
        assert!(STATUS_PAGE.len() < 20 * 1024, "{} bytes", STATUS_PAGE.len());
        assert!(STATUS_PAGE.starts_with("<!doctype html>"));
        for external in ["http://", "https://", "src=", "href=", "@import", "url("] {
            assert!(
                !STATUS_PAGE.contains(external),
                "external reference {external}"
            );
        }
        // Untrusted ledger data (hostnames, roles) only ever goes through textContent.
        assert!(!STATUS_PAGE.contains("innerHTML"));
        assert!(!STATUS_PAGE.contains("insertAdjacentHTML"));
    }

    #[test]
    fn page_has_the_stable_ids_and_polls_the_api() {
        for id in [
            "id=\"node\"",
            "id=\"node-id\"",
            "id=\"node-hostname\"",
            "id=\"node-uuid\"",
            "id=\"node-k3s\"",
            "id=\"node-role\"",
            "id=\"node-address\"",
            "id=\"node-network\"",
            "id=\"node-version\"",
            "id=\"node-uptime\"",
            "id=\"node-peers\"",
            "id=\"node-traffic\"",
            "id=\"peers\"",
            "id=\"peers-body\"",
            "id=\"peers-empty\"",
            "id=\"status\"",
            "id=\"alarm\"",
            "SecondMasters",
        ] {
            assert!(STATUS_PAGE.contains(id), "missing {id}");
        }
        // Relative to the page, not to the origin's root.
        for endpoint in [
            "'api/summary'",
            "'api/machines'",
            "'api/nodes'",
            "'api/metrics'",
        ] {
            assert!(STATUS_PAGE.contains(endpoint), "missing {endpoint}");
        }
        assert!(STATUS_PAGE.contains("2000"));
        assert!(STATUS_PAGE.contains("API unreachable"));
    }

    #[test]
    fn page_response_is_html() {
        let response = status_page();
        assert_eq!(response.content_type, CONTENT_TYPE_HTML);
        assert_eq!(response.body, STATUS_PAGE.as_bytes());
    }
}
