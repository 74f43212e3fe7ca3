//! Kernel features xbr chooses its path by, detected at run time: the same binary runs on
//! 5.10 (clsact, redirect_peer) and on 6.6+ (tcx links).

use aya::{
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_program_supported},
    util::KernelVersion,
};
use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct Features {
    /// `uname -r`-style release, as aya reads it.
    pub kernel: String,
    pub sched_cls: bool,
    /// tcx links (6.6+): attachments owned by pinned links, removed by unpinning.
    pub tcx: bool,
    /// bpf_redirect_peer (5.10+): straight into the peer's ingress, no backlog pass.
    pub redirect_peer: bool,
    /// XDP programs attached through bpf links (5.9+), for `--uplink-mode xdp`.
    pub xdp: bool,
    /// A socket's network namespace can be named (SO_NETNS_COOKIE, 5.14+): what the socket
    /// hooks need to serve the host's clients of published ports and no one else.
    pub socket_hooks: bool,
}

pub fn detect() -> Features {
    let version = KernelVersion::current().ok();
    let at_least = |major, minor| version.is_some_and(|v| v >= KernelVersion::new(major, minor, 0));
    let sched_cls = is_program_supported(ProgramType::SchedClassifier).unwrap_or(false);
    let redirect_peer = is_helper_supported(
        ProgramType::SchedClassifier,
        BpfHelper::BPF_FUNC_redirect_peer,
    )
    .unwrap_or_else(|_| at_least(5, 10));
    Features {
        kernel: version
            .map(|v| format!("{v}"))
            .unwrap_or_else(|| "unknown".to_owned()),
        sched_cls,
        tcx: at_least(6, 6),
        redirect_peer,
        xdp: at_least(5, 9) && is_program_supported(ProgramType::Xdp).unwrap_or(false),
        socket_hooks: crate::datapath::netns_cookie().is_ok(),
    }
}
