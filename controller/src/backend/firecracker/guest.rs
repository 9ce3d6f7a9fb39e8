//! The guest's half of the MMDS contract, without IO: the document the backend `PUT`s
//! (`{"vncgate": VmData, "network": GuestNet}`) as the agent reads it back, and the `ip`
//! command lines that give a restored clone its own address and MAC. The agent
//! (`vncgate-agent --vm-data-mmds`) runs them; the backend's tests parse what Firecracker
//! really stored with [`Document::parse`], so writer and reader cannot drift apart.

use std::net::Ipv4Addr;

use serde::Deserialize;

use super::net::GuestNet;

/// Firecracker's default MMDS address (`PUT /mmds/config` without `ipv4_address`).
pub const MMDS_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// What the agent makes of MMDS's `GET /` (with `Accept: application/json`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// The `vncgate` key as JSON bytes, for the agent's one VM data path (which checks it
    /// against [`crate::backend::VmData`] and says why when it does not fit). `None` until
    /// the backend's `PUT /mmds`: the golden VM's store is empty.
    pub vm_data: Option<Vec<u8>>,
    /// The clone's own network, when the document carries one.
    pub network: Option<GuestNet>,
}

impl Document {
    /// A body that is not a JSON object, or a `network` that is not a [`GuestNet`], is an
    /// error naming what is wrong; absent keys are `None`.
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        #[derive(Deserialize)]
        struct Raw {
            vncgate: Option<serde_json::Value>,
            network: Option<serde_json::Value>,
        }
        let raw: Raw = serde_json::from_slice(body)
            .map_err(|e| format!("the MMDS document is not a JSON object: {e}"))?;
        let network = match raw.network {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(
                serde_json::from_value::<GuestNet>(v)
                    .map_err(|e| format!("the MMDS document's network is malformed: {e}"))?,
            ),
        };
        let vm_data = match raw.vncgate {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(serde_json::to_vec(&v).expect("a JSON value serializes")),
        };
        Ok(Self { vm_data, network })
    }
}

/// `ip` arguments (without the `ip`) that make MMDS reachable on `iface`: a link route, so
/// it never depends on a default route the guest may not have yet.
pub fn mmds_route(iface: &str, mmds: Ipv4Addr) -> Vec<String> {
    ["route", "replace", &format!("{mmds}/32"), "dev", iface]
        .map(str::to_owned)
        .to_vec()
}

/// `ip` arguments, in order, that move `iface` from the golden VM's address and MAC to
/// `net`'s. The MAC first (virtio-net changes it while up), then the addresses are replaced
/// wholesale (`flush`: the golden address must go); removing an interface's last address
/// also removes every route through it, so the default route and MMDS's come back last.
pub fn network_commands(iface: &str, net: &GuestNet, mmds: Option<Ipv4Addr>) -> Vec<Vec<String>> {
    let v = |args: &[&str]| args.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    let addr = format!("{}/{}", net.ip, net.prefix);
    let gateway = net.gateway.to_string();
    let mut cmds = vec![
        v(&["link", "set", "dev", iface, "address", &net.mac]),
        v(&["addr", "flush", "dev", iface]),
        v(&["addr", "add", &addr, "dev", iface]),
        v(&["link", "set", "dev", iface, "up"]),
        v(&["route", "replace", "default", "via", &gateway, "dev", iface]),
    ];
    if let Some(m) = mmds {
        cmds.push(mmds_route(iface, m));
    }
    cmds
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net() -> GuestNet {
        GuestNet {
            ip: Ipv4Addr::new(172, 30, 0, 2),
            prefix: 24,
            gateway: Ipv4Addr::new(172, 30, 0, 1),
            mac: "06:00:ac:1e:00:02".into(),
        }
    }

    #[test]
    fn the_backends_document_parses_into_data_and_network() {
        // As tests/firecracker.rs sees it in Firecracker's store after `push_data`.
        let body = br#"{"network":{"gateway":"172.30.0.1","ip":"172.30.0.2","mac":"06:00:ac:1e:00:02","prefix":24},"vncgate":{"agent_token":"t","controller_url":"http://172.30.0.1:8000","entropy":"00","issued_at_ms":5,"provider":"github","session_id":"s"}}"#;
        let d = Document::parse(body).unwrap();
        assert_eq!(d.network, Some(net()));
        let data: crate::backend::VmData = serde_json::from_slice(&d.vm_data.unwrap()).unwrap();
        assert_eq!(
            (
                data.session_id.as_str(),
                data.agent_token.as_str(),
                data.issued_at_ms
            ),
            ("s", "t", 5)
        );
    }

    #[test]
    fn an_empty_store_is_a_document_without_data() {
        assert_eq!(
            Document::parse(b"{}").unwrap(),
            Document {
                vm_data: None,
                network: None
            }
        );
        let d = Document::parse(br#"{"vncgate":{"session_id":"s"}}"#).unwrap();
        assert_eq!(d.network, None);
        assert_eq!(d.vm_data.as_deref(), Some(&br#"{"session_id":"s"}"#[..]));
    }

    #[test]
    fn what_is_not_a_document_says_why() {
        let e = Document::parse(b"vncgate/\nnetwork/").unwrap_err();
        assert!(
            e.starts_with("the MMDS document is not a JSON object: "),
            "{e}"
        );
        let e = Document::parse(br#"{"network":{"ip":"172.30.0.2"}}"#).unwrap_err();
        assert!(
            e.starts_with("the MMDS document's network is malformed: missing field"),
            "{e}"
        );
    }

    #[test]
    fn the_command_lines_for_a_clone() {
        let lines: Vec<String> = network_commands("eth0", &net(), Some(MMDS_ADDR))
            .iter()
            .map(|c| format!("ip {}", c.join(" ")))
            .collect();
        assert_eq!(
            lines,
            [
                "ip link set dev eth0 address 06:00:ac:1e:00:02",
                "ip addr flush dev eth0",
                "ip addr add 172.30.0.2/24 dev eth0",
                "ip link set dev eth0 up",
                "ip route replace default via 172.30.0.1 dev eth0",
                "ip route replace 169.254.169.254/32 dev eth0",
            ]
        );
        assert_eq!(network_commands("ens3", &net(), None).len(), 5);
        assert_eq!(
            mmds_route("ens3", MMDS_ADDR).join(" "),
            "route replace 169.254.169.254/32 dev ens3"
        );
    }
}
