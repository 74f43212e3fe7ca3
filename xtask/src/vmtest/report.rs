//! The serial console read back: the guest's result lines and the kernel's own alarms (panic,
//! RCU stall, soft lockup) become one row per kernel; the rows print as a kernel x suite matrix.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use super::guest::MARK;

/// Console text that means the kernel is in trouble: the VM is stopped and the kernel fails.
const ALARMS: [(&str, &str); 8] = [
    ("Kernel panic", "kernel panic"),
    // "rcu_sched self-detected stall", "rcu_preempt detected stalls".
    ("detected stall", "RCU stall"),
    ("soft lockup", "soft lockup"),
    ("hard LOCKUP", "hard lockup"),
    ("blocked for more than", "hung task"),
    ("BUG:", "kernel BUG"),
    ("Oops:", "kernel oops"),
    ("general protection fault", "general protection fault"),
];

/// Lines of a failed suite's output kept for the report.
const TAIL_LINES: usize = 30;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail(String),
    Skip(String),
    /// The guest never reported on it (the VM ended first).
    NotRun,
}

impl Outcome {
    fn short(&self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Fail(_) => "FAIL",
            Outcome::Skip(_) => "skip",
            Outcome::NotRun => "not run",
        }
    }
}

/// One kernel's results.
#[derive(Clone, Debug, Default)]
pub struct Row {
    /// What was asked for ("5.10") and what it resolved to ("5.10.0-46-amd64").
    pub label: String,
    pub release: String,
    /// The release the guest booted (`uname -r`), once it said so.
    pub booted: Option<String>,
    /// `xbr status`'s kernel line in the guest: "kernel 5.10.262: tcx no, bpf_redirect_peer yes".
    pub features: Option<String>,
    /// What `xbr attach` chose in auto mode: "clsact, bpf_redirect_peer".
    pub path: Option<String>,
    pub suites: Vec<(String, Outcome)>,
    /// Why the VM as a whole failed: a kernel alarm, a timeout, a setup step of the guest.
    pub failure: Option<String>,
    /// The last lines printed by each failed suite, and the console before a VM failure.
    pub tails: BTreeMap<String, Vec<String>>,
    pub wall: Duration,
    pub log: PathBuf,
}

impl Row {
    pub fn passed(&self) -> bool {
        self.failure.is_none()
            && self
                .suites
                .iter()
                .all(|(_, outcome)| matches!(outcome, Outcome::Pass | Outcome::Skip(_)))
    }

    pub fn outcome(&self, suite: &str) -> Option<&Outcome> {
        self.suites
            .iter()
            .find(|(name, _)| name == suite)
            .map(|(_, outcome)| outcome)
    }

    /// "tcx no, bpf_redirect_peer yes" from the status line.
    pub fn feature_summary(&self) -> String {
        match &self.features {
            Some(line) => line
                .split_once(": ")
                .map_or(line.as_str(), |(_, features)| features)
                .to_owned(),
            None => "?".to_owned(),
        }
    }
}

/// What one console line meant.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    Nothing,
    /// A guest result line, said again for the terminal.
    Progress(String),
    /// The kernel raised an alarm: stop the VM.
    Alarm(String),
    /// The guest finished its list.
    Done,
}

/// Reads one VM's console.
pub struct Console {
    row: Row,
    current: Option<String>,
    recent: VecDeque<String>,
    done: bool,
}

/// `key=value key="value with spaces"` after the mark.
pub fn fields(text: &str) -> BTreeMap<String, String> {
    let mut fields = BTreeMap::new();
    let mut rest = text.trim();
    while let Some((key, after)) = rest.split_once('=') {
        let key = key.trim().to_owned();
        let (value, next) = match after.strip_prefix('"') {
            Some(quoted) => match quoted.split_once('"') {
                Some((value, next)) => (value, next),
                None => (quoted, ""),
            },
            None => after.split_once(' ').unwrap_or((after, "")),
        };
        fields.insert(key, value.to_owned());
        rest = next.trim_start();
    }
    fields
}

impl Console {
    pub fn new(row: Row, suites: &[String]) -> Console {
        let mut row = row;
        row.suites = suites
            .iter()
            .map(|name| (name.clone(), Outcome::NotRun))
            .collect();
        Console {
            row,
            current: None,
            recent: VecDeque::new(),
            done: false,
        }
    }

    pub fn feed(&mut self, line: &str) -> Event {
        let Some(at) = line.find(MARK) else {
            self.remember(line);
            if let Some((_, name)) = ALARMS.iter().find(|(needle, _)| line.contains(needle)) {
                return Event::Alarm(format!("{name}: {}", line.trim()));
            }
            return Event::Nothing;
        };
        let fields = fields(&line[at + MARK.len()..]);
        let get = |key: &str| fields.get(key).cloned().unwrap_or_default();
        if let Some(suite) = fields.get("suite") {
            let result = get("result");
            let seconds = fields
                .get("seconds")
                .map(|s| format!(" ({s} s)"))
                .unwrap_or_default();
            let outcome = match result.as_str() {
                "start" => {
                    self.current = Some(suite.clone());
                    self.recent.clear();
                    return Event::Progress(format!("suite {suite} ..."));
                }
                "pass" => Outcome::Pass,
                "skip" => Outcome::Skip(get("reason")),
                _ => Outcome::Fail(get("reason")),
            };
            if matches!(outcome, Outcome::Fail(_)) {
                self.row
                    .tails
                    .insert(suite.clone(), self.recent.iter().cloned().collect());
            }
            let said = match &outcome {
                Outcome::Skip(reason) | Outcome::Fail(reason) => {
                    format!("suite {suite}: {}{seconds}: {reason}", outcome.short())
                }
                _ => format!("suite {suite}: {}{seconds}", outcome.short()),
            };
            match self.row.suites.iter_mut().find(|(name, _)| name == suite) {
                Some((_, slot)) => *slot = outcome,
                None => self.row.suites.push((suite.clone(), outcome)),
            }
            self.current = None;
            return Event::Progress(said);
        }
        match get("event").as_str() {
            "boot" => {
                self.row.booted = Some(get("kernel"));
                Event::Progress(format!("booted {} in {} s", get("kernel"), get("uptime")))
            }
            "features" => {
                self.row.features = Some(get("status"));
                Event::Progress(format!("xbr status: {}", get("status")))
            }
            "path" => {
                let attached = get("attached");
                let path = attached
                    .split_once('(')
                    .and_then(|(_, rest)| rest.split_once(')'))
                    .map_or(attached.as_str(), |(path, _)| path);
                self.row.path = Some(path.to_owned());
                Event::Progress(format!("xbr attach (auto) chose {path}"))
            }
            "modules" => Event::Progress(format!("modules loaded: {}", get("loaded"))),
            "fatal" => {
                let reason = get("reason");
                self.row.failure = Some(format!("guest setup failed: {reason}"));
                self.row.tails.insert(
                    "(guest setup)".to_owned(),
                    self.recent.iter().cloned().collect(),
                );
                Event::Progress(format!("guest setup failed: {reason}"))
            }
            "done" => {
                self.done = true;
                Event::Done
            }
            _ => Event::Nothing,
        }
    }

    fn remember(&mut self, line: &str) {
        if self.recent.len() == TAIL_LINES {
            self.recent.pop_front();
        }
        self.recent.push_back(line.to_owned());
    }

    /// The row, once the VM has ended; STOPPED says why the host ended it early, if it did.
    pub fn finish(mut self, stopped: Option<String>) -> Row {
        if self.row.failure.is_none() {
            let problem = match stopped {
                Some(reason) => Some(reason),
                None if !self.done => Some("the VM ended before the guest finished".to_owned()),
                None => None,
            };
            if let Some(problem) = problem {
                let during = self
                    .current
                    .as_ref()
                    .map(|suite| format!(" (during suite {suite})"))
                    .unwrap_or_default();
                self.row.failure = Some(format!("{problem}{during}"));
                let key = self
                    .current
                    .clone()
                    .unwrap_or_else(|| "(console)".to_owned());
                self.row
                    .tails
                    .insert(key, self.recent.iter().cloned().collect());
            }
        }
        if self.done {
            for (name, outcome) in &mut self.row.suites {
                if *outcome == Outcome::NotRun {
                    *outcome = Outcome::Fail(format!("the guest said nothing about suite {name}"));
                }
            }
        }
        self.row
    }
}

/// The matrix, the skip reasons and failures under it, and where the logs are.
pub fn matrix(rows: &[Row], suites: &[String]) -> String {
    let mut header = vec![
        "kernel".to_owned(),
        "release".to_owned(),
        "features (xbr status)".to_owned(),
        "auto attach".to_owned(),
    ];
    header.extend(suites.iter().cloned());
    header.push("wall".to_owned());
    let mut notes: Vec<String> = Vec::new();
    let mut table = vec![header];
    for row in rows {
        let mut cells = vec![
            row.label.clone(),
            row.booted.clone().unwrap_or_else(|| row.release.clone()),
            row.feature_summary(),
            row.path.clone().unwrap_or_else(|| "?".to_owned()),
        ];
        for suite in suites {
            let cell = match row.outcome(suite) {
                Some(Outcome::Skip(reason)) => {
                    let note = format!("skipped: {reason}");
                    let index = match notes.iter().position(|n| *n == note) {
                        Some(index) => index,
                        None => {
                            notes.push(note);
                            notes.len() - 1
                        }
                    };
                    format!("skip[{}]", index + 1)
                }
                Some(outcome) => outcome.short().to_owned(),
                None => "-".to_owned(),
            };
            cells.push(cell);
        }
        cells.push(format!("{:.0}s", row.wall.as_secs_f64()));
        table.push(cells);
    }
    let widths: Vec<usize> = (0..table[0].len())
        .map(|column| {
            table
                .iter()
                .map(|cells| cells[column].len())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for cells in &table {
        let line: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        let _ = writeln!(out, "  {}", line.join("  ").trim_end());
    }
    for (index, note) in notes.iter().enumerate() {
        let _ = writeln!(out, "  [{}] {note}", index + 1);
    }
    for row in rows.iter().filter(|row| !row.passed()) {
        let log = if row.log.as_os_str().is_empty() {
            "none (no VM ran)".to_owned()
        } else {
            row.log.display().to_string()
        };
        let _ = writeln!(
            out,
            "\n{} ({}) FAILED; console log: {log}",
            row.label, row.release
        );
        if let Some(failure) = &row.failure {
            let _ = writeln!(out, "  {failure}");
        }
        for (suite, outcome) in &row.suites {
            if let Outcome::Fail(reason) = outcome {
                let _ = writeln!(out, "  suite {suite}: {reason}");
            }
        }
        for (what, tail) in &row.tails {
            let _ = writeln!(out, "  last lines of {what}:");
            for line in tail {
                let _ = writeln!(out, "    | {line}");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn suites() -> Vec<String> {
        ["packet", "east-west-tcx"].map(String::from).to_vec()
    }

    fn console() -> Console {
        Console::new(
            Row {
                label: "5.10".into(),
                release: "5.10.0-46-amd64".into(),
                ..Row::default()
            },
            &suites(),
        )
    }

    #[test]
    fn result_lines_fill_the_row() {
        let mut console = console();
        let lines = [
            "[    1.2] random: crng init done",
            "XBR-VMTEST event=boot kernel=5.10.0-46-amd64 uptime=1.93",
            "XBR-VMTEST event=features status=\"kernel 5.10.262: tcx no, bpf_redirect_peer yes\"",
            "XBR-VMTEST event=path attached=\"attached br0 (clsact, bpf_redirect_peer): 3 ports\"",
            "XBR-VMTEST suite=packet result=start",
            "test result: ok. 12 passed",
            "XBR-VMTEST suite=packet result=pass seconds=14",
            "XBR-VMTEST suite=east-west-tcx result=skip reason=\"xbr status says tcx no (tcx links need 6.6)\"",
        ];
        for line in lines {
            assert!(!matches!(console.feed(line), Event::Alarm(_)), "{line}");
        }
        assert_eq!(console.feed("XBR-VMTEST event=done"), Event::Done);
        let row = console.finish(None);
        assert!(row.passed(), "{row:?}");
        assert_eq!(row.booted.as_deref(), Some("5.10.0-46-amd64"));
        assert_eq!(row.feature_summary(), "tcx no, bpf_redirect_peer yes");
        assert_eq!(row.path.as_deref(), Some("clsact, bpf_redirect_peer"));
        assert!(
            matches!(row.outcome("east-west-tcx"), Some(Outcome::Skip(r)) if r.contains("tcx no"))
        );
        let text = matrix(&[row], &suites());
        assert!(
            text.contains("skip[1]") && text.contains("[1] skipped: xbr status says tcx no"),
            "{text}"
        );
    }

    #[test]
    fn a_failed_suite_fails_the_row_and_keeps_its_last_lines() {
        let mut console = console();
        console.feed("XBR-VMTEST suite=packet result=start");
        console.feed("verifier log: invalid func unknown#208");
        console.feed("XBR-VMTEST suite=packet result=fail seconds=3 reason=\"exit status 101\"");
        console.feed("XBR-VMTEST suite=east-west-tcx result=pass seconds=40");
        console.feed("XBR-VMTEST event=done");
        let row = console.finish(None);
        assert!(!row.passed());
        assert_eq!(
            row.outcome("packet"),
            Some(&Outcome::Fail("exit status 101".into()))
        );
        assert_eq!(
            row.tails["packet"],
            ["verifier log: invalid func unknown#208"]
        );
        let text = matrix(&[row], &suites());
        assert!(
            text.contains("FAIL") && text.contains("| verifier log: invalid func unknown#208"),
            "{text}"
        );
    }

    #[test]
    fn kernel_alarms_and_silence_fail_the_row() {
        for (line, name) in [
            (
                "[ 30.1] Kernel panic - not syncing: Fatal exception",
                "kernel panic",
            ),
            (
                "[ 45.0] rcu: INFO: rcu_sched self-detected stall on CPU",
                "RCU stall",
            ),
            (
                "[ 50.2] watchdog: BUG: soft lockup - CPU#1 stuck for 23s!",
                "soft lockup",
            ),
        ] {
            let mut console = console();
            console.feed("XBR-VMTEST suite=packet result=start");
            match console.feed(line) {
                Event::Alarm(alarm) => assert!(alarm.starts_with(name), "{alarm}"),
                other => panic!("{line}: expected an alarm, got {other:?}"),
            }
            let row = console.finish(Some(format!("stopped: {name}")));
            assert!(!row.passed());
            assert!(
                row.failure
                    .as_deref()
                    .unwrap()
                    .contains("during suite packet"),
                "{row:?}"
            );
            assert_eq!(row.outcome("packet"), Some(&Outcome::NotRun));
        }
        // A VM that powers off without saying it is done failed too.
        let mut console = console();
        console.feed("XBR-VMTEST suite=packet result=pass seconds=1");
        let row = console.finish(None);
        assert!(
            row.failure
                .as_deref()
                .unwrap()
                .contains("ended before the guest finished")
        );
    }

    #[test]
    fn guest_setup_failures_are_reported() {
        let mut console = console();
        console.feed("insmod: can't insert '/modules/9p.ko': unknown symbol in module");
        console.feed(
            "XBR-VMTEST event=fatal reason=\"insmod 9p.ko failed (see the kernel log above)\"",
        );
        let row = console.finish(None);
        assert_eq!(
            row.failure.as_deref(),
            Some("guest setup failed: insmod 9p.ko failed (see the kernel log above)")
        );
        assert_eq!(row.tails["(guest setup)"].len(), 1);
    }

    #[test]
    fn fields_take_quoted_values() {
        let parsed = fields(" suite=x result=fail reason=\"exit status 1\" seconds=3");
        assert_eq!(parsed["reason"], "exit status 1");
        assert_eq!(parsed["seconds"], "3");
    }
}
