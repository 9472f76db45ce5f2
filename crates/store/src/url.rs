//! Store URLs: which backend a node uses and where it is, from one string.
//!
//! Owns the syntax (`etcd://host:port[,host:port…][/namespace]`, `redb:///path`, or a plain file
//! path) and its errors. It must not open or connect to anything: that is the backends' work.

use std::path::PathBuf;

use crate::StoreError;

/// The port etcd serves clients on when a URL names none.
const ETCD_DEFAULT_PORT: u16 = 2379;

/// Where a store is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// An embedded store in this file.
    Redb(PathBuf),
    /// An etcd cluster: its client endpoints (`host:port`) and the prefix put before every key
    /// (empty, or starting with `/` and not ending with one).
    Etcd {
        endpoints: Vec<String>,
        namespace: String,
    },
}

/// Parses a store URL:
/// - `etcd://h1:2379,h2:2379/telvirt`: etcd endpoints (port 2379 when left out; IPv6 hosts in
///   brackets, `[::1]:2379`) and an optional namespace path, here `/telvirt`;
/// - `redb:///var/lib/telvirt/store.redb` or a path without a scheme: a redb file.
pub fn parse_store_url(url: &str) -> Result<StoreUrl, StoreError> {
    let bad = |why: String| StoreError::BadUrl {
        url: url.to_owned(),
        why,
    };
    let Some((scheme, rest)) = url.split_once("://") else {
        if url.is_empty() {
            return Err(bad(
                "it is empty; give etcd://HOST:PORT[/NAMESPACE] or a redb file path".into(),
            ));
        }
        return Ok(StoreUrl::Redb(PathBuf::from(url)));
    };
    match scheme {
        "etcd" => parse_etcd(rest).map_err(bad),
        "redb" => {
            if rest.is_empty() {
                return Err(bad("redb:// names no file; give redb:///PATH".into()));
            }
            Ok(StoreUrl::Redb(PathBuf::from(rest)))
        }
        other => Err(bad(format!(
            "unknown scheme {other:?}; valid are etcd:// and redb:// (or a plain file path)"
        ))),
    }
}

/// The part of an etcd URL after `etcd://`.
fn parse_etcd(rest: &str) -> Result<StoreUrl, String> {
    let (hosts, path) = match rest.find('/') {
        Some(at) => rest.split_at(at),
        None => (rest, ""),
    };
    if hosts.is_empty() {
        return Err("the host list is empty; give etcd://HOST:PORT[,HOST:PORT…]".into());
    }
    if let Some(c) = path.chars().find(|c| matches!(c, '?' | '#')) {
        return Err(format!(
            "{c:?} is not allowed: an etcd URL has hosts and a namespace path only"
        ));
    }
    let endpoints = hosts
        .split(',')
        .enumerate()
        .map(|(i, endpoint)| {
            parse_endpoint(endpoint).map_err(|why| format!("host {}: {why}", i + 1))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let namespace = path.trim_end_matches('/');
    if namespace.contains("//") {
        return Err(format!(
            "namespace {namespace:?} has an empty path segment (\"//\")"
        ));
    }
    Ok(StoreUrl::Etcd {
        endpoints,
        namespace: namespace.to_owned(),
    })
}

/// One `host[:port]` of the list, as `host:port`.
fn parse_endpoint(endpoint: &str) -> Result<String, String> {
    if endpoint.is_empty() {
        return Err("empty (two commas in a row, or a comma at an end)".into());
    }
    let (host, port) = if let Some(bracketed) = endpoint.strip_prefix('[') {
        let Some((address, after)) = bracketed.split_once(']') else {
            return Err(format!(
                "{endpoint:?} opens an IPv6 address with '[' but has no ']'"
            ));
        };
        if address.is_empty() {
            return Err(format!("{endpoint:?} has an empty IPv6 address"));
        }
        let port = match after {
            "" => None,
            _ => match after.strip_prefix(':') {
                Some(port) => Some(port),
                None => {
                    return Err(format!(
                        "{endpoint:?}: after ']' comes ':PORT' or nothing, not {after:?}"
                    ));
                }
            },
        };
        (&endpoint[..address.len() + 2], port)
    } else {
        match endpoint.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (endpoint, None),
        }
    };
    if host.is_empty() {
        return Err(format!("{endpoint:?} has no host name before the port"));
    }
    if let Some(c) = host
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '[' | ']' | ':')))
    {
        return Err(format!("host {host:?} has the character {c:?}"));
    }
    let port = match port {
        None => ETCD_DEFAULT_PORT,
        Some(port) => match port.parse::<u16>() {
            Ok(0) | Err(_) => {
                return Err(format!(
                    "port {port:?} of {endpoint:?} is not a port number (1 to 65535)"
                ));
            }
            Ok(port) => port,
        },
    };
    Ok(format!("{host}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn why(url: &str) -> String {
        match parse_store_url(url) {
            Err(StoreError::BadUrl { why, .. }) => why,
            other => panic!("{url}: expected a BadUrl error, got {other:?}"),
        }
    }

    #[test]
    fn etcd_urls_give_endpoints_and_namespace() {
        assert_eq!(
            parse_store_url("etcd://h1:2379,10.0.0.2:32379/telvirt/prod/").unwrap(),
            StoreUrl::Etcd {
                endpoints: vec!["h1:2379".into(), "10.0.0.2:32379".into()],
                namespace: "/telvirt/prod".into(),
            }
        );
        assert_eq!(
            parse_store_url("etcd://etcd.local").unwrap(),
            StoreUrl::Etcd {
                endpoints: vec!["etcd.local:2379".into()],
                namespace: String::new(),
            }
        );
        assert_eq!(
            parse_store_url("etcd://[::1]:4001/").unwrap(),
            StoreUrl::Etcd {
                endpoints: vec!["[::1]:4001".into()],
                namespace: String::new(),
            }
        );
    }

    #[test]
    fn redb_urls_and_plain_paths_give_a_file() {
        assert_eq!(
            parse_store_url("redb:///var/lib/telvirt/store.redb").unwrap(),
            StoreUrl::Redb("/var/lib/telvirt/store.redb".into())
        );
        assert_eq!(
            parse_store_url("state/store.redb").unwrap(),
            StoreUrl::Redb("state/store.redb".into())
        );
    }

    #[test]
    fn an_unknown_scheme_names_the_valid_ones() {
        let why = why("http://h1:2379");
        assert!(why.contains("\"http\""), "{why}");
        assert!(why.contains("etcd://"), "{why}");
    }

    #[test]
    fn an_empty_host_list_is_refused() {
        assert!(why("etcd://").contains("host list is empty"));
        assert!(why("etcd:///telvirt").contains("host list is empty"));
        assert!(why("").contains("empty"));
    }

    #[test]
    fn an_empty_host_in_the_list_is_refused_with_its_position() {
        let why = why("etcd://h1:2379,,h3:2379");
        assert!(why.starts_with("host 2:"), "{why}");
        let why = super::parse_store_url("etcd://:2379")
            .unwrap_err()
            .to_string();
        assert!(why.contains("no host name"), "{why}");
    }

    #[test]
    fn bad_ports_are_refused() {
        for (url, port) in [
            ("etcd://h1:abc", "\"abc\""),
            ("etcd://h1:0", "\"0\""),
            ("etcd://h1:65536", "\"65536\""),
            ("etcd://h1:", "\"\""),
            ("etcd://h1:2379,h2:x1/ns", "\"x1\""),
        ] {
            let why = why(url);
            assert!(why.contains(&format!("port {port}")), "{url}: {why}");
            assert!(why.contains("1 to 65535"), "{url}: {why}");
        }
    }

    #[test]
    fn malformed_ipv6_hosts_and_queries_are_refused() {
        assert!(why("etcd://[::1:2379").contains("no ']'"));
        assert!(why("etcd://[::1]2379").contains("after ']'"));
        assert!(why("etcd://h1:2379/ns?x=1").contains("'?'"));
        assert!(why("etcd://h1:2379/a//b").contains("empty path segment"));
        assert!(why("etcd://h 1:2379").contains("character ' '"));
    }
}
