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
    /// The stacks that grew, shrank, are new or gone.
    #[serde(flatten)]
    pub stacks: Changes<Change>,
    /// The live heap by type, where both reports have a census of the same kind.
    pub types: Option<TypeDiff>,
}

/// What changed between two sides, by kind of change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Changes<T> {
    /// In both, more bytes now, most first.
    pub grown: Vec<T>,
    /// In both, fewer bytes now, most first.
    pub shrunk: Vec<T>,
    /// In the new side only, most bytes first.
    pub new: Vec<T>,
    /// In the base side only, most bytes first.
    pub gone: Vec<T>,
    /// How many of each there were (the lists keep the first 20).
    pub counts: Counts,
}

/// One thing's change, as [`Changes`] sorts and prints it.
pub trait Changed {
    /// Bytes now minus bytes before.
    fn change_bytes(&self) -> i64;
    /// What orders two equal changes.
    fn key(&self) -> Vec<String>;
    /// The line after the change, for the text.
    fn line(&self) -> String;
}

impl Changed for Change {
    fn change_bytes(&self) -> i64 {
        self.change_bytes
    }
    fn key(&self) -> Vec<String> {
        self.frames.clone()
    }
    fn line(&self) -> String {
        format!(
            "{} → {} ({} → {} blocks)  {}",
            bytes(self.base_bytes),
            bytes(self.new_bytes),
            self.base_allocations,
            self.new_allocations,
            self.frames.join(" ← ")
        )
    }
}

impl Changed for TypeChange {
    fn change_bytes(&self) -> i64 {
        self.change_bytes
    }
    fn key(&self) -> Vec<String> {
        vec![self.name.clone()]
    }
    fn line(&self) -> String {
        format!(
            "{} → {} ({} → {} objects)  {}",
            bytes(self.base_bytes),
            bytes(self.new_bytes),
            self.base_count,
            self.new_count,
            crate::units::printable(&self.name)
        )
    }
}

impl<T: Changed> Changes<T> {
    fn new() -> Self {
        Self {
            grown: Vec::new(),
            shrunk: Vec::new(),
            new: Vec::new(),
            gone: Vec::new(),
            counts: Counts::default(),
        }
    }

    /// Files one change: in the base side, in the new side; a side that listed only
    /// part of what it had (`cut`) cannot say something is new or gone.
    fn file(&mut self, c: T, (in_base, in_new): (bool, bool), (base_cut, new_cut): (bool, bool)) {
        match (in_base, in_new) {
            (false, true) if base_cut => self.counts.not_comparable += 1,
            (true, false) if new_cut => self.counts.not_comparable += 1,
            (false, true) => self.new.push(c),
            (true, false) => self.gone.push(c),
            (true, true) if c.change_bytes() > 0 => self.grown.push(c),
            (true, true) if c.change_bytes() < 0 => self.shrunk.push(c),
            _ => self.counts.same += 1,
        }
    }

    /// Sorts each list by the size of its changes, counts them, keeps the first 20.
    fn finish(&mut self) {
        for v in [
            &mut self.grown,
            &mut self.shrunk,
            &mut self.new,
            &mut self.gone,
        ] {
            v.sort_by_cached_key(|c| (std::cmp::Reverse(c.change_bytes().unsigned_abs()), c.key()));
        }
        self.counts.grown = self.grown.len();
        self.counts.shrunk = self.shrunk.len();
        self.counts.new = self.new.len();
        self.counts.gone = self.gone.len();
        for v in [
            &mut self.grown,
            &mut self.shrunk,
            &mut self.new,
            &mut self.gone,
        ] {
            v.truncate(LISTED);
        }
    }

    /// The counts' part of a heading.
    fn summary(&self) -> String {
        let c = &self.counts;
        format!(
            "{} grown, {} shrunk, {} new, {} gone, {} unchanged",
            c.grown, c.shrunk, c.new, c.gone, c.same
        )
    }

    /// The lists, each titled `grown{what}:` and so on.
    fn render(&self, o: &mut String, what: &str) {
        for (title, list) in [
            ("grown", &self.grown),
            ("new", &self.new),
            ("shrunk", &self.shrunk),
            ("gone", &self.gone),
        ] {
            if list.is_empty() {
                continue;
            }
            let _ = writeln!(o, "\n{title}{what}:");
            for c in list {
                let _ = writeln!(o, "  {:>12}  {}", signed(c.change_bytes()), c.line());
            }
        }
    }
}

/// A change in bytes, signed.
fn signed(c: i64) -> String {
    if c < 0 {
        format!("−{}", bytes(c.unsigned_abs()))
    } else {
        format!("+{}", bytes(c.unsigned_abs()))
    }
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
    /// The types that grew, shrank, are new or gone.
    #[serde(flatten)]
    pub types: Changes<TypeChange>,
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
        stacks: Changes::new(),
        types: None,
    };
    let cuts = (cut(base), cut(new));
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
        d.stacks.file(c, (b.bytes > 0, n.bytes > 0), cuts);
    }
    d.stacks.finish();
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
        types: Changes::new(),
    };
    let cuts = (!base.whole, !new.whole);
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
        d.types.file(c, (b.is_some(), n.is_some()), cuts);
    }
    d.types.finish();
    d
}

/// The comparison as text.
pub fn render(d: &Diff, base: &str, new: &str) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "Heap by stack, {base} → {new}: {} → {} live ({}); {}",
        bytes(d.base_bytes),
        bytes(d.new_bytes),
        signed(change(d.new_bytes, d.base_bytes)),
        d.stacks.summary()
    );
    if d.stacks.counts.not_comparable > 0 {
        let _ = writeln!(
            o,
            "  {} stacks are in one report only, which listed only its --top stacks: not called new or gone",
            d.stacks.counts.not_comparable
        );
    }
    d.stacks.render(&mut o, "");
    if let Some(t) = &d.types {
        let _ = writeln!(
            o,
            "\nHeap by type ({} census): {} → {} in the types listed; {}",
            t.kind,
            bytes(t.base_bytes),
            bytes(t.new_bytes),
            t.types.summary()
        );
        if t.types.counts.not_comparable > 0 {
            let _ = writeln!(
                o,
                "  {} types are in one census only, which listed only its largest types: not called new or gone",
                t.types.counts.not_comparable
            );
        }
        t.types.render(&mut o, " types");
    }
    o
}
