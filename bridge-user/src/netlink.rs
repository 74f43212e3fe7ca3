//! The one way xbr talks rtnetlink from synchronous code: a connection in the calling
//! thread's network namespace, driven by a current-thread runtime for one job.

use std::future::Future;

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
