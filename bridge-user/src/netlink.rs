//! The one way xbr talks rtnetlink from synchronous code: a connection in the calling
//! thread's network namespace, driven by a current-thread runtime for one job.

use std::future::Future;

use futures::TryStreamExt as _;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::Handle;

/// Runs `job` with an rtnetlink handle bound to the calling thread's network namespace.
///
/// The socket is opened before the job starts, so a thread that entered another namespace
/// (see `netns::NetNs::run`) gets a handle for that namespace. Called from inside a runtime
/// (the follower), the job runs on a helper thread, which inherits the caller's namespace.
pub fn run<T, F, Fut>(job: F) -> std::io::Result<T>
where
    T: Send,
    F: FnOnce(rtnetlink::Handle) -> Fut + Send,
    Fut: Future<Output = T>,
{
    if tokio::runtime::Handle::try_current().is_ok() {
        return std::thread::scope(|scope| {
            scope
                .spawn(|| run_here(job))
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        });
    }
    run_here(job)
}

fn run_here<T, F, Fut>(job: F) -> std::io::Result<T>
where
    F: FnOnce(rtnetlink::Handle) -> Fut,
    Fut: Future<Output = T>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    runtime.block_on(async move {
        let (connection, handle, _) = rtnetlink::new_connection_with_strict_check()?;
        let driver = tokio::spawn(connection);
        let result = job(handle).await;
        driver.abort();
        Ok(result)
    })
}

/// Looks a link up by name; `None` when the namespace has no such link (ENODEV). The error is
/// rtnetlink's, for the caller to say what it was doing.
pub async fn link_by_name(
    handle: &Handle,
    name: &str,
) -> Result<Option<LinkMessage>, rtnetlink::Error> {
    match handle
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_next()
        .await
    {
        Ok(link) => Ok(link),
        Err(error) if is_errno(&error, libc::ENODEV) => Ok(None),
        Err(error) => Err(error),
    }
}

/// Whether `error` is the kernel refusing with `errno` (e.g. `libc::ENODEV`).
pub fn is_errno(error: &rtnetlink::Error, errno: i32) -> bool {
    matches!(error, rtnetlink::Error::NetlinkError(message) if message.raw_code() == -errno)
}

// A link message's attributes, as xbr reads them.

/// The `IFLA_LINKINFO` entries.
pub fn link_infos(link: &LinkMessage) -> impl Iterator<Item = &LinkInfo> {
    link.attributes
        .iter()
        .filter_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => Some(infos.iter()),
            _ => None,
        })
        .flatten()
}

/// The link's kind (bridge, veth, ...); `None` for a device without one (loopback, a NIC).
pub fn link_kind(link: &LinkMessage) -> Option<&InfoKind> {
    link_infos(link).find_map(|info| match info {
        LinkInfo::Kind(kind) => Some(kind),
        _ => None,
    })
}

/// The link's name; empty when the message has none.
pub fn link_name(link: &LinkMessage) -> String {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(name) => Some(name.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

/// The link's hardware address, as the kernel gives it.
pub fn link_address(link: &LinkMessage) -> Option<&[u8]> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(bytes) => Some(bytes.as_slice()),
        _ => None,
    })
}

/// The ifindex of the link's controller (the bridge of a bridge port).
pub fn link_controller(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Controller(index) => Some(*index),
        _ => None,
    })
}

/// A NETLINK_NETFILTER socket, bound (the kernel assigns its port id): nftables' events and
/// conntrack's dumps both come this way. `extra_flags`: more socket type flags
/// (`SOCK_NONBLOCK`).
pub fn netfilter_socket(extra_flags: libc::c_int) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    // SAFETY: plain socket(2); the result is checked and owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | extra_flags,
            libc::NETLINK_NETFILTER,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_nl is a valid value (pid 0: the kernel assigns one).
    let mut address: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    address.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: the address and its length describe the struct above.
    let rc = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&address as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(socket)
}
