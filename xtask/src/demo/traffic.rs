//! Traffic between two lab containers: ping to show they reach each other, then one iperf3
//! TCP stream, its throughput read from `iperf3 -J`.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::cmd;
use crate::cmd::{Interrupt, Processes, run_captured};

const IPERF3_PORT: u16 = 5201;
/// From `iperf3 -s -1` starting to its socket listening; it takes milliseconds.
const SERVER_START: Duration = Duration::from_secs(5);

/// A lab container, as the demo addresses it.
pub struct Container {
    pub name: String,
    pub netns: String,
    pub ip: String,
}

/// Pings TO from FROM three times; returns "3/3 replies, rtt avg 0.06 ms".
pub fn ping(from: &Container, to: &Container, interrupt: &Interrupt) -> anyhow::Result<String> {
    let doing = format!("pinging {} ({}) from {}", to.name, to.ip, from.name);
    let mut ping = cmd::in_netns(&from.netns, "ping");
    ping.args(["-c", "3", "-i", "0.2", "-W", "2", "-q", &to.ip]);
    let captured = run_captured(&mut ping, &doing, Duration::from_secs(10), interrupt)?;
    if !captured.status.success() {
        bail!(
            "{doing}: no reply ({}): {}{}",
            captured.status,
            captured.stdout.trim(),
            captured.stderr.trim()
        );
    }
    Ok(ping_summary(&captured.stdout))
}

fn ping_summary(output: &str) -> String {
    let mut summary = String::new();
    for line in output.lines() {
        if let Some((sent, rest)) = line.split_once(" packets transmitted, ") {
            let received = rest.split(' ').next().unwrap_or("?");
            summary = format!("{received}/{sent} replies");
        }
        if let Some(rtts) = line.strip_prefix("rtt min/avg/max/mdev = ") {
            let avg = rtts.split('/').nth(1).unwrap_or("?");
            summary.push_str(&format!(", rtt avg {avg} ms"));
        }
    }
    summary
}

/// One TCP stream FROM -> TO for SECONDS; returns what the receiver got, in bits per second.
/// The server (`iperf3 -s -1`, in TO) serves this one client and exits; it is killed if not.
pub fn tcp_throughput(
    from: &Container,
    to: &Container,
    seconds: u32,
    processes: &mut Processes,
    interrupt: &Interrupt,
) -> anyhow::Result<f64> {
    let what = format!("the iperf3 server in {}", to.netns);
    let server = processes.start(&what, cmd::in_netns(&to.netns, "iperf3").args(["-s", "-1"]))?;
    wait_listening(&to.netns, server, &what, processes, interrupt)?;

    let doing = format!("measuring TCP {} -> {} with iperf3", from.name, to.name);
    let mut client = cmd::in_netns(&from.netns, "iperf3");
    client.args(["-c", &to.ip, "-t", &seconds.to_string(), "-J"]);
    let timeout = Duration::from_secs(u64::from(seconds) + 15);
    let captured = run_captured(&mut client, &doing, timeout, interrupt)?;
    // iperf3 -J reports its errors inside the JSON, also when it exits 1.
    let report: Value = serde_json::from_str(&captured.stdout).with_context(|| {
        format!(
            "{doing}: iperf3 printed no JSON ({}): {}",
            captured.status,
            captured.stderr.trim()
        )
    })?;
    let bits_per_second = received_bits_per_second(&report).with_context(|| doing.clone())?;
    processes.finish(server, Duration::from_secs(2))?;
    Ok(bits_per_second)
}

fn wait_listening(
    netns: &str,
    server: u32,
    what: &str,
    processes: &mut Processes,
    interrupt: &Interrupt,
) -> anyhow::Result<()> {
    let port = format!(":{IPERF3_PORT}");
    let deadline = Instant::now() + SERVER_START;
    loop {
        interrupt
            .check()
            .with_context(|| format!("starting {what}"))?;
        if let Some((status, stderr)) = processes.exited(server)? {
            bail!(
                "{what} exited before it listened ({status}): {}",
                stderr.trim()
            );
        }
        let listening = cmd::output(
            cmd::in_netns(netns, "ss").args(["-Hltn", "sport", "=", &port]),
            &format!("checking whether {what} listens"),
        )?;
        if !listening.trim().is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{what} (pid {server}) did not listen on port {IPERF3_PORT} within {}s",
                SERVER_START.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn received_bits_per_second(report: &Value) -> anyhow::Result<f64> {
    if let Some(error) = report["error"].as_str() {
        bail!("iperf3 says: {error}");
    }
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3's JSON has no end.sum_received.bits_per_second")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summarises_ping() {
        let output = "PING 10.77.0.3 (10.77.0.3) 56(84) bytes of data.\n\n--- 10.77.0.3 ping statistics ---\n\
                      3 packets transmitted, 3 received, 0% packet loss, time 405ms\n\
                      rtt min/avg/max/mdev = 0.041/0.060/0.083/0.017 ms\n";
        assert_eq!(ping_summary(output), "3/3 replies, rtt avg 0.060 ms");
    }

    #[test]
    fn reads_iperf3_results_and_errors() {
        let report = serde_json::json!({"end": {"sum_received": {"bits_per_second": 2.5e10}}});
        assert_eq!(received_bits_per_second(&report).unwrap(), 2.5e10);
        let failed =
            serde_json::json!({"error": "unable to connect to server: Connection refused"});
        assert!(
            received_bits_per_second(&failed)
                .unwrap_err()
                .to_string()
                .contains("Connection refused")
        );
    }
}
