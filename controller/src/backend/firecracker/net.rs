//! The host side of the VMs' network: one bridge, a tap per VM on it, and the address plan
//! of the subnet (the host is `.1`, slot `n` is `.n+2`, the golden VM the last address), all
//! through `ip` (iproute2), optionally inside a network namespace.

use std::net::Ipv4Addr;
use std::process::Command;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::backend::BackendError;

/// An IPv4 subnet, `172.30.0.0/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subnet {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

impl FromStr for Subnet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (ip, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not ADDR/PREFIX"))?;
        let base: Ipv4Addr = ip.parse().map_err(|e| format!("{ip:?}: {e}"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| (16..=29).contains(p))
            .ok_or_else(|| format!("prefix /{prefix}: use /16 to /29"))?;
        let mask = u32::MAX << (32 - prefix);
        if u32::from(base) & !mask != 0 {
            return Err(format!("{s} has host bits set"));
        }
        Ok(Self { base, prefix })
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

impl Subnet {
    fn at(&self, host: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base) + host)
    }

    fn size(&self) -> u32 {
        1 << (32 - self.prefix)
    }

    /// The host's address on the bridge, the guests' gateway.
    pub fn host(&self) -> Ipv4Addr {
        self.at(1)
    }

    /// The address the golden VM had when it was snapshotted: the last one before
    /// broadcast, kept out of the slots so no clone is given it.
    pub fn golden(&self) -> Ipv4Addr {
        self.at(self.size() - 2)
    }

    /// How many VMs fit: all addresses but network, host, golden and broadcast.
    pub fn slots(&self) -> u32 {
        self.size() - 4
    }

    /// Slot `n`'s guest address.
    pub fn guest(&self, slot: u32) -> Option<Ipv4Addr> {
        (slot < self.slots()).then(|| self.at(slot + 2))
    }

    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::MAX << (32 - self.prefix))
    }
}

/// A locally administered MAC from a guest address (`06:00:` and the four octets, as
/// Firecracker's own examples do), so each clone's is distinct on the bridge.
pub fn mac_for(ip: Ipv4Addr) -> String {
    let [a, b, c, d] = ip.octets();
    format!("06:00:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
}

/// What a guest applies to its interface after a restore (it carries the golden VM's
/// address and MAC until then); written into MMDS beside the per-VM data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestNet {
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub mac: String,
}

/// Runs `ip` in the namespace, when there is one.
fn ip(netns: Option<&str>, args: &[&str]) -> Result<(), BackendError> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    let out = cmd
        .args(args)
        .output()
        .map_err(|e| BackendError(format!("cannot run ip {}: {e}", args.join(" "))))?;
    if out.status.success() {
        return Ok(());
    }
    Err(BackendError(format!(
        "ip {}{}: {}",
        netns.map(|n| format!("-n {n} ")).unwrap_or_default(),
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

/// Whether a link of that name exists.
pub fn link_exists(netns: Option<&str>, name: &str) -> bool {
    ip(netns, &["link", "show", "dev", name]).is_ok()
}

/// The bridge with the host's address on it, created when absent (an existing one is taken
/// as it is: the operator may have set it up with more).
pub fn ensure_bridge(
    netns: Option<&str>,
    bridge: &str,
    subnet: &Subnet,
) -> Result<(), BackendError> {
    if link_exists(netns, bridge) {
        return Ok(());
    }
    ip(netns, &["link", "add", "name", bridge, "type", "bridge"])?;
    let addr = format!("{}/{}", subnet.host(), subnet.prefix);
    ip(netns, &["addr", "add", &addr, "dev", bridge])?;
    ip(netns, &["link", "set", "dev", bridge, "up"])
}

/// A persistent tap on the bridge, owned by `owner` (uid, gid) when Firecracker runs as
/// another user (the jailer). A stale tap of that name (a crash between start and stop) is
/// replaced.
pub fn add_tap(
    netns: Option<&str>,
    tap: &str,
    bridge: &str,
    owner: Option<(u32, u32)>,
) -> Result<(), BackendError> {
    if link_exists(netns, tap) {
        delete_link(netns, tap)?;
    }
    let (uid, gid) = owner.map(|(u, g)| (u.to_string(), g.to_string())).unzip();
    let mut args = vec!["tuntap", "add", "dev", tap, "mode", "tap"];
    if let (Some(u), Some(g)) = (&uid, &gid) {
        args.extend(["user", u.as_str(), "group", g.as_str()]);
    }
    ip(netns, &args)?;
    ip(netns, &["link", "set", "dev", tap, "master", bridge, "up"]).inspect_err(|_| {
        let _ = delete_link(netns, tap);
    })
}

/// Deletes a link; one that is already gone is not an error.
pub fn delete_link(netns: Option<&str>, name: &str) -> Result<(), BackendError> {
    match ip(netns, &["link", "delete", "dev", name]) {
        Ok(()) => Ok(()),
        Err(_) if !link_exists(netns, name) => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_plan_of_a_24() {
        let s: Subnet = "172.30.0.0/24".parse().unwrap();
        assert_eq!(s.host(), Ipv4Addr::new(172, 30, 0, 1));
        assert_eq!(s.guest(0), Some(Ipv4Addr::new(172, 30, 0, 2)));
        assert_eq!(s.guest(251), Some(Ipv4Addr::new(172, 30, 0, 253)));
        assert_eq!(s.guest(252), None);
        assert_eq!(s.golden(), Ipv4Addr::new(172, 30, 0, 254));
        assert_eq!(s.slots(), 252);
        assert_eq!(s.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(s.to_string(), "172.30.0.0/24");
    }

    #[test]
    fn no_slot_is_the_host_the_golden_or_broadcast() {
        let s: Subnet = "10.9.0.0/29".parse().unwrap();
        let guests: Vec<_> = (0..s.slots()).filter_map(|n| s.guest(n)).collect();
        assert_eq!(
            guests,
            [
                Ipv4Addr::new(10, 9, 0, 2),
                Ipv4Addr::new(10, 9, 0, 3),
                Ipv4Addr::new(10, 9, 0, 4),
                Ipv4Addr::new(10, 9, 0, 5)
            ]
        );
        for g in guests {
            assert!(g != s.host() && g != s.golden() && g != Ipv4Addr::new(10, 9, 0, 7));
        }
    }

    #[test]
    fn subnets_that_are_refused() {
        for bad in [
            "172.30.0.1/24",
            "172.30.0.0",
            "172.30.0.0/30",
            "172.30.0.0/8",
            "x/24",
        ] {
            assert!(bad.parse::<Subnet>().is_err(), "{bad}");
        }
    }

    #[test]
    fn macs_follow_the_address() {
        assert_eq!(mac_for(Ipv4Addr::new(172, 30, 0, 2)), "06:00:ac:1e:00:02");
    }
}
