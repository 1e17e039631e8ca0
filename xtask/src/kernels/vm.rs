//! Boots one kernel under QEMU with the test initramfs, reads the serial console, prints one
//! PASS/FAIL/SKIP line per test and enforces the time limit (killing QEMU by its pid). The VM
//! has no network device at all: the tests use loopback only.
use std::{
    collections::HashMap,
    fmt,
    fs::File,
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::Pin;

/// A whole suite on one kernel. TCG emulates every instruction; the suite takes a few minutes
/// there, so this only catches hangs.
const TIME_LIMIT: Duration = Duration::from_secs(25 * 60);
const PROBE_TIME_LIMIT: Duration = Duration::from_secs(60);

pub enum Accel {
    Kvm,
    Tcg { why: String },
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Accel::Kvm => write!(f, "KVM"),
            Accel::Tcg { why } => write!(f, "TCG emulation (no usable KVM: {why})"),
        }
    }
}

impl Accel {
    /// KVM if a probe boot with it reaches our init, TCG otherwise.
    pub fn detect(image: &Path, initramfs: &Path) -> Accel {
        if !Path::new("/dev/kvm").exists() {
            return Accel::Tcg { why: "no /dev/kvm".into() };
        }
        let log = initramfs.with_file_name("kvm-probe.log");
        match probe_boot(image, initramfs, &log) {
            Ok(console) if console.contains("MESH-VM-KERNEL") => Accel::Kvm,
            Ok(console) => {
                let why = console.lines().find(|l| l.starts_with("qemu-system")).unwrap_or("the probe boot did not reach init");
                Accel::Tcg { why: why.trim().to_owned() }
            }
            Err(e) => Accel::Tcg { why: format!("{e:#}") },
        }
    }
}

/// Boots with KVM and the `mesh.probe` flag (init powers off at once); returns the console.
fn probe_boot(image: &Path, initramfs: &Path, log: &Path) -> anyhow::Result<String> {
    let out = File::create(log)?;
    let mut child = qemu(image, initramfs, &Accel::Kvm, "mesh.probe").stdout(out.try_clone()?).stderr(out).spawn()?;
    let deadline = Instant::now() + PROBE_TIME_LIMIT;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            child.kill()?;
            child.wait()?;
            anyhow::bail!("the KVM probe boot took over {PROBE_TIME_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(std::fs::read_to_string(log)?)
}

fn qemu(image: &Path, initramfs: &Path, accel: &Accel, extra_cmdline: &str) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    match accel {
        Accel::Kvm => cmd.args(["-accel", "kvm", "-cpu", "host"]),
        Accel::Tcg { .. } => cmd.args(["-accel", "tcg", "-cpu", "max"]),
    };
    cmd.args(["-smp", "2", "-m", "2048", "-nodefaults", "-nic", "none", "-display", "none"])
        .args(["-serial", "stdio", "-monitor", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(image)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", &format!("console=ttyS0 panic=-1 quiet {extra_cmdline}")])
        .stdin(Stdio::null());
    cmd
}

pub fn boot(pin: &Pin, image: &Path, initramfs: &Path, accel: &Accel, dir: &Path) -> anyhow::Result<Outcome> {
    std::fs::create_dir_all(dir)?;
    let log_path = dir.join("console.log");
    let mut log = File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    println!("\n[kernels] {}: booting {}; console log {}", pin.series, pin.package, log_path.display());

    let started = Instant::now();
    let mut child =
        qemu(image, initramfs, accel, "").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().context("starting qemu-system-x86_64")?;
    let (lines, rx) = mpsc::channel::<String>();
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let err_lines = lines.clone();
    std::thread::spawn(move || forward_lines(stderr, "qemu: ", err_lines));
    std::thread::spawn(move || forward_lines(stdout, "", lines));

    let mut parser = Parser::new(&pin.series);
    let deadline = started + TIME_LIMIT;
    let mut timed_out = false;
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                let _ = writeln!(log, "{line}");
                parser.feed(&line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                timed_out = true;
                println!("[{}] time limit of {:?} reached: killing QEMU (pid {})", pin.series, TIME_LIMIT, child.id());
                let _ = child.kill();
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = child.wait()?;
    let outcome = parser.finish(timed_out, started.elapsed(), status.to_string());
    if let Some(problem) = outcome.problem() {
        println!("[{}] {problem}; the last console lines:", pin.series);
        for line in outcome.tail.iter() {
            println!("    {line}");
        }
    }
    Ok(outcome)
}

/// Sends each line (lossy UTF-8, without the serial console's `\r`) to `to`.
fn forward_lines(from: impl std::io::Read, prefix: &'static str, to: mpsc::Sender<String>) {
    let mut reader = BufReader::new(from);
    let mut buf = Vec::new();
    while reader.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
        let line = String::from_utf8_lossy(&buf).trim_end_matches(['\r', '\n']).to_owned();
        if to.send(format!("{prefix}{line}")).is_err() {
            return;
        }
        buf.clear();
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Pass,
    Fail,
    Skip(String),
}

/// What one kernel's run showed.
pub struct Outcome {
    series: String,
    kernel: Option<String>,
    results: Vec<(String, Verdict)>,
    complete: bool,
    timed_out: bool,
    elapsed: Duration,
    exit: String,
    tail: Vec<String>,
}

impl Outcome {
    /// Complete, on the kernel asked for, with results and no failure.
    pub fn ok(&self) -> bool {
        self.problem().is_none() && !self.results.iter().any(|(_, v)| *v == Verdict::Fail)
    }

    /// Why the run as a whole cannot count, if it cannot.
    fn problem(&self) -> Option<String> {
        if self.timed_out {
            return Some(format!("timed out after {:?}", TIME_LIMIT));
        }
        if !self.complete {
            return Some(format!("no end-of-run marker (QEMU exited: {})", self.exit));
        }
        match &self.kernel {
            None => Some("the kernel never reached init".into()),
            Some(k) if !k.starts_with(&format!("{}.", self.series)) => Some(format!("booted {k}, not {}", self.series)),
            Some(_) if self.results.is_empty() => Some("no test results".into()),
            Some(_) => None,
        }
    }

    pub fn counts(&self) -> (usize, usize, usize) {
        let count = |f: fn(&Verdict) -> bool| self.results.iter().filter(|(_, v)| f(v)).count();
        let failed = count(|v| *v == Verdict::Fail) + usize::from(self.problem().is_some());
        (count(|v| *v == Verdict::Pass), failed, count(|v| matches!(v, Verdict::Skip(_))))
    }

    pub fn summary(&self) -> String {
        let (passed, failed, skipped) = self.counts();
        let kernel = self.kernel.as_deref().unwrap_or("?");
        let verdict = if self.ok() { "ok" } else { "FAILED" };
        let problem = self.problem().map(|p| format!(" ({p})")).unwrap_or_default();
        format!(
            "{:<5} {kernel:<22} {verdict}: {passed} passed, {failed} failed, {skipped} skipped in {:.0?}{problem}",
            self.series, self.elapsed
        )
    }
}

#[derive(PartialEq)]
enum Section {
    Running,
    Successes,
    Failures,
}

/// Reads libtest's output between our markers. Lines are printed as they come: one per test
/// (at the end of its binary, once a skip can be told from a pass), plus failure details.
struct Parser {
    series: String,
    kernel: Option<String>,
    binary: String,
    section: Section,
    /// The test whose captured output is being shown (`---- name stdout ----`).
    shown: Option<String>,
    verdicts: Vec<(String, Verdict)>,
    skips: HashMap<String, String>,
    failure_text: Vec<String>,
    results: Vec<(String, Verdict)>,
    complete: bool,
    tail: Vec<String>,
}

impl Parser {
    fn new(series: &str) -> Self {
        Self {
            series: series.into(),
            kernel: None,
            binary: String::new(),
            section: Section::Running,
            shown: None,
            verdicts: Vec::new(),
            skips: HashMap::new(),
            failure_text: Vec::new(),
            results: Vec::new(),
            complete: false,
            tail: Vec::new(),
        }
    }

    fn feed(&mut self, line: &str) {
        if self.tail.len() == 40 {
            self.tail.remove(0);
        }
        self.tail.push(line.to_owned());
        if let Some(kernel) = line.strip_prefix("MESH-VM-KERNEL ") {
            self.kernel = Some(kernel.trim().to_owned());
            println!("[{}] kernel {} is up", self.series, kernel.trim());
        } else if let Some(binary) = line.strip_prefix("MESH-VM-BEGIN ") {
            self.binary = binary.trim().to_owned();
            self.section = Section::Running;
        } else if let Some(rest) = line.strip_prefix("MESH-VM-END ") {
            let rc = rest.rsplit_once("rc=").and_then(|(_, rc)| rc.trim().parse::<i32>().ok()).unwrap_or(-1);
            self.end_binary(rc);
        } else if line.trim() == "MESH-VM-DONE" {
            self.complete = true;
        } else if line == "successes:" {
            self.section = Section::Successes;
        } else if line == "failures:" {
            self.section = Section::Failures;
        } else if let Some(rest) = line.strip_prefix("test ").and_then(|r| r.rsplit_once(" ... ")) {
            let (name, result) = rest;
            let verdict = match result.trim() {
                "ok" => Verdict::Pass,
                "FAILED" => Verdict::Fail,
                r if r.starts_with("ignored") => Verdict::Skip(format!("ignored{}", r.trim_start_matches("ignored"))),
                _ => return,
            };
            self.verdicts.push((name.to_owned(), verdict));
        } else if let Some(name) = line.strip_prefix("---- ").and_then(|r| r.strip_suffix(" stdout ----")) {
            self.shown = Some(name.to_owned());
        } else if self.section == Section::Successes
            && let (Some(name), Some(reason)) = (&self.shown, line.trim().strip_prefix("SKIP:"))
        {
            self.skips.insert(name.clone(), reason.trim().to_owned());
        }
        if self.section == Section::Failures && !line.starts_with("test result:") {
            self.failure_text.push(line.to_owned());
        }
    }

    fn end_binary(&mut self, rc: i32) {
        let binary = std::mem::take(&mut self.binary);
        let mut verdicts = std::mem::take(&mut self.verdicts);
        verdicts.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, mut verdict) in verdicts {
            if let (Verdict::Pass, Some(reason)) = (&verdict, self.skips.remove(&name)) {
                verdict = Verdict::Skip(reason);
            }
            let full = format!("{binary}::{name}");
            match &verdict {
                Verdict::Pass => println!("[{}] PASS {full}", self.series),
                Verdict::Fail => println!("[{}] FAIL {full}", self.series),
                Verdict::Skip(reason) => println!("[{}] SKIP {full}: {reason}", self.series),
            }
            self.results.push((full, verdict));
        }
        let failed_here = self.results.iter().any(|(n, v)| *v == Verdict::Fail && n.starts_with(&format!("{binary}::")));
        if rc != 0 && !failed_here {
            println!("[{}] FAIL {binary} (the test binary exited with {rc} without a failing test: crashed?)", self.series);
            self.results.push((binary.clone(), Verdict::Fail));
        }
        if !self.failure_text.is_empty() {
            for line in self.failure_text.drain(..) {
                println!("[{}]     {line}", self.series);
            }
        }
        self.skips.clear();
        self.shown = None;
        self.section = Section::Running;
    }

    fn finish(self, timed_out: bool, elapsed: Duration, exit: String) -> Outcome {
        Outcome {
            series: self.series,
            kernel: self.kernel,
            results: self.results,
            complete: self.complete,
            timed_out,
            elapsed,
            exit,
            tail: self.tail,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(lines: &str) -> Outcome {
        let mut p = Parser::new("6.1");
        for l in lines.lines() {
            p.feed(l);
        }
        p.finish(false, Duration::ZERO, "exit status: 0".into())
    }

    const GOOD: &str = "MESH-VM-KERNEL 6.1.0-50-amd64\nMESH-VM-BEGIN redirect\nrunning 2 tests\n\
        test a ... ok\ntest b ... ok\n\nsuccesses:\n\n---- b stdout ----\nSKIP: needs 5.15\n\n\
        successes:\n    a\n    b\n\ntest result: ok. 2 passed; 0 failed\nMESH-VM-END redirect rc=0\nMESH-VM-DONE\n";

    #[test]
    fn passes_and_skips() {
        let o = run(GOOD);
        assert!(o.ok());
        assert_eq!(o.counts(), (1, 0, 1));
        assert_eq!(o.results[1], ("redirect::b".into(), Verdict::Skip("needs 5.15".into())));
    }

    #[test]
    fn missing_marker_wrong_kernel_and_crash_fail() {
        assert!(!run(&GOOD.replace("MESH-VM-DONE\n", "")).ok());
        assert!(!run(&GOOD.replace("6.1.0-50", "6.12.7")).ok());
        let crashed = run(&GOOD.replace("rc=0", "rc=101"));
        assert!(!crashed.ok());
        assert_eq!(crashed.counts().1, 1);
        let failed = run(&GOOD.replace("test a ... ok", "test a ... FAILED").replace("rc=0", "rc=101"));
        assert_eq!(failed.counts(), (0, 1, 1));
    }

    #[test]
    fn a_timeout_never_passes() {
        let mut p = Parser::new("6.1");
        GOOD.lines().for_each(|l| p.feed(l));
        assert!(!p.finish(true, Duration::ZERO, "signal: 9".into()).ok());
    }
}
