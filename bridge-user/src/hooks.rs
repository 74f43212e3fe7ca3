//! What the kernel really runs on a port, read before xbr trusts its own records: the
//! programs on a port's tcx ingress, the cls_bpf filters in its clsact qdisc, where a pinned
//! link is attached. A hook removed behind xbr's back (`tc filter del`, `bpftool link
//! detach`, a deleted qdisc) shows up here, and `judge` says what the record is missing.

use std::path::Path;

use aya::programs::{
    ProgramError, TcAttachType,
    links::Link as _,
    tc::{SchedClassifierLink, TcHandle},
};
use futures::TryStreamExt as _;
use netlink_packet_route::tc::{TcAttribute, TcFilterBpfOption, TcOption};

use crate::{
    bpf_link,
    error::{Error, Result},
    netlink,
};

/// A cls_bpf filter on a port's ingress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Filter {
    pub priority: u16,
    pub handle: u32,
    pub prog_id: u32,
}

/// What is on one port's tc ingress, as far as xbr's program is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observed {
    /// tcx: whether the program runs on the port, and where the pinned link is attached
    /// (`None`: nothing pinned).
    Tcx {
        running: bool,
        pin: Option<bpf_link::LinkTarget>,
    },
    /// clsact: whether the port has a clsact qdisc, and xbr's filters in it (those running the
    /// program), lowest priority first.
    Clsact { qdisc: bool, ours: Vec<Filter> },
}

/// How a port's hook differs from what xbr recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Drift {
    /// The program is not on the port: removed outside xbr (`tc filter del`, `bpftool link
    /// detach`, a deleted qdisc or pin), or a writer stopped before hooking it.
    Missing,
    /// The program is on the port more than once (clsact: more than one filter).
    Duplicated,
    /// The program is on the port, but not as recorded (a writer stopped before recording
    /// it): the record is corrected.
    Unrecorded,
    /// A port of the bridge that xbr has not hooked (it joined after the last attach with no
    /// follower running, or hooking it failed).
    NotHooked,
}

impl Drift {
    pub fn name(self) -> &'static str {
        match self {
            Drift::Missing => "missing",
            Drift::Duplicated => "duplicated",
            Drift::Unrecorded => "unrecorded",
            Drift::NotHooked => "not_hooked",
        }
    }

    /// What it means for the port, in a sentence's middle.
    pub fn describe(self) -> &'static str {
        match self {
            Drift::Missing => "program missing (hook removed outside xbr)",
            Drift::Duplicated => "program hooked more than once",
            Drift::Unrecorded => "hook not recorded (an interrupted writer)",
            Drift::NotHooked => "not hooked yet (joined after the last attach)",
        }
    }
}

/// The recorded hook of a port: clsact filters are found by (priority, handle).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recorded {
    pub ifindex: u32,
    pub priority: u16,
    pub handle: u32,
}

/// How the port's hook differs from `recorded`, if at all. Pure: the rules in one place.
pub fn judge(recorded: &Recorded, observed: &Observed) -> Option<Drift> {
    match observed {
        Observed::Tcx { running, pin } => {
            let pinned_here = pin.is_some_and(|p| p.ifindex == recorded.ifindex);
            match (running, pinned_here) {
                (true, true) => None,
                // The program runs without our pin holding it (a link being released), or
                // the pin's link was detached: either way the pin does not keep it there.
                _ => Some(Drift::Missing),
            }
        }
        Observed::Clsact { ours, .. } => {
            let recorded_there = ours
                .iter()
                .any(|f| f.priority == recorded.priority && f.handle == recorded.handle);
            match (ours.len(), recorded_there) {
                (0, _) => Some(Drift::Missing),
                (1, true) => None,
                (_, true) => Some(Drift::Duplicated),
                (_, false) => Some(Drift::Unrecorded),
            }
        }
    }
}

/// The tcx ingress of `ifindex`: is `prog_id` running, and where is the link at `pin`.
pub fn observe_tcx(ifindex: u32, prog_id: u32, pin: &Path) -> Result<Observed> {
    let running = match bpf_link::tcx_ingress_programs(ifindex) {
        Ok(ids) => ids.contains(&prog_id),
        // The port is gone: nothing runs there.
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => false,
        Err(e) => {
            return Err(Error::io(
                format!("listing the tcx programs of ifindex {ifindex}"),
                e,
            ));
        }
    };
    let pin = bpf_link::pinned_link_target(pin)
        .map_err(|e| Error::io(format!("reading the link pinned at {}", pin.display()), e))?;
    Ok(Observed::Tcx { running, pin })
}

/// The clsact ingress of each of `ifindexes`: its qdisc and the filters running `prog_id`.
/// One netlink socket for all of them. A port that is gone has neither.
pub fn observe_clsact(ifindexes: &[u32], prog_id: u32) -> Result<Vec<Observed>> {
    let ifindexes = ifindexes.to_vec();
    netlink::run(|handle| async move {
        let mut observed = Vec::with_capacity(ifindexes.len());
        for ifindex in ifindexes {
            let qdisc = has_clsact(&handle, ifindex).await?;
            let ours = if qdisc {
                ingress_filters(&handle, ifindex)
                    .await?
                    .into_iter()
                    .filter(|f| f.prog_id == prog_id)
                    .collect()
            } else {
                Vec::new()
            };
            observed.push(Observed::Clsact { qdisc, ours });
        }
        Ok(observed)
    })
    .map_err(|e| Error::io("opening a netlink socket", e))?
}

/// Whether `ifindex` has a clsact qdisc.
pub async fn has_clsact(handle: &rtnetlink::Handle, ifindex: u32) -> Result<bool> {
    let mut qdiscs = handle.qdisc().get().index(ifindex as i32).execute();
    let mut found = false;
    loop {
        match qdiscs.try_next().await {
            Ok(Some(qdisc)) => {
                found |= qdisc.header.index == ifindex as i32
                    && qdisc
                        .attributes
                        .iter()
                        .any(|a| matches!(a, TcAttribute::Kind(kind) if kind == "clsact"));
            }
            Ok(None) => return Ok(found),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {
                return Ok(false);
            }
            Err(e) => {
                return Err(Error::netlink(
                    format!("listing the qdiscs of ifindex {ifindex}"),
                    e,
                ));
            }
        }
    }
}

/// The cls_bpf filters on `ifindex`'s ingress, lowest priority first.
async fn ingress_filters(handle: &rtnetlink::Handle, ifindex: u32) -> Result<Vec<Filter>> {
    let mut messages = handle
        .traffic_filter(ifindex as i32)
        .get()
        .ingress()
        .execute();
    let mut filters = Vec::new();
    loop {
        let message = match messages.try_next().await {
            Ok(Some(message)) => message,
            Ok(None) => break,
            // The port (or its qdisc) went away meanwhile.
            Err(rtnetlink::Error::NetlinkError(e))
                if e.raw_code() == -libc::ENODEV || e.raw_code() == -libc::EINVAL =>
            {
                break;
            }
            Err(e) => {
                return Err(Error::netlink(
                    format!("listing the ingress filters of ifindex {ifindex}"),
                    e,
                ));
            }
        };
        let prog_id = message.attributes.iter().find_map(|a| match a {
            TcAttribute::Options(options) => options.iter().find_map(|o| match o {
                TcOption::Bpf(TcFilterBpfOption::ProgId(id)) => Some(*id),
                _ => None,
            }),
            _ => None,
        });
        // A filter's dump also lists its chain head without options: not a filter of ours.
        if let Some(prog_id) = prog_id {
            filters.push(Filter {
                // tcm_info: priority in the upper 16 bits, protocol in the lower.
                priority: (message.header.info >> 16) as u16,
                handle: message.header.handle.into(),
                prog_id,
            });
        }
    }
    filters.sort_by_key(|f| (f.priority, f.handle));
    Ok(filters)
}

/// Deletes one of xbr's filters. A filter (or port) already gone is not an error.
pub fn delete_filter(ifindex: u32, filter: &Filter) -> Result<()> {
    let Ok(name) = nix::net::if_::if_indextoname(ifindex) else {
        return Ok(());
    };
    let name = name.to_string_lossy().into_owned();
    let link = SchedClassifierLink::attached(
        &name,
        TcAttachType::Ingress,
        filter.priority,
        TcHandle::from(filter.handle),
        None,
    )
    .map_err(|e| Error::io(format!("finding the filter on {name}"), e))?;
    match link.detach() {
        Ok(()) => Ok(()),
        Err(ProgramError::NetlinkError(e))
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT | libc::ENODEV | libc::EINVAL)
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(Error::ebpf(
            format!(
                "removing xbr's filter (priority {}) from {name}",
                filter.priority
            ),
            e,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECORDED: Recorded = Recorded {
        ifindex: 7,
        priority: 49152,
        handle: 1,
    };

    fn filter(priority: u16) -> Filter {
        Filter {
            priority,
            handle: 1,
            prog_id: 42,
        }
    }

    fn pin(ifindex: u32) -> Option<bpf_link::LinkTarget> {
        Some(bpf_link::LinkTarget {
            prog_id: 42,
            ifindex,
        })
    }

    #[test]
    fn a_tcx_hook_counts_only_while_its_pinned_link_holds_it_on_the_port() {
        let tcx = |running, pin| judge(&RECORDED, &Observed::Tcx { running, pin });
        assert_eq!(tcx(true, pin(7)), None);
        assert_eq!(
            tcx(false, pin(0)),
            Some(Drift::Missing),
            "bpftool link detach"
        );
        assert_eq!(tcx(false, None), Some(Drift::Missing), "pin removed");
        assert_eq!(
            tcx(true, None),
            Some(Drift::Missing),
            "running without a pin: it goes when its last fd does"
        );
        assert_eq!(tcx(true, pin(8)), Some(Drift::Missing), "pinned elsewhere");
    }

    #[test]
    fn a_clsact_hook_is_the_recorded_filter_and_no_other() {
        let clsact = |ours: Vec<Filter>| {
            judge(
                &RECORDED,
                &Observed::Clsact {
                    qdisc: !ours.is_empty(),
                    ours,
                },
            )
        };
        assert_eq!(clsact(vec![filter(49152)]), None);
        assert_eq!(clsact(vec![]), Some(Drift::Missing), "tc filter del");
        assert_eq!(
            clsact(vec![filter(49151), filter(49152)]),
            Some(Drift::Duplicated)
        );
        assert_eq!(clsact(vec![filter(49151)]), Some(Drift::Unrecorded));
    }
}
