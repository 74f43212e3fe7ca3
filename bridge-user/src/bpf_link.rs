//! Detaching a pinned BPF link at once. Unpinning alone drops the link's last reference,
//! but the kernel frees it from a workqueue: for a moment the program still runs, and a
//! frame NATed in that moment would contradict a finished `xbr detach`. BPF_LINK_DETACH
//! (5.9+) detaches synchronously; aya 0.14 has no call for it, so this is the raw syscall.

use std::{ffi::CString, io, os::unix::ffi::OsStrExt as _, path::Path};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_DETACH: libc::c_long = 34;

/// The parts of `union bpf_attr` these two commands read (the kernel zero-checks the rest).
#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    /// Explicit, so it is zero: the kernel rejects non-zero bytes past the last field.
    _pad: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkDetachAttr {
    link_fd: u32,
}

fn bpf<T>(command: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>(),
        )
    };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

/// Detaches the link pinned at `pin` (the pin itself stays; remove it afterwards).
/// A missing pin is not an error.
pub fn detach_pinned(pin: &Path) -> io::Result<()> {
    let path = CString::new(pin.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut get = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        ..ObjGetAttr::default()
    };
    let fd = match bpf(BPF_OBJ_GET, &mut get) {
        Ok(fd) => fd as i32,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut detach = LinkDetachAttr { link_fd: fd as u32 };
    let result = bpf(BPF_LINK_DETACH, &mut detach).map(|_| ());
    unsafe { libc::close(fd) };
    match result {
        // Already detached: its device went away.
        Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => Ok(()),
        other => other,
    }
}
