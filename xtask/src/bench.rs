//! `cargo xtask bench`: the same workloads untraced, under leaktrace, and under
//! the peers that install here, side by side in one run.
//!
//! Workloads time their own core loop and speak a handshake on stdin/stdout
//! (`ready` → `go` → `result ns_per_op=N ops=N` → stdin closed), so tracer
//! start-up and shutdown are not counted and each tracer is attached before the
//! workload starts. sqlite3 is the exception: it times its statements itself
//! (`.timer on`), and the sum of their real times is used.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

/// How a workload is measured.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// `ready` / `go` / `result ns_per_op=…` handshake.
    Handshake,
    /// sqlite3 `.timer on` output on stdout, script on stdin.
    SqliteTimer,
}

struct Workload {
    name: &'static str,
    op: &'static str,
    cmd: Vec<String>,
    protocol: Protocol,
    stdin_file: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Tool {
    Untraced,
    Leaktrace,
    LeaktraceNoPython,
    LeaktraceBare,
    LeaktraceSampled,
    LeaktraceSampledNoSessions,
    LeaktraceStats,
    LeaktraceFp,
    LeaktraceCopy,
    LeaktraceRecord,
    Bpftrace,
    Heaptrack,
}

impl Tool {
    /// A leaktrace row (it writes a JSON report).
    fn is_leaktrace(self) -> bool {
        !matches!(self, Self::Untraced | Self::Bpftrace | Self::Heaptrack)
    }

    fn label(self) -> &'static str {
        match self {
            Self::Untraced => "untraced",
            Self::Leaktrace => "leaktrace (exact)",
            Self::LeaktraceNoPython => "leaktrace --no-python",
            Self::LeaktraceBare => "leaktrace probes, no BPF work",
            Self::LeaktraceSampled => "leaktrace --sample-rate 512K",
            Self::LeaktraceSampledNoSessions => "  the same, no uprobe sessions",
            Self::LeaktraceStats => "leaktrace (exact), BPF stats on",
            Self::LeaktraceFp => "leaktrace --unwind fp",
            Self::LeaktraceCopy => "leaktrace, 8 KiB stack copies",
            Self::LeaktraceRecord => "leaktrace (exact) --record",
            Self::Bpftrace => "bpftrace memleak-equivalent",
            Self::Heaptrack => "heaptrack (LD_PRELOAD)",
        }
    }
}

struct Sample {
    ns_per_op: f64,
    /// Tracer CPU over the run, as a share of one core; None where not measurable.
    tracer_cpu: Option<f64>,
    /// Tracer peak RSS in KiB.
    tracer_rss_kib: Option<u64>,
    /// Operations the workload ran.
    ops: Option<f64>,
    /// Events leaktrace recorded (from its JSON report).
    events: Option<f64>,
    /// BPF programs' runs and mean ns per run (kernel statistics), from the report.
    programs: Vec<(String, f64, f64)>,
    /// With --record: the capture's size in bytes.
    capture_bytes: Option<u64>,
}

/// utime + stime of a process, seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ticks = leaktrace_common::stat::cpu_ticks(&stat)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks as f64 / hz)
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

fn command(tool: Tool, w: &Workload, leaktrace: &Path, bench_dir: &Path, libc: &str) -> Command {
    let out = std::env::temp_dir().join(format!("leaktrace-bench-{}", std::process::id()));
    let mut c = match tool {
        Tool::Untraced => {
            let mut c = Command::new(&w.cmd[0]);
            c.args(&w.cmd[1..]);
            c
        }
        Tool::Bpftrace => {
            let mut c = Command::new("bpftrace");
            c.arg("-c")
                .arg(w.cmd.join(" "))
                .arg(bench_dir.join("memleak.bt"))
                .arg(libc);
            c
        }
        Tool::Heaptrack => {
            let mut c = Command::new("heaptrack");
            c.arg("-o")
                .arg(out.with_extension("heaptrack"))
                .args(&w.cmd);
            c
        }
        // Every leaktrace row.
        _ => {
            let mut c = Command::new(leaktrace);
            c.args(["--format", "json", "-o"])
                .arg(out.with_extension("json"));
            if matches!(
                tool,
                Tool::LeaktraceSampled | Tool::LeaktraceSampledNoSessions
            ) {
                c.args(["--sample-rate", "524288"]);
            }
            if tool == Tool::LeaktraceSampledNoSessions {
                c.arg("--no-uprobe-sessions");
            }
            if tool == Tool::LeaktraceStats {
                // A budget that never trips: it turns the kernel's BPF statistics on.
                c.args(["--max-overhead", "1000000"]);
            }
            if tool == Tool::LeaktraceNoPython {
                c.arg("--no-python");
            }
            if tool == Tool::LeaktraceBare {
                c.arg("--bare-probes");
            }
            if tool == Tool::LeaktraceFp {
                c.args(["--unwind", "fp"]);
            }
            if tool == Tool::LeaktraceCopy {
                c.arg("--copy-stacks");
            }
            if tool == Tool::LeaktraceRecord {
                c.arg("--record").arg(out.with_extension("ltcap"));
            }
            c.arg("--").args(&w.cmd);
            c
        }
    };
    c.stdout(Stdio::piped()).stderr(Stdio::null());
    c
}

fn finish(mut child: Child) -> Result<()> {
    drop(child.stdin.take());
    let status = child.wait()?;
    if !status.success() {
        bail!("exited with {status}");
    }
    Ok(())
}

fn run_one(
    tool: Tool,
    w: &Workload,
    leaktrace: &Path,
    bench_dir: &Path,
    libc: &str,
) -> Result<Sample> {
    let mut cmd = command(tool, w, leaktrace, bench_dir, libc);
    match (w.protocol, &w.stdin_file) {
        (Protocol::SqliteTimer, Some(f)) => {
            cmd.stdin(std::fs::File::open(f)?);
        }
        _ => {
            cmd.stdin(Stdio::piped());
        }
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("failed to start {:?}", tool.label()))?;
    let tracer = child.id();
    let mut out = BufReader::new(child.stdout.take().context("stdout")?);
    let mut line = String::new();
    if w.protocol == Protocol::SqliteTimer {
        let mut total = 0.0;
        while out.read_line(&mut line)? > 0 {
            if let Some(rest) = line.strip_prefix("Run Time: real ") {
                total += rest
                    .split_whitespace()
                    .next()
                    .unwrap_or("0")
                    .parse::<f64>()
                    .unwrap_or(0.0);
            }
            line.clear();
        }
        finish(child)?;
        return Ok(Sample {
            ns_per_op: total * 1e9,
            tracer_cpu: None,
            tracer_rss_kib: None,
            ops: None,
            events: None,
            programs: Vec::new(),
            capture_bytes: None,
        });
    }
    loop {
        line.clear();
        if out.read_line(&mut line)? == 0 {
            bail!("{} ended before `ready`", tool.label());
        }
        if line.trim() == "ready" {
            break;
        }
    }
    let cpu0 = cpu_seconds(tracer);
    let t0 = Instant::now();
    let stdin = child.stdin.as_mut().context("stdin")?;
    stdin.write_all(b"go\n")?;
    stdin.flush()?;
    let (ns_per_op, ops) = loop {
        line.clear();
        if out.read_line(&mut line)? == 0 {
            bail!("{} ended before its result", tool.label());
        }
        if let Some(v) = line.trim().strip_prefix("result ns_per_op=") {
            let mut it = v.split_whitespace();
            let ns = it.next().unwrap_or("").parse::<f64>().context("result")?;
            let ops = it
                .find_map(|f| f.strip_prefix("ops="))
                .and_then(|n| n.parse::<f64>().ok());
            break (ns, ops);
        }
    };
    let wall = t0.elapsed().as_secs_f64();
    let measured = tool.is_leaktrace() || tool == Tool::Bpftrace;
    let tracer_cpu = if measured {
        cpu_seconds(tracer).zip(cpu0).map(|(b, a)| (b - a) / wall)
    } else {
        None
    };
    let tracer_rss_kib = if measured { peak_rss_kib(tracer) } else { None };
    finish(child)?;
    let report = tool
        .is_leaktrace()
        .then(|| {
            let path =
                std::env::temp_dir().join(format!("leaktrace-bench-{}.json", std::process::id()));
            std::fs::read_to_string(path)
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        })
        .flatten();
    let events = report
        .as_ref()
        .and_then(|v| v["counters"]["events_sent"].as_f64());
    let programs = report
        .as_ref()
        .and_then(|v| v["overhead"]["bpf_programs"].as_object().cloned())
        .map(|m| {
            m.into_iter()
                .filter_map(|(name, c)| {
                    Some((name, c["runs"].as_f64()?, c["ns_per_run"].as_f64()?))
                })
                .collect()
        })
        .unwrap_or_default();
    let capture_bytes = (tool == Tool::LeaktraceRecord)
        .then(|| {
            let path =
                std::env::temp_dir().join(format!("leaktrace-bench-{}.ltcap", std::process::id()));
            let size = std::fs::metadata(&path).ok().map(|m| m.len());
            let _ = std::fs::remove_file(&path);
            size
        })
        .flatten();
    Ok(Sample {
        ns_per_op,
        tracer_cpu,
        tracer_rss_kib,
        ops,
        events,
        programs,
        capture_bytes,
    })
}

/// Runs the table. `leaktrace` is the release binary.
pub fn run(workspace: &Path, leaktrace: &Path, quick: bool) -> Result<()> {
    let bench_dir = workspace.join("bench");
    let build = workspace.join("target/bench");
    std::fs::create_dir_all(&build)?;
    let ml = build.join("malloc_loop");
    let status = Command::new("cc")
        .args(["-O2", "-pthread", "-o"])
        .arg(&ml)
        .arg(bench_dir.join("malloc_loop.c"))
        .status()?;
    if !status.success() {
        bail!("failed to build malloc_loop");
    }
    // The same loop with frame pointers, so that both unwinders walk the full stack.
    let ml_fp = build.join("malloc_loop_fp");
    let status = Command::new("cc")
        .args(["-O2", "-fno-omit-frame-pointer", "-pthread", "-o"])
        .arg(&ml_fp)
        .arg(bench_dir.join("malloc_loop.c"))
        .status()?;
    if !status.success() {
        bail!("failed to build malloc_loop_fp");
    }
    let ml_fp = ml_fp.display().to_string();
    let libc = "/lib/x86_64-linux-gnu/libc.so.6";
    let ml = ml.display().to_string();
    let scale = |n: u64| {
        if quick {
            (n / 20).to_string()
        } else {
            n.to_string()
        }
    };
    let mut workloads = vec![
        Workload {
            name: "malloc/free, 1 thread",
            op: "pair",
            cmd: vec![ml.clone(), scale(200_000), "1".into()],
            protocol: Protocol::Handshake,
            stdin_file: None,
        },
        Workload {
            name: "malloc/free, 2 threads",
            op: "pair",
            cmd: vec![ml.clone(), scale(100_000), "2".into()],
            protocol: Protocol::Handshake,
            stdin_file: None,
        },
        Workload {
            name: "malloc/free, 1 thread, 20 deep, FP",
            op: "pair",
            cmd: vec![ml_fp, scale(200_000), "1".into(), "0".into(), "20".into()],
            protocol: Protocol::Handshake,
            stdin_file: None,
        },
        Workload {
            name: "malloc/free at 100k pairs/s",
            op: "pair",
            cmd: vec![ml, scale(300_000), "1".into(), "100000".into()],
            protocol: Protocol::Handshake,
            stdin_file: None,
        },
    ];
    if Path::new("/usr/bin/python3.11").exists() {
        workloads.push(Workload {
            name: "CPython 3.11 (Debian) json/dict churn",
            op: "document",
            cmd: vec![
                "/usr/bin/python3.11".into(),
                bench_dir.join("py_churn.py").display().to_string(),
                scale(20_000),
            ],
            protocol: Protocol::Handshake,
            stdin_file: None,
        });
    }
    if Path::new("/usr/bin/sqlite3").exists() && !quick {
        workloads.push(Workload {
            name: "sqlite3: 100k rows in memory",
            op: "run",
            cmd: vec!["/usr/bin/sqlite3".into(), ":memory:".into()],
            protocol: Protocol::SqliteTimer,
            stdin_file: Some(bench_dir.join("sqlite_churn.sql")),
        });
    }
    let mut tools = vec![
        Tool::Untraced,
        Tool::Leaktrace,
        Tool::LeaktraceBare,
        Tool::LeaktraceNoPython,
        Tool::LeaktraceSampled,
        Tool::LeaktraceSampledNoSessions,
        Tool::LeaktraceStats,
        Tool::LeaktraceFp,
        Tool::LeaktraceCopy,
        Tool::LeaktraceRecord,
    ];
    for (tool, bin) in [(Tool::Bpftrace, "bpftrace"), (Tool::Heaptrack, "heaptrack")] {
        if which::which(bin).is_ok() {
            tools.push(tool);
        } else {
            println!(
                "note: {bin} is not installed, so its rows are missing (apt-get install {bin})"
            );
        }
    }
    println!();
    println!(
        "{:<38} {:<30} {:>12} {:>14} {:>10} {:>11} {:>11}",
        "workload", "tool", "ns/op", "added µs/op", "slowdown", "tracer CPU", "tracer RSS"
    );
    let mut failures = Vec::new();
    // leaktrace's added cost over bpftrace's on the flat-out loop, for the goals at the end.
    let mut microbench_ratio = None;
    for w in &workloads {
        let mut base = None;
        let mut added = Vec::new();
        let mut per_event = Vec::new();
        let mut programs: Vec<(String, f64, f64)> = Vec::new();
        let mut program_ops = None;
        // --record's capture: bytes, events, tracer CPU; and the exact row's CPU.
        let mut capture: Option<(u64, f64, Option<f64>)> = None;
        let mut exact_cpu: Option<f64> = None;
        let python = w.name.contains("CPython");
        for &tool in tools
            .iter()
            .filter(|&&t| python || t != Tool::LeaktraceNoPython)
            .filter(|&&t| w.name.contains("1 thread") || python || t != Tool::LeaktraceBare)
            // Sessions and per-program costs on the flat-out loop and CPython only.
            .filter(|&&t| {
                (w.name == "malloc/free, 1 thread" || python)
                    || !matches!(t, Tool::LeaktraceStats | Tool::LeaktraceSampledNoSessions)
            })
            // Captures are measured on the flat-out loop and CPython.
            .filter(|&&t| w.name == "malloc/free, 1 thread" || python || t != Tool::LeaktraceRecord)
            // The unwinders are compared where stacks are deep: the 20-frame loop and CPython.
            .filter(|&&t| {
                w.name.contains("deep")
                    || python
                    || !matches!(t, Tool::LeaktraceFp | Tool::LeaktraceCopy)
            })
        {
            // The full run measures each row twice and keeps the faster: on a shared VM
            // a row is sometimes slowed by 20% or more by something else running.
            let mut best: Option<Sample> = None;
            let mut failed = None;
            for _ in 0..if quick { 1 } else { 2 } {
                match run_one(tool, w, leaktrace, &bench_dir, libc) {
                    Ok(s) if best.as_ref().is_none_or(|b| s.ns_per_op < b.ns_per_op) => {
                        best = Some(s);
                    }
                    Ok(_) => {}
                    Err(e) => failed = Some(e),
                }
            }
            let s = match (best, failed) {
                (Some(s), None) => s,
                (_, Some(e)) => {
                    println!("{:<38} {:<30} failed: {e:#}", w.name, tool.label());
                    failures.push(format!("{} under {}", w.name, tool.label()));
                    continue;
                }
                (None, None) => continue,
            };
            let b = *base.get_or_insert(s.ns_per_op);
            let add = (s.ns_per_op - b) / 1000.0;
            added.push((tool, add));
            if let (Some(ops), Some(ev)) = (s.ops, s.events) {
                per_event.push((tool, ev / ops));
            }
            if let (Some(bytes), Some(ev)) = (s.capture_bytes, s.events) {
                capture = Some((bytes, ev, s.tracer_cpu));
            }
            if tool == Tool::Leaktrace {
                exact_cpu = s.tracer_cpu;
            }
            // Every leaktrace report has the programs' run times now; the exact row's (or
            // the BPF-stats row's, which comes after it) are the ones to show, not the
            // sampled rows', whose programs ran only in windows.
            if !s.programs.is_empty() && matches!(tool, Tool::Leaktrace | Tool::LeaktraceStats) {
                programs = s.programs.clone();
                program_ops = s.ops;
            }
            println!(
                "{:<38} {:<30} {:>12.0} {:>14} {:>9.1}x {:>11} {:>11}",
                if tool == Tool::Untraced { w.name } else { "" },
                tool.label(),
                s.ns_per_op,
                if tool == Tool::Untraced {
                    "-".to_owned()
                } else {
                    format!("{add:.3}")
                },
                s.ns_per_op / b,
                s.tracer_cpu
                    .map_or("-".into(), |c| format!("{:.1}%", c * 100.0)),
                s.tracer_rss_kib
                    .map_or("-".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
            );
        }
        let get = |t: Tool| added.iter().find(|(x, _)| *x == t).map(|(_, a)| *a);
        let events = per_event
            .iter()
            .find(|(t, _)| *t == Tool::Leaktrace)
            .map(|(_, e)| *e);
        if !programs.is_empty() {
            // Per program, and per operation: where the BPF time goes.
            let mut parts: Vec<String> = programs
                .iter()
                .filter(|(_, runs, _)| program_ops.is_none_or(|o| *runs >= o / 100.0))
                .map(|(n, runs, ns)| match program_ops {
                    Some(o) => format!("{n} {ns:.0} ns × {:.2}", runs / o),
                    None => format!("{n} {ns:.0} ns"),
                })
                .collect();
            if let Some(o) = program_ops {
                let per_op: f64 = programs.iter().map(|(_, runs, ns)| runs * ns).sum::<f64>() / o;
                parts.push(format!("= {:.3} µs per {}", per_op / 1000.0, w.op));
            }
            println!("{:<38} BPF time (kernel stats): {}", "", parts.join(", "));
        }
        if let Some((bytes, events, cpu)) = capture.filter(|c| c.1 > 0.0) {
            println!(
                "{:<38} --record: {:.1} MiB per million events ({:.1} bytes each); tracer CPU {} (exact without it: {}), {} per {}",
                "",
                bytes as f64 / events * 1e6 / (1024.0 * 1024.0),
                bytes as f64 / events,
                cpu.map_or("-".into(), |c| format!("{:.1}%", c * 100.0)),
                exact_cpu.map_or("-".into(), |c| format!("{:.1}%", c * 100.0)),
                get(Tool::LeaktraceRecord).map_or("-".into(), |a| format!("{a:.3} µs added")),
                w.op
            );
        }
        if let (Some(s), Some(n)) = (
            get(Tool::LeaktraceSampled),
            get(Tool::LeaktraceSampledNoSessions),
        ) {
            println!(
                "{:<38} uprobe sessions: sampled {:.3} µs per {}, {:.3} without (unsampled calls skip the return probe)",
                "", s, w.op, n
            );
        }
        if let (Some(l), Some(bare)) = (get(Tool::Leaktrace), get(Tool::LeaktraceBare)) {
            println!(
                "{:<38} BPF work: exact / bare probes at the same sites = {:.2} (goal ≤ 1.15)",
                "",
                l / bare
            );
        }
        if let (Some(with), Some(without), Some(ev)) =
            (get(Tool::Leaktrace), get(Tool::LeaktraceNoPython), events)
        {
            println!(
                "{:<38} Python walk: {:.3} µs per {}, {:.2} µs per recorded event ({:.1} events per {})",
                "",
                with - without,
                w.op,
                (with - without) / ev.max(1e-9),
                ev,
                w.op
            );
        }
        if let (Some(cfi), Some(fp)) = (get(Tool::Leaktrace), get(Tool::LeaktraceFp)) {
            print!(
                "{:<38} unwinding: CFI tables {:.3} µs per {op}, frame pointers {:.3} (CFI - FP = {:.3} µs",
                "",
                cfi,
                fp,
                cfi - fp,
                op = w.op
            );
            if let Some(ev) = events {
                print!(", {:.2} µs per recorded event", (cfi - fp) / ev.max(1e-9));
            }
            print!(")");
            if let Some(copy) = get(Tool::LeaktraceCopy) {
                print!("; 8 KiB stack copies {copy:.3} µs per {}", w.op);
            }
            println!();
        }
        // The paced loop sleeps between batches: its added cost hides in the sleep.
        if let (Some(l), Some(bt), false) = (
            get(Tool::Leaktrace),
            get(Tool::Bpftrace),
            w.name.contains("pairs/s"),
        ) {
            print!(
                "{:<38} ratio of added cost per {}: leaktrace/bpftrace = {:.2}",
                "",
                w.op,
                l / bt
            );
            if w.name == "malloc/free, 1 thread" {
                microbench_ratio = Some(l / bt);
            }
            if let Some(s) = get(Tool::LeaktraceSampled) {
                print!(", sampled/bpftrace = {:.2}", s / bt);
            }
            println!();
        }
    }
    println!();
    if let Err(e) = crate::census::run(workspace, leaktrace, quick) {
        println!("heap census: failed: {e:#}");
        failures.push("the heap census".into());
    }
    // The real servers, then the summary of both tables against the figures.
    let (summaries, server_failures) = crate::servers::run(workspace, leaktrace, quick);
    failures.extend(server_failures);
    crate::servers::print_summary(&summaries, microbench_ratio);
    if !failures.is_empty() {
        bail!(
            "{} benchmark runs failed: {}",
            failures.len(),
            failures.join("; ")
        );
    }
    Ok(())
}
