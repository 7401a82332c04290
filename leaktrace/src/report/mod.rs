//! Reports: the model (this file, serialized as the JSON document), how it is
//! built ([`build`]) and its text rendering ([`text`]).
//!
//! The JSON shape is a stable contract (see README): fields are only added.

mod build;
pub mod diff;
pub mod pprof;
mod text;

use serde::{Deserialize, Serialize};

pub use build::{Inputs, build};
pub use text::{Frames, render_dry_run, render_text};

pub use crate::probes::{
    attach::{ProbeInfo, ReturnProbe},
    meter::{HeapDetached, Overhead, ProgramCost},
};
use crate::{
    accounting::{
        ledger::Activity,
        timeline::{Growth, Point},
    },
    analysis::{memory::MemoryMap, verdict::Verdict},
    heap::glibc::{ArenaLimit, ArenaStats, Unwalkable},
    heap::pymalloc::PymallocWalk,
    process::procfs::Rss,
    symbolize::Frame,
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
    /// Blocks it allocated since attach, freed or not (estimated when sampling).
    pub allocations: u64,
    /// Bytes it allocated since attach, freed or not (estimated when sampling).
    pub allocated_bytes: u64,
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

/// Who keeps the heap alive, from two conservative scans of the target's memory.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Reachability {
    /// Blocks no pointer reaches, in both scans.
    pub unreferenced: Unreferenced,
    /// The roots holding the most of the rest.
    pub held_by: Vec<crate::heap::reach::HeldBy>,
    /// How the scans went.
    pub scan: crate::heap::reach::ScanStats,
}

/// Blocks nothing points to.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Unreferenced {
    /// How many, and their bytes (usable sizes).
    pub blocks: u64,
    /// Their bytes.
    pub bytes: u64,
    /// How many of them were listed and grouped (at most 100,000, by address).
    pub listed: u64,
    /// Grouped by the stack that allocated them where that was seen (since attach),
    /// else by size; largest first.
    pub groups: Vec<UnreferencedGroup>,
}

/// Unreferenced blocks of one allocation stack, or of one size.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UnreferencedGroup {
    /// How many, and their bytes.
    pub blocks: u64,
    /// Their bytes (requested sizes where the allocation was seen, else usable).
    pub bytes: u64,
    /// The allocating stack (blocks allocated since attach), else null.
    pub stack_id: Option<i64>,
    /// Its frames (empty for blocks from before attach).
    pub frames: Vec<Frame>,
    /// The blocks' usable size, for blocks from before attach (grouped by it).
    pub size: Option<u64>,
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
    /// Live blocks right above its largest free chunks, which keep that memory from
    /// being returned as the heap shrinks, most held first.
    pub pinned_by: Vec<PinnedBy>,
}

/// A live block that keeps free memory below it in its heap.
#[derive(Clone, Debug, Serialize)]
pub struct PinnedBy {
    /// Its address (the user pointer).
    pub address: String,
    /// Resident free bytes it holds below it.
    pub bytes_held: u64,
    /// The block's size (requested size when allocated since attach, else its chunk's).
    pub block_bytes: u64,
    /// Allocated since attach (its stack is known).
    pub since_attach: bool,
    /// Allocation stack id, when allocated since attach.
    pub stack_id: Option<i64>,
    /// Its frames, innermost first.
    pub frames: Vec<Frame>,
}

/// The allocator as seen from outside: glibc's heaps walked through /proc/PID/mem.
#[derive(Clone, Debug, Serialize)]
pub struct Allocator {
    /// The allocators found in the target's objects (and a Go runtime): which object,
    /// which version, whether it serves `malloc`, how many probes it got.
    pub found: Vec<crate::probes::allocators::Found>,
    /// What is traced and what is not read, given those allocators.
    pub notes: Vec<String>,
    /// Arenas walked (main first), with totals; null when the target has no glibc heap to walk or has exited.
    pub glibc_heaps: Option<GlibcHeaps>,
    /// glibc's arena limit for the target.
    pub arena_limit: Option<ArenaLimit>,
    /// malloc settings in the target's environment.
    pub environment: Vec<String>,
    /// glibc raised its dynamic mmap threshold to this after freeing an mmapped chunk.
    pub mmap_threshold_raised_to: Option<u64>,
    /// CPython's small-object arenas walked from outside; null when the target is not
    /// CPython (or its version's layout is unknown).
    pub pymalloc: Option<PymallocWalk>,
    /// Other allocators' own state, read from outside where their layout is known
    /// (jemalloc's arenas), and why not for the others.
    pub state: crate::heap::OtherState,
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

/// How native stacks are unwound.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Unwinder {
    /// No stacks (`--no-stacks`).
    #[default]
    #[serde(rename = "off")]
    Off,
    /// Unwind tables, frame pointers only where no table exists (the default).
    #[serde(rename = "cfi")]
    Cfi,
    /// Frame pointers only (`--unwind fp`).
    #[serde(rename = "frame-pointers")]
    FramePointers,
    /// Benchmark only: stack copies for a userspace unwinder, no stacks.
    #[serde(rename = "stack-copy (benchmark)")]
    StackCopy,
}

/// How call stacks were unwound, and how many reached their outermost frame.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StackInfo {
    /// The unwinder.
    pub unwinder: Unwinder,
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
    /// Objects in which some of the stacks' addresses had no symbol (frames shown
    /// as `??`), with what finds their debug information.
    pub unnamed_objects: Vec<crate::symbolize::native::Unnamed>,
}

/// The target's CPython interpreter.
#[derive(Clone, Debug, Serialize, Deserialize)]
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
    /// Python frames left unnamed because their code object had been freed and
    /// another (with another name) made at its address before it was read. Absent
    /// when 0.
    #[serde(default, skip_serializing_if = "crate::units::is_zero")]
    pub frames_replaced: u64,
    /// The cyclic garbage collector, read from outside (final reports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gc: Option<crate::heap::pygc::PyGc>,
    /// Why the collector was not read, when it was looked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gc_not_read: Option<String>,
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
    /// Sampled mode's duty cycle, when the heap probes were attached only for windows
    /// (null: attached all the time).
    pub duty_cycle: Option<DutyReport>,
    /// Why the heap was not traced (null: it was): no allocator leaktrace recognizes
    /// (a static binary, an unknown allocator); mappings, brk and RSS still are.
    pub not_traced: Option<String>,
    /// Stacks by outstanding bytes, largest first.
    pub stacks: Vec<HeapStack>,
    /// Stacks with outstanding blocks, listed or not (`stacks` keeps `--top` of them).
    pub stacks_total: u64,
}

/// How sampled mode's duty cycle went: the heap probes were attached for one window
/// at a random moment of each second, as often as the cost budget allowed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DutyReport {
    /// The budget, percent of the target's own CPU time.
    pub budget_pct: f64,
    /// Share of the traced time the heap probes were attached.
    pub attached_share: f64,
    /// Windows opened.
    pub windows: u64,
    /// Share of each period attached now (1/slots).
    pub duty_now: f64,
    /// The probes' cost while attached, percent of the target's own CPU time, as last
    /// measured.
    pub cost_when_attached_pct: Option<f64>,
    /// Whether the free-like probes stayed attached between windows (every free seen:
    /// a recorded block is live until its free) or came and went with them (a block
    /// freed between windows is counted until its address is handed out again in a
    /// window, or its memory unmapped: estimates lean high).
    pub frees_always_attached: bool,
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
    pub split: crate::accounting::ledger::AnonSplit,
    /// Arena reservations made since attach, most committed first.
    pub arenas: Vec<ArenaInfo>,
    /// Stacks by mapped bytes, largest first.
    pub stacks: Vec<MapStack>,
}

/// What a report states of the run besides the books and the worker's snapshot, taken
/// once per report (and recorded with it in a capture).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunFacts {
    /// The traced process.
    pub pid: u32,
    /// The kernel's counters, indexed by `counter::*`.
    pub kernel_counters: Vec<u64>,
    /// The target's RSS, last sampled.
    pub rss: Rss,
    /// Seconds traced.
    pub duration_s: f64,
    /// CLOCK_MONOTONIC when the report was made (ages are measured to it).
    pub now_ns: u64,
    /// The report at the end of the run.
    pub final_report: bool,
    /// Why the run ended.
    pub end_reason: Option<String>,
    /// The target is gone.
    pub target_exited: bool,
    /// The probes attached.
    pub probes: Vec<ProbeInfo>,
    /// The allocators found, the one serving `malloc` marked.
    pub allocators: Vec<crate::probes::allocators::Found>,
    /// The probes' cost.
    pub overhead: Option<Overhead>,
    /// Why and when the heap probes were detached by the overhead budget.
    pub heap_detached: Option<HeapDetached>,
    /// Sampled mode's duty cycle.
    pub duty: Option<DutyReport>,
    /// Why the heap is not traced at all.
    pub heap_not_traced: Option<String>,
    /// `--min-age`, in seconds.
    pub min_age_s: f64,
    /// How stacks were captured.
    pub unwinder: Unwinder,
    /// The target's execs while traced.
    pub execs: Vec<ExecNote>,
}

impl RunFacts {
    /// Facts of a run nothing is known of but its pid (a capture cut before any).
    pub fn unknown(pid: u32) -> Self {
        Self {
            pid,
            kernel_counters: Vec::new(),
            rss: Rss::default(),
            duration_s: 0.0,
            now_ns: 0,
            final_report: true,
            end_reason: None,
            target_exited: false,
            probes: Vec::new(),
            allocators: Vec::new(),
            overhead: None,
            heap_detached: None,
            duty: None,
            heap_not_traced: None,
            min_age_s: 0.0,
            unwinder: Unwinder::default(),
            execs: Vec::new(),
        }
    }
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
    /// Where RSS goes: every resident byte classified from the target's state,
    /// allocated before attach or since (empty until the target could be read).
    pub memory: MemoryMap,
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
    /// The live heap by type, read from outside: Python objects in a CPython whose
    /// object layout is known, C++ objects by vtable in a program mapping libstdc++ or
    /// libc++; null otherwise (and with --no-census).
    pub census: Option<crate::heap::census::Census>,
    /// Who keeps the heap alive: what nothing points to, and the roots holding the
    /// rest (the final report's, where glibc serves malloc; null otherwise).
    pub reachability: Option<Reachability>,
    /// The CPython interpreter, when the target is one.
    pub python: Option<PythonInfo>,
    /// How stacks were unwound.
    pub stacks: StackInfo,
    /// Totals sampled every 250 ms (thinned to at most 2048 points).
    pub timeline: Vec<Point>,
    /// The target's descendants, with `--follow-forks` (null otherwise).
    pub follow: Option<Followed>,
    /// Each exec of the target while traced (a launched command's own start is not
    /// one): its books, mappings and samples restarted there; the report is the new
    /// program's.
    pub execs: Vec<ExecNote>,
}

/// An exec of the traced process.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExecNote {
    /// Seconds after the start of tracing.
    pub at_s: f64,
    /// The program it runs since.
    pub program: String,
}

/// The followed descendants (`--follow-forks`).
#[derive(Clone, Debug, Serialize)]
pub struct Followed {
    /// Each followed process, in pid order.
    pub processes: Vec<FollowedProcess>,
    /// Descendants found at attach that run another program: not followed.
    pub not_followed: Vec<NotFollowed>,
    /// The target and its followed descendants together.
    pub totals: FamilyTotals,
}

/// One followed descendant: its own books, verdict and stacks.
#[derive(Clone, Debug, Serialize)]
pub struct FollowedProcess {
    /// Its pid.
    pub pid: u32,
    /// Its parent.
    pub parent: u32,
    /// Its command line, as first seen.
    pub command: String,
    /// Whether it was forked while traced (false: found at attach).
    pub forked_while_traced: bool,
    /// Seconds after the start of tracing when it was first followed.
    pub since_s: f64,
    /// Seconds it was followed.
    pub followed_s: f64,
    /// How it stopped being followed ("exited", "exec'd another program (…)"), or null.
    pub ended: Option<String>,
    /// Why its heap probes could not be attached, or null.
    pub attach_error: Option<String>,
    /// Its RSS, last read while it lived.
    pub rss: Rss,
    /// Its heap since it was followed (stacks by outstanding bytes).
    pub heap: Heap,
    /// Its address-space activity.
    pub mappings: Mappings,
    /// Its calls and syscalls.
    pub activity: Activity,
    /// Its own verdict, from its own RSS and heap over the time it was followed.
    pub verdict: Verdict,
    /// What its books lost (events that could not be applied), by cause; also in
    /// the report's `lost`, which counts the whole family.
    pub lost: std::collections::BTreeMap<String, u64>,
}

/// A descendant found at attach that was not followed.
#[derive(Clone, Debug, Serialize)]
pub struct NotFollowed {
    /// Its pid.
    pub pid: u32,
    /// The program it runs (another than the target's).
    pub program: String,
}

/// The family's figures summed.
#[derive(Clone, Debug, Serialize)]
pub struct FamilyTotals {
    /// The target and every process followed.
    pub processes: usize,
    /// Of which still alive (the ones that exited or exec'd are not).
    pub alive: usize,
    /// Outstanding heap bytes allocated while traced, in the processes alive.
    pub live_bytes: u64,
    /// Outstanding blocks, likewise.
    pub live_allocations: u64,
    /// RSS summed over the live ones (pages shared between a parent and its forked
    /// children are counted in each).
    pub rss_bytes: u64,
    /// Anonymous RSS summed likewise.
    pub anon_rss_bytes: u64,
}

#[cfg(test)]
mod tests {
    use leaktrace_common::counter;

    use super::*;
    use crate::{
        analysis::verdict::VerdictKind, heap::glibc::ArenaKind, symbolize::FrameKind, units::bytes,
    };

    fn frame(function: &str, file: &str, line: u32, module: &str, inlined: bool) -> Frame {
        Frame {
            function: Some(function.into()),
            file: Some(file.into()),
            line: Some(line),
            module: Some(module.into()),
            kind: FrameKind::Native,
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
        let mut r = Report {
            pid: 4242,
            duration_s: 5.0,
            rss_bytes: 10 << 20,
            rss: Rss { rss_bytes: 10 << 20, anon_bytes: 6 << 20, file_bytes: 4 << 20, shmem_bytes: 0 },
            memory: MemoryMap::default(),
            final_report: true,
            end_reason: Some("duration elapsed".into()),
            target_exited: false,
            heap: Heap {
                live_bytes: 819_200 + 112_000,
                live_allocations: 2200,
                live_bytes_error95: 0,
                sample_rate_bytes: 0,
                duty_cycle: None,
                not_traced: None,
                stacks: vec![
                    HeapStack {
                        live_bytes: 819_200,
                        live_allocations: 200,
                        samples: 200,
                        live_bytes_error95: 0,
                        oldest_age_s: 4.96,
                        allocations: 260,
                        allocated_bytes: 1_064_960,
                        growth: Some(Growth { bytes_per_s: 163_840.0, steadiness: 1.0, points: 20 }),
                        stack_id: 1,
                        truncated: false,
                        frames: vec![
                            frame("make_buffer", "/src/leaky.c", 20, "/usr/bin/leaky", true),
                            frame("handle_error", "/src/leaky.c", 21, "/usr/bin/leaky", false),
                            frame("main", "/src/leaky.c", 59, "/usr/bin/leaky", false),
                        ],
                    },
                    HeapStack { live_bytes: 112_000, live_allocations: 2000, samples: 2000, live_bytes_error95: 0, oldest_age_s: 0.5, allocations: 2000, allocated_bytes: 112_000, growth: None, stack_id: -14, truncated: false, frames: vec![] },
                ],
                stacks_total: 2,
            },
            mappings: Mappings {
                anon_mapped_bytes: 1 << 20,
                brk_bytes: 135_168,
                brk_grown_bytes: 0,
                split: crate::accounting::ledger::AnonSplit::default(),
                arenas: vec![],
                stacks: vec![MapStack {
                    mapped_bytes: 1 << 20,
                    oldest_age_s: 2.0,
                    stack_id: 7,
                    truncated: true,
                    frames: vec![Frame { function: None, file: None, line: None, module: None, kind: FrameKind::Native, address: "0xdead".into(), inlined: false }],
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
                trend: None,
                secondary: Vec::new(),
                kind: VerdictKind::Leak,
                summary: "Leak: the live heap grew 800.0 KiB over 5.0 s (100% of the RSS growth of 800.0 KiB) and is still growing. Top suspect: make_buffer at +160.0 KiB/s, 800.0 KiB outstanding, none of its 200 blocks freed.".into(),
                evidence: vec![crate::analysis::verdict::Evidence { metric: "rss_anon_growth_bytes", value: 819_200.0, text: "anonymous RSS +800.0 KiB over 5.0 s".into() }],
                suspects: vec![],
                remedies: vec![],
            },
            allocator: Allocator {
                found: vec![crate::probes::allocators::Found {
                    allocator: crate::probes::allocators::Allocator::Glibc,
                    version: Some("2.36".into()),
                    object: "/usr/lib/x86_64-linux-gnu/libc.so.6".into(),
                    prefix: String::new(),
                    defines_malloc: true,
                    serves_malloc: true,
                    probes: 9,
                }],
                notes: Vec::new(),
                state: crate::heap::OtherState::default(),
                glibc_heaps: Some(GlibcHeaps {
                    in_use_bytes: 900 << 10,
                    free_bytes: 5 << 20,
                    free_resident_bytes: 4 << 20,
                    trimmable_bytes: 3 << 20,
                    resident_bytes: 6 << 20,
                    arenas: vec![
                        WalkedArena {
                            pinned_by: vec![],
                            stats: ArenaStats { kind: ArenaKind::Main, arena: "brk heap".into(), heaps: vec!["0x5555000".into()], extent_bytes: 1 << 20, resident_bytes: 1 << 20, in_use_bytes: 800 << 10, ..ArenaStats::default() },
                            created_by_thread: None, created_by_thread_name: None, created_by_stack: None, frames: vec![],
                        },
                        WalkedArena {
                            pinned_by: vec![],
                            stats: ArenaStats { kind: ArenaKind::Thread, arena: "0x7f0000000030".into(), heaps: vec!["0x7f0000000000".into()], extent_bytes: 5 << 20, resident_bytes: 5 << 20, in_use_bytes: 100 << 10, free_resident_bytes: 4 << 20, trimmable_bytes: 3 << 20, ..ArenaStats::default() },
                            created_by_thread: Some(4243), created_by_thread_name: Some("worker".into()), created_by_stack: Some(1),
                            frames: vec![frame("make_buffer", "/src/leaky.c", 20, "/usr/bin/leaky", false)],
                        },
                    ],
                    unwalkable: vec![],
                }),
                arena_limit: Some(ArenaLimit { limit: 16, source: "glibc default: 8 × 2 CPUs".into() }),
                environment: vec![],
                mmap_threshold_raised_to: None,
                pymalloc: None,
            },
            census: Some({
                let mut c = crate::heap::census::Census {
                    kind: "python".into(),
                    objects: 61_000,
                    attributed_bytes: 4 << 20,
                    heap_in_use_bytes: 5 << 20,
                    walk_ms: 41.0,
                    at_s: 5.0,
                    all: [
                        ("Order".to_owned(), (50_000, 3_200_000)),
                        ("Session".to_owned(), (10_000, 480_000)),
                        ("dict".to_owned(), (1_000, 512_000)),
                    ]
                    .into_iter()
                    .collect(),
                    ..Default::default()
                };
                let first = crate::heap::census::Census {
                    kind: "python".into(),
                    all: [
                        ("Order".to_owned(), (30_000, 1_920_000)),
                        ("Session".to_owned(), (10_000, 480_000)),
                        ("dict".to_owned(), (1_100, 560_000)),
                    ]
                    .into_iter()
                    .collect(),
                    ..Default::default()
                };
                c.rank(Some(&first));
                c
            }),
            reachability: Some(Reachability {
                unreferenced: Unreferenced {
                    blocks: 1012,
                    bytes: 980_384,
                    listed: 1012,
                    groups: vec![
                        UnreferencedGroup {
                            blocks: 1000,
                            bytes: 980_000,
                            stack_id: Some(3),
                            frames: vec![frame("parse_header", "/src/server.c", 88, "/usr/bin/server", false)],
                            size: None,
                        },
                        UnreferencedGroup { blocks: 12, bytes: 384, stack_id: None, frames: vec![], size: Some(32) },
                    ],
                },
                held_by: vec![
                    crate::heap::reach::HeldBy {
                        root: "request_cache in server".into(),
                        kind: crate::heap::reach::RootKind::Data,
                        blocks: 2000,
                        bytes: 991_232,
                    },
                    crate::heap::reach::HeldBy {
                        root: "thread 4243's stack".into(),
                        kind: crate::heap::reach::RootKind::Stack,
                        blocks: 3,
                        bytes: 4096,
                    },
                ],
                scan: crate::heap::reach::ScanStats {
                    bytes_scanned: 25 << 20,
                    ms: 48,
                    passes: 2,
                    stopped_ms: 0,
                    blocks: 5200,
                    roots: 31,
                    incomplete: None,
                },
            }),
            python: None,
            stacks: StackInfo {
                unwinder: Unwinder::Cfi,
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
                unnamed_objects: vec![crate::symbolize::native::Unnamed {
                    object: "/usr/bin/redis-check-rdb".into(),
                    run_as: Some("/usr/bin/redis-server".into()),
                    build_id: Some("a50d6825e71f1473372299161f75fe50e80452de".into()),
                    package: Some("redis-tools".into()),
                    unnamed_addresses: 5,
                    named_addresses: 75,
                }],
            },
            timeline: vec![],
            follow: None,
            execs: Vec::new(),
        };
        // One worker forked while traced, one that exited, one not followed.
        let worker = |pid: u32, ended: Option<&str>| FollowedProcess {
            pid,
            parent: 4242,
            command: "server: worker".into(),
            forked_while_traced: pid != 4243,
            since_s: if pid == 4243 { 0.0 } else { 1.5 },
            followed_s: 3.5,
            ended: ended.map(Into::into),
            attach_error: None,
            rss: Rss {
                rss_bytes: 4 << 20,
                anon_bytes: 1 << 20,
                ..Rss::default()
            },
            heap: Heap {
                stacks: r.heap.stacks[..1].to_vec(),
                ..r.heap.clone()
            },
            mappings: r.mappings.clone(),
            activity: r.activity,
            verdict: r.verdict.clone(),
            lost: Default::default(),
        };
        r.follow = Some(Followed {
            processes: vec![worker(4243, None), worker(4250, Some("exited"))],
            not_followed: vec![NotFollowed {
                pid: 4244,
                program: "/usr/bin/logger".into(),
            }],
            totals: FamilyTotals {
                processes: 3,
                alive: 2,
                live_bytes: 2 * r.heap.live_bytes,
                live_allocations: 2 * r.heap.live_allocations,
                rss_bytes: r.rss.rss_bytes + (4 << 20),
                anon_rss_bytes: r.rss.anon_bytes + (1 << 20),
            },
        });
        r
    }

    /// The text report renders totals, stacks innermost first, and a loud loss line.
    #[test]
    fn renders_text_report() {
        let got = render_text(
            &sample(),
            Frames {
                max: 16,
                fold_python: true,
            },
        );
        if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
            std::fs::write(
                concat!(env!("CARGO_MANIFEST_DIR"), "/src/testdata/report.txt"),
                &got,
            )
            .expect("write snapshot");
        }
        let want = include_str!("../testdata/report.txt");
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
