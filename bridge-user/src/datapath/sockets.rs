//! The socket hooks: published ports for clients on the host itself. The object's
//! socket-address programs (`bridge_common::programs::SOCKET`) are attached to a cgroup v2
//! (by default the root of the hierarchy, so every process of the host) with bpf links pinned
//! beside the rest of the attachment; they translate a connect or send of the bridge's
//! network namespace to a published port into the container's address (see
//! `bridge-ebpf/src/socket.rs`). They need the namespace's cookie (SO_NETNS_COOKIE, 5.14+)
//! and the host's own addresses, which every reconcile writes.

use std::{
    collections::BTreeSet,
    io,
    net::Ipv4Addr,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{Array, PerCpuValues},
    programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink},
    util::nr_cpus,
};
use bridge_common::{PublishedKey, SocketConfig, SocketCounts, programs};

use super::pinned::{Pinned, allocating};
use crate::{
    error::{Error, Result},
    pins,
};

/// Where `xbr attach` hooks the socket programs (`--cgroup`, `--no-socket-hooks`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketHooksChoice {
    /// At the root of the cgroup v2 hierarchy, when the kernel can run them (5.14+) and a
    /// cgroup v2 hierarchy is mounted; else without them.
    Auto,
    At(PathBuf),
    Off,
}

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
/// `SO_NETNS_COOKIE` (5.14+): the cookie of a socket's network namespace.
const SO_NETNS_COOKIE: libc::c_int = 71;

impl SocketHooksChoice {
    /// The cgroup to hook, or `None` for no socket hooks; an error when hooks were asked for
    /// and cannot be had.
    pub fn resolve(&self) -> Result<Option<PathBuf>> {
        let missing = |detail: String| Error::MissingFeature {
            feature: "socket hooks (published ports for clients on the host)",
            detail,
        };
        match self {
            SocketHooksChoice::Off => Ok(None),
            SocketHooksChoice::Auto => Ok(netns_cookie().ok().and(cgroup2_root())),
            SocketHooksChoice::At(path) => {
                netns_cookie().map_err(|e| {
                    missing(format!(
                        "the kernel cannot name a socket's network namespace (SO_NETNS_COOKIE, \
                         5.14+): {e}; attach without --cgroup, or with --no-socket-hooks"
                    ))
                })?;
                let on_cgroup2 = nix::sys::statfs::statfs(path)
                    .is_ok_and(|fs| fs.filesystem_type().0 == CGROUP2_SUPER_MAGIC);
                if !on_cgroup2 || !path.is_dir() {
                    return Err(missing(format!(
                        "{} is not a cgroup v2 directory (the hierarchy here: {})",
                        path.display(),
                        cgroup2_root()
                            .map_or("none mounted".to_owned(), |p| p.display().to_string())
                    )));
                }
                Ok(Some(path.clone()))
            }
        }
    }
}

impl SocketHooksChoice {
    /// On an attached bridge: a choice the user made (`--cgroup`, `--no-socket-hooks`) must be
    /// what the attachment has; `Auto` keeps whatever it has.
    pub(super) fn check(&self, pinned: &Pinned) -> Result<()> {
        let attached = pinned.record.socket_cgroup;
        let describe = |id: u64| match id {
            0 => "no socket hooks (--no-socket-hooks)".to_owned(),
            id => format!(
                "socket hooks on cgroup {}",
                cgroup_path(id).map_or_else(|| format!("id {id}"), |p| p.display().to_string())
            ),
        };
        let wanted = match self {
            SocketHooksChoice::Auto => return Ok(()),
            SocketHooksChoice::Off => 0,
            SocketHooksChoice::At(path) => cgroup_id(path)
                .map_err(|e| Error::io(format!("reading cgroup {}", path.display()), e))?,
        };
        if wanted == attached {
            return Ok(());
        }
        Err(Error::SocketHooksMismatch {
            bridge: pinned.bridge.clone(),
            attached: describe(attached),
            wanted: match self {
                SocketHooksChoice::At(path) => format!("socket hooks on cgroup {}", path.display()),
                _ => describe(wanted),
            },
        })
    }
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified`
/// in the hybrid layout), from this process's mount table.
pub fn cgroup2_root() -> Option<PathBuf> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    table.lines().find_map(|line| {
        // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE OPTIONS
        let (before, after) = line.split_once(" - ")?;
        let fstype = after.split_whitespace().next()?;
        let root = before.split_whitespace().nth(3)?;
        let mount_point = before.split_whitespace().nth(4)?;
        (fstype == "cgroup2" && root == "/").then(|| PathBuf::from(mount_point))
    })
}

/// The cookie of this process's network namespace: the socket programs serve its sockets.
pub fn netns_cookie() -> io::Result<u64> {
    let socket = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `cookie`.
    let result = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// A cgroup's id: the inode of its directory.
fn cgroup_id(path: &Path) -> io::Result<u64> {
    Ok(std::fs::metadata(path)?.ino())
}

/// The directory of the cgroup with id `id`, searched for under the cgroup v2 mount.
pub fn cgroup_path(id: u64) -> Option<PathBuf> {
    let root = cgroup2_root()?;
    let mut pending = vec![root];
    while let Some(dir) = pending.pop() {
        if std::fs::metadata(&dir).is_ok_and(|meta| meta.ino() == id) {
            return Some(dir);
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            pending.extend(
                entries
                    .filter_map(|e| e.ok())
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    None
}

/// The pin of the link that attaches socket program `program` to its cgroup.
pub fn link_pin(dir: &Path, program: &str) -> PathBuf {
    dir.join(format!("{}{program}", pins::CGROUP_LINK_PREFIX))
}

/// Loads the socket programs of a new attachment, pins them, tells them the bridge's
/// namespace and attaches them to `cgroup`, each with a pinned link. Returns the cgroup's id.
pub(super) fn hook(ebpf: &mut Ebpf, dir: &Path, cgroup: &Path) -> Result<u64> {
    let cookie = netns_cookie().map_err(|e| {
        Error::io(
            "reading this network namespace's cookie (SO_NETNS_COOKIE)",
            e,
        )
    })?;
    let mut config: Array<_, SocketConfig> =
        Array::try_from(ebpf.map_mut("SOCKET_CONFIG").expect("SOCKET_CONFIG map"))
            .map_err(|e| Error::ebpf("opening the socket programs' configuration", e))?;
    config
        .set(
            0,
            SocketConfig {
                host_netns_cookie: cookie,
            },
            0,
        )
        .map_err(|e| Error::ebpf("writing the socket programs' configuration", e))?;
    let cgroup_dir = std::fs::File::open(cgroup)
        .map_err(|e| Error::io(format!("opening cgroup {}", cgroup.display()), e))?;
    for name in programs::SOCKET {
        let program: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .expect("program defined by the object")
            .try_into()
            .map_err(|e| Error::ebpf(format!("program {name} is not a socket program"), e))?;
        program
            .load()
            .map_err(|e| Error::ebpf(format!("loading program {name} into the kernel"), e))?;
        program
            .pin(dir.join(name))
            .map_err(|e| Error::ebpf(format!("pinning program {name} in {}", dir.display()), e))?;
        attach(program, &cgroup_dir, &link_pin(dir, name), cgroup)?;
    }
    cgroup_id(cgroup).map_err(|e| Error::io(format!("reading cgroup {}", cgroup.display()), e))
}

/// Attaches `program` to `cgroup_dir` with a bpf link and pins the link. A cgroup link always
/// runs beside the cgroup's other programs, and the kernel refuses attach flags for one
/// (`Single` is no flags; socket hooks need 5.14, where aya always makes a link).
fn attach(
    program: &mut CgroupSockAddr,
    cgroup_dir: &std::fs::File,
    pin: &Path,
    cgroup: &Path,
) -> Result<()> {
    let link_id = program
        .attach(cgroup_dir, CgroupAttachMode::Single)
        .map_err(|e| {
            Error::ebpf(
                format!("attaching a socket program to {}", cgroup.display()),
                e,
            )
        })?;
    let link = program
        .take_link(link_id)
        .map_err(|e| Error::ebpf("taking the socket program's link", e))?;
    let link = FdLink::try_from(link)
        .map_err(|e| Error::io("taking the socket program's link", io::Error::other(e)))?;
    link.pin(pin).map_err(|e| {
        Error::io(
            format!("pinning link {}", pin.display()),
            io::Error::other(e),
        )
    })?;
    Ok(())
}

/// The socket hooks of an attachment, as the kernel has them.
#[derive(Clone, Debug)]
pub struct SocketHooks {
    pub cgroup_id: u64,
    /// The cgroup's directory; `None` if it is gone.
    pub cgroup: Option<PathBuf>,
    /// The programs whose link is attached to the cgroup.
    pub attached: Vec<&'static str>,
    /// The programs whose link someone detached or removed.
    pub missing: Vec<&'static str>,
}

impl Pinned {
    /// Whether the attachment has socket hooks.
    pub fn has_socket_hooks(&self) -> bool {
        self.record.socket_cgroup != 0
    }

    /// The socket programs whose link is attached to the hooks' cgroup, and those whose
    /// link someone detached or removed.
    fn socket_links(&self) -> (Vec<&'static str>, Vec<&'static str>) {
        let cgroup_id = self.record.socket_cgroup;
        programs::SOCKET.iter().partition(|name| {
            crate::bpf_link::pinned_cgroup_link(&link_pin(&self.dir, name))
                .is_ok_and(|target| target == Some(cgroup_id))
        })
    }

    /// The socket hooks, if the attachment has them (for status: this searches the cgroup
    /// hierarchy for the cgroup's directory).
    pub fn socket_hooks(&self) -> Option<SocketHooks> {
        if !self.has_socket_hooks() {
            return None;
        }
        let (attached, missing) = self.socket_links();
        Some(SocketHooks {
            cgroup_id: self.record.socket_cgroup,
            cgroup: cgroup_path(self.record.socket_cgroup),
            attached,
            missing,
        })
    }

    /// Puts back socket hooks that were detached behind xbr's back (`bpftool link detach`,
    /// an unpinned link). Returns how many it put back; none when the cgroup itself is gone.
    pub fn restore_socket_hooks(&self) -> Result<usize> {
        if !self.has_socket_hooks() {
            return Ok(0);
        }
        let (_, missing) = self.socket_links();
        if missing.is_empty() {
            return Ok(0);
        }
        let Some(cgroup) = cgroup_path(self.record.socket_cgroup) else {
            return Ok(0);
        };
        let cgroup_dir = std::fs::File::open(&cgroup)
            .map_err(|e| Error::io(format!("opening cgroup {}", cgroup.display()), e))?;
        for name in &missing {
            let pin = link_pin(&self.dir, name);
            let _ = crate::bpf_link::detach_pinned(&pin);
            match std::fs::remove_file(&pin) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(Error::io(format!("unpinning {}", pin.display()), e));
                }
                _ => {}
            }
            let mut program = CgroupSockAddr::from_pin(self.dir.join(name), attach_type(name))
                .map_err(|e| Error::ebpf(format!("opening the pinned program {name}"), e))?;
            attach(&mut program, &cgroup_dir, &pin, &cgroup)?;
        }
        Ok(missing.len())
    }

    /// Writes the host's own IPv4 addresses for the socket programs (a port published on
    /// every address serves a socket that dials any of them). Returns whether they changed.
    pub fn sync_local_addresses(&mut self, addresses: &BTreeSet<Ipv4Addr>) -> Result<bool> {
        if !self.has_socket_hooks() {
            return Ok(false);
        }
        let current: BTreeSet<Ipv4Addr> = self
            .local_addresses
            .keys()
            .filter_map(|key| key.ok())
            .map(Ipv4Addr::from)
            .collect();
        for gone in current.difference(addresses) {
            let _ = self.local_addresses.remove(&gone.octets());
        }
        let mut left_out = 0;
        for new in addresses.difference(&current) {
            match allocating(|| self.local_addresses.insert(new.octets(), 1, 0)) {
                Ok(()) => {}
                // Full: a port published on every address then serves the host's clients
                // of the addresses in the map (and 127.0.0.0/8); the rest take the kernel path.
                Err(aya::maps::MapError::SyscallError(error))
                    if error.io_error.raw_os_error() == Some(libc::E2BIG) =>
                {
                    left_out += 1;
                }
                Err(e) => return Err(Error::ebpf("writing the host's addresses", e)),
            }
        }
        if left_out > 0 {
            tracing::warn!(
                "{}: the host has more than {} addresses; the socket hooks serve {left_out} of \
                 them the kernel's way",
                self.bridge,
                bridge_common::MAX_LOCAL_ADDRESSES
            );
        }
        Ok(current != *addresses)
    }

    /// Makes the socket counters of a published port (kept if it has them already), when the
    /// attachment has socket hooks.
    pub(super) fn add_socket_counts(&mut self, key: &PublishedKey) -> Result<()> {
        // Without socket hooks the map has room for none (see `socket_hooks_entries`).
        if !self.has_socket_hooks() || self.socket_counts.get(key, 0).is_ok() {
            return Ok(());
        }
        let cpus = nr_cpus().map_err(|(_, e)| Error::io("counting CPUs", e))?;
        let zero = || PerCpuValues::try_from(vec![SocketCounts::default(); cpus]);
        zero().map_err(|e| Error::io("making per-CPU counters", e))?;
        allocating(|| {
            self.socket_counts
                .insert(key, zero().expect("checked above"), 0)
        })
        .map_err(|e| Error::ebpf("writing the socket counters", e))
    }

    pub(super) fn remove_socket_counts(&mut self, key: &PublishedKey) {
        let _ = self.socket_counts.remove(key);
    }

    /// What the socket programs did for a published port, summed over CPUs.
    pub fn socket_counts(&self, key: &PublishedKey) -> SocketCounts {
        let mut total = SocketCounts::default();
        if let Ok(values) = self.socket_counts.get(key, 0) {
            for counts in values.iter() {
                total.add(counts);
            }
        }
        total
    }
}

/// The hook a socket program is for, by its name.
fn attach_type(name: &str) -> aya::programs::CgroupSockAddrAttachType {
    use aya::programs::CgroupSockAddrAttachType as Type;
    match name {
        programs::SOCKET_CONNECT4 => Type::Connect4,
        programs::SOCKET_SENDMSG4 => Type::UDPSendMsg4,
        programs::SOCKET_RECVMSG4 => Type::UDPRecvMsg4,
        programs::SOCKET_GETPEERNAME4 => Type::GetPeerName4,
        programs::SOCKET_CONNECT6 => Type::Connect6,
        programs::SOCKET_SENDMSG6 => Type::UDPSendMsg6,
        programs::SOCKET_RECVMSG6 => Type::UDPRecvMsg6,
        _ => Type::GetPeerName6,
    }
}
