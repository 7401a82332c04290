//! Reports: a serializable snapshot of the books, and its text rendering.
//!
//! The JSON shape is a stable contract (see README): fields are only added.

use std::fmt::Write as _;

use leaktrace_common::counter;
use serde::Serialize;

use crate::{
    ledger::{Activity, Ledger, UserCounters},
    procfs::Rss,
    symbols::{Frame, Symbols},
    timeline::{Growth, Point, Timeline},
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
    /// Frames, innermost first.
    pub frames: Vec<Frame>,
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
    /// Projected CPU seconds per second added by tracing every call.
    pub projected_cpu_per_s: f64,
    /// CPU seconds per second the kernel charged the target (traps included).
    pub target_cpu_per_s: f64,
    /// The projected cost as a percentage of the target's own CPU time.
    pub projected_pct: f64,
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
    let mut heap: Vec<_> = i
        .ledger
        .heap_by_stack()
        .iter()
        .map(|(&id, t)| (id, *t))
        .collect();
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
                    .map(|(start, reserved, committed, id)| ArenaInfo {
                        address: format!("{start:#x}"),
                        reserved_bytes: reserved,
                        committed_bytes: committed,
                        stack_id: id,
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
        timeline: i.timeline.points().to_vec(),
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
    if let Some(d) = &r.heap_detached {
        let _ = writeln!(
            o,
            "\nHEAP PROBES DETACHED after {:.1} s: {}. Heap figures are as of then; mappings are still traced.",
            d.after_s, d.reason
        );
    }
    if let Some(ov) = &r.overhead {
        let calls: f64 = ov.calls_per_s.values().sum();
        let _ = writeln!(
            o,
            "\nProbe cost (projected): {:.1}% of the target's CPU time at {:.0} allocator calls/s.",
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
            rss: Rss {
                rss_bytes: 10 << 20,
                anon_bytes: 6 << 20,
                file_bytes: 4 << 20,
                shmem_bytes: 0,
            },
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
                        growth: Some(Growth {
                            bytes_per_s: 163_840.0,
                            steadiness: 1.0,
                            points: 20,
                        }),
                        stack_id: 1,
                        truncated: false,
                        frames: vec![
                            frame("make_buffer", "/src/leaky.c", 20, "/usr/bin/leaky", true),
                            frame("handle_error", "/src/leaky.c", 21, "/usr/bin/leaky", false),
                            frame("main", "/src/leaky.c", 59, "/usr/bin/leaky", false),
                        ],
                    },
                    HeapStack {
                        live_bytes: 112_000,
                        live_allocations: 2000,
                        samples: 2000,
                        live_bytes_error95: 0,
                        oldest_age_s: 0.5,
                        growth: None,
                        stack_id: -14,
                        truncated: false,
                        frames: vec![],
                    },
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
                    frames: vec![Frame {
                        function: None,
                        file: None,
                        line: None,
                        module: None,
                        kind: "native",
                        address: "0xdead".into(),
                        inlined: false,
                    }],
                }],
            },
            lost_total: 12,
            lost,
            counters,
            activity: Activity {
                allocs: 8201,
                alloc_bytes: 35_481_186,
                frees: 4000,
                mmaps: 8,
                munmaps: 1,
                ..Activity::default()
            },
            probes: vec![],
            overhead: None,
            heap_detached: None,
            timeline: vec![],
        }
    }

    /// The text report renders totals, stacks innermost first, and a loud loss line.
    #[test]
    fn renders_text_report() {
        let got = render_text(&sample(), 16);
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
