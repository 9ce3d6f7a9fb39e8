//! Which upstream addresses the gateway may dial.
//!
//! Every dial is checked against the `--allow-upstream` CIDRs, whatever the route source: a
//! poisoned route (a bad row in Redis, a typo in a routes file) must not turn the gateway
//! into an open proxy into the VM network or anywhere else. An empty list allows nothing.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

#[derive(Debug, Clone, Default)]
pub struct UpstreamPolicy {
    allowed: Vec<IpNet>,
}

impl UpstreamPolicy {
    pub fn new(allowed: Vec<IpNet>) -> Self {
        Self { allowed }
    }

    pub fn allows(&self, addr: &SocketAddr) -> bool {
        let ip = match addr.ip() {
            // An IPv4-mapped IPv6 address is checked as the IPv4 address it is.
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        self.allowed.iter().any(|net| net.contains(&ip))
    }

    pub fn nets(&self) -> &[IpNet] {
        &self.allowed
    }
}

/// Parses a CIDR, or a bare address as a single-host network.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("'{s}' is not a CIDR (like 10.0.0.0/8) or an IP address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_inside_only() {
        let p = UpstreamPolicy::new(vec![
            parse_cidr("10.0.0.0/8").unwrap(),
            parse_cidr("127.0.0.1").unwrap(),
        ]);
        assert!(p.allows(&"10.1.2.3:6080".parse().unwrap()));
        assert!(p.allows(&"127.0.0.1:5900".parse().unwrap()));
        assert!(!p.allows(&"127.0.0.2:5900".parse().unwrap()));
        assert!(!p.allows(&"169.254.169.254:80".parse().unwrap()));
        assert!(p.allows(&"[::ffff:10.0.0.1]:6080".parse().unwrap()));
        assert!(!UpstreamPolicy::default().allows(&"10.0.0.1:1".parse().unwrap()));
        assert!(parse_cidr("nonsense").is_err());
    }
}
