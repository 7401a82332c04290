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
    if crate::capture::is_capture(path) {
        let r = crate::capture::Replay::load(path)?;
        if let Some(why) = r
            .cut
            .as_deref()
            .map(|c| format!("cut short {c}"))
            .or_else(|| {
                (!r.complete).then(|| {
                    "without its final report (copied while recording, or leaktrace was killed)"
                        .to_owned()
                })
            })
        {
            #[expect(clippy::print_stderr, reason = "a note for the user: what is compared")]
            {
                eprintln!(
                    "leaktrace: {shown} is a capture {why}: its heap up to there is compared"
                );
            }
        }
        return Ok(Heaps::from(&r.report(usize::MAX)));
    }
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
    /// In one report only, which listed only its `--top` stacks: perhaps below its
    /// cut, so neither new nor gone (for every stack, compare `--format pprof` or
    /// reports made with a large `--top`).
    pub not_comparable: usize,
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

/// One side's figures for a stack key (stacks with the same frames summed).
#[derive(Clone, Copy, Default)]
struct Side {
    bytes: u64,
    allocations: u64,
}

/// A stack key's base side, new side, and frame names.
type Merged = (Option<Side>, Option<Side>, Vec<String>);

/// `new − base`, saturated.
fn change(new: u64, base: u64) -> i64 {
    let d = i128::from(new) - i128::from(base);
    i64::try_from(d).unwrap_or(if d < 0 { i64::MIN } else { i64::MAX })
}

/// Whether a report lists fewer stacks than it had (`--top`).
fn cut(h: &Heaps) -> bool {
    h.heap
        .stacks_total
        .is_some_and(|t| t > h.heap.stacks.iter().filter(|s| s.live_bytes > 0).count() as u64)
}

/// Compares `new` against `base`. A stack absent from a report that kept only its
/// `--top` stacks may be below its cut: it is counted as not comparable, not as new
/// or gone.
pub fn compare(base: &Heaps, new: &Heaps) -> Diff {
    let mut merged: FxHashMap<String, Merged> = FxHashMap::default();
    let frames = |s: &StackPart| s.frames.iter().take(FRAMES).map(frame_name).collect();
    for (i, h) in [base, new].into_iter().enumerate() {
        for s in &h.heap.stacks {
            let e = merged
                .entry(key(s))
                .or_insert_with(|| (None, None, frames(s)));
            let side = if i == 0 { &mut e.0 } else { &mut e.1 };
            let v = side.get_or_insert_with(Side::default);
            v.bytes = v.bytes.saturating_add(s.live_bytes);
            v.allocations = v.allocations.saturating_add(s.live_allocations);
        }
    }
    let sum = |h: &Heaps| {
        h.heap
            .stacks
            .iter()
            .fold(0u64, |a, s| a.saturating_add(s.live_bytes))
    };
    let mut d = Diff {
        base_bytes: sum(base),
        new_bytes: sum(new),
        grown: Vec::new(),
        shrunk: Vec::new(),
        new: Vec::new(),
        gone: Vec::new(),
        counts: Counts::default(),
    };
    let (base_cut, new_cut) = (cut(base), cut(new));
    for (_, (b, n, frames)) in merged {
        let (b, n) = (b.unwrap_or_default(), n.unwrap_or_default());
        let c = Change {
            base_bytes: b.bytes,
            new_bytes: n.bytes,
            change_bytes: change(n.bytes, b.bytes),
            base_allocations: b.allocations,
            new_allocations: n.allocations,
            frames,
        };
        match (b.bytes > 0, n.bytes > 0) {
            (false, true) if base_cut => d.counts.not_comparable += 1,
            (true, false) if new_cut => d.counts.not_comparable += 1,
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
    let total = change(d.new_bytes, d.base_bytes);
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
        signed(total),
        d.counts.grown,
        d.counts.shrunk,
        d.counts.new,
        d.counts.gone,
        d.counts.same
    );
    if d.counts.not_comparable > 0 {
        let _ = writeln!(
            o,
            "  {} stacks are in one report only, which listed only its --top stacks: not called new or gone",
            d.counts.not_comparable
        );
    }
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
