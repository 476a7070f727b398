//! Parsing the endpoint list (`http://127.0.0.1:2379,http://10.0.0.2:2379`,
//! or `https://` for client TLS) into checked URLs, so a typo fails at
//! startup and names the entry.

use std::fmt;

use crate::error::Error;

/// One etcd member's client URL, `http://HOST:PORT` or `https://HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdEndpoint {
    url: String,
    /// Where the host starts and ends in `url`, brackets of an IPv6
    /// address excluded: the name the server's certificate must carry.
    host: std::ops::Range<usize>,
    https: bool,
}

impl EtcdEndpoint {
    /// Check one URL: scheme `http` or `https`, a host and a port, nothing
    /// after them. Whether an `https` endpoint can be used depends on the
    /// client's TLS settings, checked when the client connects.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let text = text.trim();
        let invalid = |reason: &str| Error::InvalidEndpoint {
            endpoint: text.to_string(),
            reason: reason.to_string(),
        };
        let (scheme, rest) = if let Some(rest) = text.strip_prefix("http://") {
            ("http", rest)
        } else if let Some(rest) = text.strip_prefix("https://") {
            ("https", rest)
        } else {
            return Err(invalid("expected http://HOST:PORT or https://HOST:PORT"));
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains('/') {
            return Err(invalid(
                "a path is not allowed, only HOST:PORT after the scheme",
            ));
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
        let url = format!("{scheme}://{authority}");
        let start = scheme.len() + "://".len();
        let host = if host.starts_with('[') {
            start + 1..start + host.len() - 1
        } else {
            start..start + host.len()
        };
        Ok(Self {
            url,
            host,
            https: scheme == "https",
        })
    }

    /// The URL, without a trailing slash.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The host, without the brackets of an IPv6 address: the name (or
    /// address) the member's TLS certificate is checked against.
    pub fn host(&self) -> &str {
        &self.url[self.host.clone()]
    }

    /// Whether the endpoint is `https://`, spoken over client TLS.
    pub fn is_https(&self) -> bool {
        self.https
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
        check(
            "https://etcd-0.example:2379,https://10.0.0.2:2379/",
            Ok(&["https://etcd-0.example:2379", "https://10.0.0.2:2379"]),
        );
        check(" , ", Err("no etcd endpoints given"));
        check("", Err("no etcd endpoints given"));
    }

    #[test]
    fn bad_entries_are_named() {
        check(
            "http://a:1,127.0.0.1:2379",
            Err("etcd endpoint \"127.0.0.1:2379\": expected http://HOST:PORT or https://HOST:PORT"),
        );
        check(
            "ftp://a:2379",
            Err("etcd endpoint \"ftp://a:2379\": expected http://HOST:PORT or https://HOST:PORT"),
        );
        check("https://a", Err("etcd endpoint \"https://a\": no port"));
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
            Err(
                "etcd endpoint \"http://a:1/v3\": a path is not allowed, only HOST:PORT after the scheme",
            ),
        );
        check(
            "http://::1:2379",
            Err("etcd endpoint \"http://::1:2379\": an IPv6 address must be in brackets"),
        );
    }

    #[test]
    fn hosts_and_schemes() {
        let check = |text: &str, host: &str, https: bool| {
            let endpoint = EtcdEndpoint::parse(text).expect("a valid endpoint");
            assert_eq!(endpoint.host(), host, "host of {text}");
            assert_eq!(endpoint.is_https(), https, "scheme of {text}");
        };
        check("http://127.0.0.1:2379", "127.0.0.1", false);
        check("https://etcd-0.example:2379/", "etcd-0.example", true);
        check("https://[::1]:2379", "::1", true);
        check(" https://[fe80::1]:1 ", "fe80::1", true);
    }
}
