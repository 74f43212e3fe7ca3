//! What an attachment costs the kernel: the memory its maps and programs lock, as the kernel
//! itself reports it (`memlock` in `/proc/self/fdinfo/<fd>`). For maps that are not
//! preallocated the kernel counts what their entries use, so the figure follows the work.

use std::{
    collections::BTreeSet,
    io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
};

use aya::{maps::MapInfo, programs::ProgramInfo};

use crate::error::{Error, Result};

/// One map of an attachment and the memory it locks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapMemory {
    pub name: String,
    /// The kernel's map type, e.g. `Hash`, `LruHash`, `PerCpuHash`.
    pub kind: String,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
    pub bytes: u64,
}

/// The memory an attachment locks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    /// Largest first.
    pub maps: Vec<MapMemory>,
    pub programs: u64,
}

impl Memory {
    pub fn maps_total(&self) -> u64 {
        self.maps.iter().map(|map| map.bytes).sum()
    }

    pub fn total(&self) -> u64 {
        self.maps_total() + self.programs
    }
}

/// The memory of `programs`, of every map they use, and of `more_maps` (maps reached through
/// an array of maps, which a program's map list does not name).
pub fn of(programs: &[ProgramInfo], more_maps: &[u32]) -> Result<Memory> {
    let mut memory = Memory::default();
    let mut map_ids: BTreeSet<u32> = more_maps.iter().copied().collect();
    for program in programs {
        let fd = program
            .fd()
            .map_err(|e| Error::ebpf("opening a program to read its memory", e))?;
        memory.programs +=
            locked(fd.as_fd()).map_err(|e| Error::io("reading a program's locked memory", e))?;
        let ids = program
            .map_ids()
            .map_err(|e| Error::ebpf("listing a program's maps", e))?;
        map_ids.extend(ids.unwrap_or_default());
    }
    for id in map_ids {
        let info = MapInfo::from_id(id).map_err(|e| Error::ebpf("reading a map's info", e))?;
        let fd = info
            .fd()
            .map_err(|e| Error::ebpf("opening a map to read its memory", e))?;
        memory.maps.push(MapMemory {
            name: info.name_as_str().unwrap_or("?").to_owned(),
            kind: info
                .map_type()
                .map_or_else(|_| "?".to_owned(), |kind| format!("{kind:?}")),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
            bytes: locked(fd.as_fd()).map_err(|e| Error::io("reading a map's locked memory", e))?,
        });
    }
    memory
        .maps
        .sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.name.cmp(&b.name)));
    Ok(memory)
}

/// The `memlock:` figure the kernel reports for a BPF map or program fd.
pub fn locked(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
    parse_memlock(&fdinfo).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "no memlock line in the fd's fdinfo",
        )
    })
}

fn parse_memlock(fdinfo: &str) -> Option<u64> {
    fdinfo
        .lines()
        .find_map(|line| line.strip_prefix("memlock:"))
        .and_then(|value| value.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_memlock_line() {
        let fdinfo = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t2057\nmap_type:\t1\n\
                      key_size:\t6\nvalue_size:\t16\nmax_entries:\t1024\nmap_flags:\t0x1\n\
                      map_extra:\t0x0\nmemlock:\t18160\nmap_id:\t129436\nfrozen:\t0\n";
        assert_eq!(parse_memlock(fdinfo), Some(18160));
        assert_eq!(parse_memlock("pos:\t0\n"), None);
    }
}
