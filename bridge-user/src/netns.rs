//! Named network namespaces, mounted at /run/netns/NAME exactly like `ip netns add` does, and the
//! one way xbr enters them: `NetNs::run` on a scoped thread, `enter` on the calling thread.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::thread;

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};
use nix::sys::statfs::statfs;

/// Where iproute2 keeps named namespaces; using the same place makes ours visible to `ip netns`.
const RUN_DIR: &str = "/run/netns";
/// Filesystem magic of nsfs: a file at /run/netns/NAME is a live namespace only while an nsfs
/// inode is bind-mounted on it (a crash between creating the file and mounting leaves a plain file).
const NSFS_MAGIC: u64 = 0x6e73_6673;
const THREAD_SELF_NET: &str = "/proc/thread-self/ns/net";

/// A network namespace mounted at /run/netns/NAME.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetNs {
    name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum NetNsError {
    #[error("`{name}` cannot name a network namespace: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error(
        "network namespace {name} not found (nothing mounted at {RUN_DIR}/{name}); \
         list namespaces with `ip netns list`"
    )]
    NotFound { name: String },
    #[error("cannot prepare {RUN_DIR} for network namespaces: {cause}; run xbr as root")]
    RunDir { cause: io::Error },
    #[error(
        "cannot create network namespace {name}: {cause}; run xbr as root and check \
         `ip netns list`"
    )]
    Create { name: String, cause: io::Error },
    #[error("cannot open network namespace {name}: {cause}; check it with `ip netns list`")]
    Open { name: String, cause: io::Error },
    #[error(
        "cannot enter network namespace {name}: {cause}; run xbr as root and check \
         `ip netns list`"
    )]
    Enter { name: String, cause: io::Error },
    #[error("cannot delete network namespace {name}: {cause}; try `ip netns delete {name}`")]
    Delete { name: String, cause: io::Error },
    #[error("cannot start a thread to work in network namespace {name}: {cause}")]
    Thread { name: String, cause: io::Error },
    #[error("no network namespace at {path} (no such file)")]
    NoFile { path: String },
    #[error(
        "{path} is not a network namespace (expected a file like /run/netns/NAME or /proc/PID/ns/net)"
    )]
    NotANamespace { path: String },
    #[error("cannot read the current network namespace ({THREAD_SELF_NET}): {cause}")]
    CurrentInode { cause: io::Error },
}

impl NetNs {
    /// Creates namespace `name`, or opens it when it already exists.
    pub fn create(name: &str) -> Result<NetNs, NetNsError> {
        validate_name(name)?;
        if NetNs::exists(name) {
            return Ok(NetNs {
                name: name.to_owned(),
            });
        }
        prepare_run_dir()?;
        let path = path_of(name);
        let create_error = |cause: io::Error| NetNsError::Create {
            name: name.to_owned(),
            cause,
        };
        // Mode 0 like iproute2: the file is only a mount point for the nsfs inode.
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o000)
            .open(&path)
            .map_err(create_error)?;
        // unshare moves the calling thread for good, so a throwaway thread does it; the bind
        // mount keeps the namespace alive after that thread exits.
        let mounted = thread::scope(|scope| {
            let worker = thread::Builder::new()
                .name("xbr-netns-add".into())
                .spawn_scoped(scope, || -> nix::Result<()> {
                    unshare(CloneFlags::CLONE_NEWNET)?;
                    mount(
                        Some(THREAD_SELF_NET),
                        &path,
                        None::<&str>,
                        MsFlags::MS_BIND,
                        None::<&str>,
                    )
                })
                .map_err(|cause| NetNsError::Thread {
                    name: name.to_owned(),
                    cause,
                })?;
            Ok(join(worker))
        })?;
        if let Err(errno) = mounted {
            let _ = fs::remove_file(&path);
            return Err(create_error(errno.into()));
        }
        Ok(NetNs {
            name: name.to_owned(),
        })
    }

    pub fn open(name: &str) -> Result<NetNs, NetNsError> {
        validate_name(name)?;
        if !NetNs::exists(name) {
            return Err(NetNsError::NotFound {
                name: name.to_owned(),
            });
        }
        Ok(NetNs {
            name: name.to_owned(),
        })
    }

    pub fn exists(name: &str) -> bool {
        validate_name(name).is_ok()
            && statfs(&path_of(name)).is_ok_and(|fs| fs.filesystem_type().0 as u64 == NSFS_MAGIC)
    }

    /// Removes namespace `name` the way `ip netns delete` does; the kernel destroys it (and
    /// every veth in it, with their peers) once no process or fd holds it any more.
    pub fn delete(name: &str) -> Result<(), NetNsError> {
        validate_name(name)?;
        let path = path_of(name);
        let delete_error = |cause: io::Error| NetNsError::Delete {
            name: name.to_owned(),
            cause,
        };
        // Two racing creators can stack two mounts on one file; peel them all.
        for _ in 0..8 {
            match umount2(&path, MntFlags::MNT_DETACH) {
                Ok(()) => continue,
                Err(Errno::EINVAL | Errno::ENOENT) => break,
                Err(errno) => return Err(delete_error(errno.into())),
            }
        }
        match fs::remove_file(&path) {
            Err(cause) if cause.kind() != io::ErrorKind::NotFound => Err(delete_error(cause)),
            _ => Ok(()),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        path_of(&self.name)
    }

    /// An fd on the namespace, for setns or IFLA_NET_NS_FD.
    pub fn file(&self) -> Result<File, NetNsError> {
        File::open(self.path()).map_err(|cause| NetNsError::Open {
            name: self.name.clone(),
            cause,
        })
    }

    /// Inode of this namespace: equals `current_inode()` on a thread inside it.
    pub fn inode(&self) -> Result<u64, NetNsError> {
        fs::metadata(self.path())
            .map(|meta| meta.ino())
            .map_err(|cause| NetNsError::Open {
                name: self.name.clone(),
                cause,
            })
    }

    /// Runs `f` on a scoped thread that has entered this namespace (setns CLONE_NEWNET only,
    /// never a new mount namespace: bpffs pins made there must stay visible).
    ///
    /// A panic in `f` resumes on the caller with its own payload.
    pub fn run<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> Result<T, NetNsError> {
        let file = self.file()?;
        thread::scope(|scope| {
            let worker = thread::Builder::new()
                .name("xbr-netns-run".into())
                .spawn_scoped(scope, move || {
                    setns(&file, CloneFlags::CLONE_NEWNET).map(|()| f())
                })
                .map_err(|cause| NetNsError::Thread {
                    name: self.name.clone(),
                    cause,
                })?;
            join(worker).map_err(|errno| NetNsError::Enter {
                name: self.name.clone(),
                cause: errno.into(),
            })
        })
    }
}

/// Enters namespace `name` on the calling thread, for good (`xbr -n NAME` does it first
/// thing). A name with a `/` is a path to a namespace file (a Docker sandbox such as
/// /var/run/docker/netns/1-0123456789, or /proc/PID/ns/net).
pub fn enter(name: &str) -> Result<(), NetNsError> {
    if name.contains('/') {
        return enter_path(Path::new(name));
    }
    let netns = NetNs::open(name)?;
    let file = netns.file()?;
    setns(&file, CloneFlags::CLONE_NEWNET).map_err(|errno| NetNsError::Enter {
        name: name.to_owned(),
        cause: errno.into(),
    })
}

/// Runs `f` on a scoped thread that has entered the namespace at `path` (as `NetNs::run`).
pub fn run_in_path<T: Send, F: FnOnce() -> T + Send>(path: &Path, f: F) -> Result<T, NetNsError> {
    thread::scope(|scope| {
        let worker = thread::Builder::new()
            .name("xbr-netns-run".into())
            .spawn_scoped(scope, move || enter_path(path).map(|()| f()))
            .map_err(|cause| NetNsError::Thread {
                name: path.display().to_string(),
                cause,
            })?;
        join(worker)
    })
}

/// Enters the network namespace at `path` on the calling thread, for good.
pub fn enter_path(path: &Path) -> Result<(), NetNsError> {
    let name = path.display().to_string();
    let file = File::open(path).map_err(|cause| match cause.kind() {
        io::ErrorKind::NotFound => NetNsError::NoFile { path: name.clone() },
        _ => NetNsError::Open {
            name: name.clone(),
            cause,
        },
    })?;
    setns(&file, CloneFlags::CLONE_NEWNET).map_err(|errno| match errno {
        // setns says EINVAL for a file that is not a network namespace.
        Errno::EINVAL => NetNsError::NotANamespace { path: name.clone() },
        errno => NetNsError::Enter {
            name,
            cause: errno.into(),
        },
    })
}

/// Whether `path` is a namespace: an nsfs file, or a bind mount of one (a mount point left
/// without its mount is a plain file).
pub fn is_namespace(path: &Path) -> bool {
    statfs(path).is_ok_and(|fs| fs.filesystem_type().0 as u64 == NSFS_MAGIC)
}

/// A file for each live network namespace of `inodes` that can be found: this thread's,
/// those named in /run/netns, Docker's (`extra`, and its default /run/docker/netns), and
/// those of running processes. A namespace without any is gone (or held only by a socket).
pub fn find_paths(inodes: &[u64], extra: &[PathBuf]) -> std::collections::BTreeMap<u64, PathBuf> {
    let listed = |dir: &str| -> Vec<PathBuf> {
        fs::read_dir(dir)
            .map(|entries| entries.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    let processes = listed("/proc")
        .into_iter()
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(|path| path.join("ns/net"));
    let candidates = [PathBuf::from(THREAD_SELF_NET)]
        .into_iter()
        .chain(listed(RUN_DIR))
        .chain(listed("/run/docker/netns"))
        .chain(extra.iter().cloned())
        .chain(processes);
    let mut found = std::collections::BTreeMap::new();
    for path in candidates {
        if found.len() == inodes.len() {
            break;
        }
        let Ok(meta) = fs::metadata(&path) else {
            continue;
        };
        if inodes.contains(&meta.ino()) && !found.contains_key(&meta.ino()) && is_namespace(&path) {
            found.insert(meta.ino(), path);
        }
    }
    found
}

/// Whether `path` is a namespace with inode `inode`.
pub fn path_is(path: &Path, inode: u64) -> bool {
    is_namespace(path) && fs::metadata(path).is_ok_and(|meta| meta.ino() == inode)
}

/// Inode of the calling thread's network namespace; it keys per-namespace pins.
pub fn current_inode() -> Result<u64, NetNsError> {
    fs::metadata(THREAD_SELF_NET)
        .map(|meta| meta.ino())
        .map_err(|cause| NetNsError::CurrentInode { cause })
}

fn path_of(name: &str) -> PathBuf {
    Path::new(RUN_DIR).join(name)
}

fn validate_name(name: &str) -> Result<(), NetNsError> {
    let reason = if name.is_empty() {
        "the name is empty"
    } else if name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        "it must be a plain file name (no '/', not '.' or '..')"
    } else if name.len() > 255 {
        "it is longer than 255 bytes"
    } else {
        return Ok(());
    };
    Err(NetNsError::InvalidName {
        name: name.to_owned(),
        reason,
    })
}

fn join<T>(worker: thread::ScopedJoinHandle<'_, T>) -> T {
    worker
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Makes /run/netns a shared mount, as iproute2 does, so namespace mounts propagate to other
/// mount namespaces (and `ip netns` in them sees ours).
fn prepare_run_dir() -> Result<(), NetNsError> {
    // Threads of one process would otherwise stack bind mounts of /run/netns on each other.
    static PREPARING: Mutex<()> = Mutex::new(());
    let _serialized = PREPARING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let run_dir_error = |cause: io::Error| NetNsError::RunDir { cause };
    fs::create_dir_all(RUN_DIR).map_err(run_dir_error)?;
    let make_shared = || {
        mount(
            None::<&str>,
            RUN_DIR,
            Some("none"),
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match make_shared() {
        Ok(()) => Ok(()),
        // EINVAL: not a mount point yet; bind it onto itself and try again.
        Err(Errno::EINVAL) => mount(
            Some(RUN_DIR),
            RUN_DIR,
            Some("none"),
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .and_then(|()| make_shared())
        .map_err(|errno| run_dir_error(errno.into())),
        Err(errno) => Err(run_dir_error(errno.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_be_plain_file_names() {
        for bad in ["", ".", "..", "a/b", "/abs"] {
            assert!(
                matches!(validate_name(bad), Err(NetNsError::InvalidName { .. })),
                "`{bad}` should be refused as a namespace name"
            );
        }
        assert!(validate_name("demo-host").is_ok());
        assert!(!NetNs::exists("a/b"), "an invalid name never exists");
    }

    #[test]
    fn paths_live_under_run_netns() {
        let netns = NetNs {
            name: "demo-a".into(),
        };
        assert_eq!(netns.path(), Path::new("/run/netns/demo-a"));
    }
}
