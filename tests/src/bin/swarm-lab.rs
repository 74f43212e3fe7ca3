//! `swarm-lab`: the two-node Docker Swarm lab of `xbr_tests::swarm_support`, left up for
//! another program (the benchmark in xtask, which cannot link the test crate).
//!
//! swarm-lab up --tag TAG --state FILE
//!     Builds lab TAG, overlay network `xbrov` (10.251.0.0/24, attachable), containers c1 on
//!     node 1 and c2 on node 2 (`sleep 100000`), writes FILE (JSON: the nodes, the overlay
//!     network and the containers) and exits with everything up. A failure tears down what
//!     was made. Exit status 3: the lab cannot be built (Docker cannot run on this machine,
//!     or a lab tagged TAG is already up); the reason is printed.
//! swarm-lab down --state FILE
//!     Tears down exactly what FILE names (daemons only while their command lines still name
//!     the lab's paths), then removes FILE. /run/xbrsw-TAG/state.json, which every lab
//!     writes, serves too: for a lab whose test process was killed.

use std::{path::PathBuf, process::ExitCode, time::Instant};

use serde_json::{Value, json};
use xbr_tests::swarm_support::SwarmLab;

const USAGE: &str =
    "usage: swarm-lab up --tag TAG --state FILE\n       swarm-lab down --state FILE";
const NETWORK: &str = "xbrov";
const SUBNET: &str = "10.251.0.0/24";
/// Exit status when the lab cannot be built here, so a caller can report a skip.
const UNAVAILABLE: u8 = 3;

enum Action {
    Up { tag: String, state: PathBuf },
    Down { state: PathBuf },
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let action = match parse(&args) {
        Ok(action) => action,
        Err(error) => {
            eprintln!("swarm-lab: {error}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let started = Instant::now();
    let result = match action {
        Action::Up { tag, state } => up(&tag, &state),
        Action::Down { state } => down(&state),
    };
    match result {
        Ok(what) => {
            eprintln!(
                "swarm-lab: {what} in {:.1} s",
                started.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err((code, error)) => {
            eprintln!("swarm-lab: {error}");
            ExitCode::from(code)
        }
    }
}

fn parse(args: &[String]) -> Result<Action, String> {
    let (command, options) = args.split_first().ok_or("no command")?;
    let mut tag = None;
    let mut state = None;
    let mut rest = options.iter();
    while let Some(option) = rest.next() {
        let value = rest
            .next()
            .ok_or_else(|| format!("{option} needs a value"))?;
        match option.as_str() {
            "--tag" => tag = Some(value.clone()),
            "--state" => state = Some(PathBuf::from(value)),
            _ => return Err(format!("unknown option {option}")),
        }
    }
    let state = state.ok_or("--state FILE is required")?;
    match (command.as_str(), tag) {
        ("up", Some(tag)) => Ok(Action::Up { tag, state }),
        ("up", None) => Err("up needs --tag TAG".to_owned()),
        ("down", None) => Ok(Action::Down { state }),
        ("down", Some(_)) => Err("down takes no --tag: the state file names the lab".to_owned()),
        (other, _) => Err(format!("unknown command {other}")),
    }
}

fn up(tag: &str, state_file: &PathBuf) -> Result<String, (u8, String)> {
    if state_file.exists() {
        return Err((
            1,
            format!(
                "{} exists: a lab may be up; `swarm-lab down --state {0}` first",
                state_file.display()
            ),
        ));
    }
    let lab = SwarmLab::up(tag)
        .map_err(|reason| (UNAVAILABLE, format!("lab {tag} not built: {reason}")))?;
    let network = lab.create_overlay(NETWORK, SUBNET);
    let containers = [(1, "c1"), (2, "c2")].map(|(node, name)| {
        let container = lab.run_container(node, name, NETWORK);
        json!({
            "node": node,
            "name": name,
            "id": container.id,
            "ip": container.ip.to_string(),
            "mac": container.mac,
            "sandbox_key": container.sandbox_key,
        })
    });
    let mut state = lab.state();
    for (index, node) in state["nodes"]
        .as_array_mut()
        .expect("the lab's state lists its nodes")
        .iter_mut()
        .enumerate()
    {
        let overlay_netns = lab.node(index as u8 + 1).overlay_netns(&network);
        node["overlay_network_id"] = json!(network);
        node["overlay_netns"] = json!(overlay_netns);
    }
    state["overlay"] = json!({ "name": NETWORK, "id": network, "subnet": SUBNET });
    state["containers"] = json!(containers);
    let text = serde_json::to_string_pretty(&state).expect("JSON");
    // On failure `lab` drops here and takes everything down again.
    std::fs::write(state_file, text + "\n")
        .map_err(|e| (1, format!("write {}: {e}", state_file.display())))?;
    lab.keep();
    Ok(format!("lab {tag} up, state in {}", state_file.display()))
}

fn down(state_file: &PathBuf) -> Result<String, (u8, String)> {
    let text = std::fs::read_to_string(state_file)
        .map_err(|e| (1, format!("read {}: {e}", state_file.display())))?;
    let state: Value = serde_json::from_str(&text)
        .map_err(|e| (1, format!("{}: not JSON: {e}", state_file.display())))?;
    SwarmLab::down_from_state(&state).map_err(|e| (1, e))?;
    // Already gone when it was the lab's own (in its run dir).
    if let Err(e) = std::fs::remove_file(state_file)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        return Err((1, format!("remove {}: {e}", state_file.display())));
    }
    Ok(format!("lab {} down", state["tag"].as_str().unwrap_or("?")))
}
