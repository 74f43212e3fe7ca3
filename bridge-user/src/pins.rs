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

/// A replacement's staging directory (`datapath::replace`) is named this and the bridge's
/// name: 16 characters and more, never an interface's name.
pub const REPLACEMENT_PREFIX: &str = "xbr-replacement-";

/// The pinned layout's stamp directory starts with this, then the stamp (see `layout_stamp`).
pub const LAYOUT_PREFIX: &str = "layout-";

/// The stamp of the layout this xbr pins: a hash of what another xbr opening the pins relies
/// on, so that an upgrade which changes any of it is told apart from one that does not. It
/// covers every pinned map's definition in the compiled object (name, type, key and value
/// sizes, flags, entries, an inner map's definition), which programs the object has, the
/// sizes of the shared records, and `bridge_common::PIN_LAYOUT_REVISION` (the hand-kept part,
/// for a meaning changed without a size changed). Computed from the object itself, so that a
/// changed map cannot ship with a stale stamp.
pub fn layout_stamp() -> &'static str {
    static STAMP: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    STAMP.get_or_init(|| format!("{:016x}", layout_hash(crate::datapath::OBJECT)))
}

/// FNV-1a, 64 bits: stable across builds and Rust versions (unlike `DefaultHasher`).
struct Fnv(u64);

impl Fnv {
    fn bytes(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn word(&mut self, word: u64) {
        self.bytes(&word.to_le_bytes());
    }
    fn text(&mut self, text: &str) {
        self.word(text.len() as u64);
        self.bytes(text.as_bytes());
    }
}

fn layout_hash(object: &[u8]) -> u64 {
    use bridge_common as c;
    use std::mem::size_of;
    let object = aya_obj::Object::parse(object).expect("xbr's own eBPF object parses");
    let mut hash = Fnv(0xcbf2_9ce4_8422_2325);
    hash.word(u64::from(c::PIN_LAYOUT_REVISION));
    let definition = |hash: &mut Fnv, map: &aya_obj::Map| {
        for field in [
            map.map_type(),
            map.key_size(),
            map.value_size(),
            map.map_flags(),
            map.max_entries(),
        ] {
            hash.word(u64::from(field));
        }
    };
    for (object_name, pin) in MAPS {
        hash.text(object_name);
        hash.text(pin);
        match object.maps.get(object_name) {
            Some(map) => {
                definition(&mut hash, map);
                if let Some(inner) = map.inner() {
                    definition(&mut hash, &inner);
                }
            }
            None => hash.text("absent"),
        }
    }
    for program in programs::ALL {
        hash.text(program);
        hash.word(u64::from(object.programs.contains_key(program)));
    }
    for size in [
        size_of::<c::BridgeRecord>(),
        size_of::<c::PortRecord>(),
        size_of::<c::PortStats>(),
        size_of::<c::Endpoint>(),
        size_of::<c::EndpointKey>(),
        size_of::<c::PublishedKey>(),
        size_of::<c::PublishedPort>(),
        size_of::<c::SocketConfig>(),
        size_of::<c::SocketCounts>(),
        size_of::<c::SocketDials>(),
        size_of::<c::HoldKey>(),
        size_of::<c::ClientHoldKey>(),
        size_of::<c::ClientPrefix>(),
        size_of::<c::EgressConfig>(),
        size_of::<c::FlowKey>(),
        size_of::<c::Flow>(),
    ] {
        hash.word(size as u64);
    }
    hash.0
}

/// The stamp directory of `dir`'s layout, when it is this xbr's.
pub fn layout_pin(dir: &Path) -> PathBuf {
    dir.join(format!("{LAYOUT_PREFIX}{}", layout_stamp()))
}

/// The layout stamp `dir` holds, if any (None: pinned by an xbr from before stamps).
pub fn found_layout(dir: &Path) -> Option<String> {
    fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .find_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            name.strip_prefix(LAYOUT_PREFIX).map(str::to_owned)
        })
}

/// Records this xbr's layout in `dir` (bpffs holds pins and directories only: a directory).
pub fn stamp_layout(dir: &Path) -> Result<()> {
    let pin = layout_pin(dir);
    match fs::create_dir(&pin) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            Err(Error::io(format!("creating {}", pin.display()), e))
        }
        _ => Ok(()),
    }
}

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
    clear_keeping(dir, &[])
}

/// `clear`, keeping the entries `keep` (a follower's lock directory).
pub fn clear_keeping(dir: &Path, keep: &[PathBuf]) -> Result<()> {
    let listing = |e| Error::io(format!("listing {}", dir.display()), e);
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(listing)?
        .map(|entry| entry.map(|e| e.path()).map_err(listing))
        .collect::<Result<_>>()?;
    entries.retain(|path| !keep.contains(path));
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
        // A replacement being built (`datapath::replace`) is no bridge.
        .filter(|name| !name.starts_with(REPLACEMENT_PREFIX))
        .collect();
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_stamp_is_stable_and_follows_the_maps() {
        let stamp = layout_stamp();
        assert_eq!(stamp.len(), 16, "{stamp}");
        assert_eq!(
            format!("{:016x}", layout_hash(crate::datapath::OBJECT)),
            stamp
        );
        assert!(found_layout(Path::new("/nonexistent")).is_none());
    }
}
