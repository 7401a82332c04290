//! The soak tier: leaktrace attached for a long time (an hour by default) to a process
//! allocating at a high rate (`bench/soak.c`), with leaktrace's own resident memory
//! and CPU recorded every 10 s and an interval report every minute. It holds if
//! leaktrace's memory stays flat after its first five minutes (within 10%) and no
//! event is lost.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// A process's resident bytes and CPU seconds (user + system), from /proc.
fn usage(pid: u32) -> Option<(u64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse::<u64>()
        .ok()?
        * 1024;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some((rss, ticks / 100.0))
}

/// Runs the soak for `minutes` with `threads` allocating threads; writes
/// target/soak/samples.csv and reports.jsonl and prints the summary.
pub fn run(
    workspace: &Path,
    leaktrace: &Path,
    minutes: u64,
    threads: u32,
    continuous: bool,
) -> Result<()> {
    let dir = workspace.join("target/soak");
    std::fs::create_dir_all(&dir)?;
    let prog = dir.join("soak");
    let status = Command::new("cc")
        .args(["-O2", "-g", "-pthread", "-o"])
        .arg(&prog)
        .arg(workspace.join("bench/soak.c"))
        .status()?;
    if !status.success() {
        bail!("cc bench/soak.c failed");
    }
    let mut target = Command::new(&prog)
        .arg(threads.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .context("start the soak program")?;
    let mut line = String::new();
    BufReader::new(target.stdout.take().context("stdout")?).read_line(&mut line)?;
    let pid: u32 = line
        .strip_prefix("ready ")
        .and_then(|p| p.trim().parse().ok())
        .context("soak program's ready line")?;
    let reports = dir.join("reports.jsonl");
    let mut lt = Command::new(leaktrace);
    if continuous {
        lt.arg("--continuous");
    }
    let mut lt = lt
        .args([
            "--pid",
            &pid.to_string(),
            "--interval",
            "60",
            "--format",
            "json",
            "-o",
        ])
        .arg(&reports)
        .stderr(Stdio::piped())
        .spawn()
        .context("start leaktrace")?;
    let mut stderr = BufReader::new(lt.stderr.take().context("stderr")?);
    loop {
        line.clear();
        if stderr.read_line(&mut line)? == 0 {
            bail!("leaktrace ended before attaching");
        }
        if line.starts_with("leaktrace: tracing pid") {
            break;
        }
    }
    std::thread::spawn(move || for _ in stderr.lines() {});
    let mut csv = std::fs::File::create(dir.join("samples.csv"))?;
    writeln!(
        csv,
        "seconds,leaktrace_rss_bytes,leaktrace_cpu_s,target_cpu_s"
    )?;
    let started = Instant::now();
    let end = started + Duration::from_secs(minutes * 60);
    let mut samples: Vec<(f64, u64, f64, f64)> = Vec::new();
    while Instant::now() < end {
        std::thread::sleep(Duration::from_secs(10));
        let (Some((rss, cpu)), Some((_, tcpu))) = (usage(lt.id()), usage(pid)) else {
            bail!("leaktrace or the soak program ended early");
        };
        let t = started.elapsed().as_secs_f64();
        writeln!(csv, "{t:.0},{rss},{cpu:.2},{tcpu:.2}")?;
        samples.push((t, rss, cpu, tcpu));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(lt.id() as i32, libc::SIGTERM) };
    let st = lt.wait()?;
    let _ = target.kill();
    let _ = target.wait();
    if !st.success() {
        bail!("leaktrace exited with {st}");
    }
    let text = std::fs::read_to_string(&reports)?;
    let docs: Vec<serde_json::Value> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("reports.jsonl")?;
    let lost: u64 = docs
        .last()
        .and_then(|d| d["lost_total"].as_u64())
        .unwrap_or(u64::MAX);
    let allocs = docs
        .last()
        .and_then(|d| d["activity"]["allocs"].as_u64())
        .unwrap_or(0);
    let secs = started.elapsed().as_secs_f64();
    let settle = samples
        .iter()
        .find(|s| s.0 >= 300.0)
        .or(samples.first())
        .copied();
    let (Some(settle), Some(last)) = (settle, samples.last().copied()) else {
        bail!("no samples");
    };
    let max = samples.iter().map(|s| s.1).max().unwrap_or(0);
    let mib = |b: u64| b as f64 / 1048576.0;
    println!(
        "soak: {minutes} min, {threads} thread(s), {:.0} allocations/s traced ({} reports){}",
        allocs as f64 / secs,
        docs.len(),
        if continuous {
            ", --continuous (sampled at 512 KiB, duty-cycled)"
        } else {
            ""
        }
    );
    if let Some(d) = docs.last() {
        println!(
            "  stacks in the last report: {}, aged out: {}",
            d["heap"]["stacks_total"], d["counters"]["stacks_aged_out"]
        );
    }
    println!(
        "  leaktrace RSS: {:.1} MiB at {:.0} s, {:.1} MiB at the end, {:.1} MiB at most",
        mib(settle.1),
        settle.0,
        mib(last.1),
        mib(max)
    );
    println!(
        "  leaktrace CPU: {:.1}% of one CPU; the target's: {:.1}%",
        100.0 * last.2 / last.0,
        100.0 * last.3 / last.0
    );
    println!("  lost events: {lost}");
    println!("  samples: {}", dir.join("samples.csv").display());
    if lost > 0 {
        bail!("{lost} events lost");
    }
    if last.1 as f64 > settle.1 as f64 * 1.1 {
        bail!(
            "leaktrace's RSS grew from {:.1} MiB to {:.1} MiB after its first five minutes",
            mib(settle.1),
            mib(last.1)
        );
    }
    Ok(())
}
