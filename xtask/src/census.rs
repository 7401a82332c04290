//! The heap census benchmark (in `cargo xtask bench`): how long leaktrace's census of
//! a live CPython heap takes, read from outside, beside what a user can run inside the
//! process (`gc.get_objects()` counted by type) on the same heap.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

const PYTHON: &str = "/usr/bin/python3.11";

/// Runs the row and prints it; `quick` makes a heap of ~50 MiB instead of ~1 GiB.
pub fn run(workspace: &Path, leaktrace: &Path, quick: bool) -> Result<()> {
    if !Path::new(PYTHON).exists() {
        bail!("{PYTHON} is missing (cargo xtask setup installs it)");
    }
    let n = if quick { 300_000 } else { 6_000_000 };
    let mut py = Command::new(PYTHON)
        .arg(workspace.join("bench/py_heap.py"))
        .arg(n.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting py_heap.py")?;
    let mut out = BufReader::new(py.stdout.take().expect("stdout"));
    let mut stdin = py.stdin.take().expect("stdin");
    let result = (|| -> Result<String> {
        let mut line = String::new();
        out.read_line(&mut line)?;
        let pid: u32 = line
            .trim()
            .strip_prefix("ready ")
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("py_heap.py said {line:?}"))?;
        let report = std::env::temp_dir().join(format!("leaktrace-census-bench-{pid}.json"));
        let status = Command::new(leaktrace)
            .args([
                "--pid",
                &pid.to_string(),
                "-d",
                "1",
                "--format",
                "json",
                "-o",
            ])
            .arg(&report)
            .stderr(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("leaktrace failed: {status}");
        }
        let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report)?)?;
        let _ = std::fs::remove_file(&report);
        let c = &r["census"];
        let ms = c["walk_ms"].as_f64().context("no census in the report")?;
        let objects = c["objects"].as_u64().unwrap_or(0);
        let in_use = c["heap_in_use_bytes"].as_u64().unwrap_or(0);
        // Cut short by the time budget, the figure means nothing; a pool changed
        // while read costs its blocks only, and is said in the row.
        let note = match c["incomplete"].as_str() {
            Some(why) if why.contains("budget") => bail!("the census is incomplete: {why}"),
            Some(why) => format!(" (incomplete: {why})"),
            None => String::new(),
        };
        writeln!(stdin, "count")?;
        line.clear();
        out.read_line(&mut line)?;
        // "counted <objects> in <ms> ms"
        let words: Vec<&str> = line.split_whitespace().collect();
        let (peer_objects, peer_ms): (u64, f64) = match words.as_slice() {
            ["counted", n, "in", ms, "ms"] => (n.parse()?, ms.parse()?),
            _ => bail!("py_heap.py said {line:?}"),
        };
        Ok(format!(
            "{:<38} leaktrace {ms:.0} ms for {:.2} GiB of live blocks ({:.1} M objects, {:.2} GB/s), from outside; \
             in the process, gc.get_objects() counted by type {peer_ms:.0} ms ({:.1} M objects, GC-tracked only): \
             ratio {:.2}{note}",
            format!("heap census, CPython 3.11 ({n} objects)"),
            in_use as f64 / (1u64 << 30) as f64,
            objects as f64 / 1e6,
            in_use as f64 / ms / 1e6,
            peer_objects as f64 / 1e6,
            ms / peer_ms
        ))
    })();
    drop(stdin);
    let _ = py.kill();
    let _ = py.wait();
    println!("{}", result?);
    Ok(())
}
