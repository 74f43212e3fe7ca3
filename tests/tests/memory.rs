//! Kernel memory that follows the work (run as root): what an attachment locks, by the
//! kernel's own figures (`xbr status --json`, read from each map's and program's fdinfo).
//! Twenty bridges in one namespace each stay under the per-bridge budget with traffic on the
//! fast path, and the model of `bridge_common::memory` (what the README's formula and the
//! bench's memory table come from) matches the kernel map by map.

use std::net::Ipv4Addr;

use bridge_common::memory::{self, MAPS, MapDefinition, NAT_TABLES, Work};
use serde_json::Value;
use xbr::lab::{LabGuard, LabSpec};
use xbr_tests::{
    lab_support::{ExtraContainers, LabBuilder, assert_ping, unique_name},
    witness::PinRoot,
};

/// What one attached bridge with a few containers and nothing published may lock, maps and
/// programs together (docs/DESIGN.md, "Memory"): 512 KiB, and 4 KiB more per CPU.
fn per_bridge_budget(cpus: u64) -> u64 {
    512 * 1024 + 4096 * cpus
}

fn cpus() -> u64 {
    aya::util::nr_cpus().expect("the number of possible CPUs") as u64
}

/// The attachment of `bridge` in `xbr status --json`.
fn bridge_status(pins: &PinRoot, bridge: &str) -> Value {
    let status = pins.status();
    status["bridges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == bridge)
        .unwrap_or_else(|| panic!("{bridge} in status: {status}"))
        .clone()
}

fn locked_bytes(bridge: &Value) -> u64 {
    bridge["memory"]["locked_bytes"].as_u64().unwrap()
}

/// A lab whose host namespace holds `count` bridges (br0 from the lab, br1.. added) with two
/// containers each, on subnets of their own.
struct Bridges {
    lab: LabGuard,
    _more: Vec<ExtraContainers>,
    /// Per bridge: its name and its two containers' (namespace, address).
    bridges: Vec<(String, [(String, Ipv4Addr); 2])>,
}

impl Bridges {
    fn up(count: u8) -> Bridges {
        let mut spec = LabBuilder::three_containers().build();
        spec.containers.truncate(2);
        let lab = LabGuard::up(spec.clone()).expect("the lab comes up");
        let host = spec.host_netns();
        let first = |name: &str| {
            let container = spec.container(name).unwrap();
            (spec.container_netns(name), container.address.addr)
        };
        let mut bridges = vec![("br0".to_owned(), [first("a"), first("b")])];
        let mut more = Vec::new();
        for index in 1..count {
            let bridge = format!("br{index}");
            xbr_tests::lab_support::ip_in(&host, &["link", "add", &bridge, "type", "bridge"]);
            xbr_tests::lab_support::ip_in(&host, &["link", "set", &bridge, "up"]);
            let other = LabSpec {
                bridge: xbr::lab::BridgeSpec {
                    name: bridge.clone(),
                    address: None,
                },
                ..spec.clone()
            };
            let mut containers = ExtraContainers::new(&other);
            let pair = [2u8, 3].map(|last| {
                let netns = unique_name("mem");
                let address = Ipv4Addr::new(10, 88, index, last);
                containers.add(
                    &netns,
                    &format!("v{index}-{last}"),
                    &format!("02:88:00:00:{index:02x}:{last:02x}"),
                    &format!("{address}/24"),
                );
                (netns, address)
            });
            more.push(containers);
            bridges.push((bridge, pair));
        }
        Bridges {
            lab,
            _more: more,
            bridges,
        }
    }

    fn spec(&self) -> &LabSpec {
        self.lab.spec()
    }
}

#[test]
fn twenty_bridges_each_lock_less_than_the_budget_with_traffic_on_the_fast_path() {
    let lab = Bridges::up(20);
    let pins = PinRoot::new(&lab.spec().host_netns());
    for (bridge, _) in &lab.bridges {
        pins.xbr_ok(&["attach", bridge]);
    }
    for (bridge, [(a, _), (b, b_address)]) in &lab.bridges {
        assert_ping(a, *b_address);
        let stats: Value =
            serde_json::from_str(&pins.xbr_ok(&["stats", bridge, "--json"])).unwrap();
        let endpoints = stats["endpoints"].as_array().unwrap();
        assert_eq!(endpoints.len(), 2, "{bridge}: {stats}");
        for endpoint in endpoints {
            assert!(
                endpoint["fast_path_packets"].as_u64().unwrap() > 0,
                "{bridge}: ping between {a} and {b} should take the fast path: {endpoint}"
            );
        }
    }
    let budget = per_bridge_budget(cpus());
    let mut total = 0;
    for (bridge, _) in &lab.bridges {
        let status = bridge_status(&pins, bridge);
        let locked = locked_bytes(&status);
        assert!(
            locked <= budget,
            "{bridge} locks {locked} bytes, over the budget of {budget}: {}",
            status["memory"]
        );
        total += locked;
    }
    eprintln!(
        "20 bridges lock {} KiB together, {} KiB each on average",
        total / 1024,
        total / 1024 / 20
    );
}

/// The definition of the map the kernel names `name`.
fn definition(name: &str) -> Option<&'static MapDefinition> {
    MAPS.iter()
        .chain(NAT_TABLES.iter())
        .find(|map| map.name == name)
}

/// Checks every map of `bridge`'s attachment against its definition and the model's bytes,
/// with `entries` of each map as given (0 when not named).
fn assert_model_matches(bridge: &Value, entries: &[(&str, u64)]) {
    let cpus = cpus();
    let maps = bridge["memory"]["maps"].as_array().unwrap();
    let mut seen = Vec::new();
    for map in maps {
        let name = map["name"].as_str().unwrap();
        // The object's read-only data (its global constants): not one of xbr's maps.
        if name.starts_with('.') {
            continue;
        }
        let definition = definition(name)
            .unwrap_or_else(|| panic!("map {name} has no definition in bridge_common::memory"));
        assert_eq!(
            map["type"].as_str().unwrap(),
            format!("{:?}", definition.kind),
            "{name}: {map}"
        );
        assert_eq!(
            map["key_size"].as_u64().unwrap() as u32,
            definition.key_size,
            "{name}"
        );
        assert_eq!(
            map["value_size"].as_u64().unwrap() as u32,
            definition.value_size,
            "{name}"
        );
        let max_entries = map["max_entries"].as_u64().unwrap() as u32;
        if let Some(defined) = definition.max_entries {
            assert_eq!(max_entries, defined, "{name}");
        }
        let no_prealloc = map["flags"].as_u64().unwrap() & 1 != 0;
        assert_eq!(!no_prealloc, definition.preallocated, "{name}: {map}");
        let held = entries
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0, |(_, count)| *count);
        let modelled = memory::map_bytes(definition, max_entries, held, cpus);
        assert_eq!(
            map["bytes"].as_u64().unwrap(),
            modelled,
            "{name} with {held} entries on {cpus} CPUs: the kernel's figure against the model"
        );
        seen.push(name.to_owned());
    }
    for definition in MAPS {
        assert!(
            seen.iter().any(|name| name == definition.name),
            "{} is defined but the attachment has no such map: {seen:?}",
            definition.name
        );
    }
}

#[test]
fn the_memory_model_matches_the_kernel_and_the_nat_tables_come_and_go_with_published_ports() {
    let lab = LabBuilder::three_containers().with_uplink().up();
    let spec = lab.spec().clone();
    let pins = PinRoot::new(&spec.host_netns());
    pins.xbr_ok(&[
        "attach",
        "br0",
        "--uplink",
        "uplink0",
        "--max-flows",
        "1024",
    ]);
    let ports = spec.containers.len() as u64;
    let per_port = [
        ("ENDPOINTS", ports),
        ("PORTS", ports),
        ("PORT_STATS", ports),
        ("UPLINKS", 1),
    ];

    let unpublished = bridge_status(&pins, "br0");
    assert_eq!(
        unpublished["nat"]["tables"], false,
        "{}",
        unpublished["nat"]
    );
    assert_model_matches(&unpublished, &per_port);
    let work = Work {
        cpus: cpus(),
        ports,
        uplinks: 1,
        published: 0,
        connections: 0,
        max_flows: None,
        logging: false,
        socket_hooks: false,
        local_addresses: 0,
    };
    assert_eq!(
        unpublished["memory"]["maps_bytes"].as_u64().unwrap(),
        memory::attachment_bytes(&work) + rodata_bytes(&unpublished),
        "the whole attachment against the model"
    );

    let container = spec.containers[0].address.addr;
    pins.xbr_ok(&["publish", "br0", &format!("8080:{container}:80")]);
    let published = bridge_status(&pins, "br0");
    assert_eq!(published["nat"]["tables"], true, "{}", published["nat"]);
    let mut with_published = per_port.to_vec();
    // (No socket hooks here: their counters are made only with them.)
    with_published.push(("PUBLISHED", 1));
    assert_model_matches(&published, &with_published);
    let names: Vec<&str> = published["memory"]["maps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|map| map["name"].as_str().unwrap())
        .collect();
    for table in NAT_TABLES {
        assert!(
            names.contains(&table.name),
            "{} once a port is published: {names:?}",
            table.name
        );
    }
    assert_eq!(
        published["memory"]["maps_bytes"].as_u64().unwrap(),
        memory::attachment_bytes(&Work {
            published: 1,
            max_flows: Some(1024),
            ..work
        }) + rodata_bytes(&published),
    );

    pins.xbr_ok(&["unpublish", "br0", &format!("8080:{container}:80")]);
    let again = bridge_status(&pins, "br0");
    assert_eq!(again["nat"]["tables"], false, "{}", again["nat"]);
    assert_eq!(
        again["memory"]["maps_bytes"], unpublished["memory"]["maps_bytes"],
        "the connection tables' memory goes with the last published port"
    );
}

/// The object's read-only data map, which the model leaves out.
fn rodata_bytes(bridge: &Value) -> u64 {
    bridge["memory"]["maps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|map| map["name"].as_str().unwrap().starts_with('.'))
        .map(|map| map["bytes"].as_u64().unwrap())
        .sum()
}
