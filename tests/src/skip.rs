//! Skipping a test that cannot run on this machine, honestly: libtest has no way to skip at
//! run time, so `skip` writes `SKIPPED <test>: <reason>` to the process's stdout past the
//! harness's capture, and `cargo xtask test` counts that test as skipped, not passed.

use std::io::Write as _;

/// The line `cargo xtask test` looks for.
pub const MARK: &str = "SKIPPED ";

/// Reports `test` as skipped for `reason`; the test returns right after.
pub fn skip(test: &str, reason: &str) {
    // io::stdout() (not println!) is not captured by the test harness.
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{MARK}{test}: {reason}");
    let _ = stdout.flush();
}

/// Whether the kernel has tcx links; when not, reports `test` as skipped.
pub fn needs_tcx(test: &str) -> bool {
    let features = xbr::features::detect();
    if !features.tcx {
        skip(
            test,
            &format!("kernel {} has no tcx links (6.6+)", features.kernel),
        );
    }
    features.tcx
}
