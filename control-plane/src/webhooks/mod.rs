//! Webhooks (SPEC §9): receivers that get every matching event of the
//! durable event log as an HTTP POST, signed with HMAC-SHA256, in sequence
//! order, at least once, retried with backoff for up to
//! `webhook_retry_for`.
//!
//! This module is the pure part: what a valid webhook is
//! ([`WebhookSpec::parse`], including the rule that a receiver may not be
//! the control plane's own gRPC or admin port), which events match, the
//! bodies (the §4 event JSON or a Slack message), the signature and the
//! backoff schedule. [`client`] sends one delivery; [`dispatch`] runs one
//! delivery task per webhook from the persisted cursor, on the leader.

pub mod client;
pub mod dispatch;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hmac::{KeyInit, Mac};
use hotswap_common::model::EventView;
use hotswap_common::timefmt::rfc3339_from_ms;

use crate::events::Event;

/// Longest URL accepted.
const MAX_URL_BYTES: usize = 2048;
/// Most kinds one webhook may filter on.
const MAX_KINDS: usize = 32;
/// Longest kind or prefix.
const MAX_KIND_BYTES: usize = 128;
/// Largest secret: HMAC keys beyond the hash's block size are hashed
/// first anyway.
const MAX_SECRET_BYTES: usize = 4096;
/// Largest CA bundle (the request must fit the 256 KiB message limit).
const MAX_CA_BYTES: usize = 128 * 1024;

/// Why a webhook cannot be created as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    #[error("url {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("kind {kind:?}: {reason}")]
    Kind { kind: String, reason: String },
    #[error("format {0:?} is not json or slack")]
    Format(String),
    #[error("secret: {0}")]
    Secret(String),
    #[error("ca file: {0}")]
    Ca(String),
    #[error(
        "url {url:?} points at this control plane's own {which} port ({addr}); a webhook receiver must be another service"
    )]
    OwnPort {
        url: String,
        which: &'static str,
        addr: SocketAddr,
    },
}

/// How deliveries are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The SPEC §4 event JSON, as `hotswapctl -o json events` prints it.
    Json,
    /// A Slack-compatible `{"text": ...}` message.
    Slack,
}

impl Format {
    pub fn parse(text: &str) -> Result<Self, WebhookError> {
        match text {
            "" | "json" => Ok(Format::Json),
            "slack" => Ok(Format::Slack),
            other => Err(WebhookError::Format(other.to_string())),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Slack => "slack",
        }
    }
}

/// The control plane's own listeners, which no webhook may target: a
/// receiver URL on them would have the control plane call itself (SSRF).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwnPorts {
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
}

impl OwnPorts {
    /// Which of our listeners `addr` would reach, if any: the same port on
    /// a loopback, unspecified or local address (or the exact address a
    /// listener is bound to).
    ///
    /// Any address of this host counts, whatever the listener is bound to:
    /// a listener on `0.0.0.0` answers on all of them, and refusing a
    /// little more than reaches us is the safe side.
    pub fn reached_by(&self, addr: SocketAddr) -> Option<(&'static str, SocketAddr)> {
        [("gRPC", self.grpc), ("admin", self.admin)]
            .into_iter()
            .find(|(_, own)| {
                own.port() == addr.port() && (own.ip() == addr.ip() || is_own_address(addr.ip()))
            })
    }
}

/// Whether `ip` is this host's: loopback, unspecified (which connects to
/// the host itself), or an address of one of its interfaces (which a
/// socket can bind to).
pub fn is_own_address(ip: IpAddr) -> bool {
    if ip.is_loopback() || ip.is_unspecified() {
        return true;
    }
    if let IpAddr::V6(v6) = ip
        && let Some(v4) = v6.to_ipv4_mapped()
    {
        return is_own_address(IpAddr::V4(v4));
    }
    // Binding succeeds only for an address this host has.
    std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// A webhook as validated from an operator's request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookSpec {
    pub url: reqwest::Url,
    pub kinds: Vec<String>,
    pub format: Format,
    pub secret: String,
    pub ca_pem: String,
}

impl WebhookSpec {
    /// Check every field; the error names the field and why. The URL's host
    /// is resolved here to refuse one that reaches our own ports.
    pub async fn parse(
        url: &str,
        kinds: Vec<String>,
        format: &str,
        secret: String,
        ca_pem: String,
        own: &OwnPorts,
    ) -> Result<Self, WebhookError> {
        let url = parse_url(url)?;
        for kind in &kinds {
            check_kind(kind)?;
        }
        if kinds.len() > MAX_KINDS {
            return Err(WebhookError::Kind {
                kind: kinds.join(","),
                reason: format!("at most {MAX_KINDS} kinds per webhook"),
            });
        }
        let format = Format::parse(format)?;
        if secret.len() > MAX_SECRET_BYTES {
            return Err(WebhookError::Secret(format!(
                "{} bytes; the limit is {MAX_SECRET_BYTES}",
                secret.len()
            )));
        }
        if !ca_pem.is_empty() {
            if url.scheme() != "https" {
                return Err(WebhookError::Ca(
                    "a CA only applies to an https:// url".into(),
                ));
            }
            if ca_pem.len() > MAX_CA_BYTES {
                return Err(WebhookError::Ca(format!(
                    "{} bytes; the limit is {MAX_CA_BYTES}",
                    ca_pem.len()
                )));
            }
            client::roots_from_pem(&ca_pem)?;
        }
        check_not_own(&url, own).await?;
        Ok(Self {
            url,
            kinds: dedup(kinds),
            format,
            secret,
            ca_pem,
        })
    }
}

fn dedup(mut kinds: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::BTreeSet::new();
    kinds.retain(|k| seen.insert(k.clone()));
    kinds
}

/// An absolute http:// or https:// URL with a host.
pub fn parse_url(text: &str) -> Result<reqwest::Url, WebhookError> {
    let refuse = |reason: &str| WebhookError::Url {
        url: text.to_string(),
        reason: reason.to_string(),
    };
    if text.is_empty() {
        return Err(refuse("is empty"));
    }
    if text.len() > MAX_URL_BYTES {
        return Err(refuse(&format!("longer than {MAX_URL_BYTES} bytes")));
    }
    let url = reqwest::Url::parse(text).map_err(|e| refuse(&e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(refuse("the scheme must be http or https"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(refuse("has no host"));
    }
    if url.fragment().is_some() {
        return Err(refuse("may not have a #fragment"));
    }
    Ok(url)
}

/// Refuse a URL whose host (an address, or every address it resolves
/// to) reaches one of our own listeners on the URL's port.
pub async fn check_not_own(url: &reqwest::Url, own: &OwnPorts) -> Result<(), WebhookError> {
    let port = url.port_or_known_default().unwrap_or(80);
    // IPv6 literals come bracketed.
    let host = url
        .host_str()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        // A name that does not resolve now may later: it is checked again
        // at every connection (see `client`).
        Err(_) => tokio::net::lookup_host((host.as_str(), port))
            .await
            .map(Iterator::collect)
            .unwrap_or_default(),
    };
    for addr in addrs {
        if let Some((which, own_addr)) = own.reached_by(addr) {
            return Err(WebhookError::OwnPort {
                url: url.to_string(),
                which,
                addr: own_addr,
            });
        }
    }
    Ok(())
}

/// A kind or kind prefix: dotted lowercase words.
fn check_kind(kind: &str) -> Result<(), WebhookError> {
    let refuse = |reason: &str| WebhookError::Kind {
        kind: kind.to_string(),
        reason: reason.to_string(),
    };
    if kind.is_empty() {
        return Err(refuse("is empty"));
    }
    if kind.len() > MAX_KIND_BYTES {
        return Err(refuse(&format!("longer than {MAX_KIND_BYTES} bytes")));
    }
    if !kind
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
    {
        return Err(refuse(
            "may hold only lowercase letters, digits, '.', '_' and '-' (e.g. deployment or deployment.finished)",
        ));
    }
    if kind.starts_with('.') || kind.contains("..") {
        return Err(refuse("has an empty dotted part"));
    }
    Ok(())
}

/// Whether an event of `kind` goes to a webhook filtering on `kinds`: no
/// kinds match everything; a kind matches itself and the kinds under it
/// (`deployment` and `deployment.` both match `deployment.finished`, not
/// `deployments.x`).
pub fn kind_matches(kinds: &[String], kind: &str) -> bool {
    kinds.is_empty()
        || kinds.iter().any(|want| {
            let want = want.strip_suffix('.').unwrap_or(want);
            kind == want
                || kind
                    .strip_prefix(want)
                    .is_some_and(|rest| rest.starts_with('.'))
        })
}

/// The SPEC §4 view of an event, field for field what `events -o json`
/// prints (absent fields null).
pub fn event_view(event: &Event) -> EventView {
    let present = |field: &Option<String>| field.clone().filter(|s| !s.is_empty());
    EventView {
        seq: event.seq,
        time: Some(rfc3339_from_ms(event.time_ms)),
        kind: event.kind.clone(),
        deployment_id: present(&event.deployment_id),
        node: present(&event.node),
        module: present(&event.module),
        version: present(&event.version),
        message: event.message.clone(),
    }
}

/// Slack's three characters that need escaping in message text.
fn slack_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// One line for a person: kind, what it concerns, the message, the seq.
pub fn slack_text(event: &Event) -> String {
    let mut text = format!("*{}*", slack_escape(&event.kind));
    if let Some(module) = event.module.as_deref().filter(|m| !m.is_empty()) {
        match event.version.as_deref().filter(|v| !v.is_empty()) {
            Some(version) => text.push_str(&format!(
                " {}@{}",
                slack_escape(module),
                slack_escape(version)
            )),
            None => text.push_str(&format!(" {}", slack_escape(module))),
        }
    }
    if let Some(node) = event.node.as_deref().filter(|n| !n.is_empty()) {
        text.push_str(&format!(" on {}", slack_escape(node)));
    }
    if let Some(id) = event.deployment_id.as_deref().filter(|d| !d.is_empty()) {
        text.push_str(&format!(" (deployment {})", slack_escape(id)));
    }
    if !event.message.is_empty() {
        text.push_str(&format!(": {}", slack_escape(&event.message)));
    }
    text.push_str(&format!(" [seq {}]", event.seq));
    text
}

/// The body of one delivery.
pub fn body(event: &Event, format: Format) -> Vec<u8> {
    let value = match format {
        Format::Json => serde_json::to_value(event_view(event)).unwrap_or_default(),
        Format::Slack => serde_json::json!({ "text": slack_text(event) }),
    };
    serde_json::to_vec(&value).unwrap_or_default()
}

/// `sha256=HEX`: HMAC-SHA256 of the exact body bytes under the secret.
pub fn signature(secret: &str, body: &[u8]) -> String {
    // HMAC takes a key of any length, so this cannot fail.
    let mut mac = match hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(mac) => mac,
        Err(_) => return String::new(),
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The first pause between attempts at one delivery.
pub const BACKOFF_INITIAL: Duration = Duration::from_millis(500);

/// The ceiling of the pause before attempt `attempt + 1` after `attempt`
/// failures (1-based): doubling from [`BACKOFF_INITIAL`], never above
/// `max`. Non-decreasing in `attempt`.
pub fn backoff_cap(attempt: u32, max: Duration) -> Duration {
    let doublings = attempt.saturating_sub(1).min(30);
    BACKOFF_INITIAL
        .saturating_mul(1u32 << doublings)
        .min(max)
        .max(Duration::from_millis(1).min(max))
}

/// The pause itself: "equal jitter", between half the cap and the cap, so
/// receivers that come back are not hit by every webhook at once and the
/// schedule still grows. `unit` is a random number in [0, 1).
pub fn backoff_delay(attempt: u32, max: Duration, unit: f64) -> Duration {
    let cap = backoff_cap(attempt, max);
    let unit = if unit.is_finite() {
        unit.clamp(0.0, 1.0)
    } else {
        0.0
    };
    cap / 2 + (cap / 2).mul_f64(unit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn event() -> Event {
        Event {
            seq: 42,
            time_ms: 1_700_000_000_123,
            kind: "deployment.finished".into(),
            deployment_id: Some("d-1".into()),
            node: None,
            module: Some("hello".into()),
            version: Some("1.2.0".into()),
            message: "succeeded <fast> & well".into(),
        }
    }

    #[test]
    fn signature_is_hmac_sha256_of_the_body_in_hex() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_ne!(signature("Jefe", b"x"), signature("jefe", b"x"));
        assert_ne!(signature("Jefe", b"x"), signature("Jefe", b"x "));
    }

    #[test]
    fn kinds_match_themselves_and_what_is_under_them() {
        let kinds = |k: &[&str]| k.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let check = |want: &[&str], kind: &str, expected: bool| {
            assert_eq!(
                kind_matches(&kinds(want), kind),
                expected,
                "{want:?} {kind}"
            );
        };
        check(&[], "anything.at.all", true);
        check(&["deployment"], "deployment", true);
        check(&["deployment"], "deployment.finished", true);
        check(&["deployment."], "deployment.finished", true);
        check(&["deployment"], "deployments.finished", false);
        check(&["deployment.finished"], "deployment.finished", true);
        check(&["deployment.finished"], "deployment.finished_late", false);
        check(&["deployment.finished"], "deployment.created", false);
        check(&["node", "deployment.created"], "deployment.created", true);
        check(&["node", "deployment.created"], "module.pushed", false);
    }

    #[test]
    fn kinds_are_checked() {
        for ok in [
            "deployment",
            "deployment.",
            "node.connected",
            "webhooks.create",
        ] {
            assert!(check_kind(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Deployment", "a b", ".x", "a..b", "ä"] {
            assert!(check_kind(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn json_body_is_the_event_view() {
        let body = body(&event(), Format::Json);
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            value,
            serde_json::json!({
                "seq": 42, "time": "2023-11-14T22:13:20.123Z", "kind": "deployment.finished",
                "deployment_id": "d-1", "node": null, "module": "hello", "version": "1.2.0",
                "message": "succeeded <fast> & well"
            })
        );
    }

    #[test]
    fn slack_body_is_one_escaped_text() {
        let body = body(&event(), Format::Slack);
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            value,
            serde_json::json!({
                "text": "*deployment.finished* hello@1.2.0 (deployment d-1): succeeded &lt;fast&gt; &amp; well [seq 42]"
            })
        );
        let bare = Event {
            seq: 3,
            kind: "node.connected".into(),
            node: Some("web-1".into()),
            ..Event::default()
        };
        assert_eq!(slack_text(&bare), "*node.connected* on web-1 [seq 3]");
    }

    #[test]
    fn urls_are_checked() {
        for ok in ["http://example.com/hook", "https://10.0.0.1:8443/x?y=1"] {
            assert!(parse_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "example.com/hook",
            "ftp://example.com/",
            "http://",
            "http://x/#frag",
            "not a url",
        ] {
            assert!(parse_url(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn our_own_ports_are_refused_and_others_are_not() {
        let own = OwnPorts {
            grpc: "127.0.0.1:7443".parse().unwrap(),
            admin: "0.0.0.0:9443".parse().unwrap(),
        };
        for refused in [
            "https://127.0.0.1:7443/",
            "http://localhost:9443/metrics",
            "http://127.0.0.2:7443/",
            "http://[::1]:9443/",
            "http://0.0.0.0:9443/",
        ] {
            let url = parse_url(refused).unwrap();
            assert!(
                matches!(
                    check_not_own(&url, &own).await,
                    Err(WebhookError::OwnPort { .. })
                ),
                "{refused}"
            );
        }
        for allowed in [
            "http://127.0.0.1:7444/",
            "http://localhost:8080/hook",
            "http://192.0.2.1:7443/",
        ] {
            let url = parse_url(allowed).unwrap();
            assert!(check_not_own(&url, &own).await.is_ok(), "{allowed}");
        }
    }

    #[test]
    fn backoff_starts_small_doubles_and_stops_at_the_maximum() {
        let max = Duration::from_secs(60);
        assert_eq!(backoff_cap(1, max), Duration::from_millis(500));
        assert_eq!(backoff_cap(2, max), Duration::from_secs(1));
        assert_eq!(backoff_cap(4, max), Duration::from_secs(4));
        assert_eq!(backoff_cap(1000, max), max);
        assert_eq!(backoff_delay(3, max, 0.0), Duration::from_secs(1));
        assert_eq!(backoff_delay(3, max, 1.0), Duration::from_secs(2));
    }

    proptest! {
        #[test]
        fn backoff_caps_are_bounded_and_non_decreasing(
            attempt in 0u32..10_000,
            max_ms in 1u64..7_200_000,
            unit in 0.0f64..1.0,
        ) {
            let max = Duration::from_millis(max_ms);
            let cap = backoff_cap(attempt, max);
            prop_assert!(cap <= max);
            prop_assert!(cap > Duration::ZERO);
            prop_assert!(backoff_cap(attempt + 1, max) >= cap);
            let delay = backoff_delay(attempt, max, unit);
            prop_assert!(delay <= cap);
            prop_assert!(delay >= cap / 2);
        }
    }
}
