//! Upgrades (run as root): the follower stopped and started again as a package upgrade does,
//! and an attachment pinned by an xbr of another pinned layout (simulated: its layout stamp
//! renamed), replaced by `xbr attach` with its hooks taken over in place. A UDP stream on the
//! fast path runs throughout and loses nothing; every port runs exactly one program.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use xbr_tests::{
    lab_support::LabBuilder,
    witness::{BridgeForwardCounter, Follower, PinRoot, stream_a_to_b, tc_programs},
};

const PORTS: [&str; 3] = ["veth-a", "veth-b", "veth-c"];

/// Samples `tc_programs` on every port until stopped; returns what was not exactly one.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(usize, Vec<String>)>,
}

impl Sampler {
    fn start(host: &str) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let host = host.to_owned();
        let thread = std::thread::spawn(move || {
            let mut samples = 0;
            let mut wrong = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                for port in PORTS {
                    let programs = tc_programs(&host, port);
                    samples += 1;
                    if programs.len() != 1 {
                        wrong.push(format!("{port}: {programs:?}"));
                    }
                }
            }
            (samples, wrong)
        });
        Sampler { stop, thread }
    }

    fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// The attachment directory of `br0` under `pins`.
fn bridge_dir(pins: &PinRoot) -> PathBuf {
    std::fs::read_dir(&pins.path)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("br0"))
        .find(|dir| dir.exists())
        .expect("br0 is attached")
}

fn layout_stamps(dir: &PathBuf) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with("layout-"))
        .collect()
}

#[test]
fn a_follower_restart_loses_nothing() {
    let lab = LabBuilder::three_containers().up();
    let spec = lab.spec().clone();
    let host = spec.host_netns();
    let pins = PinRoot::new(&host);
    let mut first = Follower::start(&host, &pins.path, "br0", &[]);
    let bridge = BridgeForwardCounter::install(&host);
    let stream = stream_a_to_b(&spec, 40401);
    let sampler = Sampler::start(&host);
    first.terminate();
    first.wait_exit(Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(200));
    let second = Follower::start(&host, &pins.path, "br0", &[]);
    std::thread::sleep(Duration::from_millis(300));
    let (samples, wrong) = sampler.finish();
    let (sent, received) = stream.finish();
    eprintln!(
        "restart: sent {sent}, received {received}; {samples} samples of the ports' programs"
    );
    assert!(wrong.is_empty(), "not one program per port: {wrong:?}");
    assert_eq!(sent, received, "datagrams lost across the restart");
    assert_eq!(
        bridge.read().ipv4_unicast,
        0,
        "the stream left the fast path during the restart"
    );
    drop(second);
}

fn another_layout_is_replaced_without_a_gap(mode: &str) {
    let lab = LabBuilder::three_containers().up();
    let spec = lab.spec().clone();
    let host = spec.host_netns();
    let pins = PinRoot::new(&host);
    pins.xbr_ok(&["attach", "br0", "--mode", mode]);
    let dir = bridge_dir(&pins);
    let stamps = layout_stamps(&dir);
    assert_eq!(stamps.len(), 1, "{stamps:?}");
    let current = stamps[0].clone();
    // An older xbr's pins: another stamp.
    std::fs::rename(dir.join(&current), dir.join("layout-0000000000000000")).unwrap();
    let (code, stdout, stderr) = pins.xbr(&["status"]);
    eprintln!("{mode}: status of the old layout ({code}): {stdout}{stderr}");
    let bridge = BridgeForwardCounter::install(&host);

    let stream = stream_a_to_b(&spec, 40402);
    let sampler = Sampler::start(&host);
    let (code, _, stderr) = pins.xbr(&["attach", "br0"]);
    std::thread::sleep(Duration::from_millis(300));
    let (samples, wrong) = sampler.finish();
    let (sent, received) = stream.finish();
    eprintln!("{mode}: sent {sent}, received {received}; {samples} samples; attach said: {stderr}");
    assert_eq!(code, 0, "attach failed: {stderr}");
    assert!(
        stderr.contains("replaced an attachment of another pinned layout"),
        "{stderr}"
    );
    assert_eq!(layout_stamps(&dir), vec![current], "the stamp is current");
    assert!(wrong.is_empty(), "not one program per port: {wrong:?}");
    assert_eq!(sent, received, "datagrams lost across the replacement");
    // A port on the new program before its map holds the endpoint hands frames to the
    // bridge meanwhile: delivered, off the fast path for at most the replacement's reconcile.
    let via_bridge = bridge.read().ipv4_unicast;
    eprintln!("{mode}: {via_bridge} of {sent} datagrams crossed the bridge during the replacement");
    assert!(
        via_bridge * 10 < sent,
        "{via_bridge} of {sent} datagrams left the fast path"
    );
    for port in PORTS {
        assert_eq!(tc_programs(&host, port), vec!["port_ingress"], "{port}");
    }
    pins.xbr_ok(&["status"]);
}

#[test]
fn another_layout_is_replaced_without_a_gap_tcx() {
    another_layout_is_replaced_without_a_gap("tcx");
}

#[test]
fn another_layout_is_replaced_without_a_gap_clsact() {
    another_layout_is_replaced_without_a_gap("clsact");
}
