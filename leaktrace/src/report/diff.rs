//! Two reports compared stack by stack: what grew, shrank, appeared and went. Stacks
//! are matched by their frames (function, file and line, else the address), so two
//! runs of the same program compare, not only two reports of one run.

use std::fmt::Write as _;

use rustc_hash::FxHashMap;
use serde::Serialize;

use super::pprof::{Heaps, StackPart, frame_name};
use crate::units::bytes;

/// Largest report file read.
const MAX_REPORT_BYTES: u64 = 1 << 30;
/// Stacks listed per kind of change.
const LISTED: usize = 20;
/// Frames shown per stack.
const FRAMES: usize = 6;

/// A report read from a file: the last document of a JSON or JSON Lines file.
pub fn load(path: &std::path::Path) -> Result<Heaps, String> {
    use std::io::Read as _;
    let shown = path.display();
    let f = std::fs::File::open(path).map_err(|e| format!("{shown}: {e}"))?;
    let mut text = String::new();
    f.take(MAX_REPORT_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("{shown}: {e}"))?;
    if text.len() as u64 > MAX_REPORT_BYTES {
        return Err(format!("{shown}: larger than 1 GiB"));
    }
    // JSON Lines (--interval): the last report is the final one.
    let doc = match serde_json::from_str::<Heaps>(&text) {
        Ok(h) => return Ok(h),
        Err(e) => match text.lines().rev().find(|l| !l.trim().is_empty()) {
            Some(last) if text.trim_end().contains('\n') => {
                serde_json::from_str::<Heaps>(last).map_err(|_| e)
            }
            _ => Err(e),
        },
    };
    doc.map_err(|e| format!("{shown} is not a leaktrace JSON report: {e}"))
}

/// One stack's change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Change {
    /// Live bytes in the base report (0 when absent).
    pub base_bytes: u64,
    /// Live bytes in the new report (0 when absent).
    pub new_bytes: u64,
    /// `new_bytes − base_bytes`.
    pub change_bytes: i64,
    /// Live blocks in each.
    pub base_allocations: u64,
    /// Live blocks in the new report.
    pub new_allocations: u64,
    /// Frame names, innermost first.
    pub frames: Vec<String>,
}

/// Two reports compared.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Diff {
    /// Live heap bytes (by stack, summed) in the base report.
    pub base_bytes: u64,
    /// In the new report.
    pub new_bytes: u64,
    /// Stacks in both whose live bytes grew, most first.
    pub grown: Vec<Change>,
    /// Stacks in both whose live bytes shrank, most first.
    pub shrunk: Vec<Change>,
    /// Stacks only in the new report, most bytes first.
    pub new: Vec<Change>,
    /// Stacks only in the base report, most bytes first.
    pub gone: Vec<Change>,
    /// How many of each there were (the lists keep the first 20).
    pub counts: Counts,
}

/// Stacks per kind of change.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Grown.
    pub grown: usize,
    /// Shrunk.
    pub shrunk: usize,
    /// New.
    pub new: usize,
    /// Gone.
    pub gone: usize,
    /// Unchanged.
    pub same: usize,
}

/// A stack's identity across runs.
fn key(s: &StackPart) -> String {
    let mut k = String::new();
    for f in &s.frames {
        let _ = write!(
            k,
            "{}@{}:{}|",
            f.function.as_deref().unwrap_or(&f.address),
            f.file.as_deref().unwrap_or(""),
            f.line.unwrap_or(0)
        );
    }
    if k.is_empty() {
        format!("#{}", s.stack_id)
    } else {
        k
    }
}

/// Compares `new` against `base`.
pub fn compare(base: &Heaps, new: &Heaps) -> Diff {
    let mut merged: FxHashMap<String, (Option<&StackPart>, Option<&StackPart>)> =
        FxHashMap::default();
    for s in &base.heap.stacks {
        merged.entry(key(s)).or_default().0 = Some(s);
    }
    for s in &new.heap.stacks {
        merged.entry(key(s)).or_default().1 = Some(s);
    }
    let mut d = Diff {
        base_bytes: base.heap.stacks.iter().map(|s| s.live_bytes).sum(),
        new_bytes: new.heap.stacks.iter().map(|s| s.live_bytes).sum(),
        grown: Vec::new(),
        shrunk: Vec::new(),
        new: Vec::new(),
        gone: Vec::new(),
        counts: Counts::default(),
    };
    for (_, (b, n)) in merged {
        let frames = b
            .or(n)
            .map(|s| s.frames.iter().take(FRAMES).map(frame_name).collect())
            .unwrap_or_default();
        let c = Change {
            base_bytes: b.map_or(0, |s| s.live_bytes),
            new_bytes: n.map_or(0, |s| s.live_bytes),
            change_bytes: 0,
            base_allocations: b.map_or(0, |s| s.live_allocations),
            new_allocations: n.map_or(0, |s| s.live_allocations),
            frames,
        };
        let c = Change {
            change_bytes: c.new_bytes as i64 - c.base_bytes as i64,
            ..c
        };
        match (
            b.is_some() && b.is_some_and(|s| s.live_bytes > 0),
            n.is_some_and(|s| s.live_bytes > 0),
        ) {
            (false, true) => d.new.push(c),
            (true, false) => d.gone.push(c),
            (true, true) if c.change_bytes > 0 => d.grown.push(c),
            (true, true) if c.change_bytes < 0 => d.shrunk.push(c),
            _ => d.counts.same += 1,
        }
    }
    let order = |v: &mut Vec<Change>| {
        v.sort_by(|a, b| {
            b.change_bytes
                .unsigned_abs()
                .cmp(&a.change_bytes.unsigned_abs())
                .then_with(|| a.frames.cmp(&b.frames))
        });
    };
    for v in [&mut d.grown, &mut d.shrunk, &mut d.new, &mut d.gone] {
        order(v);
    }
    d.counts.grown = d.grown.len();
    d.counts.shrunk = d.shrunk.len();
    d.counts.new = d.new.len();
    d.counts.gone = d.gone.len();
    for v in [&mut d.grown, &mut d.shrunk, &mut d.new, &mut d.gone] {
        v.truncate(LISTED);
    }
    d
}

/// The comparison as text.
pub fn render(d: &Diff, base: &str, new: &str) -> String {
    let mut o = String::new();
    let change = d.new_bytes as i64 - d.base_bytes as i64;
    let signed = |c: i64| {
        if c < 0 {
            format!("−{}", bytes(c.unsigned_abs()))
        } else {
            format!("+{}", bytes(c.unsigned_abs()))
        }
    };
    let _ = writeln!(
        o,
        "Heap by stack, {base} → {new}: {} → {} live ({}); {} grown, {} shrunk, {} new, {} gone, {} unchanged",
        bytes(d.base_bytes),
        bytes(d.new_bytes),
        signed(change),
        d.counts.grown,
        d.counts.shrunk,
        d.counts.new,
        d.counts.gone,
        d.counts.same
    );
    for (title, list) in [
        ("grown", &d.grown),
        ("new", &d.new),
        ("shrunk", &d.shrunk),
        ("gone", &d.gone),
    ] {
        if list.is_empty() {
            continue;
        }
        let _ = writeln!(o, "\n{title}:");
        for c in list {
            let _ = writeln!(
                o,
                "  {:>12}  {} → {} ({} → {} blocks)  {}",
                signed(c.change_bytes),
                bytes(c.base_bytes),
                bytes(c.new_bytes),
                c.base_allocations,
                c.new_allocations,
                c.frames.join(" ← ")
            );
        }
    }
    o
}
