//! Published ports (`docker run -p` semantics): parsing `[HOSTIP:]HOSTPORT:CONTAINERIP:
//! CONTAINERPORT[/tcp|/udp]`, the entries in the pinned `PUBLISHED` map, and the NATed
//! connections: retiring them when they go idle or lose their port, and counting them.

use std::{fmt, net::Ipv4Addr, str::FromStr, time::Duration};

use aya::maps::PerCpuValues;
use bridge_common::{
    Flow, FlowKey, IPPROTO_TCP, IPPROTO_UDP, NatEvent, PublishedKey, PublishedPort, lifetime,
};

use crate::{
    datapath::{FlowTable, NatTables, Pinned},
    error::{Error, Result},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    fn number(self) -> u8 {
        match self {
            Proto::Tcp => IPPROTO_TCP,
            Proto::Udp => IPPROTO_UDP,
        }
    }

    fn from_number(number: u8) -> Option<Proto> {
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

impl FromStr for PublishSpec {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        let usage = || {
            format!(
                "`{text}` is not a published port; write [HOSTIP:]HOSTPORT:CONTAINERIP:CONTAINERPORT[/tcp|/udp], e.g. 8080:172.17.0.2:80"
            )
        };
        let (ports, proto) = match text.rsplit_once('/') {
            Some((ports, "tcp")) => (ports, Proto::Tcp),
            Some((ports, "udp")) => (ports, Proto::Udp),
            Some(_) => return Err(usage()),
            None => (text, Proto::Tcp),
        };
        let parts: Vec<&str> = ports.split(':').collect();
        let (host_ip, rest) = match parts.as_slice() {
            [host_ip, rest @ ..] if rest.len() == 3 => {
                (Some(host_ip.parse().map_err(|_| usage())?), rest)
            }
            rest if rest.len() == 3 => (None, rest),
            _ => return Err(usage()),
        };
        let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(usage);
        Ok(PublishSpec {
            host_ip,
            host_port: port(rest[0])?,
            container_ip: rest[1].parse().map_err(|_| usage())?,
            container_port: port(rest[2])?,
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

    fn from_entry(key: &PublishedKey, value: &PublishedPort) -> Option<PublishSpec> {
        Some(PublishSpec {
            host_ip: (key.host_ip != [0; 4]).then(|| Ipv4Addr::from(key.host_ip)),
            host_port: u16::from_be_bytes(key.host_port),
            container_ip: Ipv4Addr::from(value.container_ip),
            container_port: u16::from_be_bytes(value.container_port),
            proto: Proto::from_number(key.proto)?,
        })
    }

    /// Whether an inbound connection to `key`'s destination came through this port.
    fn matches_inbound(&self, key: &FlowKey) -> bool {
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
}

impl Pinned {
    /// Publishes `spec`. The container must be on the bridge now (`containers` maps the
    /// bridge's container addresses to their port and MAC); the follower keeps it current.
    pub fn publish(
        &mut self,
        spec: &PublishSpec,
        containers: &std::collections::BTreeMap<Ipv4Addr, (u32, [u8; 6])>,
        bridge_mac: [u8; 6],
    ) -> Result<()> {
        let Some((ifindex, container_mac)) = containers.get(&spec.container_ip).copied() else {
            return Err(Error::Publish(format!(
                "no container on bridge {} has address {}; see the container addresses with `xbr status`",
                self.bridge, spec.container_ip
            )));
        };
        let key = spec.key();
        if let Ok(existing) = self.published.get(&key, 0)
            && let Some(existing) = PublishSpec::from_entry(&key, &existing)
            && existing != *spec
        {
            return Err(Error::Publish(format!(
                "{} is already published to {}:{}; unpublish it first with `xbr unpublish {} {existing}`",
                self.bridge_port_name(spec),
                existing.container_ip,
                existing.container_port,
                self.bridge
            )));
        }
        self.ensure_nat_tables()?;
        let value = PublishedPort {
            container_ip: spec.container_ip.octets(),
            container_port: spec.container_port.to_be_bytes(),
            // Held until the policy has been asked (`apply_published_policy`).
            flags: PublishedPort::HELD,
            _pad: 0,
            ifindex,
            container_mac,
            gateway_mac: bridge_mac,
        };
        self.published
            .insert(key, value, 0)
            .map_err(|e| Error::ebpf("writing the published ports map", e))
    }

    fn bridge_port_name(&self, spec: &PublishSpec) -> String {
        match spec.host_ip {
            Some(ip) => format!(
                "{ip}:{}/{}",
                spec.host_port,
                if spec.proto == Proto::Tcp {
                    "tcp"
                } else {
                    "udp"
                }
            ),
            None => format!(
                "port {}/{}",
                spec.host_port,
                if spec.proto == Proto::Tcp {
                    "tcp"
                } else {
                    "udp"
                }
            ),
        }
    }

    /// Unpublishes `spec` and ends the connections that came through it.
    pub fn unpublish(&mut self, spec: &PublishSpec) -> Result<usize> {
        let key = spec.key();
        match self
            .published
            .get(&key, 0)
            .ok()
            .and_then(|v| PublishSpec::from_entry(&key, &v))
        {
            Some(existing) if existing == *spec => {}
            _ => {
                return Err(Error::Publish(format!(
                    "{spec} is not published on bridge {}; list published ports with `xbr status`",
                    self.bridge
                )));
            }
        }
        self.published
            .remove(&key)
            .map_err(|e| Error::ebpf("updating the published ports map", e))?;
        let ended = self
            .retire_flows(|key, flow| flow.flags & Flow::INBOUND != 0 && spec.matches_inbound(key));
        self.release_unused_nat_tables()?;
        Ok(ended)
    }

    pub fn published(&self) -> Vec<Published> {
        let mut published: Vec<Published> = self
            .published
            .iter()
            .filter_map(|entry| entry.ok())
            .filter_map(|(key, value)| {
                Some(Published {
                    spec: PublishSpec::from_entry(&key, &value)?,
                    port_ifindex: (value.ifindex != 0).then_some(value.ifindex),
                    flags: value.flags,
                })
            })
            .collect();
        published.sort_by_key(|p| p.spec);
        published
    }

    pub fn has_published(&self) -> bool {
        self.published.keys().next().is_some()
    }

    /// Retires what has been quiet for longer than its lifetime: established connections
    /// quiet in both directions (24 h TCP, 60 s after a FIN, 120 s UDP), and transient entries
    /// (30 s; the datapath ignores them already, this frees their room). Returns how many
    /// established connections and transient entries it removed.
    pub fn expire_flows(&mut self, timeouts: &Timeouts) -> usize {
        let Some(NatTables {
            mut flows,
            mut transient,
        }) = self.nat_tables()
        else {
            return 0;
        };
        let now = monotonic_ns();
        let established: std::collections::BTreeMap<FlowKey, Flow> =
            flows.iter().filter_map(|entry| entry.ok()).collect();
        let ended = retire_established(&mut flows, |key, flow| {
            // A connection is quiet when neither direction carried a frame for the limit.
            let (last_seen, limit) = match established.get(&flow.peer) {
                Some(peer) => (
                    flow.last_seen_ns.max(peer.last_seen_ns),
                    timeouts
                        .limit(key.proto, flow)
                        .min(timeouts.limit(key.proto, peer)),
                ),
                None => (flow.last_seen_ns, timeouts.limit(key.proto, flow)),
            };
            Duration::from_nanos(now.saturating_sub(last_seen)) > limit
        });
        let expired: Vec<FlowKey> = transient
            .iter()
            .filter_map(|entry| entry.ok())
            .filter(|(key, flow)| {
                let limit = timeouts.limit(key.proto, flow);
                Duration::from_nanos(now.saturating_sub(flow.last_seen_ns)) > limit
            })
            .map(|(key, _)| key)
            .collect();
        let swept = expired
            .iter()
            .filter(|key| transient.remove(key).is_ok())
            .count();
        self.count_swept(swept);
        // Connections of a withdrawn port may have been the last users of the tables.
        let _ = self.release_unused_nat_tables();
        ended + swept
    }

    /// Removes every connection one of whose directions `retire` picks (both directions go),
    /// established or transient; returns how many connections it ended.
    pub(crate) fn retire_flows(&mut self, retire: impl Fn(&FlowKey, &Flow) -> bool) -> usize {
        let Some(NatTables {
            mut flows,
            mut transient,
        }) = self.nat_tables()
        else {
            return 0;
        };
        let mut ended = retire_established(&mut flows, &retire);
        let doomed: Vec<(FlowKey, FlowKey)> = transient
            .iter()
            .filter_map(|entry| entry.ok())
            .filter(|(key, flow)| retire(key, flow))
            .map(|(key, flow)| (key, flow.peer))
            .collect();
        let mut swept = 0;
        for (key, peer) in doomed {
            if transient.remove(&key).is_ok() {
                ended += 1;
                swept += 1 + usize::from(transient.remove(&peer).is_ok());
            }
        }
        self.count_swept(swept);
        ended
    }

    /// Adds `entries` to the `TransientSwept` counter (the datapath never writes it), so that
    /// what the LRU replaced can be told from what was removed.
    fn count_swept(&mut self, entries: usize) {
        if entries == 0 {
            return;
        }
        let index = NatEvent::TransientSwept as u32;
        let Ok(values) = self.nat_events.get(&index, 0) else {
            return;
        };
        let mut values: Vec<u64> = values.iter().copied().collect();
        if let Some(first) = values.first_mut() {
            *first += entries as u64;
        }
        if let Ok(values) = PerCpuValues::try_from(values) {
            let _ = self.nat_events.set(index, values, 0);
        }
    }

    /// The NATed connections now: how many in each table, the tables' sizes, and what
    /// happened to connections since the attachment was made.
    pub fn nat_state(&self) -> NatState {
        let now = monotonic_ns();
        let tables = self.nat_tables();
        let established = tables.as_ref().map_or(0, |tables| {
            tables
                .flows
                .iter()
                .filter_map(|entry| entry.ok())
                .filter(|(_, flow)| flow.flags & Flow::INBOUND != 0)
                .count()
        });
        let transient = tables.as_ref().map(|tables| &tables.transient);
        let (mut live, mut expired, mut entries) = (0usize, 0, 0u64);
        for (key, flow) in transient
            .into_iter()
            .flat_map(|table| table.iter().filter_map(|entry| entry.ok()))
        {
            entries += 1;
            if now.saturating_sub(flow.last_seen_ns) > flow.lifetime_ns(key.proto) {
                expired += 1;
            } else {
                live += 1;
            }
        }
        let events: Vec<(NatEvent, u64)> = NatEvent::ALL
            .iter()
            .map(|event| {
                let count = self
                    .nat_events
                    .get(&(*event as u32), 0)
                    .map(|values| values.iter().sum())
                    .unwrap_or(0);
                (*event, count)
            })
            .collect();
        let mut state = NatState {
            tables: tables.is_some(),
            established,
            established_capacity: self.capacity.established,
            // Entries in pairs; the LRU may have replaced one of a pair.
            transient: live.div_ceil(2),
            transient_entries: live,
            transient_expired: expired,
            transient_capacity: self.capacity.transient,
            replaced: 0,
            events,
        };
        // Entries that left the LRU without the datapath or the control plane removing them:
        // the kernel replaced them to make room for new ones.
        let replaced_entries = state.event(NatEvent::TransientAdded).saturating_sub(
            state.event(NatEvent::TransientRemoved)
                + state.event(NatEvent::TransientSwept)
                + entries,
        );
        state.replaced = replaced_entries / 2;
        state
    }
}

/// Removes the established connections one of whose directions `retire` picks (both
/// directions go); returns how many it ended.
fn retire_established(flows: &mut FlowTable, retire: impl Fn(&FlowKey, &Flow) -> bool) -> usize {
    let doomed: Vec<(FlowKey, FlowKey)> = flows
        .iter()
        .filter_map(|entry| entry.ok())
        .filter(|(key, flow)| retire(key, flow))
        .map(|(key, flow)| (key, flow.peer))
        .collect();
    let mut ended = 0;
    for (key, peer) in doomed {
        // A connection whose both directions were picked is counted once.
        if flows.remove(&key).is_ok() {
            ended += 1;
            let _ = flows.remove(&peer);
        }
    }
    ended
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
        let (flow_entries, transient_entries) = crate::datapath::flow_table_entries(max_flows);
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
    fn limit(&self, proto: u8, flow: &Flow) -> Duration {
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

/// CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns.
fn monotonic_ns() -> u64 {
    let now =
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

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
            let error = bad.parse::<PublishSpec>().unwrap_err();
            assert!(
                error.contains("HOSTPORT:CONTAINERIP:CONTAINERPORT"),
                "{bad}: {error}"
            );
        }
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
    fn table_sizes_follow_max_flows_and_memory() {
        assert_eq!(crate::datapath::flow_table_entries(65536), (131072, 65536));
        let default = crate::datapath::default_max_flows();
        assert!(default.is_power_of_two(), "{default}");
        assert!((4096..=65536).contains(&default), "{default}");
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
}
