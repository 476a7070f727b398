//! Parsing the endpoint list (`http://127.0.0.1:2379,http://10.0.0.2:2379`)
//! into checked URLs, so a typo fails at startup and names the entry.

use std::fmt;

use crate::error::Error;

/// One etcd member's client URL, `http://HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdEndpoint {
    url: String,
}

impl EtcdEndpoint {
    /// Check one URL: scheme `http`, a host and a port, nothing after them.
    /// Client TLS (`https`) is not supported yet and is refused by name.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let text = text.trim();
        let invalid = |reason: &str| Error::InvalidEndpoint {
            endpoint: text.to_string(),
            reason: reason.to_string(),
        };
        let rest = if let Some(rest) = text.strip_prefix("http://") {
            rest
        } else if text.starts_with("https://") {
            return Err(invalid("https (client TLS) is not supported yet"));
        } else {
            return Err(invalid("expected http://HOST:PORT"));
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains('/') {
            return Err(invalid("a path is not allowed, only http://HOST:PORT"));
        }
        let (host, port) = authority
            .rsplit_once(':')
            .ok_or_else(|| invalid("no port"))?;
        if host.is_empty() || host == "[]" {
            return Err(invalid("no host"));
        }
        if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
            return Err(invalid("an IPv6 address must be in brackets"));
        }
        match port.parse::<u16>() {
            Ok(0) | Err(_) => return Err(invalid("the port must be a number from 1 to 65535")),
            Ok(_) => {}
        }
        Ok(Self {
            url: format!("http://{authority}"),
        })
    }

    /// The URL, without a trailing slash.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl fmt::Display for EtcdEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url)
    }
}

/// Parse a comma-separated endpoint list; empty entries (a trailing comma)
/// are skipped, duplicates are dropped, and at least one must remain.
pub fn parse_endpoints(list: &str) -> Result<Vec<EtcdEndpoint>, Error> {
    let mut endpoints: Vec<EtcdEndpoint> = Vec::new();
    for entry in list.split(',').filter(|e| !e.trim().is_empty()) {
        let endpoint = EtcdEndpoint::parse(entry)?;
        if !endpoints.contains(&endpoint) {
            endpoints.push(endpoint);
        }
    }
    if endpoints.is_empty() {
        return Err(Error::NoEndpoints);
    }
    Ok(endpoints)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(list: &str, expected: Result<&[&str], &str>) {
        let got = parse_endpoints(list)
            .map(|e| e.iter().map(|e| e.url().to_string()).collect::<Vec<_>>())
            .map_err(|e| e.to_string());
        let expected = expected
            .map(|urls| urls.iter().map(|u| u.to_string()).collect::<Vec<_>>())
            .map_err(str::to_string);
        assert_eq!(got, expected, "parsing {list:?}");
    }

    #[test]
    fn lists() {
        check("http://127.0.0.1:2379", Ok(&["http://127.0.0.1:2379"]));
        check(
            "http://127.0.0.1:2379, http://127.0.0.1:22379/,",
            Ok(&["http://127.0.0.1:2379", "http://127.0.0.1:22379"]),
        );
        check(
            "http://a:1,http://a:1,http://b:2",
            Ok(&["http://a:1", "http://b:2"]),
        );
        check("http://[::1]:2379", Ok(&["http://[::1]:2379"]));
        check(" , ", Err("no etcd endpoints given"));
        check("", Err("no etcd endpoints given"));
    }

    #[test]
    fn bad_entries_are_named() {
        check(
            "http://a:1,127.0.0.1:2379",
            Err("etcd endpoint \"127.0.0.1:2379\": expected http://HOST:PORT"),
        );
        check(
            "https://a:2379",
            Err("etcd endpoint \"https://a:2379\": https (client TLS) is not supported yet"),
        );
        check("http://a", Err("etcd endpoint \"http://a\": no port"));
        check(
            "http://a:0",
            Err("etcd endpoint \"http://a:0\": the port must be a number from 1 to 65535"),
        );
        check(
            "http://a:x",
            Err("etcd endpoint \"http://a:x\": the port must be a number from 1 to 65535"),
        );
        check("http://:1", Err("etcd endpoint \"http://:1\": no host"));
        check(
            "http://a:1/v3",
            Err("etcd endpoint \"http://a:1/v3\": a path is not allowed, only http://HOST:PORT"),
        );
        check(
            "http://::1:2379",
            Err("etcd endpoint \"http://::1:2379\": an IPv6 address must be in brackets"),
        );
    }
}
