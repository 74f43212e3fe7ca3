//! Apply: bring a bridge's pinned datapath to what the plan wants. A first attach loads the
//! programs and pins them with empty maps; from then on every attach (and every event of a
//! follower) reconciles the pinned state: removals first, then additions, so that at every
//! moment each map entry points at a port that holds it. Also reads the pins back for
//! `status`, `stats` and `detach`.
//!
//! This file holds the entry points (`attach`, `detach`) and the attach options; the rest is
//! split by concern, every method of the pinned state (`Pinned`) in one of these files:
//! - `pinned`: the pinned state itself, created (programs loaded and pinned) and opened
//!   again, and the NAT connection tables made and removed behind their slots;
//! - `hooking`: putting the programs on ports and uplinks (tcx, clsact, XDP), reading back
//!   what the kernel runs there, and taking them off;
//! - `steps`: reconcile's safety ordering as a pure, tested list of steps;
//! - `apply`: bringing the pinned state to a plan (`Pinned::reconcile`, executing those
//!   steps) and the policy's hold-backs;
//! - `published`: the published ports in the pinned map (`xbr publish`, Docker's bindings)
//!   and the NATed connections through them: retiring and counting them;
//! - `snapshot`: reading an attachment back for `status` and `stats`.

mod apply;
mod egress;
mod hooking;
mod pinned;
mod published;
mod replace;
mod snapshot;
mod sockets;
mod steps;

use std::path::{Path, PathBuf};

use bridge_common::{AttachMode, UplinkMode};

pub use apply::{Changes, PublishedApplied};
pub use bridge_common::SocketCounts;
pub use bridge_common::memory::flow_table_entries;
pub use egress::EgressApplied;
use hooking::unpin_link;
pub use hooking::{Modes, Role, UnknownMode, mode_name, uplink_mode_name, xdp_attach_name};
pub use pinned::{
    FLOW_TABLE_PROTOTYPE, FlowTable, MAX_MAX_FLOWS, MIN_MAX_FLOWS, OBJECT, Pinned,
    TRANSIENT_TABLE_PROTOTYPE, default_max_flows, new_flow_tables,
};
pub use snapshot::{Attachment, read};
pub use sockets::{SocketHooks, SocketHooksChoice, cgroup2_root, netns_cookie};

use crate::{
    error::{Error, Result},
    features::Features,
    observe::UplinkView,
    pins,
    plan::Plan,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeChoice {
    /// tcx where the kernel has it (6.6+), clsact before.
    Auto,
    Tcx,
    Clsact,
}

impl ModeChoice {
    pub fn resolve(self, features: &Features) -> Result<AttachMode> {
        match self {
            ModeChoice::Auto if features.tcx => Ok(AttachMode::Tcx),
            ModeChoice::Auto | ModeChoice::Clsact => Ok(AttachMode::Clsact),
            ModeChoice::Tcx if features.tcx => Ok(AttachMode::Tcx),
            ModeChoice::Tcx => Err(Error::MissingFeature {
                feature: "tcx links",
                detail: format!(
                    "kernel {} is older than 6.6; use --mode clsact",
                    features.kernel
                ),
            }),
        }
    }
}

/// How to hook the uplinks (`--uplink-mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum UplinkModeChoice {
    /// tc: right for every uplink. XDP cannot tell a frame with a partial (offloaded) L4
    /// checksum from a full one, and its redirect into a container's veth is dropped unless
    /// the container's end has NAPI (GRO on, or an XDP program) - neither can be probed from
    /// here, so xdp is never chosen automatically. A bridge attached already keeps its mode.
    Auto,
    /// The tc program alone.
    Tc,
    /// An XDP program in front of the tc program (native where the driver has it, else
    /// generic): published-port connections are delivered from XDP, the rest goes on to tc.
    /// Only for uplinks whose frames carry full checksums (physical NICs), and containers
    /// whose eth0 has GRO on (`ethtool -K eth0 gro on`, kernel 5.13+) or an XDP program.
    Xdp,
}

impl UplinkModeChoice {
    pub fn resolve(self, features: &Features) -> Result<UplinkMode> {
        match self {
            UplinkModeChoice::Auto | UplinkModeChoice::Tc => Ok(UplinkMode::Tc),
            UplinkModeChoice::Xdp if features.xdp => Ok(UplinkMode::Xdp),
            UplinkModeChoice::Xdp => Err(Error::MissingFeature {
                feature: "XDP programs (BPF_PROG_TYPE_XDP) with bpf links",
                detail: format!(
                    "kernel {} refused a test program or is older than 5.9; use --uplink-mode tc",
                    features.kernel
                ),
            }),
        }
    }
}

/// How a bridge is to be attached, as the user chose (what an attached bridge has already
/// is checked against them, not changed).
#[derive(Clone, Copy, Debug)]
pub struct Choices<'a> {
    pub mode: ModeChoice,
    pub uplink_mode: UplinkModeChoice,
    /// Established connections the new datapath's NAT table holds (None:
    /// `default_max_flows()`).
    pub max_flows: Option<u32>,
    /// Whether and where to hook the socket programs.
    pub socket_hooks: &'a SocketHooksChoice,
}

/// The result of `attach`.
#[derive(Debug)]
pub struct Attached {
    pub dir: PathBuf,
    pub mode: AttachMode,
    pub uplink_mode: UplinkMode,
    /// False when the bridge was attached already and this attach brought it up to date.
    pub created: bool,
    /// The pins were an interrupted attach or detach, removed before attaching afresh.
    pub replaced_incomplete: bool,
    /// The pins were of another layout (an xbr upgrade): replaced, their hooks taken over in
    /// place. Holds the layout found (None: pinned before layouts were stamped).
    pub replaced_layout: Option<Option<String>>,
    pub ports: usize,
    pub endpoints: usize,
    pub changes: Changes,
}

/// Attaches `plan`'s bridge (and hooks `uplinks` for its published ports): creates the pinned
/// datapath, or picks up the one already pinned and reconciles it. A failed first attach
/// removes everything it made. An attached bridge keeps its modes, sizes and socket hooks.
pub fn attach(
    plan: &Plan,
    uplinks: &[UplinkView],
    choices: &Choices,
    features: &Features,
    root: &Path,
) -> Result<Attached> {
    let Choices {
        mode,
        uplink_mode,
        max_flows,
        socket_hooks,
    } = *choices;
    match Pinned::open(root, &plan.bridge) {
        Ok(pinned) => {
            return reattach(pinned, plan, uplinks, choices, features);
        }
        Err(Error::NotAttached { .. } | Error::Incomplete { .. }) => {}
        Err(Error::OtherLayout { found, .. }) => {
            return replace::replace(plan, uplinks, choices, features, root, found);
        }
        Err(error) => return Err(error),
    }
    // Nothing, or what an attach or detach stopped half-way left: start afresh. (The caller's
    // writer lock may have made the directory already.)
    let dir = pins::bridge_dir(root, &plan.bridge)?;
    let replaced_incomplete = holds_pins(&dir);
    if dir.exists() {
        pins::clear(&dir)?;
    }
    let mode = mode.resolve(features)?;
    let uplink_mode = uplink_mode.resolve(features)?;
    let max_flows = max_flows.unwrap_or_else(default_max_flows);
    let socket_cgroup = socket_hooks.resolve()?;
    let mut pinned = match Pinned::create(
        plan,
        mode,
        uplink_mode,
        max_flows,
        socket_cgroup.as_deref(),
        features,
        root,
        &dir,
    ) {
        Ok(pinned) => pinned,
        Err(error) => {
            let _ = pins::remove(&dir, root);
            return Err(error);
        }
    };
    // Uplinks first: their records say which to hook, so an attach stopped while hooking
    // ports leaves the next one only ports to finish.
    let attached = pinned
        .hook_uplinks(plan, uplinks)
        .and_then(|uplinks_added| {
            let mut changes = pinned.reconcile(plan, true)?;
            changes.uplinks_added = uplinks_added;
            Ok(changes)
        });
    match attached {
        Ok(changes) => {
            let mut attached = pinned.attached(plan, true, changes);
            attached.replaced_incomplete = replaced_incomplete;
            Ok(attached)
        }
        Err(error) => {
            let _ = pinned.detach();
            Err(error)
        }
    }
}

/// An attach of an attached bridge: same modes, brought up to date.
fn reattach(
    mut pinned: Pinned,
    plan: &Plan,
    uplinks: &[UplinkView],
    choices: &Choices,
    features: &Features,
) -> Result<Attached> {
    let Choices {
        mode,
        uplink_mode,
        max_flows,
        socket_hooks,
    } = *choices;
    socket_hooks.check(&pinned)?;
    if let Some(wanted) = max_flows
        && wanted as usize != pinned.capacity.established
    {
        return Err(Error::FlowTableSize {
            bridge: plan.bridge.clone(),
            attached: pinned.capacity.established,
            wanted,
        });
    }
    if mode != ModeChoice::Auto {
        let wanted = mode.resolve(features)?;
        if pinned.modes.attach != wanted {
            return Err(Error::ModeMismatch {
                bridge: plan.bridge.clone(),
                attached: mode_name(pinned.modes.attach),
                wanted: mode_name(wanted),
            });
        }
    }
    if uplink_mode != UplinkModeChoice::Auto {
        let wanted = uplink_mode.resolve(features)?;
        if pinned.modes.uplink != wanted {
            let name = |mode| match mode {
                UplinkMode::Tc => "uplink tc",
                UplinkMode::Xdp => "uplink xdp",
            };
            return Err(Error::ModeMismatch {
                bridge: plan.bridge.clone(),
                attached: name(pinned.modes.uplink),
                wanted: name(wanted),
            });
        }
    }
    let mut changes = pinned.reconcile(plan, false)?;
    changes.uplinks_added = pinned.hook_uplinks(plan, uplinks)?;
    // Without a follower, an attach is when closed connections get retired.
    pinned.expire_flows(&crate::publish::Timeouts::default());
    Ok(pinned.attached(plan, false, changes))
}

/// Whether `dir` holds any pin (its follower's lock directory aside).
fn holds_pins(dir: &Path) -> bool {
    let follower = pins::follower_dir(dir);
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries
            .filter_map(|e| e.ok())
            .any(|entry| entry.path() != follower)
    })
}

/// What detach removed.
#[derive(Debug)]
pub struct Detached {
    pub dir: PathBuf,
    pub ports: usize,
}

impl Pinned {
    fn attached(&self, plan: &Plan, created: bool, changes: Changes) -> Attached {
        Attached {
            dir: self.dir.clone(),
            mode: self.modes.attach,
            uplink_mode: self.modes.uplink,
            created,
            replaced_incomplete: false,
            replaced_layout: None,
            ports: self.ports.keys().filter_map(|k| k.ok()).count(),
            endpoints: plan.endpoints.len(),
            changes,
        }
    }

    /// Whether the container with `mac` and `addresses` behind `port` is on the fast path
    /// (recorded, hooked, delivered to) with no hold-back naming its addresses: what a
    /// reconcile that saw it left. (Lets a
    /// writer queued behind that reconcile, such as one of many CNI ADDs started together,
    /// skip its own.)
    pub fn serves(&self, port: u32, mac: [u8; 6], addresses: &[std::net::Ipv4Addr]) -> bool {
        use bridge_common::{EndpointKey, HoldKey};
        let Ok(record) = self.ports.get(&port, 0) else {
            return false;
        };
        let recorded = record.endpoint_mac == mac;
        // Hooks can be removed without an event (`bpftool link detach`): look.
        let hooked = self
            .drift(
                Role::Port,
                &std::collections::BTreeMap::from([(port, record)]),
            )
            .is_ok_and(|drifted| drifted.is_empty());
        let delivered = self
            .endpoints
            .get(&EndpointKey { mac }, 0)
            .is_ok_and(|endpoint| endpoint.ifindex == port);
        let names = |key: &HoldKey, address: &std::net::Ipv4Addr| {
            key.family == 4
                && ((key.shape & HoldKey::SOURCE != 0 && key.source[..4] == address.octets())
                    || (key.shape & HoldKey::DESTINATION != 0
                        && key.destination[..4] == address.octets()))
        };
        let held = self
            .holds
            .keys()
            .filter_map(|key| key.ok())
            .any(|key| addresses.iter().any(|address| names(&key, address)));
        recorded && hooked && delivered && !held
    }

    /// How many ports hold the program now.
    pub fn hooked_ports(&self) -> usize {
        self.ports.keys().filter_map(|k| k.ok()).count()
    }

    /// Removes everything: hooks, qdiscs xbr added, pins (the bridge record first, so a
    /// detach stopped half-way leaves pins that say so).
    pub fn detach(self) -> Result<Detached> {
        let ports = self.records(Role::Port)?;
        for (ifindex, record) in &ports {
            self.unhook(Role::Port, *ifindex, record)?;
        }
        for (ifindex, record) in &self.records(Role::Uplink)? {
            // XDP first: it runs in front of the tc program.
            unpin_link(&pins::uplink_xdp_pin(&self.dir, *ifindex), *ifindex, "XDP")?;
            self.unhook(Role::Uplink, *ifindex, record)?;
        }
        pins::remove(&self.dir, &self.root)?;
        Ok(Detached {
            dir: self.dir.clone(),
            ports: ports.len(),
        })
    }
}

/// Removes the attachment of `bridge`. Pins that are not a whole attachment (an attach or
/// detach stopped half-way) are removed as they are: links are detached with their pins, and
/// clsact filters exist only once the attachment is whole.
pub fn detach(root: &Path, bridge: &str) -> Result<Detached> {
    let opened = match Pinned::open(root, bridge) {
        // Another layout's attachment is whole: its hooks (clsact filters have no pins) are
        // taken off as this xbr's are, when its records can be read.
        Err(Error::OtherLayout { .. }) => Pinned::open_any_layout(root, bridge),
        opened => opened,
    };
    match opened {
        Ok(pinned) => pinned.detach(),
        Err(Error::BrokenPins { pins: dir, .. } | Error::Incomplete { pins: dir, .. }) => {
            pins::remove(&dir, root)?;
            Ok(Detached { dir, ports: 0 })
        }
        Err(error) => Err(error),
    }
}
