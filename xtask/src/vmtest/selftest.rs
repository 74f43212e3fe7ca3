//! The runner tested on itself: a datapath the old verifier rejects must fail the matrix, and
//! so must a kernel panic. It boots one 5.10 VM, so it runs only with XBR_VMTEST_SELFTEST set
//! (.ci/run sets it).

use std::time::{Duration, Instant};

use super::guest::Suite;
use super::report::Outcome;
use super::{Accel, Runner, verdict};
use crate::cmd;

/// The stand-in for a broken datapath: a tc classifier calling bpf_ktime_get_tai_ns, a helper
/// that arrived in 6.1. On 5.10 the verifier refuses it, just as it would refuse a real
/// datapath change that used it.
const HELPER_KTIME_GET_TAI_NS: i32 = 208;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;

#[repr(C)]
struct Insn {
    code: u8,
    registers: u8,
    offset: i16,
    imm: i32,
}

/// The head of `union bpf_attr` for BPF_PROG_LOAD; the kernel zero-fills the rest.
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
}

#[test]
#[ignore = "the VM self-test runs this inside a 5.10 guest"]
fn classifier_calling_a_6_1_helper() {
    let program = [
        // call bpf_ktime_get_tai_ns
        Insn {
            code: 0x85,
            registers: 0,
            offset: 0,
            imm: HELPER_KTIME_GET_TAI_NS,
        },
        // r0 = 0 (TC_ACT_OK)
        Insn {
            code: 0xb7,
            registers: 0,
            offset: 0,
            imm: 0,
        },
        // exit
        Insn {
            code: 0x95,
            registers: 0,
            offset: 0,
            imm: 0,
        },
    ];
    let license = c"GPL";
    let mut log = vec![0u8; 64 * 1024];
    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_SCHED_CLS,
        insn_cnt: program.len() as u32,
        insns: program.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        kern_version: 0,
        prog_flags: 0,
    };
    // SAFETY: attr and everything it points to outlive the call; the size is attr's own.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoadAttr,
            std::mem::size_of::<ProgLoadAttr>(),
        )
    };
    let error = std::io::Error::last_os_error();
    let log =
        String::from_utf8_lossy(&log[..log.iter().position(|&b| b == 0).unwrap_or(0)]).into_owned();
    assert!(
        fd >= 0,
        "the verifier rejected the classifier ({error}); its log:\n{}",
        log.trim_end()
    );
    // SAFETY: fd is the program this test loaded.
    unsafe { libc::close(fd as i32) };
}

#[test]
fn a_datapath_the_old_verifier_rejects_fails_the_matrix() {
    if std::env::var_os("XBR_VMTEST_SELFTEST").is_none() {
        xbr_tests::skip::skip(
            "a_datapath_the_old_verifier_rejects_fails_the_matrix",
            "set XBR_VMTEST_SELFTEST=1 to boot a 5.10 VM (about a minute under TCG)",
        );
        return;
    }
    let started = Instant::now();
    let this_test_binary = std::env::current_exe().expect("the test binary's path");
    let probe = vec![
        this_test_binary.display().to_string(),
        "vmtest::selftest::classifier_calling_a_6_1_helper".to_owned(),
        "--exact".to_owned(),
        "--ignored".to_owned(),
    ];
    // The control: on this machine's newer kernel the same program loads, so a failure in the
    // VM is the old verifier's doing, not a broken probe.
    let native = std::process::Command::new(&probe[0])
        .args(&probe[1..])
        .output()
        .expect("run the probe natively");
    assert!(
        native.status.success(),
        "the probe should load on this machine's kernel (6.1+, as root): {}",
        String::from_utf8_lossy(&native.stdout)
    );
    let suites = vec![
        Suite {
            name: "broken-datapath".to_owned(),
            argv: probe,
            dir: cmd::workspace_root(),
            timeout: Duration::from_secs(120),
            needs: None,
        },
        // And a kernel that dies under a suite: the console's panic must end the VM and fail it.
        Suite {
            name: "kernel-crash".to_owned(),
            argv: ["/bin/sh", "-c", "echo c > /proc/sysrq-trigger"]
                .map(String::from)
                .to_vec(),
            dir: cmd::workspace_root(),
            timeout: Duration::from_secs(60),
            needs: None,
        },
    ];
    let names: Vec<String> = suites.iter().map(|suite| suite.name.clone()).collect();
    let xbr = cmd::target_dir().join("release/xbr");
    let vmtest_dir = cmd::target_dir().join("vmtest");
    let mut runner = Runner::new(
        vmtest_dir.clone(),
        Accel::Auto,
        xbr.is_file().then_some(xbr),
        suites,
    )
    .with_runs_in(vmtest_dir.join("run-selftest"));
    let rows = runner.run_matrix(&["5.10".to_owned()]);
    let row = &rows[0];
    let tail = row
        .tails
        .get("broken-datapath")
        .cloned()
        .unwrap_or_default()
        .join("\n");
    eprintln!(
        "self-test: 5.10 ran in {:.0} s\n{}",
        started.elapsed().as_secs_f64(),
        super::report::matrix(&rows, &names)
    );
    assert_eq!(
        row.booted.as_deref(),
        Some(row.release.as_str()),
        "the 5.10 VM should boot; log {}",
        row.log.display()
    );
    assert!(
        row.failure
            .as_deref()
            .is_some_and(|f| f.contains("kernel panic") && f.contains("during suite kernel-crash")),
        "the crash should end the VM as a kernel panic during suite kernel-crash, got {:?}",
        row.failure
    );
    assert_eq!(row.outcome("kernel-crash"), Some(&Outcome::NotRun));
    assert!(
        matches!(row.outcome("broken-datapath"), Some(Outcome::Fail(_))),
        "the broken datapath should fail on 5.10, got {:?}",
        row.outcome("broken-datapath")
    );
    assert!(
        tail.contains("invalid func unknown#208"),
        "the report should quote the verifier's refusal; it kept:\n{tail}"
    );
    assert!(!row.passed(), "a failed suite must fail its kernel's row");
    assert!(
        verdict(&rows).is_err(),
        "a failed row must make `cargo xtask vmtest` exit non-zero"
    );
}
