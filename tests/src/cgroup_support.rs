//! A cgroup v2 of a test's own, for the socket hooks: processes the test starts join it (the
//! test process never does), and on drop the ones still in it are killed by pid and the
//! directory is removed, on every path.

use std::{
    ffi::CString,
    os::unix::{ffi::OsStrExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output},
    sync::Mutex,
    time::{Duration, Instant},
};

/// A uniquely named cgroup under the cgroup v2 mount.
pub struct TestCgroup {
    path: PathBuf,
    /// Pids of the processes this guard started in the cgroup.
    started: Mutex<Vec<u32>>,
}

impl TestCgroup {
    /// Makes the cgroup; `None` when no cgroup v2 hierarchy is mounted.
    pub fn new() -> Option<TestCgroup> {
        let root = xbr::datapath::cgroup2_root()?;
        let path = root.join(crate::lab_support::unique_name("xbrtest"));
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("making cgroup {}: {e}", path.display()));
        Some(TestCgroup {
            path,
            started: Mutex::new(Vec::new()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn arg(&self) -> &str {
        self.path.to_str().expect("UTF-8 cgroup path")
    }

    /// The cgroup's id (the inode of its directory), as bpftool and `xbr status` show it.
    pub fn id(&self) -> u64 {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(&self.path)
            .expect("the cgroup exists")
            .ino()
    }

    /// Pids in the cgroup now.
    pub fn procs(&self) -> Vec<u32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.trim().parse().ok())
            .collect()
    }

    /// Starts `command` inside the cgroup: the child joins it between fork and exec, so
    /// every socket the program makes belongs to the cgroup.
    pub fn spawn(&self, mut command: Command) -> Child {
        let procs = CString::new(self.path.join("cgroup.procs").as_os_str().as_bytes())
            .expect("no NUL in the cgroup path");
        // SAFETY: between fork and exec the closure only makes async-signal-safe system
        // calls (open, write, close) on memory prepared before the fork.
        unsafe {
            command.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0": the writing process itself.
                let written = libc::write(fd, b"0\n".as_ptr().cast(), 2);
                let error = std::io::Error::last_os_error();
                libc::close(fd);
                if written != 2 {
                    return Err(error);
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("start a process in the test cgroup");
        self.started.lock().unwrap().push(child.id());
        child
    }

    /// Runs `command` in the cgroup to its end, killed (by pid) after `limit`.
    pub fn run(&self, command: Command, limit: Duration) -> Output {
        wait_output(self.spawn(command), limit)
    }
}

/// Waits for `child` to end and collects its output; kills it (it is ours) after `limit` and
/// panics, so a hung client fails its test instead of hanging it.
pub fn wait_output(mut child: Child, limit: Duration) -> Output {
    let started = Instant::now();
    // The pipes are read on threads, so a chatty child never blocks on a full pipe.
    let stdout = child.stdout.take().map(read_all);
    let stderr = child.stderr.take().map(read_all);
    loop {
        if let Some(status) = child.try_wait().expect("poll a client process") {
            let collect = |reader: Option<std::thread::JoinHandle<Vec<u8>>>| {
                reader.map(|r| r.join().unwrap()).unwrap_or_default()
            };
            return Output {
                status,
                stdout: collect(stdout),
                stderr: collect(stderr),
            };
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("client process {} still ran after {limit:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn read_all(mut pipe: impl std::io::Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        bytes
    })
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let started = std::mem::take(&mut *self.started.lock().unwrap_or_else(|e| e.into_inner()));
        for pid in self.procs() {
            if started.contains(&pid) {
                // SAFETY: kill(2) on a pid this guard started and the cgroup still holds.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        }
        // A killed process leaves the cgroup when it has exited; only then can it go.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.path).is_err()
            && self.path.exists()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
