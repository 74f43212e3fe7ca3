//! The one way xbr talks rtnetlink: a connection in the calling thread's network namespace,
//! driven by a current-thread runtime for the duration of one job.

use std::future::Future;

/// Runs `job` with an rtnetlink handle bound to the calling thread's network namespace.
///
/// The socket is opened before the job starts, so a thread that entered another namespace
/// (see `netns::NetNs::run`) gets a handle for that namespace.
pub fn run<T, F, Fut>(job: F) -> std::io::Result<T>
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
