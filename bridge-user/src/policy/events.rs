//! Hearing the ruleset change, so a follower re-reads it within a second: nftables' multicast
//! group (every change made with nft, iptables-nft, firewalld or Docker is a message there),
//! and a once-a-second look at what sends no event: the legacy xtables rules and
//! br_netfilter's switches.

use std::{
    os::fd::{AsRawFd as _, OwnedFd},
    time::Duration,
};

use tracing::warn;

use super::read;

/// Changes closer together than this are one change.
const QUIET: Duration = Duration::from_millis(20);
/// ...but a storm of them does not postpone it longer than this.
const MAX_DELAY: Duration = Duration::from_millis(200);
/// How often what sends no event is looked at.
const POLL: Duration = Duration::from_secs(1);

pub struct RulesetChanges {
    nftables: Option<NftablesEvents>,
    poll: tokio::time::Interval,
    /// What the last poll saw of the unevented state.
    unevented: String,
    /// A change was heard and not reported yet. Kept here, not in a future, because the
    /// follower's `select!` may drop `changed()` at any await: a change heard then is still
    /// reported by the next call.
    pending: bool,
}

impl RulesetChanges {
    /// Starts listening in the calling thread's network namespace.
    pub fn open() -> RulesetChanges {
        let nftables = match NftablesEvents::open() {
            Ok(events) => Some(events),
            Err(error) => {
                warn!(%error, "cannot hear nftables changes; the ruleset is re-read at each resync");
                None
            }
        };
        let mut poll = tokio::time::interval(POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        RulesetChanges {
            nftables,
            poll,
            unevented: read::unevented_state(),
            pending: false,
        }
    }

    /// Waits until the ruleset (or a switch that decides which hooks apply) may have changed,
    /// and the burst the change belongs to (iptables writes a rule as a batch of messages,
    /// Docker a dozen rules per container) has settled. Cancellation-safe.
    pub async fn changed(&mut self) {
        while !self.pending {
            let nftables = async {
                match self.nftables.as_ref() {
                    Some(events) => events.drain().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                heard = nftables => match heard {
                    Ok(()) => self.pending = true,
                    Err(error) => {
                        warn!(%error, "nftables change events failed; the ruleset is re-read each second");
                        self.nftables = None;
                        self.pending = true;
                    }
                },
                _ = self.poll.tick() => {
                    let now = read::unevented_state();
                    if now != self.unevented {
                        self.unevented = now;
                        self.pending = true;
                    }
                }
            }
        }
        if let Some(events) = self.nftables.as_ref() {
            let first = tokio::time::Instant::now();
            while first.elapsed() < MAX_DELAY {
                match tokio::time::timeout(QUIET, events.drain()).await {
                    Ok(Ok(())) => continue,
                    Ok(Err(_)) | Err(_) => break,
                }
            }
        }
        self.pending = false;
    }
}

/// A netlink socket on the nftables multicast group: one message per ruleset change.
struct NftablesEvents {
    socket: tokio::io::unix::AsyncFd<OwnedFd>,
}

impl NftablesEvents {
    fn open() -> std::io::Result<NftablesEvents> {
        let socket = crate::netlink::netfilter_socket(libc::SOCK_NONBLOCK)?;
        let group: libc::c_int = libc::NFNLGRP_NFTABLES;
        // SAFETY: the option value and its length describe `group`.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_NETLINK,
                libc::NETLINK_ADD_MEMBERSHIP,
                (&group as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the AsyncFd owns the socket, so the descriptor stays open while registered.
        let socket = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(socket, tokio::io::Interest::READABLE)
        }?;
        Ok(NftablesEvents { socket })
    }

    /// Waits until messages arrived, and reads all there are. Cancellation-safe: it reads
    /// only after its last await, and returns right after.
    async fn drain(&self) -> std::io::Result<()> {
        loop {
            let mut ready = self.socket.readable().await?;
            let mut got = false;
            let mut buffer = [0u8; 16 * 1024];
            loop {
                // SAFETY: the buffer and its length describe writable memory we own.
                let n = unsafe {
                    libc::recv(
                        self.socket.as_raw_fd(),
                        buffer.as_mut_ptr().cast(),
                        buffer.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n > 0 {
                    got = true;
                    continue;
                }
                let error = std::io::Error::last_os_error();
                match error.raw_os_error() {
                    _ if n == 0 => break,
                    Some(libc::EAGAIN) => break,
                    // The socket overflowed: changes were missed, which is a change too.
                    Some(libc::ENOBUFS) => got = true,
                    Some(libc::EINTR) => continue,
                    _ => return Err(error),
                }
            }
            ready.clear_ready();
            if got {
                return Ok(());
            }
        }
    }
}
