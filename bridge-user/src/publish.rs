//! Published ports (`docker run -p` semantics), the pure spec: parsing `[HOSTIP:]HOSTPORT:
//! CONTAINERIP:CONTAINERPORT[/tcp|/udp]` and reading it back from a `PUBLISHED` entry, the
//! lifetimes of NATed connections (`Timeouts`), and the types that describe the connection
//! tables (`NatState`, `Capacity`). Writing the pinned map and retiring connections is the
//! datapath's (`datapath/published.rs`).

use std::{collections::BTreeSet, fmt, net::Ipv4Addr, str::FromStr, time::Duration};

use bridge_common::{
    Flow, FlowKey, IPPROTO_TCP, IPPROTO_UDP, NatEvent, PublishedKey, PublishedPort, lifetime,
    memory::flow_table_entries,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub(crate) fn number(self) -> u8 {
        match self {
            Proto::Tcp => IPPROTO_TCP,
            Proto::Udp => IPPROTO_UDP,
        }
    }

    pub(crate) fn from_number(number: u8) -> Option<Proto> {
        match number {
            IPPROTO_TCP => Some(Proto::Tcp),
            IPPROTO_UDP => Some(Proto::Udp),
            _ => None,
        }
    }
}

/// One published port, as the user writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PublishSpec {
    /// `None`: every address of the host.
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub container_ip: Ipv4Addr,
    pub container_port: u16,
    pub proto: Proto,
}

/// Why text is not a published port: which part is wrong, and the form to write.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PublishSpecError {
    #[error("`{text}` is not a published port ({proto:?} is not tcp or udp); {PUBLISH_FORM}")]
    Protocol { text: String, proto: String },
    #[error("`{text}` is not a published port (it has {parts} parts, not 3 or 4); {PUBLISH_FORM}")]
    Parts { text: String, parts: usize },
    #[error("`{text}` is not a published port ({ip:?} is not an IPv4 address); {PUBLISH_FORM}")]
    Address { text: String, ip: String },
    #[error(
        "`{text}` is not a published port ({port:?} is not a port from 1 to 65535); {PUBLISH_FORM}"
    )]
    Port { text: String, port: String },
}

const PUBLISH_FORM: &str =
    "write [HOSTIP:]HOSTPORT:CONTAINERIP:CONTAINERPORT[/tcp|/udp], e.g. 8080:172.17.0.2:80";

impl FromStr for PublishSpec {
    type Err = PublishSpecError;

    fn from_str(text: &str) -> std::result::Result<Self, PublishSpecError> {
        let (ports, proto) = match text.rsplit_once('/') {
            Some((ports, "tcp")) => (ports, Proto::Tcp),
            Some((ports, "udp")) => (ports, Proto::Udp),
            Some((_, proto)) => {
                return Err(PublishSpecError::Protocol {
                    text: text.into(),
                    proto: proto.into(),
                });
            }
            None => (text, Proto::Tcp),
        };
        let ip = |ip: &str| {
            ip.parse::<Ipv4Addr>()
                .map_err(|_| PublishSpecError::Address {
                    text: text.into(),
                    ip: ip.into(),
                })
        };
        let port = |port: &str| {
            port.parse::<u16>()
                .ok()
                .filter(|port| *port != 0)
                .ok_or_else(|| PublishSpecError::Port {
                    text: text.into(),
                    port: port.into(),
                })
        };
        let parts: Vec<&str> = ports.split(':').collect();
        let (host_ip, [host_port, container_ip, container_port]) = match parts[..] {
            [host_ip, host_port, container_ip, container_port] => (
                Some(ip(host_ip)?),
                [host_port, container_ip, container_port],
            ),
            [host_port, container_ip, container_port] => {
                (None, [host_port, container_ip, container_port])
            }
            _ => {
                return Err(PublishSpecError::Parts {
                    text: text.into(),
                    parts: parts.len(),
                });
            }
        };
        Ok(PublishSpec {
            host_ip,
            host_port: port(host_port)?,
            container_ip: ip(container_ip)?,
            container_port: port(container_port)?,
            proto,
        })
    }
}

impl fmt::Display for PublishSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(host_ip) = self.host_ip {
            write!(f, "{host_ip}:")?;
        }
        let proto = match self.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        write!(
            f,
            "{}:{}:{}/{proto}",
            self.host_port, self.container_ip, self.container_port
        )
    }
}

impl PublishSpec {
    pub fn key(&self) -> PublishedKey {
        PublishedKey {
            proto: self.proto.number(),
            _pad: 0,
            host_port: self.host_port.to_be_bytes(),
            host_ip: self.host_ip.map(|ip| ip.octets()).unwrap_or([0; 4]),
        }
    }

    pub(crate) fn from_entry(key: &PublishedKey, value: &PublishedPort) -> Option<PublishSpec> {
        Some(PublishSpec {
            host_ip: (key.host_ip != [0; 4]).then(|| Ipv4Addr::from(key.host_ip)),
            host_port: u16::from_be_bytes(key.host_port),
            container_ip: Ipv4Addr::from(value.container_ip),
            container_port: u16::from_be_bytes(value.container_port),
            proto: Proto::from_number(key.proto)?,
        })
    }

    /// Whether an inbound connection to `key`'s destination came through this port.
    pub(crate) fn matches_inbound(&self, key: &FlowKey) -> bool {
        key.proto == self.proto.number()
            && u16::from_be_bytes(key.dst_port) == self.host_port
            && self.host_ip.is_none_or(|ip| ip.octets() == key.dst_ip)
    }
}

/// A published port with where it points now.
#[derive(Clone, Debug)]
pub struct Published {
    pub spec: PublishSpec,
    /// The container's bridge port, when a container has the address now.
    pub port_ifindex: Option<u32>,
    /// What the datapath does with it: `PublishedPort::HELD`, `CLIENT_HOLDS` (and `BY_DOCKER`).
    pub flags: u8,
    /// What the socket hooks did for the host's own clients of the port.
    pub host_clients: bridge_common::SocketCounts,
}

/// What a sync of Docker's published ports changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Synced {
    pub added: Vec<PublishSpec>,
    pub removed: Vec<PublishSpec>,
    /// Docker bindings whose host port an `xbr publish` entry holds: the user's entry stays.
    pub held_by_user: Vec<PublishSpec>,
    /// Docker bindings in the map after the sync.
    pub mirrored: usize,
}

impl Synced {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

/// The pure part of a sync: the entries now (spec, whether Docker's) and the wanted Docker
/// bindings -> which Docker entries go and which come. Entries of `xbr publish` stay.
pub fn diff(current: &[(PublishSpec, bool)], wanted: &BTreeSet<PublishSpec>) -> Synced {
    let mut synced = Synced::default();
    for (spec, by_docker) in current {
        if *by_docker && !wanted.contains(spec) {
            synced.removed.push(*spec);
        }
    }
    for spec in wanted {
        match current.iter().find(|(now, _)| now.key() == spec.key()) {
            None => synced.added.push(*spec),
            Some((now, true)) if now != spec => synced.added.push(*spec),
            Some((_, true)) => {}
            Some((_, false)) => synced.held_by_user.push(*spec),
        }
    }
    synced.mirrored = wanted.len() - synced.held_by_user.len();
    synced
}

/// What `nat_state` read.
#[derive(Clone, Debug, Default)]
pub struct NatState {
    /// Whether the attachment has its connection tables (made with its first published
    /// port); the capacities below are what they hold, or will hold once made.
    pub tables: bool,
    /// Established connections, and how many the table holds.
    pub established: usize,
    pub established_capacity: usize,
    /// Transient connections (not established, or closing) within their lifetime: their live
    /// entries, halved.
    pub transient: usize,
    pub transient_entries: usize,
    /// Transient entries past their lifetime, not removed yet: the datapath ignores them, and
    /// the LRU reuses them first.
    pub transient_expired: usize,
    pub transient_capacity: usize,
    /// Transient connections the LRU replaced to make room for new ones (entries / 2: the
    /// two directions of a connection may go at different times). Exact when the datapath is
    /// quiet; while connections come and go the count moves by what changed during the read.
    pub replaced: u64,
    pub events: Vec<(NatEvent, u64)>,
}

impl NatState {
    pub fn event(&self, wanted: NatEvent) -> u64 {
        self.events
            .iter()
            .find(|(event, _)| *event == wanted)
            .map_or(0, |(_, count)| *count)
    }
}

/// The connection tables' sizes, in connections (two entries each).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capacity {
    pub established: usize,
    pub transient: usize,
}

impl Capacity {
    /// The sizes of an attachment made with `--max-flows max_flows`.
    pub fn of(max_flows: u32) -> Capacity {
        let (flow_entries, transient_entries) = flow_table_entries(max_flows);
        Capacity {
            established: flow_entries as usize / 2,
            transient: transient_entries as usize / 2,
        }
    }
}

/// How long an entry may stay quiet before the control plane retires it; the datapath uses
/// the same numbers (`bridge_common::lifetime`) for transient entries.
#[derive(Clone, Debug)]
pub struct Timeouts {
    pub tcp: Duration,
    /// An established TCP connection after a FIN in one direction.
    pub closed: Duration,
    pub udp: Duration,
    /// Connections that are not established, or are closing.
    pub transient: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tcp: Duration::from_nanos(lifetime::TCP_ESTABLISHED_NS),
            closed: Duration::from_nanos(lifetime::TCP_FIN_QUIET_NS),
            udp: Duration::from_nanos(lifetime::UDP_STREAM_NS),
            transient: Duration::from_nanos(lifetime::TRANSIENT_NS),
        }
    }
}

impl Timeouts {
    /// The limit for one direction `flow`, by the rules of `Flow::lifetime_ns`.
    pub(crate) fn limit(&self, proto: u8, flow: &Flow) -> Duration {
        if flow.flags & Flow::ESTABLISHED == 0 || flow.flags & Flow::CLOSING != 0 {
            self.transient
        } else if proto != IPPROTO_TCP {
            self.udp
        } else if flow.flags & Flow::FIN_SEEN != 0 {
            self.closed
        } else {
            self.tcp
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> PublishSpec {
        text.parse().unwrap()
    }

    #[test]
    fn specs_parse_like_docker_run_p() {
        let spec: PublishSpec = "8080:172.17.0.2:80".parse().unwrap();
        assert_eq!(
            spec,
            PublishSpec {
                host_ip: None,
                host_port: 8080,
                container_ip: "172.17.0.2".parse().unwrap(),
                container_port: 80,
                proto: Proto::Tcp
            }
        );
        let spec: PublishSpec = "10.78.0.1:5353:10.77.0.2:53/udp".parse().unwrap();
        assert_eq!(spec.host_ip, Some("10.78.0.1".parse().unwrap()));
        assert_eq!(spec.proto, Proto::Udp);
        assert_eq!(spec.to_string(), "10.78.0.1:5353:10.77.0.2:53/udp");
        assert_eq!(
            "8080:172.17.0.2:80"
                .parse::<PublishSpec>()
                .unwrap()
                .to_string(),
            "8080:172.17.0.2:80/tcp"
        );
    }

    #[test]
    fn bad_specs_say_what_is_expected() {
        for bad in [
            "8080",
            "8080:80",
            "0:10.0.0.1:80",
            "8080:10.0.0.1:80/sctp",
            "x:8080:10.0.0.1:80",
            "8080:nohost:80",
            "70000:10.0.0.1:80",
        ] {
            let error = bad.parse::<PublishSpec>().unwrap_err().to_string();
            assert!(
                error.contains("HOSTPORT:CONTAINERIP:CONTAINERPORT"),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn bad_specs_name_the_wrong_part() {
        let error = |text: &str| text.parse::<PublishSpec>().unwrap_err();
        assert_eq!(
            error("8080:10.0.0.1:80/sctp"),
            PublishSpecError::Protocol {
                text: "8080:10.0.0.1:80/sctp".into(),
                proto: "sctp".into()
            }
        );
        assert!(matches!(
            error("8080:80"),
            PublishSpecError::Parts { parts: 2, .. }
        ));
        assert!(
            matches!(error("8080:nohost:80"), PublishSpecError::Address { ip, .. } if ip == "nohost")
        );
        assert!(
            matches!(error("x:8080:10.0.0.1:80"), PublishSpecError::Address { ip, .. } if ip == "x")
        );
        assert!(
            matches!(error("0:10.0.0.1:80"), PublishSpecError::Port { port, .. } if port == "0")
        );
        assert_eq!(
            error("70000:10.0.0.1:80").to_string(),
            "`70000:10.0.0.1:80` is not a published port (\"70000\" is not a port from 1 to 65535); \
             write [HOSTIP:]HOSTPORT:CONTAINERIP:CONTAINERPORT[/tcp|/udp], e.g. 8080:172.17.0.2:80"
        );
    }

    #[test]
    fn lifetimes_follow_the_state_of_each_direction() {
        let flow = |flags| Flow {
            flags,
            ..Flow::default()
        };
        let t = Timeouts::default();
        let secs = |d: Duration| d.as_secs();
        // Not established (new, answered) or closing: the transient lifetime.
        for flags in [
            Flow::INBOUND,
            Flow::OUTBOUND | Flow::ANSWERED,
            Flow::INBOUND | Flow::ESTABLISHED | Flow::CLOSING,
        ] {
            assert_eq!(secs(t.limit(IPPROTO_TCP, &flow(flags))), 30, "{flags:#x}");
            assert_eq!(flow(flags).lifetime_ns(IPPROTO_TCP), lifetime::TRANSIENT_NS);
        }
        let established = Flow::INBOUND | Flow::ESTABLISHED;
        assert_eq!(secs(t.limit(IPPROTO_TCP, &flow(established))), 24 * 3600);
        assert_eq!(
            secs(t.limit(IPPROTO_TCP, &flow(established | Flow::FIN_SEEN))),
            60
        );
        assert_eq!(secs(t.limit(IPPROTO_UDP, &flow(established))), 120);
        for (proto, flags) in [
            (IPPROTO_TCP, established),
            (IPPROTO_TCP, established | Flow::FIN_SEEN),
            (IPPROTO_UDP, established),
        ] {
            assert_eq!(
                t.limit(proto, &flow(flags)),
                Duration::from_nanos(flow(flags).lifetime_ns(proto)),
                "the control plane and the datapath agree"
            );
        }
    }

    #[test]
    fn a_port_published_on_any_address_matches_every_destination() {
        let spec: PublishSpec = "8080:10.77.0.2:80".parse().unwrap();
        let key = FlowKey {
            proto: IPPROTO_TCP,
            _pad: [0; 3],
            src_ip: [10, 78, 0, 2],
            dst_ip: [10, 78, 0, 1],
            src_port: 40000u16.to_be_bytes(),
            dst_port: 8080u16.to_be_bytes(),
        };
        assert!(spec.matches_inbound(&key));
        let exact: PublishSpec = "10.78.0.9:8080:10.77.0.2:80".parse().unwrap();
        assert!(!exact.matches_inbound(&key));
        let udp: PublishSpec = "8080:10.77.0.2:80/udp".parse().unwrap();
        assert!(!udp.matches_inbound(&key));
    }

    #[test]
    fn a_sync_touches_only_dockers_entries() {
        let current = [
            (spec("18080:10.213.0.2:8080"), true),
            (spec("18081:10.213.0.9:8081/udp"), true),
            (spec("9000:10.213.0.3:80"), false),
            (spec("18083:10.213.0.4:80"), true),
        ];
        let wanted = BTreeSet::from([
            spec("18080:10.213.0.2:8080"),
            spec("9000:10.213.0.5:80"),
            spec("18083:10.213.0.7:80"),
            spec("18084:10.213.0.2:8084"),
        ]);
        let synced = diff(&current, &wanted);
        assert_eq!(
            synced.removed,
            [
                spec("18081:10.213.0.9:8081/udp"),
                spec("18083:10.213.0.4:80")
            ]
        );
        assert_eq!(
            synced.added,
            [spec("18083:10.213.0.7:80"), spec("18084:10.213.0.2:8084")],
            "a moved binding is replaced, a new one added"
        );
        assert_eq!(synced.held_by_user, [spec("9000:10.213.0.5:80")]);
        assert_eq!(synced.mirrored, 3);
        assert!(diff(&current[..1], &BTreeSet::from([current[0].0])).is_empty());
    }
}
