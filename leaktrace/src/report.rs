//! Reports: a serializable snapshot of the books, and its text rendering.
//!
//! The JSON shape is a stable contract (see README): fields are only added.

use std::fmt::Write as _;

use leaktrace_common::counter;
use serde::Serialize;

use crate::{
    glibc_heap::{ArenaLimit, ArenaStats, HeapWalk, Unwalkable},
    ledger::{Activity, Ledger, Totals, UserCounters, weigh},
    procfs::Rss,
    symbols::{Frame, Symbols},
    timeline::{Growth, Point, Timeline},
    verdict::{self, Candidate, Verdict},
};

/// One stack's outstanding heap.
#[derive(Clone, Debug, Serialize)]
pub struct HeapStack {
    /// Outstanding requested bytes.
    pub live_bytes: u64,
    /// Outstanding blocks.
    pub live_allocations: u64,
    /// Sampled blocks behind the figures (equal to `live_allocations` when exact).
    pub samples: u64,
    /// Half-width of the 95% interval of `live_bytes` (0 when exact).
    pub live_bytes_error95: u64,
    /// Age of the oldest outstanding block, seconds.
    pub oldest_age_s: f64,
    /// How its outstanding bytes moved over the trace (null until three samples).
    pub growth: Option<Growth>,
    /// Kernel stack id (negative: capture failed, see `lost`).
    pub stack_id: i64,
    /// The stack walk stopped early.
    pub truncated: bool,
    /// Frames, innermost first.
    pub frames: Vec<Frame>,
}

/// One stack's outstanding mappings (anonymous mmap and brk growth).
#[derive(Clone, Debug, Serialize)]
pub struct MapStack {
    /// Bytes still mapped.
    pub mapped_bytes: u64,
    /// Age of the oldest region, seconds.
    pub oldest_age_s: f64,
    /// Kernel stack id.
    pub stack_id: i64,
    /// The stack walk stopped early.
    pub truncated: bool,
    /// Frames, innermost first.
    pub frames: Vec<Frame>,
}

/// An arena reservation made by the allocator since attach.
#[derive(Clone, Debug, Serialize)]
pub struct ArenaInfo {
    /// Start address, hex.
    pub address: String,
    /// Reserved address space.
    pub reserved_bytes: u64,
    /// Made accessible with mprotect.
    pub committed_bytes: u64,
    /// Stack of the allocator call that created it.
    pub stack_id: i64,
    /// Thread that created it.
    pub thread: u32,
    /// That thread's name, if it is still running.
    pub thread_name: Option<String>,
    /// Frames, innermost first.
    pub frames: Vec<Frame>,
}

/// A glibc arena as walked from outside, with who created it when that was seen.
#[derive(Clone, Debug, Serialize)]
pub struct WalkedArena {
    /// The walk's figures.
    #[serde(flatten)]
    pub stats: ArenaStats,
    /// Thread whose allocation created the arena (arenas created since attach).
    pub created_by_thread: Option<u32>,
    /// That thread's name, if still running.
    pub created_by_thread_name: Option<String>,
    /// Stack of the allocation that created it.
    pub created_by_stack: Option<i64>,
    /// Its frames, innermost first.
    pub frames: Vec<Frame>,
}

/// The allocator as seen from outside: glibc's heaps walked through /proc/PID/mem.
#[derive(Clone, Debug, Serialize)]
pub struct Allocator {
    /// Arenas walked (main first), with totals; null when the target has no glibc heap to walk or has exited.
    pub glibc_heaps: Option<GlibcHeaps>,
    /// glibc's arena limit for the target.
    pub arena_limit: Option<ArenaLimit>,
    /// malloc settings in the target's environment.
    pub environment: Vec<String>,
    /// glibc raised its dynamic mmap threshold to this after freeing an mmapped chunk.
    pub mmap_threshold_raised_to: Option<u64>,
}

/// The walk's totals and arenas.
#[derive(Clone, Debug, Serialize)]
pub struct GlibcHeaps {
    /// Bytes in chunks in use.
    pub in_use_bytes: u64,
    /// Free bytes, top chunks included.
    pub free_bytes: u64,
    /// Resident free bytes.
    pub free_resident_bytes: u64,
    /// What malloc_trim(0) would release now.
    pub trimmable_bytes: u64,
    /// Resident bytes of all heaps.
    pub resident_bytes: u64,
    /// Arenas, main first.
    pub arenas: Vec<WalkedArena>,
    /// Heaps that could not be walked.
    pub unwalkable: Vec<Unwalkable>,
}

/// How call stacks were unwound, and how many reached their outermost frame.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StackInfo {
    /// `cfi` (unwind tables, frame pointers only where no table exists),
    /// `frame-pointers`, or `off`.
    pub unwinder: String,
    /// Live heap bytes whose stack reached its outermost frame (`_start`, the
    /// thread start), in percent of the live heap bytes that have a stack.
    pub complete_pct: f64,
    /// Distinct stacks holding live heap bytes: complete and truncated.
    pub complete_stacks: usize,
    /// See `complete_stacks`.
    pub truncated_stacks: usize,
    /// The unwind tables loaded (CFI only).
    pub tables: Option<crate::unwind::UnwindStats>,
    /// For a userspace unwinder fed with a copy of the stack (perf's design): share of
    /// live heap bytes, in percent, whose complete stack fits in a copy of 8, 16, 32
    /// and 64 KiB (`[KiB, percent]` pairs). From the span of each CFI-unwound stack.
    pub copy_would_fit: Vec<(u64, f64)>,
}

/// The target's CPython interpreter.
#[derive(Clone, Debug, Serialize)]
pub struct PythonInfo {
    /// "3.11".
    pub version: String,
    /// Object holding the interpreter.
    pub object: String,
    /// Whether Python frames are in the stacks.
    pub frames: bool,
    /// Why not, when they are not.
    pub unavailable: Option<String>,
    /// How small objects show up.
    pub note: String,
}

/// Heap section.
#[derive(Clone, Debug, Serialize)]
pub struct Heap {
    /// Outstanding requested bytes allocated since attach.
    pub live_bytes: u64,
    /// Outstanding blocks allocated since attach.
    pub live_allocations: u64,
    /// Half-width of the 95% interval of `live_bytes` (0 when exact).
    pub live_bytes_error95: u64,
    /// Mean sampling interval in bytes; 0 when every call was traced.
    pub sample_rate_bytes: u64,
    /// Stacks by outstanding bytes, largest first.
    pub stacks: Vec<HeapStack>,
}

/// Address-space section.
#[derive(Clone, Debug, Serialize)]
pub struct Mappings {
    /// Anonymous bytes mapped since attach and still mapped.
    pub anon_mapped_bytes: u64,
    /// Size of the brk heap (`brk − start_brk`), 0 if the process has none.
    pub brk_bytes: u64,
    /// brk growth since attach still in place.
    pub brk_grown_bytes: u64,
    /// Anonymous mappings since attach by origin.
    pub split: crate::ledger::AnonSplit,
    /// Arena reservations made since attach, most committed first.
    pub arenas: Vec<ArenaInfo>,
    /// Stacks by mapped bytes, largest first.
    pub stacks: Vec<MapStack>,
}

/// Allocator call rates and what the probes cost, projected from them.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Overhead {
    /// Seconds measured.
    pub window_s: f64,
    /// Calls per second per function (entry-probe hits).
    pub calls_per_s: std::collections::BTreeMap<String, f64>,
    /// Projected cost per traced call, µs (entry trap, plus the return trap where there is one).
    pub cost_per_call_us: std::collections::BTreeMap<String, f64>,
    /// Projected CPU seconds per second added by tracing every call: the traps from
    /// the per-trap model, plus `bpf_cpu_per_s` when measured.
    pub projected_cpu_per_s: f64,
    /// CPU seconds per second spent in leaktrace's BPF programs, measured by the
    /// kernel's BPF statistics (on with `--max-overhead`); null when not measured.
    pub bpf_cpu_per_s: Option<f64>,
    /// `bpf_cpu_per_s` per allocator call, µs (stack walks included).
    pub bpf_us_per_call: Option<f64>,
    /// Per BPF program, over the whole run while statistics were on: runs and mean
    /// nanoseconds per run (empty when not measured).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub bpf_programs: std::collections::BTreeMap<String, ProgramCost>,
    /// CPU seconds per second the kernel charged the target (traps included).
    pub target_cpu_per_s: f64,
    /// The projected cost as a percentage of the target's own CPU time.
    pub projected_pct: f64,
}

/// What one BPF program cost, measured by the kernel's BPF statistics.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ProgramCost {
    /// Runs while the statistics were on.
    pub runs: u64,
    /// Mean run time, ns.
    pub ns_per_run: f64,
}

/// The overhead budget detached the heap probes.
#[derive(Clone, Debug, Serialize)]
pub struct HeapDetached {
    /// Seconds after attach.
    pub after_s: f64,
    /// Why.
    pub reason: String,
}

/// A probe leaktrace attached.
#[derive(Clone, Debug, Serialize)]
pub struct ProbeInfo {
    /// Function name.
    pub function: String,
    /// Object as the target names it.
    pub object: String,
    /// File offset of the probe.
    pub offset: u64,
    /// Offset of the probe from the function's first instruction.
    pub offset_in_function: u64,
    /// Why the probe sits there.
    pub placement: String,
    /// How the return is seen: `uretprobe`, `session` (a uprobe session whose
    /// return runs only for sampled calls) or `none` (free, dry runs).
    pub return_probe: String,
}

/// A report, as printed at each interval and at the end.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Traced process.
    pub pid: u32,
    /// Seconds since the probes were attached.
    pub duration_s: f64,
    /// Resident set size (last value read while the target was alive).
    pub rss_bytes: u64,
    /// RSS split.
    pub rss: Rss,
    /// Whether this is the final report.
    pub final_report: bool,
    /// Why tracing ended (final report only).
    pub end_reason: Option<String>,
    /// Whether the target had exited.
    pub target_exited: bool,
    /// Heap accounting.
    pub heap: Heap,
    /// Address-space accounting.
    pub mappings: Mappings,
    /// Data lost, by cause; all zero means the report is complete.
    pub lost: std::collections::BTreeMap<String, u64>,
    /// Sum of `lost`.
    pub lost_total: u64,
    /// Other counters (not losses).
    pub counters: std::collections::BTreeMap<String, u64>,
    /// Activity since attach.
    pub activity: Activity,
    /// Probes attached.
    pub probes: Vec<ProbeInfo>,
    /// Latest call rates and projected probe cost (over the whole run in the final report).
    pub overhead: Option<Overhead>,
    /// Set when the overhead budget detached the heap probes: heap figures stop there.
    pub heap_detached: Option<HeapDetached>,
    /// Leak, fragmentation, non-heap growth, no growth, or inconclusive — with evidence.
    pub verdict: Verdict,
    /// The allocator as seen from outside.
    pub allocator: Allocator,
    /// The CPython interpreter, when the target is one.
    pub python: Option<PythonInfo>,
    /// How stacks were unwound.
    pub stacks: StackInfo,
    /// Totals sampled every 250 ms (thinned to at most 2048 points).
    pub timeline: Vec<Point>,
}

/// Everything a report is built from.
#[derive(Debug)]
pub struct Inputs<'a> {
    /// Traced process.
    pub pid: u32,
    /// The books.
    pub ledger: &'a Ledger,
    /// Resolved stacks.
    pub symbols: &'a Symbols,
    /// Kernel counters, indexed by `counter::*`.
    pub kernel_counters: &'a [u64],
    /// Last RSS reading.
    pub rss: Rss,
    /// Seconds traced.
    pub duration_s: f64,
    /// Monotonic now, ns (for ages).
    pub now_ns: u64,
    /// Stacks to show per section.
    pub top: usize,
    /// Final report?
    pub final_report: bool,
    /// Why tracing ended.
    pub end_reason: Option<String>,
    /// Whether the target exited.
    pub target_exited: bool,
    /// Probes attached.
    pub probes: &'a [ProbeInfo],
    /// Latest overhead measurement.
    pub overhead: Option<Overhead>,
    /// Heap probes detached by the budget.
    pub heap_detached: Option<HeapDetached>,
    /// Samples over time.
    pub timeline: &'a Timeline,
    /// Blocks younger than this are left out of the heap stacks (0: none).
    pub min_age_s: f64,
    /// glibc heaps walked now, if the target has them and is alive.
    pub walk: Option<&'a HeapWalk>,
    /// glibc's arena limit.
    pub arena_limit: Option<ArenaLimit>,
    /// malloc settings in the target's environment.
    pub malloc_env: Vec<String>,
    /// The target's CPython interpreter, if it is one.
    pub python: Option<PythonInfo>,
    /// Names of the target's threads.
    pub thread_names: &'a rustc_hash::FxHashMap<u32, String>,
    /// The unwinder in use (`cfi`, `frame-pointers`, `off`).
    pub unwinder: &'static str,
    /// The unwind tables loaded, with CFI.
    pub unwind: Option<&'a crate::unwind::UnwindStats>,
}

/// Builds a report.
pub fn build(i: &Inputs<'_>) -> Report {
    let oldest = i.ledger.oldest_by_stack();
    let age = |id: i64| {
        oldest
            .get(&id)
            .map_or(0.0, |&t| i.now_ns.saturating_sub(t) as f64 / 1e9)
    };
    let frames = |id: i64| {
        i.symbols
            .get(id)
            .map_or((Vec::new(), false), |s| (s.frames.clone(), s.truncated))
    };
    let mut heap: Vec<(i64, Totals)> = if i.min_age_s > 0.0 {
        aged_heap(i.ledger, i.now_ns, i.min_age_s)
    } else {
        i.ledger
            .heap_by_stack()
            .iter()
            .map(|(&id, t)| (id, *t))
            .collect()
    };
    heap.sort_by(|a, b| b.1.bytes.cmp(&a.1.bytes).then(a.0.cmp(&b.0)));
    let heap_stacks = heap
        .iter()
        .take(i.top)
        .map(|&(id, t)| {
            let (frames, truncated) = frames(id);
            HeapStack {
                live_bytes: t.bytes,
                live_allocations: t.count,
                samples: t.samples,
                live_bytes_error95: error95(t.variance),
                oldest_age_s: age(id),
                growth: i.timeline.stack_growth(id),
                stack_id: id,
                truncated,
                frames,
            }
        })
        .collect();
    let mut mapped: Vec<_> = i
        .ledger
        .mapped_by_stack()
        .iter()
        .map(|(&id, t)| (id, t.bytes))
        .collect();
    mapped.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let map_stacks = mapped
        .iter()
        .take(i.top)
        .map(|&(id, bytes)| {
            let (frames, truncated) = frames(id);
            MapStack {
                mapped_bytes: bytes,
                oldest_age_s: age(id),
                stack_id: id,
                truncated,
                frames,
            }
        })
        .collect();

    let mut lost = std::collections::BTreeMap::new();
    let mut counters = std::collections::BTreeMap::new();
    for (id, name) in counter::NAMES.iter().enumerate() {
        let v = i.kernel_counters.get(id).copied().unwrap_or(0);
        if counter::is_loss(id as u32) {
            lost.insert((*name).to_owned(), v);
        } else {
            counters.insert((*name).to_owned(), v);
        }
    }
    let UserCounters {
        free_unknown,
        realloc_unknown,
        alloc_over_live,
        failed_allocs,
        bad_events,
        untracked_unmapped_bytes,
        stack_unreadable,
    } = i.ledger.counters;
    lost.insert("bad_events".into(), bad_events);
    lost.insert("stack_unreadable".into(), stack_unreadable);
    lost.insert("alloc_over_live".into(), alloc_over_live);
    counters.insert("free_unknown".into(), free_unknown);
    counters.insert("realloc_unknown".into(), realloc_unknown);
    counters.insert("failed_allocs".into(), failed_allocs);
    counters.insert("untracked_unmapped_bytes".into(), untracked_unmapped_bytes);
    let lost_total = lost.values().sum();

    Report {
        pid: i.pid,
        duration_s: (i.duration_s * 1000.0).round() / 1000.0,
        rss_bytes: i.rss.rss_bytes,
        rss: i.rss,
        final_report: i.final_report,
        end_reason: i.end_reason.clone(),
        target_exited: i.target_exited,
        heap: Heap {
            live_bytes: i.ledger.live_bytes(),
            live_allocations: i.ledger.live_allocations(),
            live_bytes_error95: error95(i.ledger.live_variance()),
            sample_rate_bytes: i.ledger.sample_rate(),
            stacks: heap_stacks,
        },
        mappings: Mappings {
            anon_mapped_bytes: i.ledger.anon_mapped_bytes(),
            brk_bytes: i.ledger.brk_bytes().unwrap_or(0),
            brk_grown_bytes: i.ledger.brk_grown_bytes(),
            split: i.ledger.anon_split(),
            arenas: {
                let mut a = i.ledger.arenas();
                a.sort_by(|x, y| y.2.cmp(&x.2).then(x.0.cmp(&y.0)));
                a.into_iter()
                    .take(i.top)
                    .map(|(start, reserved, committed, id, tid)| ArenaInfo {
                        address: format!("{start:#x}"),
                        reserved_bytes: reserved,
                        committed_bytes: committed,
                        stack_id: id,
                        thread: tid,
                        thread_name: i.thread_names.get(&tid).cloned(),
                        frames: frames(id).0,
                    })
                    .collect()
            },
            stacks: map_stacks,
        },
        lost,
        lost_total,
        counters,
        activity: i.ledger.activity,
        probes: i.probes.to_vec(),
        overhead: i.overhead.clone(),
        heap_detached: i.heap_detached.clone(),
        verdict: verdict::decide(&verdict::Facts {
            points: i.timeline.points(),
            candidates: candidates(i, &oldest),
            walk: i.walk,
            arena_limit: i.arena_limit.clone(),
            mmap_threshold_raised_to: i.ledger.mmap_threshold_raised_to(),
            malloc_env: i.malloc_env.clone(),
            heap_detached: i.heap_detached.is_some(),
            lost_total,
            python: i.python.is_some(),
        }),
        allocator: Allocator {
            glibc_heaps: i.walk.map(|w| glibc_heaps(i, w)),
            arena_limit: i.arena_limit.clone(),
            environment: i.malloc_env.clone(),
            mmap_threshold_raised_to: i.ledger.mmap_threshold_raised_to(),
        },
        python: i.python.clone(),
        stacks: stack_info(i),
        timeline: i.timeline.points().to_vec(),
    }
}

fn stack_info(i: &Inputs<'_>) -> StackInfo {
    let (mut complete, mut all, mut cs, mut ts) = (0u64, 0u64, 0, 0);
    const COPIES: [u64; 4] = [8, 16, 32, 64];
    let mut fit = [0u64; 4];
    for (&id, t) in i.ledger.heap_by_stack() {
        let Some(s) = i.symbols.get(id) else {
            continue;
        };
        if t.bytes == 0 {
            continue;
        }
        all += t.bytes;
        if s.truncated {
            ts += 1;
        } else {
            complete += t.bytes;
            cs += 1;
            // The copy must reach the outermost frame's return address, just below its CFA.
            for (k, kib) in COPIES.iter().enumerate() {
                if s.span <= kib * 1024 {
                    fit[k] += t.bytes;
                }
            }
        }
    }
    StackInfo {
        unwinder: i.unwinder.to_owned(),
        complete_pct: if all == 0 {
            100.0
        } else {
            complete as f64 * 100.0 / all as f64
        },
        complete_stacks: cs,
        truncated_stacks: ts,
        tables: i.unwind.cloned(),
        copy_would_fit: if i.unwinder == "cfi" {
            COPIES
                .iter()
                .zip(fit)
                .map(|(&k, f)| (k, f as f64 * 100.0 / all.max(1) as f64))
                .collect()
        } else {
            Vec::new()
        },
    }
}

/// Heap totals per stack counting only blocks at least `min_age_s` old.
fn aged_heap(ledger: &Ledger, now_ns: u64, min_age_s: f64) -> Vec<(i64, Totals)> {
    let cutoff = now_ns.saturating_sub((min_age_s * 1e9) as u64);
    let mut m: rustc_hash::FxHashMap<i64, Totals> = rustc_hash::FxHashMap::default();
    for b in ledger.live().values().filter(|b| b.ts_ns <= cutoff) {
        let (bytes, count, var) = weigh(b.size, ledger.sample_rate());
        let t = m.entry(b.stack_id).or_default();
        t.bytes += bytes;
        t.count += count;
        t.samples += 1;
        t.variance += var;
    }
    m.into_iter().collect()
}

/// Stacks the verdict may name: every heap and mapping stack with a history.
fn candidates(i: &Inputs<'_>, oldest: &rustc_hash::FxHashMap<i64, u64>) -> Vec<Candidate> {
    let age = |id: i64| {
        oldest
            .get(&id)
            .map_or(0.0, |&t| i.now_ns.saturating_sub(t) as f64 / 1e9)
    };
    let mut out = Vec::new();
    for (section, all) in [
        ("heap", i.timeline.heap_series()),
        ("mappings", i.timeline.mapped_series()),
    ] {
        for (&id, series) in all {
            if series.len() < 3 || series.last().is_none_or(|p| p.1 == 0) {
                continue;
            }
            let (frames, truncated) = i
                .symbols
                .get(id)
                .map_or((Vec::new(), false), |s| (s.frames.clone(), s.truncated));
            let a = if section == "heap" {
                i.ledger.stack_activity(id)
            } else {
                Default::default()
            };
            out.push(Candidate {
                section,
                stack_id: id,
                series: series.clone(),
                oldest_age_s: age(id),
                allocs: a.allocs,
                frees: a.frees,
                truncated,
                frames,
            });
        }
    }
    out
}

/// The walk, with arenas joined to the thread and stack that created them.
fn glibc_heaps(i: &Inputs<'_>, w: &HeapWalk) -> GlibcHeaps {
    let created = i.ledger.arenas();
    GlibcHeaps {
        in_use_bytes: w.in_use_bytes,
        free_bytes: w.free_bytes,
        free_resident_bytes: w.free_resident_bytes,
        trimmable_bytes: w.trimmable_bytes,
        resident_bytes: w.resident_bytes,
        arenas: w
            .arenas
            .iter()
            .map(|a| {
                let first = a
                    .heaps
                    .first()
                    .and_then(|h| u64::from_str_radix(h.trim_start_matches("0x"), 16).ok());
                let c = first.and_then(|h| created.iter().find(|c| c.0 == h));
                WalkedArena {
                    stats: a.clone(),
                    created_by_thread: c.map(|c| c.4),
                    created_by_thread_name: c.and_then(|c| i.thread_names.get(&c.4).cloned()),
                    created_by_stack: c.map(|c| c.3),
                    frames: c
                        .map(|c| i.symbols.get(c.3).map_or(Vec::new(), |s| s.frames.clone()))
                        .unwrap_or_default(),
                }
            })
            .collect(),
        unwalkable: w.unwalkable.clone(),
    }
}

/// Renders a dry run: call rates and the projected cost of tracing them.
pub fn render_dry_run(pid: u32, duration_s: f64, o: &Overhead, reason: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "=== leaktrace dry run: pid {pid}, {duration_s:.1} s counting allocator calls ({reason}) ==="
    );
    let _ = writeln!(
        s,
        "{:<16} {:>12} {:>16} {:>14}",
        "function", "calls/s", "cost/call (µs)", "CPU-s/s"
    );
    for (f, r) in &o.calls_per_s {
        let c = o.cost_per_call_us.get(f).copied().unwrap_or(0.0);
        let _ = writeln!(s, "{f:<16} {r:>12.0} {c:>16.1} {:>14.4}", r * c / 1e6);
    }
    let _ = writeln!(
        s,
        "Target CPU: {:.3} CPU-s/s (including the counting probes' own traps).",
        o.target_cpu_per_s
    );
    let _ = writeln!(
        s,
        "Projected cost of full tracing: {:.3} CPU-s/s, {:.1}% of the target's own CPU time.",
        o.projected_cpu_per_s, o.projected_pct
    );
    s.push_str("(Per-call costs are those measured on the development VM; see docs/bench.md.)\n");
    s
}

/// 95% half-width from a variance.
fn error95(variance: f64) -> u64 {
    (1.96 * variance.max(0.0).sqrt()).round() as u64
}

/// Human-readable byte count (binary units).
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn frame_line(f: &Frame) -> String {
    let func = f.function.as_deref().unwrap_or("??");
    let mut s = func.to_string();
    if let (Some(file), Some(line)) = (&f.file, f.line) {
        let short = file.rsplit('/').next().unwrap_or(file);
        let _ = write!(s, " ({short}:{line})");
    }
    if f.inlined {
        s.push_str(" [inlined]");
    }
    if f.kind == "python" {
        s.push_str("  [python]");
        if f.function.is_none() {
            let _ = write!(s, " code object @ {} (freed or unreadable)", f.address);
        }
        return s;
    }
    let module = f
        .module
        .as_deref()
        .map_or("?", |m| m.rsplit('/').next().unwrap_or(m));
    let _ = write!(s, "  in {module}");
    if f.function.is_none() {
        let _ = write!(s, " @ {}", f.address);
    }
    s
}

fn write_frames(out: &mut String, stack_id: i64, frames: &[Frame], truncated: bool, max: usize) {
    if frames.is_empty() {
        let why = match stack_id {
            leaktrace_common::STACK_NONE => "stacks are off".to_owned(),
            id if id < 0 => format!("capture failed with errno {}, counted under losses", -id),
            _ => "not symbolized".to_owned(),
        };
        let _ = writeln!(out, "      (no stack: {why})");
        return;
    }
    for f in frames.iter().take(max) {
        let _ = writeln!(out, "      {}", frame_line(f));
    }
    if frames.len() > max {
        let _ = writeln!(out, "      … {} more frames", frames.len() - max);
    } else if truncated {
        out.push_str("      … (stack truncated)\n");
    }
}

/// Wraps `text` at about 100 columns: the first line starts with `first`, the
/// others with `rest` (a hanging indent).
fn wrap_hanging(out: &mut String, text: &str, first: &str, rest: &str) {
    let mut line = String::new();
    let mut prefix = first;
    for word in text.split_whitespace() {
        if !line.is_empty() && prefix.len() + line.len() + 1 + word.len() > 100 {
            let _ = writeln!(out, "{prefix}{line}");
            line.clear();
            prefix = rest;
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        let _ = writeln!(out, "{prefix}{line}");
    }
}

fn wrap(out: &mut String, text: &str, indent: &str) {
    wrap_hanging(out, text, indent, indent);
}

fn render_verdict(o: &mut String, v: &Verdict, max_frames: usize) {
    let _ = writeln!(o, "VERDICT: {}", v.kind.to_uppercase());
    wrap(o, &v.summary, "  ");
    if !v.evidence.is_empty() {
        o.push_str("  Evidence:\n");
        for e in &v.evidence {
            wrap_hanging(o, &e.text, "    - ", "      ");
        }
    }
    if !v.suspects.is_empty() {
        o.push_str("  Suspects, fastest-growing first:\n");
        for (n, s) in v.suspects.iter().enumerate() {
            let freed = if s.section == "heap" && s.allocs > 0 {
                format!(", {} of its {} blocks freed", s.frees, s.allocs)
            } else {
                String::new()
            };
            let kind = if s.section == "heap" {
                "heap"
            } else {
                "mapped"
            };
            let _ = writeln!(
                o,
                "    #{} +{}/s {kind}, {} outstanding, oldest {:.1} s, {:.0}% of steps grew or held{freed}",
                n + 1,
                bytes(s.growth_bytes_per_s.max(0.0).round() as u64),
                bytes(s.bytes),
                s.oldest_age_s,
                s.steadiness * 100.0
            );
            write_frames(o, s.stack_id, &s.frames, s.truncated, max_frames);
        }
    }
    if !v.remedies.is_empty() {
        o.push_str("  Remedies, by expected effect:\n");
        for (n, r) in v.remedies.iter().enumerate() {
            let effect = if r.expected_bytes > 0 {
                format!(" — about {}", bytes(r.expected_bytes))
            } else {
                String::new()
            };
            wrap_hanging(
                o,
                &format!("{}. {}{effect}", n + 1, r.action),
                "    ",
                "       ",
            );
            wrap(o, &r.why, "       ");
        }
    }
}

fn render_allocator(o: &mut String, a: &Allocator) {
    let Some(g) = &a.glibc_heaps else { return };
    let _ = writeln!(
        o,
        "\nglibc heaps, read from /proc/PID/mem: {} arena{}{}; {} in use, {} free ({} resident); malloc_trim(0) would return {}",
        g.arenas.len(),
        if g.arenas.len() == 1 { "" } else { "s" },
        a.arena_limit.as_ref().map_or(String::new(), |l| format!(
            " (limit {}: {})",
            l.limit, l.source
        )),
        bytes(g.in_use_bytes),
        bytes(g.free_bytes),
        bytes(g.free_resident_bytes),
        bytes(g.trimmable_bytes)
    );
    let _ = writeln!(
        o,
        "  {:<16} {:>5} {:>11} {:>11} {:>11} {:>13} {:>11}  created by",
        "arena", "heaps", "extent", "resident", "in use", "free resident", "trimmable"
    );
    for w in &g.arenas {
        let s = &w.stats;
        let by = match (w.created_by_thread, &w.created_by_thread_name) {
            (Some(t), Some(n)) => format!(
                "thread {t} ({n}) in {}",
                crate::verdict::suspect_name(&w.frames)
            ),
            (Some(t), None) => format!("thread {t} in {}", crate::verdict::suspect_name(&w.frames)),
            _ if s.kind == "main" => "the main heap".into(),
            _ => "before attach".into(),
        };
        let _ = writeln!(
            o,
            "  {:<16} {:>5} {:>11} {:>11} {:>11} {:>13} {:>11}  {by}",
            s.arena,
            s.heaps.len(),
            bytes(s.extent_bytes),
            bytes(s.resident_bytes),
            bytes(s.in_use_bytes),
            bytes(s.free_resident_bytes),
            bytes(s.trimmable_bytes)
        );
    }
    for u in &g.unwalkable {
        let _ = writeln!(o, "  heap at {} not walked: {}", u.heap, u.reason);
    }
    if !a.environment.is_empty() {
        let _ = writeln!(
            o,
            "  malloc settings in the environment: {}",
            a.environment.join(" ")
        );
    }
}

/// Renders a report as text.
pub fn render_text(r: &Report, max_frames: usize) -> String {
    let mut o = String::new();
    let title = if r.final_report {
        "final report"
    } else {
        "report"
    };
    let _ = writeln!(
        o,
        "=== leaktrace {title}: pid {}, {:.1} s traced{} ===",
        r.pid,
        r.duration_s,
        r.end_reason
            .as_deref()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        o,
        "RSS {} (anon {}, file {}, shmem {}){}",
        bytes(r.rss.rss_bytes),
        bytes(r.rss.anon_bytes),
        bytes(r.rss.file_bytes),
        bytes(r.rss.shmem_bytes),
        if r.target_exited {
            " — last reading; the target has exited"
        } else {
            ""
        }
    );
    if r.heap.sample_rate_bytes == 0 {
        let _ = writeln!(
            o,
            "Live heap allocated since attach: {} in {} blocks",
            bytes(r.heap.live_bytes),
            r.heap.live_allocations
        );
    } else {
        let _ = writeln!(
            o,
            "Live heap allocated since attach (estimated, sampling every {} on average): {} ± {} (95%) in ~{} blocks",
            bytes(r.heap.sample_rate_bytes),
            bytes(r.heap.live_bytes),
            bytes(r.heap.live_bytes_error95),
            r.heap.live_allocations
        );
    }
    let _ = writeln!(
        o,
        "Anonymous mappings since attach: {}    brk heap: {} ({} grown since attach)",
        bytes(r.mappings.anon_mapped_bytes),
        bytes(r.mappings.brk_bytes),
        bytes(r.mappings.brk_grown_bytes)
    );
    let sp = &r.mappings.split;
    if sp.arenas > 0 || sp.allocator_chunk_bytes > 0 {
        let _ = writeln!(
            o,
            "  of which by the allocator: {} arena heaps ({} committed of {} reserved), {} in directly mapped chunks; other anonymous: {}",
            sp.arenas,
            bytes(sp.arena_committed_bytes),
            bytes(sp.arena_reserved_bytes),
            bytes(sp.allocator_chunk_bytes),
            bytes(sp.other_anon_bytes)
        );
    }
    let a = &r.activity;
    let sampled = if r.heap.sample_rate_bytes == 0 {
        ""
    } else {
        "sampled "
    };
    let _ = writeln!(
        o,
        "Activity: {} {sampled}allocations ({}), {} {sampled}frees, {} mmap, {} munmap, {} mremap, {} brk",
        a.allocs,
        bytes(a.alloc_bytes),
        a.frees,
        a.mmaps,
        a.munmaps,
        a.mremaps,
        a.brks
    );
    {
        let st = &r.stacks;
        let tables = st.tables.as_ref().map_or(String::new(), |t| {
            let mut x = format!(
                " from the unwind tables of {} objects ({} rows, {} KiB, built in {:.0} ms)",
                t.objects,
                t.rows,
                t.table_bytes / 1024,
                t.build_ms
            );
            if !t.without_tables.is_empty() {
                x.push_str(&format!(
                    "; frame pointers in {} mappings without tables",
                    t.without_tables.len()
                ));
            }
            if !t.loaded_after_attach.is_empty() {
                x.push_str(&format!(
                    "; loaded after attach: {}",
                    t.loaded_after_attach.join(", ")
                ));
            }
            x
        });
        if st.unwinder != "off" {
            let _ = writeln!(
                o,
                "Stacks: unwound with {}{tables}. {:.1}% of live heap bytes sit on stacks that reach their outermost frame ({} complete, {} truncated).",
                if st.unwinder == "cfi" {
                    "CFI"
                } else {
                    "frame pointers"
                },
                st.complete_pct,
                st.complete_stacks,
                st.truncated_stacks
            );
        }
    }
    if let Some(p) = &r.python {
        match &p.unavailable {
            None => {
                let _ = writeln!(
                    o,
                    "CPython {} ({}): Python frames on. {}",
                    p.version, p.object, p.note
                );
            }
            Some(why) => {
                let _ = writeln!(
                    o,
                    "CPython {} ({}): no Python frames: {why}. {}",
                    p.version, p.object, p.note
                );
            }
        }
    }
    o.push('\n');
    render_verdict(&mut o, &r.verdict, max_frames);
    o.push('\n');
    if r.heap.stacks.is_empty() {
        o.push_str("No outstanding heap allocations since attach.\n");
    } else {
        let _ = writeln!(
            o,
            "Top {} stacks by outstanding heap bytes:",
            r.heap.stacks.len()
        );
        for (n, s) in r.heap.stacks.iter().enumerate() {
            let growth = s.growth.map_or(String::new(), |g| {
                let rate = if g.bytes_per_s >= 0.0 {
                    format!("+{}/s", bytes(g.bytes_per_s.round() as u64))
                } else {
                    format!("-{}/s", bytes((-g.bytes_per_s).round() as u64))
                };
                let down = (1.0 - g.steadiness) * 100.0;
                if down < 0.5 {
                    format!(", {rate} over {} samples, never shrank", g.points)
                } else {
                    format!(
                        ", {rate} over {} samples, shrank in {down:.0}% of steps",
                        g.points
                    )
                }
            });
            if r.heap.sample_rate_bytes == 0 {
                let _ = writeln!(
                    o,
                    "  #{} {} in {} blocks, oldest {:.1} s{growth}",
                    n + 1,
                    bytes(s.live_bytes),
                    s.live_allocations,
                    s.oldest_age_s
                );
            } else {
                let _ = writeln!(
                    o,
                    "  #{} ~{} ± {} in ~{} blocks ({} sampled), oldest {:.1} s{growth}",
                    n + 1,
                    bytes(s.live_bytes),
                    bytes(s.live_bytes_error95),
                    s.live_allocations,
                    s.samples,
                    s.oldest_age_s
                );
            }
            write_frames(&mut o, s.stack_id, &s.frames, s.truncated, max_frames);
        }
    }
    if !r.mappings.stacks.is_empty() {
        o.push('\n');
        let _ = writeln!(
            o,
            "Top {} stacks by mapped bytes (anonymous mmap, brk):",
            r.mappings.stacks.len()
        );
        for (n, s) in r.mappings.stacks.iter().enumerate() {
            let _ = writeln!(
                o,
                "  #{} {} mapped, oldest {:.1} s",
                n + 1,
                bytes(s.mapped_bytes),
                s.oldest_age_s
            );
            write_frames(&mut o, s.stack_id, &s.frames, s.truncated, max_frames);
        }
    }
    render_allocator(&mut o, &r.allocator);
    if let Some(d) = &r.heap_detached {
        let _ = writeln!(
            o,
            "\nHEAP PROBES DETACHED after {:.1} s: {}. Heap figures are as of then; mappings are still traced.",
            d.after_s, d.reason
        );
    }
    if let Some(ov) = &r.overhead {
        let calls: f64 = ov.calls_per_s.values().sum();
        let measured = ov.bpf_us_per_call.map_or(String::new(), |u| {
            format!(
                " (traps as modelled, plus {u:.2} µs of BPF work per call measured by the kernel)"
            )
        });
        let _ = writeln!(
            o,
            "\nProbe cost (projected): {:.1}% of the target's CPU time at {:.0} allocator calls/s{measured}.",
            ov.projected_pct, calls
        );
    }
    o.push('\n');
    let nonzero: Vec<String> = r
        .lost
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if nonzero.is_empty() {
        o.push_str("Losses: none — every event was accounted.\n");
    } else {
        let _ = writeln!(
            o,
            "LOSSES: {} — this report is built on incomplete data ({} events or stacks lost).",
            nonzero.join(", "),
            r.lost_total
        );
    }
    let c = &r.counters;
    let _ = writeln!(
        o,
        "Not losses: {} frees of blocks not allocated since attach, {} reallocs of such blocks, {} failed allocations, {} nested allocator calls, {} truncated stacks.",
        c.get("free_unknown").unwrap_or(&0),
        c.get("realloc_unknown").unwrap_or(&0),
        c.get("failed_allocs").unwrap_or(&0),
        c.get("nested_call").unwrap_or(&0),
        c.get("stack_truncated").unwrap_or(&0)
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(function: &str, file: &str, line: u32, module: &str, inlined: bool) -> Frame {
        Frame {
            function: Some(function.into()),
            file: Some(file.into()),
            line: Some(line),
            module: Some(module.into()),
            kind: "native",
            address: "0x1234".into(),
            inlined,
        }
    }

    fn sample() -> Report {
        let mut lost: std::collections::BTreeMap<String, u64> = counter::NAMES
            .iter()
            .enumerate()
            .filter(|(i, _)| counter::is_loss(*i as u32))
            .map(|(_, n)| ((*n).to_owned(), 0))
            .collect();
        lost.insert("ringbuf_full".into(), 12);
        let counters = [
            ("free_unknown", 3),
            ("realloc_unknown", 0),
            ("failed_allocs", 1),
            ("nested_call", 2),
            ("stack_truncated", 0),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        Report {
            pid: 4242,
            duration_s: 5.0,
            rss_bytes: 10 << 20,
            rss: Rss { rss_bytes: 10 << 20, anon_bytes: 6 << 20, file_bytes: 4 << 20, shmem_bytes: 0 },
            final_report: true,
            end_reason: Some("duration elapsed".into()),
            target_exited: false,
            heap: Heap {
                live_bytes: 819_200 + 112_000,
                live_allocations: 2200,
                live_bytes_error95: 0,
                sample_rate_bytes: 0,
                stacks: vec![
                    HeapStack {
                        live_bytes: 819_200,
                        live_allocations: 200,
                        samples: 200,
                        live_bytes_error95: 0,
                        oldest_age_s: 4.96,
                        growth: Some(Growth { bytes_per_s: 163_840.0, steadiness: 1.0, points: 20 }),
                        stack_id: 1,
                        truncated: false,
                        frames: vec![
                            frame("make_buffer", "/src/leaky.c", 20, "/usr/bin/leaky", true),
                            frame("handle_error", "/src/leaky.c", 21, "/usr/bin/leaky", false),
                            frame("main", "/src/leaky.c", 59, "/usr/bin/leaky", false),
                        ],
                    },
                    HeapStack { live_bytes: 112_000, live_allocations: 2000, samples: 2000, live_bytes_error95: 0, oldest_age_s: 0.5, growth: None, stack_id: -14, truncated: false, frames: vec![] },
                ],
            },
            mappings: Mappings {
                anon_mapped_bytes: 1 << 20,
                brk_bytes: 135_168,
                brk_grown_bytes: 0,
                split: crate::ledger::AnonSplit::default(),
                arenas: vec![],
                stacks: vec![MapStack {
                    mapped_bytes: 1 << 20,
                    oldest_age_s: 2.0,
                    stack_id: 7,
                    truncated: true,
                    frames: vec![Frame { function: None, file: None, line: None, module: None, kind: "native", address: "0xdead".into(), inlined: false }],
                }],
            },
            lost_total: 12,
            lost,
            counters,
            activity: Activity { allocs: 8201, alloc_bytes: 35_481_186, frees: 4000, mmaps: 8, munmaps: 1, ..Activity::default() },
            probes: vec![],
            overhead: None,
            heap_detached: None,
            verdict: Verdict {
                kind: "leak",
                summary: "Leak: the live heap grew 800.0 KiB over 5.0 s (100% of the RSS growth of 800.0 KiB) and is still growing. Top suspect: make_buffer at +160.0 KiB/s, 800.0 KiB outstanding, none of its 200 blocks freed.".into(),
                evidence: vec![crate::verdict::Evidence { metric: "rss_anon_growth_bytes", value: 819_200.0, text: "anonymous RSS +800.0 KiB over 5.0 s".into() }],
                suspects: vec![],
                remedies: vec![],
            },
            allocator: Allocator {
                glibc_heaps: Some(GlibcHeaps {
                    in_use_bytes: 900 << 10,
                    free_bytes: 5 << 20,
                    free_resident_bytes: 4 << 20,
                    trimmable_bytes: 3 << 20,
                    resident_bytes: 6 << 20,
                    arenas: vec![
                        WalkedArena {
                            stats: ArenaStats { kind: "main", arena: "brk heap".into(), heaps: vec!["0x5555000".into()], extent_bytes: 1 << 20, resident_bytes: 1 << 20, in_use_bytes: 800 << 10, ..ArenaStats::default() },
                            created_by_thread: None, created_by_thread_name: None, created_by_stack: None, frames: vec![],
                        },
                        WalkedArena {
                            stats: ArenaStats { kind: "thread", arena: "0x7f0000000030".into(), heaps: vec!["0x7f0000000000".into()], extent_bytes: 5 << 20, resident_bytes: 5 << 20, in_use_bytes: 100 << 10, free_resident_bytes: 4 << 20, trimmable_bytes: 3 << 20, ..ArenaStats::default() },
                            created_by_thread: Some(4243), created_by_thread_name: Some("worker".into()), created_by_stack: Some(1),
                            frames: vec![frame("make_buffer", "/src/leaky.c", 20, "/usr/bin/leaky", false)],
                        },
                    ],
                    unwalkable: vec![],
                }),
                arena_limit: Some(ArenaLimit { limit: 16, source: "glibc default: 8 × 2 CPUs".into() }),
                environment: vec![],
                mmap_threshold_raised_to: None,
            },
            python: None,
            stacks: StackInfo {
                unwinder: "cfi".into(),
                complete_pct: 87.97,
                complete_stacks: 2,
                truncated_stacks: 1,
                tables: Some(crate::unwind::UnwindStats {
                    objects: 3,
                    rows: 29_873,
                    table_bytes: 242_000,
                    build_ms: 31.0,
                    ..Default::default()
                }),
                copy_would_fit: vec![(8, 60.0), (16, 87.97), (32, 87.97), (64, 87.97)],
            },
            timeline: vec![],
        }
    }

    /// The text report renders totals, stacks innermost first, and a loud loss line.
    #[test]
    fn renders_text_report() {
        let got = render_text(&sample(), 16);
        if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
            std::fs::write(
                concat!(env!("CARGO_MANIFEST_DIR"), "/src/testdata/report.txt"),
                &got,
            )
            .expect("write snapshot");
        }
        let want = include_str!("testdata/report.txt");
        assert_eq!(got, want, "rendered:\n{got}");
    }

    /// The JSON report carries the contract's keys with the documented nesting.
    #[test]
    fn serializes_json_contract() {
        let v = serde_json::to_value(sample()).expect("serializes");
        assert_eq!(v["pid"], 4242);
        assert_eq!(v["duration_s"], 5.0);
        assert_eq!(v["rss_bytes"], 10 << 20);
        assert_eq!(v["heap"]["live_bytes"], 931_200);
        assert_eq!(
            v["heap"]["stacks"][0]["frames"][0]["function"],
            "make_buffer"
        );
        assert_eq!(v["heap"]["stacks"][0]["frames"][0]["kind"], "native");
        assert_eq!(v["heap"]["stacks"][0]["frames"][0]["line"], 20);
        assert_eq!(v["mappings"]["stacks"][0]["mapped_bytes"], 1 << 20);
        assert_eq!(
            v["mappings"]["stacks"][0]["frames"][0]["function"],
            serde_json::Value::Null
        );
        assert_eq!(v["lost"]["ringbuf_full"], 12);
        assert_eq!(v["mappings"]["brk_bytes"], 135_168);
    }

    /// Byte counts use binary units with one decimal.
    #[test]
    fn formats_bytes() {
        let cases = [
            (0, "0 B"),
            (1023, "1023 B"),
            (1024, "1.0 KiB"),
            (819_200, "800.0 KiB"),
            (10 << 20, "10.0 MiB"),
            (3 << 30, "3.0 GiB"),
        ];
        for (n, want) in cases {
            assert_eq!(bytes(n), want);
        }
    }
}
