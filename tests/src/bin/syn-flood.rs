//! `syn-flood`: the lab's flood generator as a program, for `cargo xtask bench` (which runs
//! its traffic as processes, like iperf3). Sends spoofed TCP SYNs (or UDP datagrams with
//! --udp) from DEVICE in NETNS to DST for SECONDS at RATE packets/s, then prints what it sent
//! as JSON: `{"sent": N, "seconds": S}`.
//!
//! syn-flood --netns NS --device DEV --dst-mac-of NS:DEV --dst IP:PORT --sources 10.79.0.0
//!           --rate PPS --seconds S [--udp]

use std::{net::SocketAddrV4, process::ExitCode, time::Instant};

use xbr_tests::flood::{Flood, FloodProto, FloodSpec, mac_of};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("syn-flood: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let (mut netns, mut device, mut dst_mac, mut dst, mut sources) = (None, None, None, None, None);
    let (mut rate, mut seconds, mut proto) = (0u64, 1f64, FloodProto::TcpSyn);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--netns" => netns = Some(value()?),
            "--device" => device = Some(value()?),
            "--dst-mac-of" => {
                let of = value()?;
                let (ns, dev) = of
                    .split_once(':')
                    .ok_or(format!("--dst-mac-of {of}: write NETNS:DEVICE"))?;
                dst_mac = Some(mac_of(ns, dev).map_err(|e| format!("the MAC of {of}: {e}"))?);
            }
            "--dst" => {
                dst = Some(
                    value()?
                        .parse::<SocketAddrV4>()
                        .map_err(|e| e.to_string())?,
                )
            }
            "--sources" => sources = Some(value()?.parse().map_err(|e| format!("--sources: {e}"))?),
            "--rate" => rate = value()?.parse().map_err(|e| format!("--rate: {e}"))?,
            "--seconds" => seconds = value()?.parse().map_err(|e| format!("--seconds: {e}"))?,
            "--udp" => proto = FloodProto::Udp,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let missing = |what: &str| format!("{what} is required");
    let spec = FloodSpec {
        netns: netns.ok_or_else(|| missing("--netns"))?,
        device: device.ok_or_else(|| missing("--device"))?,
        dst_mac: dst_mac.ok_or_else(|| missing("--dst-mac-of"))?,
        dst: dst.ok_or_else(|| missing("--dst"))?,
        sources: sources.ok_or_else(|| missing("--sources"))?,
        proto,
        rate,
        count: None,
        seed: u64::from(std::process::id()),
    };
    let started = Instant::now();
    let flood = Flood::start(spec).map_err(|e| format!("starting: {e}"))?;
    while started.elapsed().as_secs_f64() < seconds && !flood.is_done() {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let sent = flood.finish().map_err(|e| format!("sending: {e}"))?;
    println!(
        "{{\"sent\": {sent}, \"seconds\": {:.3}}}",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
