//! One writer at a time per attachment. Every writer (attach, detach, publish, unpublish, a
//! follower's reconcile) holds an exclusive flock on the attachment's directory on bpffs,
//! `<pin root>/netns-<inode>/<bridge>/`, from its first look at the kernel to its last write.
//! The lock lives with the state it guards: whoever sees the pins sees the lock, whatever the
//! mount namespace or `--pin-root`, and the kernel releases it when the writer dies, `kill -9`
//! included. A second writer waits a bounded time, then fails naming the holder, read from
//! /proc/locks. A follower also holds `<dir>/follower` for as long as it follows: a second
//! follower stands by until the first one stops.
//!
//! A directory can be removed (detach) while others wait for its lock: a lock counts only
//! when, once taken, the path still names the directory that was locked.

use std::{
    fmt,
    fs::File,
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
};

use crate::{
    error::{Error, Result},
    pins,
};

/// How long a writer waits for another by default (`--wait`): longer than the slowest
/// writer, a first tcx attach of 1000 ports (15-19 s here).
pub const DEFAULT_WAIT: Duration = Duration::from_secs(60);

/// A process holding a lock, as /proc/locks and /proc/PID/cmdline tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    /// Its command line, program name without its directory; empty when unreadable.
    pub command: String,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.command.is_empty() {
            write!(f, "pid {} (`{}`)", self.pid, self.command)
        } else if Path::new(&format!("/proc/{}", self.pid)).exists() {
            write!(f, "pid {}", self.pid)
        } else {
            // /proc/locks names who took the lock; a process it started inherited it.
            write!(
                f,
                "pid {} (exited; a process it started still holds the lock)",
                self.pid
            )
        }
    }
}

/// The exclusive right to change one attachment, until dropped. Dropping it also removes the
/// directory when it holds no pins: a writer that created it and then failed leaves nothing.
pub struct Writer {
    lock: Option<Flock<File>>,
    dir: PathBuf,
    root: PathBuf,
}

/// (device, inode) of what an open file or a path names.
fn identity(meta: &std::fs::Metadata) -> (u64, u64) {
    (meta.dev(), meta.ino())
}

/// One try at a lock.
pub enum Attempt<T> {
    Acquired(T),
    /// Someone else holds it.
    Busy,
    /// The directory is not there (not attached, or detached meanwhile).
    Gone,
}

impl Writer {
    /// Takes the writer lock of `bridge`'s attachment under `root`, waiting up to `wait` for
    /// another writer. `create`: make the directory (and the pin root, on bpffs) when absent,
    /// as a first attach does; otherwise a missing directory is `NotAttached`.
    pub fn acquire(root: &Path, bridge: &str, create: bool, wait: Duration) -> Result<Writer> {
        let dir = pins::bridge_dir(root, bridge)?;
        let started = Instant::now();
        let mut pause = Duration::from_millis(1);
        let mut told = false;
        loop {
            if create {
                make_dir(root, &dir)?;
            }
            match Writer::try_acquire(root, &dir)? {
                Attempt::Acquired(writer) => return Ok(writer),
                Attempt::Gone if !create => {
                    return Err(Error::NotAttached {
                        bridge: bridge.to_owned(),
                        pins: dir,
                    });
                }
                Attempt::Gone => continue,
                Attempt::Busy => {}
            }
            let waited = started.elapsed();
            if waited >= wait {
                return Err(Error::Busy {
                    bridge: bridge.to_owned(),
                    holder: describe(&holders(&dir)),
                    waited: wait.as_secs_f64(),
                });
            }
            if !told && waited >= Duration::from_secs(1) {
                told = true;
                eprintln!(
                    "xbr: {bridge} is being changed by {}; waiting up to {} s",
                    describe(&holders(&dir)),
                    wait.as_secs()
                );
            }
            std::thread::sleep(pause.min(wait.saturating_sub(waited)));
            pause = (pause * 2).min(Duration::from_millis(25));
        }
    }

    /// One try at the writer lock of the attachment at `dir` (the follower's way: it waits
    /// without blocking its event loop).
    pub fn try_acquire(root: &Path, dir: &Path) -> Result<Attempt<Writer>> {
        Ok(match lock(dir)? {
            Attempt::Acquired(lock) => Attempt::Acquired(Writer {
                lock: Some(lock),
                dir: dir.to_owned(),
                root: root.to_owned(),
            }),
            Attempt::Busy => Attempt::Busy,
            Attempt::Gone => Attempt::Gone,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Only the directory this lock holds: once this writer removed it (a detach), another
        // writer may have made a new one under the same name and be filling it now.
        let ours = self.lock.as_ref().and_then(|lock| lock.metadata().ok());
        let named = std::fs::metadata(&self.dir).ok();
        let same = matches!((ours, named), (Some(ours), Some(named)) if identity(&ours) == identity(&named));
        if same && holds_no_pins(&self.dir) {
            let _ = pins::remove(&self.dir, &self.root);
        }
        drop(self.lock.take());
    }
}

/// Whether `dir` exists and holds nothing but the follower's lock directory.
fn holds_no_pins(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    let follower = pins::follower_dir(dir);
    entries
        .filter_map(|e| e.ok())
        .all(|entry| entry.path() == follower)
}

/// Creates `dir` and its parents, racing detaches that remove empty parents.
fn make_dir(root: &Path, dir: &Path) -> Result<()> {
    pins::ensure_bpffs(root)?;
    let mut tries = 0;
    loop {
        match std::fs::create_dir_all(dir) {
            Ok(()) => return Ok(()),
            // A parent was removed between two steps of create_dir_all: go again.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && tries < 100 => tries += 1,
            Err(e) => return Err(Error::io(format!("creating {}", dir.display()), e)),
        }
    }
}

/// An exclusive flock on directory `path`, valid only if `path` still names it once taken.
fn lock(path: &Path) -> Result<Attempt<Flock<File>>> {
    loop {
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(path)
        {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Attempt::Gone),
            Err(e) => {
                return Err(Error::io(
                    format!("opening {} to lock it", path.display()),
                    e,
                ));
            }
        };
        let locked = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((_, Errno::EWOULDBLOCK)) => return Ok(Attempt::Busy),
            Err((_, errno)) => {
                return Err(Error::io(
                    format!("locking {}", path.display()),
                    errno.into(),
                ));
            }
        };
        let held = locked
            .metadata()
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        match std::fs::metadata(path) {
            Ok(now) if identity(&now) == identity(&held) => {
                return Ok(Attempt::Acquired(locked));
            }
            // Removed (and maybe made again) while we waited: the lock guards nothing.
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Attempt::Gone),
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }
}

/// The follower's lock: held for as long as one process follows the bridge.
pub struct Following {
    _lock: Flock<File>,
}

impl Following {
    /// One try at following the attachment at `dir`.
    pub fn try_acquire(dir: &Path) -> Result<Attempt<Following>> {
        if !dir.exists() {
            return Ok(Attempt::Gone);
        }
        let path = pins::follower_dir(dir);
        match std::fs::create_dir(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Attempt::Gone),
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(Error::io(format!("creating {}", path.display()), e));
            }
            _ => {}
        }
        Ok(match lock(&path)? {
            Attempt::Acquired(lock) => Attempt::Acquired(Following { _lock: lock }),
            Attempt::Busy => Attempt::Busy,
            Attempt::Gone => Attempt::Gone,
        })
    }
}

/// Who writes to the attachment at `dir` now.
pub fn writer(dir: &Path) -> Option<Holder> {
    holders(dir).into_iter().next()
}

/// Who follows the attachment at `dir`.
pub fn follower(dir: &Path) -> Option<Holder> {
    holders(&pins::follower_dir(dir)).into_iter().next()
}

fn describe(holders: &[Holder]) -> String {
    match holders {
        [] => "another process (it let go as we looked)".to_owned(),
        holders => holders
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// The processes holding (not waiting for) an flock on `path`, from /proc/locks.
pub fn holders(path: &Path) -> Vec<Holder> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Vec::new();
    };
    let Ok(locks) = std::fs::read_to_string("/proc/locks") else {
        return Vec::new();
    };
    let device = format!(
        "{:02x}:{:02x}:{}",
        libc::major(meta.dev()),
        libc::minor(meta.dev()),
        meta.ino()
    );
    parse_proc_locks(&locks, &device)
        .into_iter()
        .map(|pid| Holder {
            pid,
            command: command_of(pid),
        })
        .collect()
}

/// The pids holding an FLOCK on `device` ("MAJ:MIN:INODE" as /proc/locks writes it).
fn parse_proc_locks(locks: &str, device: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for line in locks.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // "1: FLOCK  ADVISORY  WRITE 1234 00:27:218406 0 EOF"; waiters have "->" after the id.
        let [_, "FLOCK", _, _, pid, dev, ..] = fields.as_slice() else {
            continue;
        };
        if *dev == device
            && let Ok(pid) = pid.parse::<u32>()
            && pid != 0
            && !pids.contains(&pid)
        {
            pids.push(pid);
        }
    }
    pids
}

fn command_of(pid: u32) -> String {
    let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return String::new();
    };
    let mut words = raw
        .split(|b| *b == 0)
        .filter(|w| !w.is_empty())
        .map(|w| String::from_utf8_lossy(w).into_owned());
    let Some(program) = words.next() else {
        return String::new();
    };
    let program = Path::new(&program)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or(program);
    std::iter::once(program)
        .chain(words)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holders_are_read_from_proc_locks_and_waiters_are_not() {
        let locks = "\
1: FLOCK  ADVISORY  WRITE 27296 00:27:218406 0 EOF
1: -> FLOCK  ADVISORY  WRITE 27300 00:27:218406 0 EOF
2: POSIX  ADVISORY  WRITE 999 00:27:218406 0 EOF
3: FLOCK  ADVISORY  WRITE 4242 00:27:218407 0 EOF
";
        assert_eq!(parse_proc_locks(locks, "00:27:218406"), vec![27296]);
        assert!(parse_proc_locks(locks, "00:28:1").is_empty());
    }

    #[test]
    fn a_holder_reads_as_pid_and_command() {
        let holder = Holder {
            pid: 12,
            command: "xbr attach br0 --follow".to_owned(),
        };
        assert_eq!(holder.to_string(), "pid 12 (`xbr attach br0 --follow`)");
        assert_eq!(describe(&[]), "another process (it let go as we looked)");
    }
}
