//! Two reports compared stack by stack: what grew, shrank, appeared and went. Stacks
//! are matched by their frames (function, file and line, else the address), so two
//! runs of the same program compare, not only two reports of one run.

use std::fmt::Write as _;

use rustc_hash::FxHashMap;
use serde::Serialize;

use super::pprof::{CensusPart, Heaps, StackPart, TypePart, frame_name};
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
    /// The live heap by type, where both reports have a census of the same kind.
    pub types: Option<TypeDiff>,
}

/// One type's change between two censuses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TypeChange {
    /// The type's name.
    pub name: String,
    /// Bytes in the base census (0 when absent).
    pub base_bytes: u64,
    /// Bytes in the new census.
    pub new_bytes: u64,
    /// `new_bytes − base_bytes`.
    pub change_bytes: i64,
    /// Objects in the base census.
    pub base_count: u64,
    /// Objects in the new census.
    pub new_count: u64,
}

/// Two censuses compared, type by type.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TypeDiff {
    /// The census's kind ("python" or "c++").
    pub kind: String,
    /// Bytes of the types listed in both, in the base census.
    pub base_bytes: u64,
    /// In the new census.
    pub new_bytes: u64,
    /// Types whose bytes grew, most first.
    pub grown: Vec<TypeChange>,
    /// Types whose bytes shrank, most first.
    pub shrunk: Vec<TypeChange>,
    /// Types only in the new census.
    pub new: Vec<TypeChange>,
    /// Types only in the base census.
    pub gone: Vec<TypeChange>,
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
        types: None,
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
    d.types = match (&base.census, &new.census) {
        (Some(b), Some(n)) if b.kind == n.kind => Some(compare_types(b, n)),
        _ => None,
    };
    d
}

/// Compares two censuses type by type. A type absent from a census that listed only
/// its largest types may be below its cut: not comparable, not new or gone.
fn compare_types(base: &CensusPart, new: &CensusPart) -> TypeDiff {
    let mut merged: FxHashMap<&str, (Option<&TypePart>, Option<&TypePart>)> = FxHashMap::default();
    for t in &base.types {
        merged.entry(&t.name).or_default().0 = Some(t);
    }
    for t in &new.types {
        merged.entry(&t.name).or_default().1 = Some(t);
    }
    let sum = |c: &CensusPart| c.types.iter().fold(0u64, |a, t| a.saturating_add(t.bytes));
    let mut d = TypeDiff {
        kind: new.kind.clone(),
        base_bytes: sum(base),
        new_bytes: sum(new),
        grown: Vec::new(),
        shrunk: Vec::new(),
        new: Vec::new(),
        gone: Vec::new(),
        counts: Counts::default(),
    };
    for (name, (b, n)) in merged {
        let (bb, bc) = b.map_or((0, 0), |t| (t.bytes, t.count));
        let (nb, nc) = n.map_or((0, 0), |t| (t.bytes, t.count));
        let c = TypeChange {
            name: name.to_owned(),
            base_bytes: bb,
            new_bytes: nb,
            change_bytes: change(nb, bb),
            base_count: bc,
            new_count: nc,
        };
        match (b, n) {
            (None, Some(_)) if !base.whole => d.counts.not_comparable += 1,
            (Some(_), None) if !new.whole => d.counts.not_comparable += 1,
            (None, Some(_)) => d.new.push(c),
            (Some(_), None) => d.gone.push(c),
            _ if c.change_bytes > 0 => d.grown.push(c),
            _ if c.change_bytes < 0 => d.shrunk.push(c),
            _ => d.counts.same += 1,
        }
    }
    for v in [&mut d.grown, &mut d.shrunk, &mut d.new, &mut d.gone] {
        v.sort_by(|a, b| {
            b.change_bytes
                .unsigned_abs()
                .cmp(&a.change_bytes.unsigned_abs())
                .then_with(|| a.name.cmp(&b.name))
        });
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
    if let Some(t) = &d.types {
        let _ = writeln!(
            o,
            "\nHeap by type ({} census): {} → {} in the types listed; {} grown, {} shrunk, {} new, {} gone, {} unchanged",
            t.kind,
            bytes(t.base_bytes),
            bytes(t.new_bytes),
            t.counts.grown,
            t.counts.shrunk,
            t.counts.new,
            t.counts.gone,
            t.counts.same
        );
        if t.counts.not_comparable > 0 {
            let _ = writeln!(
                o,
                "  {} types are in one census only, which listed only its largest types: not called new or gone",
                t.counts.not_comparable
            );
        }
        for (title, list) in [
            ("grown", &t.grown),
            ("new", &t.new),
            ("shrunk", &t.shrunk),
            ("gone", &t.gone),
        ] {
            if list.is_empty() {
                continue;
            }
            let _ = writeln!(o, "\n{title} types:");
            for c in list {
                let _ = writeln!(
                    o,
                    "  {:>12}  {} → {} ({} → {} objects)  {}",
                    signed(c.change_bytes),
                    bytes(c.base_bytes),
                    bytes(c.new_bytes),
                    c.base_count,
                    c.new_count,
                    crate::units::printable(&c.name)
                );
            }
        }
    }
    o
}
