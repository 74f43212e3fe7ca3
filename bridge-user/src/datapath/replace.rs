//! Replacing an attachment of another pinned layout (an xbr upgrade that changed the maps or
//! records) without a moment when a port runs no program or two.
//!
//! The new programs and maps are loaded into a staging directory beside the bridge's and
//! filled by a reconcile as on a first attach. Where that reconcile would hook a port or an
//! uplink, it takes over the old hook in place instead (`Pinned::adopt_hook`): a tcx link is
//! updated to the new program (BPF_LINK_UPDATE, atomic) and its pin moved into the staging
//! directory; a clsact filter is replaced at its priority and handle (RTM_NEWTFILTER without
//! NLM_F_CREATE/EXCL: cls_bpf swaps the program atomically). The reconcile's order still
//! holds: a port is hooked by the new program before any new map entry delivers to it, and
//! the old program, on the ports not yet taken over, reads the old maps, which are left as
//! they are until every hook is taken over. Then the old pins are removed (the bridge record
//! first) and the staging pins moved into the bridge's directory (the bridge record last),
//! which keeps its writer and follower locks throughout.
//!
//! Carried over: what the plan is made of (ports, endpoints, Docker's bindings, hold-backs),
//! the published ports when the old published map can still be read. Lost: the NAT connection
//! tables (connections through published ports start again), the counters, and in clsact
//! mode whether xbr added the port's qdisc (a later detach leaves an empty clsact qdisc).
//! Uplink xdp mode is not replaced (the old attachment is left as it is, with the error).

use std::path::{Path, PathBuf};

use aya::programs::{
    ProgramInfo, SchedClassifier, TcAttachType,
    links::{FdLink, PinnedLink},
    tc::SchedClassifierLink,
};
use bridge_common::{AttachMode, PortRecord, UplinkMode};

use super::{Attached, Choices, default_max_flows, hooking::Role, pinned::Pinned};
use crate::{
    error::{Error, Result},
    features::Features,
    hooks::{self, Observed},
    observe::UplinkView,
    pins,
    plan::{Plan, PlannedPort},
};

/// The old attachment whose hooks a new one takes over.
pub(crate) struct Adopt {
    dir: PathBuf,
    port_program_id: u32,
    uplink_program_id: u32,
}

/// The staging directory of `bridge`'s replacement: `pins::REPLACEMENT_PREFIX` and the
/// bridge's name, longer than any interface name (bpffs refuses names with a dot).
pub fn staging_dir(root: &Path, bridge: &str) -> Result<PathBuf> {
    Ok(pins::netns_dir(root)?.join(format!("{}{bridge}", pins::REPLACEMENT_PREFIX)))
}

/// Replaces the attachment of `plan`'s bridge, of another layout (`found`), with this xbr's.
pub(super) fn replace(
    plan: &Plan,
    uplinks: &[UplinkView],
    choices: &Choices,
    features: &Features,
    root: &Path,
    found: Option<String>,
) -> Result<Attached> {
    let dir = pins::bridge_dir(root, &plan.bridge)?;
    let other = |detail: &str| {
        tracing::warn!(
            "{}: cannot replace the pinned layout: {detail}",
            plan.bridge
        );
        Error::OtherLayout {
            bridge: plan.bridge.clone(),
            pins: dir.clone(),
            found: found.clone(),
            wanted: pins::layout_stamp().to_owned(),
        }
    };
    let program_id = |name: &str| ProgramInfo::from_pin(dir.join(name)).map(|info| info.id());
    let (Ok(port_program_id), Ok(uplink_program_id)) = (
        program_id(pins::PORT_PROGRAM),
        program_id(pins::UPLINK_PROGRAM),
    ) else {
        return Err(other("its programs cannot be read"));
    };
    let names: Vec<String> = std::fs::read_dir(&dir)
        .map_err(|e| Error::io(format!("listing {}", dir.display()), e))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    let link_pin = |name: &String| pins::parse_link_pin(name).map(|(kind, _)| kind);
    if names
        .iter()
        .any(|name| link_pin(name) == Some(pins::LinkPin::UplinkXdp))
        || dir.join(pins::UPLINK_XDP_PROGRAM).exists()
    {
        return Err(other("uplink xdp mode"));
    }
    // The old modes and sizes, when its record can still be read; else its pins say the mode.
    let old = Pinned::open_any_layout(root, &plan.bridge).ok();
    let mode = match &old {
        Some(old) => old.modes.attach,
        None if names.iter().any(|name| link_pin(name).is_some()) => AttachMode::Tcx,
        None => choices.mode.resolve(features)?,
    };
    let max_flows = old
        .as_ref()
        .map(|old| old.record.max_flows)
        .or(choices.max_flows)
        .unwrap_or_else(default_max_flows);
    let socket_cgroup = match &old {
        Some(old) if old.record.socket_cgroup != 0 => {
            super::sockets::cgroup_path(old.record.socket_cgroup)
        }
        _ => choices.socket_hooks.resolve()?,
    };
    // The old uplinks stay hooked: from its records, else its tcx link pins.
    let mut old_uplinks: Vec<u32> = match &old {
        Some(old) => old.uplink_ifindexes(),
        None => names
            .iter()
            .filter_map(|name| pins::parse_link_pin(name))
            .filter(|(kind, _)| *kind == pins::LinkPin::Uplink)
            .map(|(_, ifindex)| ifindex)
            .collect(),
    };
    old_uplinks.retain(|ifindex| !uplinks.iter().any(|u| u.ifindex == *ifindex));
    let mut uplinks = uplinks.to_vec();
    uplinks.extend(old_uplinks.into_iter().filter_map(|ifindex| {
        let name = nix::net::if_::if_indextoname(ifindex).ok()?;
        Some(UplinkView {
            name: name.into_string().ok()?,
            ifindex,
        })
    }));
    drop(old);
    let staging = staging_dir(root, &plan.bridge)?;
    if staging.exists() {
        // A replacement stopped half-way: its links are taken over hooks, moved back below.
        abandon(&staging, &dir)?;
    }
    let mut pinned = Pinned::create(
        plan,
        mode,
        UplinkMode::Tc,
        max_flows,
        socket_cgroup.as_deref(),
        features,
        root,
        &staging,
    )?;
    pinned.adopt = Some(Adopt {
        dir: dir.clone(),
        port_program_id,
        uplink_program_id,
    });
    let uplinks_added = pinned.hook_uplinks(plan, &uplinks);
    let filled = uplinks_added.and_then(|uplinks_added| {
        let mut changes = pinned.reconcile(plan, true)?;
        changes.uplinks_added = uplinks_added;
        Ok(changes)
    });
    let changes = match filled {
        Ok(changes) => changes,
        Err(error) => {
            // Hooks taken over so far go back to the old directory: the old attachment, with
            // the new program on some ports, stays whole for the next try.
            drop(pinned);
            let _ = abandon(&staging, &dir);
            return Err(error);
        }
    };
    drop(pinned);
    swap(&staging, &dir)?;
    tracing::warn!(
        "{}: replaced an attachment of another pinned layout ({}) with layout-{}",
        plan.bridge,
        found.as_deref().map_or("no layout stamp", |f| f),
        pins::layout_stamp()
    );
    let pinned = Pinned::open(root, &plan.bridge)?;
    let mut attached = pinned.attached(plan, false, changes);
    attached.replaced_layout = Some(found);
    Ok(attached)
}

/// Gives up a replacement: its link pins (hooks taken over) go back to the old directory so
/// that the old attachment's detach still finds them, and the rest is removed.
fn abandon(staging: &Path, dir: &Path) -> Result<()> {
    if let Ok(entries) = std::fs::read_dir(staging) {
        for entry in entries.filter_map(|e| e.ok()) {
            let name = entry.file_name();
            if name.to_str().and_then(pins::parse_link_pin).is_some() {
                let _ = std::fs::rename(entry.path(), dir.join(&name));
            }
        }
    }
    pins::clear(staging)?;
    std::fs::remove_dir(staging)
        .map_err(|e| Error::io(format!("removing {}", staging.display()), e))
}

/// Puts the replacement in place: the old pins go (bridge record first, leftover links
/// detached), the new ones move in (bridge record last); the directory, and the locks on it
/// and its follower directory, stay.
fn swap(staging: &Path, dir: &Path) -> Result<()> {
    pins::clear_keeping(dir, &[pins::follower_dir(dir)])?;
    let listing = |e| Error::io(format!("listing {}", staging.display()), e);
    let mut entries: Vec<PathBuf> = std::fs::read_dir(staging)
        .map_err(listing)?
        .map(|entry| entry.map(|e| e.path()).map_err(listing))
        .collect::<Result<_>>()?;
    entries.sort_by_key(|path| path.file_name().is_some_and(|n| n == pins::COMPLETE));
    for path in entries {
        let target = dir.join(path.file_name().expect("a directory entry has a name"));
        std::fs::rename(&path, &target).map_err(|e| {
            Error::io(
                format!("moving {} to {}", path.display(), target.display()),
                e,
            )
        })?;
    }
    std::fs::remove_dir(staging)
        .map_err(|e| Error::io(format!("removing {}", staging.display()), e))
}

impl Pinned {
    /// While replacing (`adopt`): takes over the old attachment's hook of `role` on `port`
    /// in place, returning the port's record; None when the old attachment has none there
    /// (then the port is hooked as usual).
    pub(super) fn adopt_hook(
        &mut self,
        role: Role,
        port: &PlannedPort,
        previous: Option<PortRecord>,
    ) -> Result<Option<PortRecord>> {
        let Some(adopt) = &self.adopt else {
            return Ok(None);
        };
        let ifindex = port.ifindex;
        let (old_pin, new_pin, old_program) = match role {
            Role::Port => (
                pins::link_pin(&adopt.dir, ifindex),
                pins::link_pin(&self.dir, ifindex),
                adopt.port_program_id,
            ),
            Role::Uplink => (
                pins::uplink_pin(&adopt.dir, ifindex),
                pins::uplink_pin(&self.dir, ifindex),
                adopt.uplink_program_id,
            ),
        };
        let mut record = previous.unwrap_or_default();
        let failed = |what: &str, e: String| {
            Error::io(format!("{what} of {}", port.name), std::io::Error::other(e))
        };
        match self.modes.attach {
            AttachMode::Tcx => {
                let target = crate::bpf_link::pinned_link_target(&old_pin).ok().flatten();
                if target.is_none_or(|t| t.ifindex != ifindex) {
                    return Ok(None);
                }
                self.write_record(role, ifindex, record)?;
                let link = FdLink::from(
                    PinnedLink::from_pin(&old_pin)
                        .map_err(|e| failed("opening the old tcx link", e.to_string()))?,
                );
                let link = SchedClassifierLink::try_from(link)
                    .map_err(|e| failed("opening the old tcx link", e.to_string()))?;
                let program = self.classifier(role);
                let id = program
                    .attach_to_link(link)
                    .map_err(|e| failed("updating the tcx link", e.to_string()))?;
                // The pin keeps the link; the fd taken here is only closed.
                drop(program.take_link(id));
                std::fs::rename(&old_pin, &new_pin).map_err(|e| {
                    Error::io(format!("moving the tcx link pin of {}", port.name), e)
                })?;
            }
            AttachMode::Clsact => {
                let observed = hooks::observe_clsact(&[ifindex], old_program)?;
                let Some(Observed::Clsact { ours, .. }) = observed.into_iter().next() else {
                    return Ok(None);
                };
                let Some(keep) = ours.first().copied() else {
                    return Ok(None);
                };
                for extra in ours.iter().skip(1) {
                    hooks::delete_filter(ifindex, extra)?;
                }
                record.tc_priority = u32::from(keep.priority);
                record.tc_handle = keep.handle;
                self.write_record(role, ifindex, record)?;
                let link = SchedClassifierLink::attached(
                    &port.name,
                    TcAttachType::Ingress,
                    keep.priority,
                    keep.handle.into(),
                    None,
                )
                .map_err(|e| failed("naming the old clsact filter", e.to_string()))?;
                let program = self.classifier(role);
                let id = program
                    .attach_to_link(link)
                    .map_err(|e| failed("replacing the clsact filter", e.to_string()))?;
                // A clsact filter lives in its qdisc: dropping the handle would delete it.
                if let Ok(link) = program.take_link(id) {
                    std::mem::forget(link);
                }
            }
        }
        Ok(Some(record))
    }

    fn classifier(&mut self, role: Role) -> &mut SchedClassifier {
        match role {
            Role::Port => &mut self.program,
            Role::Uplink => &mut self.uplink_program,
        }
    }
}
