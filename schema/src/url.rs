//! Redis URLs: one string names a standalone server, a Sentinel-managed master or a Cluster.
//!
//! | form | meaning |
//! |---|---|
//! | `redis://[user:pass@]HOST:PORT[/DB]` | one server (also `unix:///path/to/socket`) |
//! | `redis+sentinel://[user:pass@]H:P[,H:P...]/SERVICE[/DB]` | the master Sentinel names `SERVICE`; the credentials are the master's |
//! | `redis+cluster://[user:pass@]H:P[,H:P...]` | a Redis Cluster, from any of its nodes |
//!
//! Passwords never leave this module in a printable form: [`RedisUrl`]'s `Display` shows
//! `***` in their place.

use std::fmt;
use std::str::FromStr;

use redis::{ConnectionInfo, IntoConnectionInfo as _, RedisConnectionInfo};

#[derive(Debug, Clone)]
pub enum Target {
    Standalone(ConnectionInfo),
    Sentinel {
        sentinels: Vec<ConnectionInfo>,
        service: String,
        master: RedisConnectionInfo,
    },
    Cluster(Vec<ConnectionInfo>),
}

#[derive(Debug, Clone)]
pub struct RedisUrl {
    pub target: Target,
    shown: String,
}

const FORMS: &str = "redis://HOST:PORT[/DB], redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE or redis+cluster://HOST:PORT[,HOST:PORT...]";

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

/// `user:pass@rest` with the password replaced.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{}", &rest[at + 1..])
        }
        None => url.to_owned(),
    }
}

fn info(url: &str, shown: &str) -> Result<ConnectionInfo, String> {
    url.into_connection_info()
        .map_err(|e| format!("'{shown}' is not a usable Redis URL: {e}"))
}

/// Splits `[userinfo@]h:p,h:p[/path]` into userinfo, hosts and path.
fn split_hosts<'a>(
    rest: &'a str,
    shown: &str,
) -> Result<(Option<&'a str>, Vec<&'a str>, &'a str), String> {
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, ""),
    };
    let (user, hosts) = match authority.rfind('@') {
        Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
        None => (None, authority),
    };
    let hosts: Vec<&str> = hosts.split(',').map(str::trim).collect();
    for h in &hosts {
        let port_ok = h
            .rsplit_once(':')
            .is_some_and(|(host, p)| !host.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
        if !port_ok {
            return Err(format!(
                "'{shown}': '{h}' is not HOST:PORT (every node needs its port)"
            ));
        }
    }
    Ok((user, hosts, path))
}

impl FromStr for RedisUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let shown = redact(s);
        let Some((scheme, rest)) = s.split_once("://") else {
            return Err(format!("'{shown}' is not a Redis URL; use {FORMS}"));
        };
        let target = match scheme {
            "redis" | "unix" | "redis+unix" => Target::Standalone(info(s, &shown)?),
            "rediss" | "rediss+sentinel" | "rediss+cluster" => {
                return Err(format!(
                    "'{shown}': TLS to Redis is not built into this gateway; reach Redis over a private network or a local TLS tunnel (stunnel) and use redis://"
                ));
            }
            "redis+cluster" => {
                let (user, hosts, path) = split_hosts(rest, &shown)?;
                if !path.is_empty() {
                    return Err(format!(
                        "'{shown}': a cluster URL takes no database or path (cluster mode has database 0 only)"
                    ));
                }
                let nodes = hosts
                    .iter()
                    .map(|h| match user {
                        Some(u) => info(&format!("redis://{u}@{h}"), &shown),
                        None => info(&format!("redis://{h}"), &shown),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Target::Cluster(nodes)
            }
            "redis+sentinel" => {
                let (user, hosts, path) = split_hosts(rest, &shown)?;
                let mut parts = path.split('/');
                let service = parts.next().unwrap_or("");
                if service.is_empty() {
                    return Err(format!(
                        "'{shown}': a Sentinel URL names the master after the hosts: redis+sentinel://HOST:PORT/SERVICE"
                    ));
                }
                let db = parts.next().filter(|d| !d.is_empty()).unwrap_or("0");
                if db.parse::<u32>().is_err() {
                    return Err(format!("'{shown}': database '{db}' is not a number"));
                }
                let sentinels = hosts
                    .iter()
                    .map(|h| info(&format!("redis://{h}"), &shown))
                    .collect::<Result<Vec<_>, _>>()?;
                let master_url = match user {
                    Some(u) => format!("redis://{u}@master/{db}"),
                    None => format!("redis://master/{db}"),
                };
                let master = info(&master_url, &shown)?.redis_settings().clone();
                Target::Sentinel {
                    sentinels,
                    service: service.to_owned(),
                    master,
                }
            }
            _ => {
                return Err(format!("'{shown}': unknown scheme '{scheme}'; use {FORMS}"));
            }
        };
        Ok(RedisUrl { target, shown })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        let u: RedisUrl = "redis://127.0.0.1:6379/2".parse().unwrap();
        assert!(matches!(u.target, Target::Standalone(_)));
        let u: RedisUrl = "redis+cluster://127.0.0.1:7000,127.0.0.1:7001"
            .parse()
            .unwrap();
        assert!(matches!(u.target, Target::Cluster(ref n) if n.len() == 2));
        let u: RedisUrl = "redis+sentinel://:pw@127.0.0.1:26379/mymaster/3"
            .parse()
            .unwrap();
        match &u.target {
            Target::Sentinel {
                sentinels,
                service,
                master,
            } => {
                assert_eq!(sentinels.len(), 1);
                assert_eq!(service, "mymaster");
                assert_eq!(master.db(), 3);
                assert_eq!(master.password(), Some("pw"));
            }
            other => panic!("{other:?}"),
        }
        assert!(!u.to_string().contains("pw"), "{u}");
    }

    #[test]
    fn refusals_are_named() {
        for (bad, says) in [
            ("localhost:6379", "not a Redis URL"),
            ("http://x:1", "unknown scheme"),
            ("rediss://x:1", "TLS"),
            ("redis+cluster://a:1,b", "HOST:PORT"),
            ("redis+cluster://a:1/0", "no database"),
            ("redis+sentinel://a:1", "names the master"),
            ("redis+sentinel://a:1/m/x", "not a number"),
        ] {
            let e = bad.parse::<RedisUrl>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("redis://user:secret@h:1/0"),
            "redis://user:***@h:1/0"
        );
        assert_eq!(redact("redis://h:1"), "redis://h:1");
        let e = "redis+cluster://u:secret@a:1,b"
            .parse::<RedisUrl>()
            .unwrap_err();
        assert!(!e.contains("secret"), "{e}");
    }
}
