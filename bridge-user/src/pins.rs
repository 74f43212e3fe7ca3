//! Where an attachment lives on bpffs: `<pin root>/<netns inode>/<bridge>/`, holding the
//! program, the maps and (tcx mode) one link per port. The pins are the whole state: no
//! process has to stay alive, and `detach` removes the directory.
//!
//! The bridge record (`bridge`) is pinned last and unpinned first: a directory without it is
//! an attach or detach that was interrupted (or is running), never a working attachment.

use std::{
    fs,
    path::{Path, PathBuf},
};

use bridge_common::programs;

use crate::{
    error::{Error, Result},
    netns,
};

pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/xbr";
const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The program on every bridge port, and the one on every uplink (their names in the object,
/// and of their pins).
pub const PORT_PROGRAM: &str = programs::PORT;
pub const UPLINK_PROGRAM: &str = programs::UPLINK;
/// The XDP program in front of the uplink program (uplink xdp mode only).
pub const UPLINK_XDP_PROGRAM: &str = programs::UPLINK_XDP;
/// (name in the object, name of the pin)
pub const MAPS: [(&str, &str); 25] = [
    ("ENDPOINTS", "endpoints"),
    ("PORT_STATS", "port_stats"),
    ("VERDICTS", "verdicts"),
    ("BRIDGE", "bridge"),
    ("PORTS", "ports"),
    ("PUBLISHED", "published"),
    ("NAT_FLOWS", "nat_flows"),
    ("NAT_TRANSIENT", "nat_transient"),
    ("NAT_EVENTS", "nat_events"),
    ("FLOW_SCRATCH", "flow_scratch"),
    ("UPLINKS", "uplinks"),
    ("HOLDS", "holds"),
    ("HOLD_SHAPES", "hold_shapes"),
    ("CLIENT_HOLDS", "client_holds"),
    ("CLIENT_PREFIX_HOLDS", "client_prefix_holds"),
    ("FLOW_TABLE", "flow_table_prototype"),
    ("TRANSIENT_TABLE", "transient_table_prototype"),
    ("SOCKET_CONFIG", "socket_config"),
    ("LOCAL_ADDRESSES", "local_addresses"),
    ("SOCKET_COUNTS", "socket_counts"),
    ("SOCKET_DIALS", "socket_dials"),
    ("EGRESS", "egress"),
    ("EGRESS_UPLINKS", "egress_uplinks"),
    ("KERNEL_FLOWS", "kernel_flows"),
    ("FIB_SCRATCH", "fib_scratch"),
];

/// The pins of the links that attach the socket programs to their cgroup start with this,
/// then the program's name.
pub const CGROUP_LINK_PREFIX: &str = "cgroup_link_";

/// Whether the pin `name` is a link (detached before it is unpinned).
fn is_link_pin(name: &str) -> bool {
    parse_link_pin(name).is_some() || name.starts_with(CGROUP_LINK_PREFIX)
}

/// The directory of this network namespace's attachments under `root`. Bridges with the same
/// name in different namespaces get different directories.
pub fn netns_dir(root: &Path) -> Result<PathBuf> {
    let inode = netns::current_inode().map_err(|e| {
        Error::io(
            "reading this network namespace's inode",
            std::io::Error::other(e),
        )
    })?;
    Ok(root.join(format!("netns-{inode}")))
}

pub fn bridge_dir(root: &Path, bridge: &str) -> Result<PathBuf> {
    Ok(netns_dir(root)?.join(bridge))
}

pub fn map_pin(dir: &Path, object_name: &str) -> PathBuf {
    let pin = MAPS
        .iter()
        .find(|(name, _)| *name == object_name)
        .map(|(_, pin)| *pin)
        .expect("every map the object defines is in MAPS");
    dir.join(pin)
}

/// The pin that makes a directory a whole attachment (see the module's doc).
pub const COMPLETE: &str = "bridge";

/// Whether `dir` holds a whole attachment.
pub fn is_complete(dir: &Path) -> bool {
    dir.join(COMPLETE).exists()
}

/// The directory a follower locks for as long as it follows (see `lock`).
pub fn follower_dir(dir: &Path) -> PathBuf {
    dir.join("follower")
}

/// The ifindex of a link pin's name (`link_N`, `uplink_N`, `uplink_xdp_N`) and which it is.
pub fn parse_link_pin(name: &str) -> Option<(LinkPin, u32)> {
    let (kind, index) = if let Some(index) = name.strip_prefix("uplink_xdp_") {
        (LinkPin::UplinkXdp, index)
    } else if let Some(index) = name.strip_prefix("uplink_") {
        (LinkPin::Uplink, index)
    } else {
        (LinkPin::Port, name.strip_prefix("link_")?)
    };
    Some((kind, index.parse().ok()?))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkPin {
    Port,
    Uplink,
    UplinkXdp,
}

/// The tcx link of bridge port `ifindex`.
pub fn link_pin(dir: &Path, ifindex: u32) -> PathBuf {
    dir.join(format!("link_{ifindex}"))
}

/// The tcx link of uplink `ifindex`.
pub fn uplink_pin(dir: &Path, ifindex: u32) -> PathBuf {
    dir.join(format!("uplink_{ifindex}"))
}

/// The XDP link of uplink `ifindex` (uplink xdp mode).
pub fn uplink_xdp_pin(dir: &Path, ifindex: u32) -> PathBuf {
    dir.join(format!("uplink_xdp_{ifindex}"))
}

/// Makes sure `root` exists on a bpffs, mounting bpffs at /sys/fs/bpf when the default root
/// is used and nothing is mounted there yet (the case on this project's machines at boot).
pub fn ensure_bpffs(root: &Path) -> Result<()> {
    if root.starts_with(BPFFS) && !is_bpffs(Path::new(BPFFS)) {
        nix::mount::mount(
            Some("bpf"),
            BPFFS,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| Error::Bpffs {
            path: BPFFS.into(),
            reason: format!("mount failed: {e}"),
        })?;
    }
    // Check before creating anything: a root outside bpffs must be refused without a trace.
    let existing = root
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if !is_bpffs(existing) {
        return Err(Error::Bpffs {
            path: root.into(),
            reason: format!("{} is not on a bpf filesystem", existing.display()),
        });
    }
    fs::create_dir_all(root).map_err(|e| Error::Bpffs {
        path: root.into(),
        reason: format!("cannot create it: {e}"),
    })
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|fs| fs.filesystem_type().0 == BPF_FS_MAGIC)
}

/// Removes an attachment directory and every pin in it, then the namespace directory and
/// the root when they are left empty: detach leaves nothing behind.
pub fn remove(dir: &Path, root: &Path) -> Result<()> {
    if dir.exists() {
        clear(dir)?;
        match fs::remove_dir(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Error::io(format!("removing {}", dir.display()), e));
            }
            _ => {}
        }
    }
    for parent in dir.ancestors().skip(1).filter(|p| p.exists()) {
        // remove_dir refuses a directory that is not empty: other attachments keep theirs.
        if !parent.starts_with(root) || fs::remove_dir(parent).is_err() {
            break;
        }
    }
    Ok(())
}

/// Empties an attachment directory, keeping the directory (a writer holds its lock). The
/// bridge record goes first, so a writer stopped half-way leaves a directory that says it is
/// incomplete; links are detached at once rather than whenever the kernel frees them.
pub fn clear(dir: &Path) -> Result<()> {
    let listing = |e| Error::io(format!("listing {}", dir.display()), e);
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(listing)?
        .map(|entry| entry.map(|e| e.path()).map_err(listing))
        .collect::<Result<_>>()?;
    let rank = |path: &PathBuf| {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        match name {
            COMPLETE => 0,
            _ if is_link_pin(name) => 1,
            _ if path.is_dir() => 3,
            _ => 2,
        }
    };
    entries.sort_by_key(rank);
    for path in entries {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if is_link_pin(name) {
            crate::bpf_link::detach_pinned(&path).map_err(|e| {
                Error::io(
                    format!("detaching the link pinned at {}", path.display()),
                    e,
                )
            })?;
        }
        let removed = if path.is_dir() {
            fs::remove_dir(&path)
        } else {
            fs::remove_file(&path)
        };
        match removed {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Error::io(format!("unpinning {}", path.display()), e));
            }
            _ => {}
        }
    }
    Ok(())
}

/// The namespaces with attachments under `root`: each one's inode and directory.
pub fn attached_namespaces(root: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = fs::read_dir(root) else {
        return Vec::new();
    };
    let mut found: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let inode = name.strip_prefix("netns-")?.parse().ok()?;
            Some((inode, e.path()))
        })
        .collect();
    found.sort();
    found
}

/// Bridges attached in this network namespace under `root`.
pub fn attached_bridges(root: &Path) -> Result<Vec<String>> {
    let dir = netns_dir(root)?;
    let Ok(entries) = fs::read_dir(&dir) else {
        return Ok(Vec::new());
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    Ok(names)
}
