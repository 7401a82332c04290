//! The process over time: totals sampled at a fixed pace, and each stack's
//! outstanding bytes, for growth rates that a single snapshot can't give.
//!
//! Growth is the Theil–Sen slope (the median of all pairwise slopes), which a
//! burst, a freed cache or one outlier sample does not drag around the way a
//! least-squares fit or first-versus-last does: a cache that fills and then
//! stays flat has a median slope near zero, a steady leak its rate.

use rustc_hash::FxHashMap;
use serde::Serialize;

use crate::{
    accounting::ledger::{AnonSplit, Ledger},
    process::procfs::Rss,
};

/// Samples of the totals kept before they are thinned to every other one.
const MAX_POINTS: usize = 2048;
/// Samples kept per stack (bounds memory at ~4 KiB a stack).
const MAX_STACK_POINTS: usize = 256;
/// Points used for a slope (pairwise slopes are quadratic in this).
const SLOPE_POINTS: usize = 128;

/// Totals at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Point {
    /// Seconds since attach.
    pub t_s: f64,
    /// RSS and its split.
    pub rss: Rss,
    /// Live heap bytes (estimated when sampling).
    pub live_bytes: u64,
    /// Live heap blocks.
    pub live_allocations: u64,
    /// Anonymous bytes mapped since attach.
    pub anon_mapped_bytes: u64,
    /// Size of the brk heap.
    pub brk_bytes: u64,
    /// Anonymous memory mapped since attach, by origin.
    pub split: AnonSplit,
    /// Threads in the process.
    pub threads: u64,
}

impl Point {
    /// Memory the allocator holds from the system: the brk heap, committed arena
    /// heaps and directly mapped chunks (pymalloc arenas are counted apart).
    pub fn allocator_bytes(&self) -> u64 {
        self.brk_bytes + self.split.arena_committed_bytes + self.split.allocator_chunk_bytes
    }
}

/// Growth of one series.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Growth {
    /// Theil–Sen slope, bytes per second.
    pub bytes_per_s: f64,
    /// Share of sample-to-sample steps that did not shrink (1.0: never went down).
    pub steadiness: f64,
    /// Samples behind the figures.
    pub points: usize,
}

/// Samples over time.
#[derive(Debug, Default)]
pub struct Timeline {
    points: Vec<Point>,
    stacks: FxHashMap<i64, Vec<(f64, u64)>>,
    mapped: FxHashMap<i64, Vec<(f64, u64)>>,
    /// Keep only the samples of the last this many seconds (`--continuous`): growth is
    /// then the recent growth, not the whole run's.
    window_s: Option<f64>,
}

fn thin<T: Copy>(v: &mut Vec<T>, max: usize) {
    if v.len() > max {
        let kept: Vec<T> = v.iter().copied().step_by(2).collect();
        *v = kept;
    }
}

impl Timeline {
    /// A timeline keeping the samples of the last `window_s` seconds only.
    pub fn with_window(window_s: Option<f64>) -> Self {
        Self {
            window_s,
            ..Self::default()
        }
    }

    /// Starts over (an exec: the old program's samples go with it), keeping the window.
    pub fn reset(&mut self) {
        *self = Self::with_window(self.window_s);
    }

    /// Drops the series of stacks that no longer matter (aged out).
    pub fn forget(&mut self, ids: &[i64]) {
        for id in ids {
            self.stacks.remove(id);
            self.mapped.remove(id);
        }
    }

    /// Records the ledger's totals and every stack's outstanding bytes at `t_s`.
    pub fn sample(&mut self, t_s: f64, ledger: &Ledger, rss: Rss, threads: u64) {
        self.points.push(Point {
            t_s,
            rss,
            live_bytes: ledger.live_bytes(),
            live_allocations: ledger.live_allocations(),
            anon_mapped_bytes: ledger.anon_mapped_bytes(),
            brk_bytes: ledger.brk_bytes().unwrap_or(0),
            split: ledger.anon_split(),
            threads,
        });
        thin(&mut self.points, MAX_POINTS);
        record(
            &mut self.stacks,
            t_s,
            ledger.heap_by_stack().iter().map(|(&id, t)| (id, t.bytes)),
        );
        record(
            &mut self.mapped,
            t_s,
            ledger
                .mapped_by_stack()
                .iter()
                .map(|(&id, t)| (id, t.bytes)),
        );
        if let Some(w) = self.window_s {
            let from = t_s - w;
            let first = self.points.iter().position(|p| p.t_s >= from).unwrap_or(0);
            self.points.drain(..first);
            for s in self.stacks.values_mut().chain(self.mapped.values_mut()) {
                let first = s.iter().position(|&(t, _)| t >= from).unwrap_or(s.len());
                s.drain(..first);
            }
            // A stack whose window holds nothing has no series left.
            self.stacks.retain(|_, s| !s.is_empty());
            self.mapped.retain(|_, s| !s.is_empty());
        }
    }

    /// The sampled totals.
    pub fn points(&self) -> &[Point] {
        &self.points
    }

    /// Growth of a stack's outstanding heap bytes, once it has three samples.
    pub fn stack_growth(&self, id: i64) -> Option<Growth> {
        growth(self.stacks.get(&id)?)
    }

    /// A stack's outstanding heap bytes over time.
    pub fn heap_series(&self) -> &FxHashMap<i64, Vec<(f64, u64)>> {
        &self.stacks
    }

    /// A stack's outstanding mapped bytes (anonymous mmap, brk) over time.
    pub fn mapped_series(&self) -> &FxHashMap<i64, Vec<(f64, u64)>> {
        &self.mapped
    }
}

/// Appends each stack's current bytes; stacks that went away drop to zero (once).
fn record(
    series: &mut FxHashMap<i64, Vec<(f64, u64)>>,
    t_s: f64,
    now: impl Iterator<Item = (i64, u64)>,
) {
    let mut seen = rustc_hash::FxHashSet::default();
    for (id, bytes) in now {
        seen.insert(id);
        series.entry(id).or_default().push((t_s, bytes));
    }
    for (id, s) in series.iter_mut() {
        if !seen.contains(id) && s.last().is_some_and(|&(t, b)| t < t_s && b > 0) {
            s.push((t_s, 0));
        }
        thin(s, MAX_STACK_POINTS);
    }
}

/// Theil–Sen slope and steadiness of a series of (seconds, bytes).
pub fn growth(series: &[(f64, u64)]) -> Option<Growth> {
    if series.len() < 3 {
        return None;
    }
    let step = series.len().div_ceil(SLOPE_POINTS);
    let pts: Vec<(f64, f64)> = series
        .iter()
        .step_by(step)
        .map(|&(t, b)| (t, b as f64))
        .collect();
    let mut slopes = Vec::with_capacity(pts.len() * pts.len() / 2);
    for (i, a) in pts.iter().enumerate() {
        for b in &pts[i + 1..] {
            if b.0 > a.0 {
                slopes.push((b.1 - a.1) / (b.0 - a.0));
            }
        }
    }
    if slopes.is_empty() {
        return None;
    }
    slopes.sort_by(f64::total_cmp);
    let m = slopes.len();
    let median = if m % 2 == 1 {
        slopes[m / 2]
    } else {
        (slopes[m / 2 - 1] + slopes[m / 2]) / 2.0
    };
    let steps = series.windows(2).count();
    let up = series.windows(2).filter(|w| w[1].1 >= w[0].1).count();
    Some(Growth {
        bytes_per_s: median,
        steadiness: up as f64 / steps as f64,
        points: series.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(f: impl Fn(u64) -> u64, n: u64) -> Vec<(f64, u64)> {
        (0..n).map(|i| (i as f64 * 0.5, f(i))).collect()
    }

    /// Growth cases: (name, series, expected slope in bytes/s, expected steadiness).
    /// With a window, only its samples stay, the totals' and each stack's; a stack
    /// with nothing left in it loses its series.
    #[test]
    fn a_window_keeps_only_its_samples() {
        let mut t = Timeline::with_window(Some(10.0));
        let mut l = Ledger::new(None, None);
        let ev = leaktrace_common::Event {
            kind: leaktrace_common::kind::ALLOC,
            addr: 0x1000,
            size: 64,
            stack_id: 7,
            func: leaktrace_common::AllocFn::Malloc as u32,
            ..Default::default()
        };
        l.apply(&ev);
        for s in 0..=30 {
            t.sample(f64::from(s), &l, Rss::default(), 1);
        }
        assert_eq!(t.points().first().map(|p| p.t_s), Some(20.0));
        assert_eq!(t.points().len(), 11);
        assert_eq!(t.heap_series()[&7].len(), 11);
        t.forget(&[7]);
        assert!(t.heap_series().is_empty());
        t.reset();
        assert!(t.points().is_empty());
        t.sample(100.0, &l, Rss::default(), 1);
        t.sample(115.0, &l, Rss::default(), 1);
        assert_eq!(t.points().len(), 1, "the window survives a reset");
    }

    #[test]
    fn slopes_resist_bursts_and_plateaus() {
        type Case = (&'static str, Vec<(f64, u64)>, f64, f64);
        let cases: Vec<Case> = vec![
            // A steady leak of 1000 bytes every half second.
            ("steady leak", series(|i| 5000 + 1000 * i, 40), 2000.0, 1.0),
            // A cache that fills in the first 4 samples, then stays flat.
            (
                "cache fills then flat",
                series(|i| 10_000 * i.min(4), 40),
                0.0,
                1.0,
            ),
            // Flat with one huge spike sample.
            (
                "flat with a spike",
                series(|i| if i == 20 { 1 << 30 } else { 7000 }, 40),
                0.0,
                39.0 / 39.0 - 1.0 / 39.0,
            ),
            // Churn: up and down around a level.
            (
                "churn",
                series(|i| if i % 2 == 0 { 1000 } else { 3000 }, 40),
                0.0,
                20.0 / 39.0,
            ),
            // A leak with the burst of a freed temporary every tenth sample.
            (
                "leak with bursts",
                series(|i| 1000 * i + if i % 10 == 5 { 1 << 20 } else { 0 }, 50),
                2000.0,
                44.0 / 49.0,
            ),
        ];
        for (name, s, slope, steady) in cases {
            let g = growth(&s).unwrap_or_else(|| panic!("{name}: no growth"));
            assert!(
                (g.bytes_per_s - slope).abs() < 1e-6,
                "{name}: slope {} want {slope}",
                g.bytes_per_s
            );
            assert!(
                (g.steadiness - steady).abs() < 1e-9,
                "{name}: steadiness {} want {steady}",
                g.steadiness
            );
            assert_eq!(g.points, s.len());
        }
        assert!(
            growth(&[(0.0, 1), (1.0, 2)]).is_none(),
            "two samples are not a trend"
        );
    }

    /// Long series are thinned, keeping their span.
    #[test]
    fn thins_long_series() {
        let mut v: Vec<(f64, u64)> = (0..=MAX_POINTS as u64).map(|i| (i as f64, i)).collect();
        thin(&mut v, MAX_POINTS);
        assert_eq!(v.len(), MAX_POINTS / 2 + 1);
        assert_eq!(v.first().unwrap().0, 0.0);
        assert_eq!(v.last().unwrap().0, MAX_POINTS as f64);
        assert_eq!(growth(&v).unwrap().bytes_per_s, 1.0);
    }
}
