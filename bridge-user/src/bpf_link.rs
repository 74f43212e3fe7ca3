//! The bpf(2) calls xbr needs that aya 0.14 lacks, as raw syscalls.
//!
//! Detaching a pinned link at once: unpinning alone drops the link's last reference, but the
//! kernel frees it from a workqueue: for a moment the program still runs, and a frame NATed
//! in that moment would contradict a finished `xbr detach`. BPF_LINK_DETACH (5.9+) detaches
//! synchronously.
//!
//! Making a map shaped like another, BTF included (a connection table like its prototype), and
//! emptying a slot of an array of maps (a bridge's connection tables go when nothing is
//! published).
//!
//! Reading what really runs, so a hook removed behind xbr's back is seen: where a pinned link
//! is attached (BPF_OBJ_GET_INFO_BY_FD: a link someone detached reports ifindex 0), and
//! which programs a port's tcx ingress runs (BPF_PROG_QUERY by ifindex, without opening each
//! program as aya's `query_tcx` does).

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_BTF_GET_FD_BY_ID: libc::c_long = 19;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_DETACH: libc::c_long = 34;
/// `enum bpf_attach_type`: tcx ingress (6.6+).
const BPF_TCX_INGRESS: u32 = 46;

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

/// `union bpf_attr` as BPF_MAP_DELETE_ELEM reads it.
#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
}

/// The head of `struct bpf_map_info`, up to the BTF ids.
#[repr(C)]
#[derive(Default)]
struct MapInfo {
    map_type: u32,
    id: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    name: [u8; 16],
    ifindex: u32,
    btf_vmlinux_value_type_id: u32,
    netns_dev: u64,
    netns_ino: u64,
    btf_id: u32,
    btf_key_type_id: u32,
    btf_value_type_id: u32,
    _pad: u32,
}

/// `union bpf_attr` as BPF_MAP_CREATE reads it (up to `map_extra`).
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
    map_ifindex: u32,
    btf_fd: u32,
    btf_key_type_id: u32,
    btf_value_type_id: u32,
    btf_vmlinux_value_type_id: u32,
    map_extra: u64,
}

/// `union bpf_attr` as BPF_BTF_GET_FD_BY_ID reads it.
#[repr(C)]
#[derive(Default)]
struct BtfGetFdAttr {
    btf_id: u32,
    next_id: u32,
    open_flags: u32,
}

/// `union bpf_attr` as BPF_PROG_QUERY reads it (6.6 layout; the kernel zero-checks the rest).
#[repr(C)]
#[derive(Default)]
struct ProgQueryAttr {
    target_ifindex: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    count: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// `union bpf_attr` as BPF_OBJ_GET_INFO_BY_FD reads it.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The head of `struct bpf_link_info`: type, id, prog_id, then a union whose xdp and tcx
/// members start with the ifindex (at offset 16: the union is 8-aligned). The rest is room
/// for the kernel to write into.
#[repr(C)]
#[derive(Default)]
struct LinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    ifindex: u32,
    _rest: [u32; 27],
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

/// Opens the object pinned at `pin`; `None` when nothing is pinned there.
fn open_pinned(pin: &Path) -> io::Result<Option<OwnedFd>> {
    let path = CString::new(pin.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut get = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        ..ObjGetAttr::default()
    };
    match bpf(BPF_OBJ_GET, &mut get) {
        // SAFETY: BPF_OBJ_GET returned a new fd that nothing else owns.
        Ok(fd) => Ok(Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Makes a map like `prototype` (type, key and value, flags and the BTF that describes them)
/// with `max_entries` entries, named `name`. A map put into a slot of an array of maps must
/// match the slot's template, and kernels 5.15 to 6.1 compare what the BTF says about the
/// value too; the prototype was made by the same object load as the template.
pub fn create_like(
    prototype: std::os::fd::BorrowedFd<'_>,
    max_entries: u32,
    name: &str,
) -> io::Result<OwnedFd> {
    let mut info = MapInfo::default();
    let mut get_info = InfoAttr {
        bpf_fd: prototype.as_raw_fd() as u32,
        info_len: std::mem::size_of::<MapInfo>() as u32,
        info: &mut info as *mut MapInfo as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut get_info)?;
    let btf = if info.btf_id != 0 {
        let mut get_btf = BtfGetFdAttr {
            btf_id: info.btf_id,
            ..BtfGetFdAttr::default()
        };
        let fd = bpf(BPF_BTF_GET_FD_BY_ID, &mut get_btf)?;
        // SAFETY: BPF_BTF_GET_FD_BY_ID returned a new fd that nothing else owns.
        Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    } else {
        None
    };
    let mut map_name = [0u8; 16];
    for (to, from) in map_name.iter_mut().zip(name.bytes().take(15)) {
        *to = from;
    }
    let mut create = MapCreateAttr {
        map_type: info.map_type,
        key_size: info.key_size,
        value_size: info.value_size,
        max_entries,
        map_flags: info.map_flags,
        map_name,
        btf_fd: btf.as_ref().map_or(0, |fd| fd.as_raw_fd() as u32),
        btf_key_type_id: info.btf_key_type_id,
        btf_value_type_id: info.btf_value_type_id,
        ..MapCreateAttr::default()
    };
    let fd = bpf(BPF_MAP_CREATE, &mut create)?;
    // SAFETY: BPF_MAP_CREATE returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Empties slot `index` of the array of maps pinned at `pin` (aya's `ArrayOfMaps` can only
/// set one). An empty slot is not an error.
pub fn clear_slot(pin: &Path, index: u32) -> io::Result<()> {
    let fd = open_pinned(pin)?
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no map pinned there"))?;
    let mut delete = MapElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        key: &index as *const u32 as u64,
        ..MapElemAttr::default()
    };
    match bpf(BPF_MAP_DELETE_ELEM, &mut delete) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Detaches the link pinned at `pin` (the pin itself stays; remove it afterwards).
/// A missing pin is not an error.
pub fn detach_pinned(pin: &Path) -> io::Result<()> {
    let Some(fd) = open_pinned(pin)? else {
        return Ok(());
    };
    let mut detach = LinkDetachAttr {
        link_fd: fd.as_raw_fd() as u32,
    };
    let result = bpf(BPF_LINK_DETACH, &mut detach).map(|_| ());
    match result {
        // Already detached: its device went away.
        Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => Ok(()),
        other => other,
    }
}

/// Where a pinned xdp or tcx link is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkTarget {
    pub prog_id: u32,
    /// 0 when the link was detached (`bpftool link detach`) or its device is gone.
    pub ifindex: u32,
}

/// The info of the link pinned at `pin`; `None` when nothing is pinned there.
fn pinned_link_info(pin: &Path) -> io::Result<Option<LinkInfo>> {
    let Some(fd) = open_pinned(pin)? else {
        return Ok(None);
    };
    let mut info = LinkInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<LinkInfo>() as u32,
        info: &mut info as *mut LinkInfo as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(Some(info))
}

/// What the link pinned at `pin` runs and where; `None` when nothing is pinned there.
pub fn pinned_link_target(pin: &Path) -> io::Result<Option<LinkTarget>> {
    Ok(pinned_link_info(pin)?.map(|info| LinkTarget {
        prog_id: info.prog_id,
        ifindex: info.ifindex,
    }))
}

/// Which cgroup the cgroup link pinned at `pin` is attached to (its id: the inode of the
/// cgroup's directory); `Some(0)` when it was detached (`bpftool link detach`), `None` when
/// nothing is pinned there.
pub fn pinned_cgroup_link(pin: &Path) -> io::Result<Option<u64>> {
    // The union's cgroup member starts with the 64-bit cgroup id, where the others have the
    // ifindex.
    Ok(pinned_link_info(pin)?
        .map(|info| u64::from(info.ifindex) | (u64::from(info._rest[0]) << 32)))
}

/// The ids of the programs on tcx ingress of `ifindex`, in the order they run. An error on
/// kernels without tcx (before 6.6) and for a device that is gone (ENODEV).
pub fn tcx_ingress_programs(ifindex: u32) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    loop {
        let mut query = ProgQueryAttr {
            target_ifindex: ifindex,
            attach_type: BPF_TCX_INGRESS,
            prog_ids: ids.as_mut_ptr() as u64,
            count: ids.len() as u32,
            ..ProgQueryAttr::default()
        };
        match bpf(BPF_PROG_QUERY, &mut query) {
            Ok(_) => {
                ids.truncate(query.count as usize);
                return Ok(ids);
            }
            // More programs than room: the kernel said how many.
            Err(e)
                if e.raw_os_error() == Some(libc::ENOSPC) && query.count as usize > ids.len() =>
            {
                ids = vec![0; query.count as usize];
            }
            Err(e) => return Err(e),
        }
    }
}
