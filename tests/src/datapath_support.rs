//! xbr's kernel programs loaded for BPF_PROG_TEST_RUN: one fresh instance (programs and
//! maps) per test, attached nowhere, with helpers to fill the maps and run frames.

use std::os::fd::AsFd as _;

use aya::{
    Ebpf, EbpfLoader,
    maps::{ArrayOfMaps, HashMap, Map, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues},
    programs::{ProgramError, SchedClassifier, TestRun, TestRunOptions, TestRunResult, Xdp},
    util::nr_cpus,
};
use bridge_common::{
    ClientHoldKey, ClientPrefix, EgressConfig, Endpoint, EndpointKey, Flow, FlowKey, HoldKey,
    NatEvent, PortRecord, PortStats, PublishedKey, PublishedPort, Verdict,
};
use xbr::datapath::{FLOW_TABLE_PROTOTYPE, FlowTable, TRANSIENT_TABLE_PROTOTYPE};

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_REDIRECT: u32 = 7;
/// TC_ACT_UNSPEC (-1) as the u32 BPF_PROG_TEST_RUN reports: "not mine, next program".
pub const TC_ACT_UNSPEC: u32 = u32::MAX;

pub use bridge_common::programs::{
    PORT as PORT_PROGRAM, UPLINK as UPLINK_PROGRAM, UPLINK_XDP as UPLINK_XDP_PROGRAM,
};

pub const XDP_PASS: u32 = 2;
pub const XDP_REDIRECT: u32 = 4;

/// The connection tables' size when a test does not choose one.
const DEFAULT_MAX_FLOWS: u32 = 4096;

pub struct Datapath {
    pub ebpf: Ebpf,
    /// The connection tables in the slots (established, transient), opened once.
    tables: Option<[FlowTable; 2]>,
}

impl Datapath {
    /// The programs, loaded (the tc ones and the uplink's XDP one), with connection tables
    /// as a published port gets them; `flow_capacity` sizes the established NAT connection
    /// table (entries, two per connection).
    pub fn load(redirect_peer: bool, flow_capacity: Option<u32>) -> Datapath {
        Datapath::load_sized(redirect_peer, flow_capacity, None)
    }

    /// `load`, with the transient table's entries too.
    pub fn load_sized(
        redirect_peer: bool,
        flow_capacity: Option<u32>,
        transient_capacity: Option<u32>,
    ) -> Datapath {
        let (flow_entries, transient_entries) =
            xbr::datapath::flow_table_entries(DEFAULT_MAX_FLOWS);
        Datapath::load_with(
            redirect_peer,
            0,
            Some((
                flow_capacity.unwrap_or(flow_entries),
                transient_capacity.unwrap_or(transient_entries),
            )),
        )
    }

    /// `load`, with the XDP program asking for its redirects with `flags` (`XDP_REDIRECT_FLAGS`):
    /// bpf_redirect refuses any but 0, so a test can see what a refused redirect does (xbr
    /// always asks with 0, which no kernel refuses).
    pub fn load_with_xdp_redirect_flags(flags: u64) -> Datapath {
        let (flow_entries, transient_entries) =
            xbr::datapath::flow_table_entries(DEFAULT_MAX_FLOWS);
        Datapath::load_with(true, flags, Some((flow_entries, transient_entries)))
    }

    /// The programs as an attachment has them before its first published port: the
    /// connection tables' slots are empty.
    pub fn load_without_connection_tables(redirect_peer: bool) -> Datapath {
        Datapath::load_with(redirect_peer, 0, None)
    }

    /// Loads the object; with `tables` (entries of the established and the transient table),
    /// makes the connection tables like the object's prototypes and puts them into the slots,
    /// as the control plane does with the first published port.
    fn load_with(
        redirect_peer: bool,
        xdp_redirect_flags: u64,
        tables: Option<(u32, u32)>,
    ) -> Datapath {
        let redirect_peer = u8::from(redirect_peer);
        let mut loader = EbpfLoader::new();
        loader
            .override_global("REDIRECT_PEER", &redirect_peer, true)
            .override_global("XDP_REDIRECT_FLAGS", &xdp_redirect_flags, true)
            .override_global(aya_log::LEVEL, &0u8, true);
        let mut ebpf = loader
            .load(xbr::datapath::OBJECT)
            .expect("xbr's eBPF object loads (run the tests as root)");
        let mut opened = None;
        if let Some((flow_entries, transient_entries)) = tables {
            let prototype = |name: &str| match ebpf.map(name) {
                Some(Map::HashMap(table) | Map::LruHashMap(table)) => table.fd().as_fd(),
                other => panic!("{name} should be a hash map: {other:?}"),
            };
            let (flows, transient) = xbr::datapath::new_flow_tables(
                [
                    prototype(FLOW_TABLE_PROTOTYPE),
                    prototype(TRANSIENT_TABLE_PROTOTYPE),
                ],
                flow_entries,
                transient_entries,
            )
            .unwrap();
            for (slot, table) in [("NAT_FLOWS", &flows), ("NAT_TRANSIENT", &transient)] {
                let mut slot: ArrayOfMaps<_, MapData> =
                    ArrayOfMaps::try_from(ebpf.map_mut(slot).unwrap()).unwrap();
                slot.set(0, table, 0).unwrap();
            }
            let typed = |table| FlowTable::try_from(Map::from_map_data(table).unwrap()).unwrap();
            opened = Some([typed(flows), typed(transient)]);
        }
        for name in [PORT_PROGRAM, UPLINK_PROGRAM] {
            let program: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
            program
                .load()
                .unwrap_or_else(|e| panic!("the verifier rejects {name}: {e:?}"));
        }
        let xdp: &mut Xdp = ebpf
            .program_mut(UPLINK_XDP_PROGRAM)
            .unwrap()
            .try_into()
            .unwrap();
        xdp.load()
            .unwrap_or_else(|e| panic!("the verifier rejects {UPLINK_XDP_PROGRAM}: {e:?}"));
        Datapath {
            ebpf,
            tables: opened,
        }
    }

    /// An endpoint as the control plane writes it: the MAC, the port's record and counters.
    pub fn add_endpoint(&mut self, mac: [u8; 6], port: u32) {
        let mut endpoints: HashMap<_, EndpointKey, Endpoint> =
            HashMap::try_from(self.ebpf.map_mut("ENDPOINTS").unwrap()).unwrap();
        endpoints
            .insert(
                EndpointKey { mac },
                Endpoint {
                    ifindex: port,
                    ..Endpoint::default()
                },
                0,
            )
            .unwrap();
        let mut ports: HashMap<_, u32, PortRecord> =
            HashMap::try_from(self.ebpf.map_mut("PORTS").unwrap()).unwrap();
        ports
            .insert(
                port,
                PortRecord {
                    endpoint_mac: mac,
                    ..PortRecord::default()
                },
                0,
            )
            .unwrap();
        let mut stats: PerCpuHashMap<_, u32, PortStats> =
            PerCpuHashMap::try_from(self.ebpf.map_mut("PORT_STATS").unwrap()).unwrap();
        let zeros = PerCpuValues::try_from(vec![PortStats::default(); nr_cpus().unwrap()]).unwrap();
        stats.insert(port, zeros, 0).unwrap();
    }

    /// Marks endpoint `mac` as the control plane does when rules exist: IPv4 frames take the
    /// fast path only between containers' own addresses (`ipv4` is this one's).
    pub fn check_ipv4(&mut self, mac: [u8; 6], ipv4: [u8; 4]) {
        let mut endpoints: HashMap<_, EndpointKey, Endpoint> =
            HashMap::try_from(self.ebpf.map_mut("ENDPOINTS").unwrap()).unwrap();
        let key = EndpointKey { mac };
        let endpoint = endpoints.get(&key, 0).unwrap();
        let checked = Endpoint {
            flags: endpoint.flags | Endpoint::CHECK_IPV4,
            ipv4,
            ..endpoint
        };
        endpoints.insert(key, checked, 0).unwrap();
    }

    pub fn publish(&mut self, key: PublishedKey, port: PublishedPort) {
        let mut published: HashMap<_, PublishedKey, PublishedPort> =
            HashMap::try_from(self.ebpf.map_mut("PUBLISHED").unwrap()).unwrap();
        published.insert(key, port, 0).unwrap();
    }

    /// An east-west hold-back as the control plane writes it: the entry, and its shape's bit.
    pub fn hold(&mut self, key: HoldKey) {
        let mut holds: HashMap<_, HoldKey, u8> =
            HashMap::try_from(self.ebpf.map_mut("HOLDS").unwrap()).unwrap();
        holds.insert(key, 1, 0).unwrap();
        let mut shapes: aya::maps::Array<_, u32> =
            aya::maps::Array::try_from(self.ebpf.map_mut("HOLD_SHAPES").unwrap()).unwrap();
        let family = u32::from(key.family == 6);
        let bits = shapes.get(&family, 0).unwrap();
        shapes.set(family, bits | 1 << key.shape, 0).unwrap();
    }

    pub fn hold_client(&mut self, key: ClientHoldKey) {
        let mut holds: HashMap<_, ClientHoldKey, u8> =
            HashMap::try_from(self.ebpf.map_mut("CLIENT_HOLDS").unwrap()).unwrap();
        holds.insert(key, 1, 0).unwrap();
    }

    /// A published port's clients in a /`len` prefix, held back.
    pub fn hold_client_prefix(&mut self, prefix: ClientPrefix, len: u8) {
        let mut holds: aya::maps::lpm_trie::LpmTrie<_, ClientPrefix, u8> =
            aya::maps::lpm_trie::LpmTrie::try_from(
                self.ebpf.map_mut("CLIENT_PREFIX_HOLDS").unwrap(),
            )
            .unwrap();
        let key = aya::maps::lpm_trie::Key::new(ClientPrefix::prefix_len(len), prefix);
        holds.insert(&key, 1, 0).unwrap();
    }

    /// The established (0) or the transient (1) connection table.
    fn table(&self, which: usize) -> &FlowTable {
        &self
            .tables
            .as_ref()
            .expect("a datapath with connection tables")[which]
    }

    /// The established connections' entries (`NAT_FLOWS`).
    pub fn flows(&self) -> Vec<(FlowKey, Flow)> {
        self.table(0).iter().map(|entry| entry.unwrap()).collect()
    }

    /// The transient connections' entries (`NAT_TRANSIENT`: not established, or closing).
    pub fn transient(&self) -> Vec<(FlowKey, Flow)> {
        self.table(1).iter().map(|entry| entry.unwrap()).collect()
    }

    /// Writes (or overwrites) a transient entry, as the datapath would have.
    pub fn put_transient(&mut self, key: FlowKey, flow: Flow) {
        let transient = &mut self.tables.as_mut().expect("connection tables")[1];
        transient.insert(key, flow, 0).unwrap();
    }

    /// Removes a transient entry, as the LRU does when it makes room.
    pub fn drop_transient(&mut self, key: &FlowKey) {
        let transient = &mut self.tables.as_mut().expect("connection tables")[1];
        transient.remove(key).unwrap();
    }

    /// Egress NAT as the control plane turns it on: the settings, and one uplink with its
    /// address.
    pub fn enable_egress(&mut self, config: EgressConfig, uplink: u32, address: [u8; 4]) {
        let mut egress: aya::maps::Array<_, EgressConfig> =
            aya::maps::Array::try_from(self.ebpf.map_mut("EGRESS").unwrap()).unwrap();
        egress.set(0, config, 0).unwrap();
        let mut uplinks: HashMap<_, u32, [u8; 4]> =
            HashMap::try_from(self.ebpf.map_mut("EGRESS_UPLINKS").unwrap()).unwrap();
        uplinks.insert(uplink, address, 0).unwrap();
    }

    /// The tuples the datapath leaves to the kernel path (`KERNEL_FLOWS`).
    pub fn kernel_flows(&self) -> Vec<FlowKey> {
        let flows: HashMap<_, FlowKey, u8> =
            HashMap::try_from(self.ebpf.map("KERNEL_FLOWS").unwrap()).unwrap();
        flows.keys().map(|key| key.unwrap()).collect()
    }

    /// The container's IPv4 address in `port`'s record, as the control plane writes it where
    /// it read the containers' addresses.
    pub fn set_port_ipv4(&mut self, port: u32, ipv4: [u8; 4]) {
        let mut ports: HashMap<_, u32, PortRecord> =
            HashMap::try_from(self.ebpf.map_mut("PORTS").unwrap()).unwrap();
        let record = ports.get(&port, 0).unwrap();
        ports
            .insert(
                port,
                PortRecord {
                    endpoint_ipv4: ipv4,
                    ..record
                },
                0,
            )
            .unwrap();
    }

    pub fn event_count(&self, event: NatEvent) -> u64 {
        let events: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map("NAT_EVENTS").unwrap()).unwrap();
        events.get(&(event as u32), 0).unwrap().iter().sum()
    }

    /// Runs `frame` through `program`; returns the return code and the frame as it left.
    pub fn run(&mut self, program: &str, frame: &[u8]) -> Result<(u32, Vec<u8>), ProgramError> {
        let program: &mut SchedClassifier =
            self.ebpf.program_mut(program).unwrap().try_into().unwrap();
        run_frame(program, frame)
    }

    /// Runs `frame` through the uplink's XDP program; returns the XDP action and the frame.
    pub fn run_xdp(&mut self, frame: &[u8]) -> Result<(u32, Vec<u8>), ProgramError> {
        let program: &mut Xdp = self
            .ebpf
            .program_mut(UPLINK_XDP_PROGRAM)
            .unwrap()
            .try_into()
            .unwrap();
        run_frame(program, frame)
    }

    pub fn verdict_count(&self, verdict: Verdict) -> u64 {
        let verdicts: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map("VERDICTS").unwrap()).unwrap();
        verdicts.get(&(verdict as u32), 0).unwrap().iter().sum()
    }

    pub fn port_stats(&self, port: u32) -> PortStats {
        let stats: PerCpuHashMap<_, u32, PortStats> =
            PerCpuHashMap::try_from(self.ebpf.map("PORT_STATS").unwrap()).unwrap();
        let mut total = PortStats::default();
        for value in stats.get(&port, 0).unwrap().iter() {
            total.add(value);
        }
        total
    }
}

/// One BPF_PROG_TEST_RUN of a frame-taking program (tc or XDP): its return code and the frame
/// as it left, with room for the frame to grow.
fn run_frame<P>(program: &P, frame: &[u8]) -> Result<(u32, Vec<u8>), ProgramError>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut out = vec![0u8; frame.len() + 256];
    let mut options = TestRunOptions::new();
    options.data_in = Some(frame);
    options.data_out = Some(&mut out);
    let result = program.test_run(options)?;
    out.truncate(result.data_size_out as usize);
    Ok((result.return_value, out))
}
