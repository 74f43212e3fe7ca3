//! The library's one error type. Every message names the object and, where there is one,
//! the next step for the user.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    NetNs(#[from] crate::netns::NetNsError),
    #[error(
        "bridge {0} not found; list bridges with `ip -br link show type bridge` (or Docker \
         networks with `docker network ls`)"
    )]
    BridgeNotFound(String),
    #[error(
        "{name} is a {kind} device, not a bridge; list bridges with `ip -br link show type bridge`"
    )]
    NotABridge { name: String, kind: String },
    #[error(
        "bridge {0} filters VLANs (vlan_filtering 1); xbr does not accelerate VLAN-filtering \
         bridges, because frames would bypass the bridge's VLAN policy"
    )]
    VlanFiltering(String),
    #[error("bridge {bridge} is already attached (pinned at {}); run `xbr detach {bridge}` first", pins.display())]
    AlreadyAttached { bridge: String, pins: PathBuf },
    #[error(
        "bridge {bridge} is attached in {attached} mode; run `xbr detach {bridge}` first to attach it in {wanted} mode"
    )]
    ModeMismatch {
        bridge: String,
        attached: &'static str,
        wanted: &'static str,
    },
    #[error(
        "bridge {bridge} is attached with {attached}; run `xbr detach {bridge}` first to attach it with {wanted}"
    )]
    SocketHooksMismatch {
        bridge: String,
        attached: String,
        wanted: String,
    },
    #[error(
        "bridge {bridge} is attached with a table of {attached} connections (--max-flows); run `xbr detach {bridge}` first to attach it with --max-flows {wanted}"
    )]
    FlowTableSize {
        bridge: String,
        attached: usize,
        wanted: u32,
    },
    #[error("bridge {bridge} is not attached (nothing pinned at {}); see `xbr status`", pins.display())]
    NotAttached { bridge: String, pins: PathBuf },
    #[error(
        "port {port} of bridge {bridge} disappeared during attach; nothing was changed, run `xbr attach {bridge}` again"
    )]
    PortVanished { bridge: String, port: String },
    #[error("uplink {0} not found; list interfaces with `ip -br link`")]
    UplinkNotFound(String),
    #[error("{0}")]
    Publish(String),
    /// Docker was asked for (`--docker on`) but cannot be used; the message says what to do.
    #[error("{0}")]
    DockerUnavailable(String),
    #[error("docker: {context}: {source}")]
    Docker {
        context: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("xbr needs root (CAP_NET_ADMIN and CAP_BPF); run it with sudo")]
    NotRoot,
    #[error("cannot use bpffs at {}: {reason}; mount it with `mount -t bpf bpf /sys/fs/bpf` or pass --pin-root on a bpffs", path.display())]
    Bpffs { path: PathBuf, reason: String },
    #[error("this kernel lacks {feature}, which xbr needs: {detail}")]
    MissingFeature {
        feature: &'static str,
        detail: String,
    },
    #[error("the pins at {} are not a complete xbr attachment ({detail}); remove them with `xbr detach {bridge}`", pins.display())]
    BrokenPins {
        bridge: String,
        pins: PathBuf,
        detail: String,
    },
    #[error(
        "the pins at {} were made by an xbr with another pinned layout (found {}, this xbr \
         pins layout-{wanted}); they keep forwarding as they are, but this xbr cannot \
         update them: `xbr detach {bridge}` and attach again",
        pins.display(),
        found.as_deref().map_or_else(|| "no layout stamp".to_owned(), |f| format!("layout-{f}"))
    )]
    OtherLayout {
        bridge: String,
        pins: PathBuf,
        found: Option<String>,
        wanted: String,
    },
    #[error(
        "the pins at {} are an interrupted attach or detach of {bridge} (no bridge record); \
         `xbr attach {bridge}` attaches afresh, `xbr detach {bridge}` removes them",
        pins.display()
    )]
    Incomplete { bridge: String, pins: PathBuf },
    #[error(
        "bridge {bridge} is being changed by {holder}; gave up after waiting {waited} s \
         (wait longer with --wait SECONDS)"
    )]
    Busy {
        bridge: String,
        holder: String,
        waited: f64,
    },
    #[error("netlink: {context}: {source}")]
    Netlink {
        context: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{context}: {source}")]
    Ebpf {
        context: String,
        /// Boxed: aya's errors are large, and every `Result` here carries an `Error`.
        #[source]
        source: Box<Aya>,
    },
}

/// An error of aya, the library below the datapath, kept with its type (callers can match
/// on e.g. `Aya::Program(ProgramError::...)`).
#[derive(Debug, thiserror::Error)]
pub enum Aya {
    #[error(transparent)]
    Load(#[from] aya::EbpfError),
    #[error(transparent)]
    Map(#[from] aya::maps::MapError),
    #[error(transparent)]
    Program(#[from] aya::programs::ProgramError),
    #[error(transparent)]
    Link(#[from] aya::programs::links::LinkError),
    #[error(transparent)]
    Pin(#[from] aya::pin::PinError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub fn netlink(context: impl Into<String>, source: rtnetlink::Error) -> Self {
        Error::Netlink {
            context: context.into(),
            source,
        }
    }

    pub fn docker(context: impl Into<String>, source: bollard::errors::Error) -> Self {
        Error::Docker {
            context: context.into(),
            source,
        }
    }

    pub fn ebpf(context: impl Into<String>, source: impl Into<Aya>) -> Self {
        Error::Ebpf {
            context: context.into(),
            source: Box::new(source.into()),
        }
    }
}
