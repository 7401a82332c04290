//! Test harness: fixture processes with a pid/ready handshake, and the
//! `leaktrace` binary driven as a user drives it.
//!
//! Tests whose names start with `root_` need root (real probes); run them with
//! `cargo xtask test`. `cargo test -- --skip root_` runs the rest unprivileged.

use std::{
    io::{BufRead, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::Value;

/// Path of a fixture program built by build.rs.
pub fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("FIXTURE_DIR")).join(name)
}

/// Path of the leaktrace binary (`LEAKTRACE_BIN`, or the workspace's debug build).
pub fn leaktrace_bin() -> PathBuf {
    let p = std::env::var_os("LEAKTRACE_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/leaktrace"),
        PathBuf::from,
    );
    assert!(
        p.exists(),
        "leaktrace binary not found at {} (run `cargo xtask test`, which builds it)",
        p.display()
    );
    p
}

/// Panics unless running as root (probes need it); `cargo xtask test` runs as root in CI.
#[track_caller]
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test attaches real probes and must run as root (cargo xtask test)"
    );
}

/// A running fixture that printed `ready <pid>` and waits for `go`.
pub struct Fixture {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    /// Its pid.
    pub pid: u32,
}

impl Fixture {
    /// Starts a fixture and waits for its ready line.
    #[track_caller]
    pub fn spawn(name: &str, args: &[&str]) -> Self {
        Self::spawn_with_env(name, args, &[])
    }

    /// Like [`Fixture::spawn`], with extra environment variables.
    #[track_caller]
    pub fn spawn_with_env(name: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::spawn_program(&fixture_path(name), args, env)
    }

    /// Starts `program ARGS` (e.g. an interpreter running a fixture script) and waits for its ready line.
    #[track_caller]
    pub fn spawn_program(program: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(program);
        cmd.args(args).envs(env.iter().copied());
        Self::spawn_command(cmd)
    }

    /// Starts `cmd` and waits for its ready line. A fixture in its own pid namespace
    /// (a container) prints its pid there; [`Fixture::pid`] is its pid here, found
    /// among `cmd`'s descendants by the last entry of their `NSpid`.
    #[track_caller]
    pub fn spawn_command(mut cmd: Command) -> Self {
        let name = format!("{cmd:?}");
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("failed to start fixture {name}: {e}"));
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        stdout
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("failed to read ready line of {name}: {e}"));
        let printed: u32 = line
            .strip_prefix("ready ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("fixture {name} printed {line:?}, expected `ready <pid>`"));
        let pid = if printed == child.id() {
            printed
        } else {
            host_pid(child.id(), printed).unwrap_or_else(|| {
                panic!("fixture {name} printed pid {printed}, which is neither its own ({}) nor a descendant's in a pid namespace", child.id())
            })
        };
        Self {
            child,
            stdin,
            stdout,
            pid,
        }
    }

    /// Sends `go` and waits until the scenario printed `done`.
    #[track_caller]
    pub fn run_scenario(&mut self) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin
            .write_all(b"go\n")
            .and_then(|()| stdin.flush())
            .expect("failed to send go to fixture");
        self.expect_line("done");
    }

    /// Sends one line to the fixture's stdin.
    #[track_caller]
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .expect("failed to write to fixture");
    }

    /// Reads one stdout line.
    #[track_caller]
    pub fn read_line(&mut self) -> String {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("failed to read fixture output");
        line.trim().to_owned()
    }

    /// Reads one stdout line and checks it.
    #[track_caller]
    pub fn expect_line(&mut self, want: &str) {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("failed to read fixture output");
        assert_eq!(line.trim(), want, "fixture output");
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }
}

/// The pid, in our namespace, of a descendant of `ancestor` whose pid in its own
/// (innermost) namespace is `inner`.
fn host_pid(ancestor: u32, inner: u32) -> Option<u32> {
    let status = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/status")).ok();
    let field = |text: &str, key: &str| -> Option<Vec<u32>> {
        let line = text.lines().find(|l| l.starts_with(key))?;
        Some(
            line[key.len()..]
                .split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect(),
        )
    };
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Some(text) = status(pid) else { continue };
        let ns = field(&text, "NSpid:").unwrap_or_default();
        if ns.len() < 2 || ns.last() != Some(&inner) {
            continue;
        }
        // Is `ancestor` above it?
        let mut p = pid;
        for _ in 0..64 {
            let Some(pp) = status(p)
                .and_then(|t| field(&t, "PPid:"))
                .and_then(|v| v.first().copied())
            else {
                break;
            };
            if pp == ancestor {
                return Some(pid);
            }
            if pp <= 1 {
                break;
            }
            p = pp;
        }
    }
    None
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `leaktrace` whose stderr announced that probes are attached.
pub struct Tracer {
    child: Child,
    /// JSON report path.
    pub out: PathBuf,
    stderr: mpsc::Receiver<String>,
    /// Stderr lines seen so far.
    pub stderr_lines: Vec<String>,
    /// Reaped by `wait4` (its pid may belong to another process now).
    reaped: bool,
}

/// Reads leaktrace's stderr up to its attach line (a line saying attaching is under
/// way may come first); panics if it ends before.
#[track_caller]
pub fn read_until_attached(stderr: &mut impl BufRead) {
    let mut line = String::new();
    while !line.starts_with("leaktrace: tracing pid") {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "leaktrace ended before attaching"
        );
    }
}

/// Runs `leaktrace --pid FIXTURE ARGS -o TMP` through the fixture's scenario and
/// returns what it wrote (text unless ARGS say otherwise). ARGS must end the run (a
/// `--duration`); it must end with status 0.
#[track_caller]
pub fn trace_to_file(fx: &mut Fixture, args: &[&str]) -> String {
    let out = temp_path("report");
    let mut child = Command::new(leaktrace_bin())
        .args(["--pid", &fx.pid.to_string(), "-o"])
        .arg(&out)
        .args(args)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start leaktrace");
    let mut stderr = BufReader::new(child.stderr.take().expect("piped stderr"));
    read_until_attached(&mut stderr);
    fx.run_scenario();
    assert_eq!(child.wait().expect("wait for leaktrace").code(), Some(0));
    let text = std::fs::read_to_string(&out).expect("report file");
    let _ = std::fs::remove_file(&out);
    text
}

/// The children of process `pid` now (every thread's), from /proc.
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(list) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(
                list.split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    out
}

/// Starts one of the Python fixture scripts on Debian's python3.11 (which must be
/// installed) and waits for its ready line.
#[track_caller]
pub fn spawn_debian_python(script: &str, args: &[&str]) -> Fixture {
    let python = std::path::Path::new("/usr/bin/python3.11");
    assert!(python.exists(), "Debian's python3.11 is missing");
    let script = script_path(script);
    let mut all = vec![script.to_str().expect("a UTF-8 path")];
    all.extend_from_slice(args);
    Fixture::spawn_program(python, &all, &[])
}

/// Live bytes of the heap stack whose innermost frame is `function`, in a JSON report.
pub fn live_bytes_of(report: &Value, function: &str) -> Option<u64> {
    report["heap"]["stacks"]
        .as_array()?
        .iter()
        .find(|s| s["frames"][0]["function"] == function)
        .and_then(|s| s["live_bytes"].as_u64())
}

/// A unique temporary file path.
pub fn temp_path(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!("leaktrace-test-{}-{tag}-{n}", std::process::id()))
}

impl Tracer {
    /// Starts `leaktrace ARGS --format json -o TMP` and waits for the attach line.
    #[track_caller]
    pub fn start(args: &[&str]) -> Self {
        Self::start_with(args, Stdio::null())
    }

    /// Starts `leaktrace ARGS --format FORMAT -o TMP` and waits for the attach line;
    /// [`Tracer::finish_bytes`] returns what it wrote.
    #[track_caller]
    pub fn start_as(format: &str, args: &[&str]) -> Self {
        Self::start_format(format, args, Stdio::null())
    }

    /// Like [`Tracer::start`], with the given stdin for a launched command.
    #[track_caller]
    pub fn start_with(args: &[&str], stdin: Stdio) -> Self {
        Self::start_format("json", args, stdin)
    }

    #[track_caller]
    fn start_format(format: &str, args: &[&str], stdin: Stdio) -> Self {
        let out = temp_path("report.json");
        let mut child = Command::new(leaktrace_bin())
            .args(["--format", format, "-o"])
            .arg(&out)
            .args(args)
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("failed to start leaktrace");
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().expect("piped stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut t = Self {
            child,
            out,
            stderr: rx,
            stderr_lines: Vec::new(),
            reaped: false,
        };
        t.wait_attached();
        t
    }

    #[track_caller]
    fn wait_attached(&mut self) {
        loop {
            match self.stderr.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => {
                    let done = line.starts_with("leaktrace: tracing pid");
                    self.stderr_lines.push(line);
                    if done {
                        return;
                    }
                }
                Err(_) => panic!("leaktrace did not attach; stderr: {:?}", self.stderr_lines),
            }
        }
    }

    /// Waits for a stderr line containing `needle` (e.g. a warning the tracer logs).
    #[track_caller]
    pub fn wait_stderr(&mut self, needle: &str) {
        if self.stderr_lines.iter().any(|l| l.contains(needle)) {
            return;
        }
        loop {
            match self.stderr.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => {
                    let found = line.contains(needle);
                    self.stderr_lines.push(line);
                    if found {
                        return;
                    }
                }
                Err(_) => panic!(
                    "leaktrace never said {needle:?}; stderr: {:?}",
                    self.stderr_lines
                ),
            }
        }
    }

    /// The stdout of a launched command, if any (leaktrace's own stdout is unused with -o).
    pub fn stdout(&mut self) -> BufReader<ChildStdout> {
        BufReader::new(self.child.stdout.take().expect("stdout"))
    }

    /// The stdin of a launched command, when started with a piped stdin.
    pub fn stdin(&mut self) -> std::process::ChildStdin {
        self.child.stdin.take().expect("piped stdin")
    }

    /// leaktrace's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM, waits, and returns the JSON report.
    #[track_caller]
    pub fn finish(mut self) -> Value {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.wait_report(0)
    }

    /// Like [`Tracer::finish`], with leaktrace's peak resident memory in bytes
    /// (`ru_maxrss` from `wait4`).
    #[track_caller]
    pub fn finish_with_peak_rss(mut self) -> (Value, u64) {
        let pid = self.child.id() as i32;
        // SAFETY: signalling our own child, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let mut status = 0;
        // SAFETY: zeroed rusage is a valid out-parameter.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: waits for our own child; both out-pointers are valid.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        assert_eq!(r, pid, "wait4: {}", std::io::Error::last_os_error());
        self.reaped = true;
        let rest: Vec<String> = self.stderr.try_iter().collect();
        self.stderr_lines.extend(rest);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "leaktrace wait status {status:#x}; stderr: {:?}",
            self.stderr_lines
        );
        let text = std::fs::read_to_string(&self.out).expect("report file");
        let _ = std::fs::remove_file(&self.out);
        let report = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("report is not JSON ({e}): {text}"));
        (report, usage.ru_maxrss as u64 * 1024)
    }

    /// Waits for leaktrace to exit with `code` on its own and returns the report.
    #[track_caller]
    pub fn wait_report(&mut self, code: i32) -> Value {
        let status = self.child.wait().expect("wait for leaktrace");
        let rest: Vec<String> = self.stderr.try_iter().collect();
        self.stderr_lines.extend(rest);
        assert_eq!(
            status.code(),
            Some(code),
            "leaktrace exit status; stderr: {:?}",
            self.stderr_lines
        );
        let text = std::fs::read_to_string(&self.out).expect("report file");
        let _ = std::fs::remove_file(&self.out);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("report is not JSON ({e}): {text}"))
    }

    /// Sends SIGTERM, waits for a clean exit, and returns the bytes of the report
    /// file (another format than JSON).
    #[track_caller]
    pub fn finish_bytes(mut self) -> Vec<u8> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().expect("wait for leaktrace");
        self.reaped = true;
        let rest: Vec<String> = self.stderr.try_iter().collect();
        self.stderr_lines.extend(rest);
        assert_eq!(
            status.code(),
            Some(0),
            "leaktrace exit; stderr: {:?}",
            self.stderr_lines
        );
        let bytes = std::fs::read(&self.out).expect("report file");
        let _ = std::fs::remove_file(&self.out);
        bytes
    }

    /// Waits for the first interval report in the report file (30 s at most).
    #[track_caller]
    pub fn wait_first_report(&self) {
        let t = Instant::now();
        while std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .is_empty()
        {
            assert!(t.elapsed().as_secs() < 30, "no interval report");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The report file's path (it grows line by line with --interval and JSON).
    pub fn out_path(&self) -> &Path {
        &self.out
    }

    /// Kills leaktrace with SIGKILL.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.out);
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Attaches `leaktrace --pid` with `tracer_args` to a fixture that printed its ready line,
/// runs its scenario, and returns the report, whose shape has been checked.
#[track_caller]
pub fn trace_fixture(fx: &mut Fixture, tracer_args: &[&str]) -> Value {
    let pid = fx.pid.to_string();
    let mut args = vec!["--pid", pid.as_str()];
    args.extend_from_slice(tracer_args);
    let tracer = Tracer::start(&args);
    fx.run_scenario();
    let r = tracer.finish();
    check_shape(&r);
    r
}

/// Path of a fixture script (not compiled: run by an interpreter).
pub fn script_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// The 1-based line of the first line of fixture script `name` that contains
/// `needle`: expected Python lines follow the fixture's text, not a number
/// copied into the test.
#[track_caller]
pub fn script_line(name: &str, needle: &str) -> u64 {
    let path = script_path(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("failed to read {}: {e}", path.display()));
    let index = text
        .lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{} has no line containing {needle:?}", path.display()));
    index as u64 + 1
}

/// Starts fixture `name` with `fixture_args`, attaches `leaktrace --pid` to it with
/// `tracer_args`, runs its scenario, and returns the fixture (still running) and the
/// report, whose shape has been checked.
#[track_caller]
pub fn trace_scenario(name: &str, fixture_args: &[&str], tracer_args: &[&str]) -> (Fixture, Value) {
    trace_scenario_with_env(name, fixture_args, &[], tracer_args)
}

/// [`trace_scenario`] with extra environment variables for the fixture.
#[track_caller]
pub fn trace_scenario_with_env(
    name: &str,
    fixture_args: &[&str],
    env: &[(&str, &str)],
    tracer_args: &[&str],
) -> (Fixture, Value) {
    let mut fx = Fixture::spawn_with_env(name, fixture_args, env);
    let r = trace_fixture(&mut fx, tracer_args);
    (fx, r)
}

/// Function names of a stack's (or an arena's) frames.
pub fn functions(stack: &Value) -> Vec<String> {
    stack["frames"]
        .as_array()
        .expect("frames array")
        .iter()
        .map(|f| f["function"].as_str().unwrap_or("??").to_owned())
        .collect()
}

/// The stacks of a section (`"heap"` or `"mappings"`) whose innermost named
/// user frame is `function` (allocator-internal frames are skipped).
pub fn stacks_at<'a>(report: &'a Value, section: &str, function: &str) -> Vec<&'a Value> {
    report[section]["stacks"]
        .as_array()
        .expect("stacks array")
        .iter()
        .filter(|s| functions(s).iter().any(|f| f == function))
        .collect()
}

/// The one stack of a section that contains `function`; panics otherwise.
#[track_caller]
pub fn stack_at<'a>(report: &'a Value, section: &str, function: &str) -> &'a Value {
    let found = stacks_at(report, section, function);
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {section} stack through {function}; report: {report:#}"
    );
    found[0]
}

/// Runs leaktrace with `args` and returns (exit code, stderr lines, stdout).
pub fn run_cli(args: &[&str]) -> (Option<i32>, Vec<String>, String) {
    let out = Command::new(leaktrace_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run leaktrace");
    let stderr = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(str::to_owned)
        .collect();
    (
        out.status.code(),
        stderr,
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Checks the JSON contract every report must satisfy.
#[track_caller]
pub fn check_shape(r: &Value) {
    for key in [
        "pid",
        "duration_s",
        "rss_bytes",
        "heap",
        "mappings",
        "lost",
        "memory",
    ] {
        assert!(r.get(key).is_some(), "report lacks {key}: {r:#}");
    }
    // Where RSS goes, when the target could be read: its parts sum to smaps' RSS read
    // with them, within 3%.
    let parts = r["memory"]["parts"].as_array().expect("memory parts");
    if !parts.is_empty() {
        let sum: f64 = parts
            .iter()
            .map(|p| p["bytes"].as_f64().expect("bytes"))
            .sum();
        let rss = r["memory"]["rss_bytes"].as_f64().expect("memory rss");
        assert!(
            (sum - rss).abs() <= 0.03 * rss,
            "where RSS goes sums to {sum}, RSS {rss}: {:#}",
            r["memory"]
        );
    }
    for key in ["live_bytes", "live_allocations", "stacks"] {
        assert!(r["heap"].get(key).is_some(), "heap lacks {key}");
    }
    for key in ["anon_mapped_bytes", "brk_bytes", "stacks"] {
        assert!(r["mappings"].get(key).is_some(), "mappings lacks {key}");
    }
    for (section, bytes_key) in [("heap", "live_bytes"), ("mappings", "mapped_bytes")] {
        let stacks = r[section]["stacks"].as_array().expect("stacks");
        let sizes: Vec<u64> = stacks
            .iter()
            .map(|s| s[bytes_key].as_u64().expect("bytes"))
            .collect();
        assert!(
            sizes.windows(2).all(|w| w[0] >= w[1]),
            "{section} stacks sorted by bytes, largest first: {sizes:?}"
        );
        for s in stacks {
            for f in s["frames"].as_array().expect("frames") {
                for key in ["function", "file", "line", "module", "kind"] {
                    assert!(f.get(key).is_some(), "frame lacks {key}: {f}");
                }
                assert!(
                    f["kind"] == "native" || f["kind"] == "python",
                    "frame kind: {f}"
                );
            }
        }
    }
}

/// A loss counter's value.
pub fn lost(r: &Value, name: &str) -> u64 {
    r["lost"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no lost counter {name}"))
}

/// A non-loss counter's value.
pub fn counter(r: &Value, name: &str) -> u64 {
    r["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name}"))
}
