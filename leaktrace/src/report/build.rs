//! Builds a report from the engine's state: the books, the resolved stacks, what
//! the worker read from the target, and the verdict decided from them.

use crate::{
    accounting::{
        ledger::{Ledger, Totals, weigh},
        losses::Losses,
        timeline::Timeline,
    },
    analysis::{memory::MemoryMap, verdict::Verdict},
    heap::glibc::{ArenaLimit, HeapWalk},
    probes::{
        attach::ProbeInfo,
        meter::{HeapDetached, Overhead},
    },
    process::procfs::Rss,
    report::*,
    symbolize::StackStore,
    unwind::UnwindStats,
};

/// Everything a report is built from.
#[derive(Debug)]
pub struct Inputs<'a> {
    /// Traced process.
    pub pid: u32,
    /// The books.
    pub ledger: &'a Ledger,
    /// Resolved stacks.
    pub stacks: &'a StackStore,
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
    /// The allocators found (and a Go runtime), the one serving `malloc` marked.
    pub allocators: &'a [crate::probes::allocators::Found],
    /// Latest overhead measurement.
    pub overhead: Option<Overhead>,
    /// Heap probes detached by the budget.
    pub heap_detached: Option<HeapDetached>,
    /// Sampled mode's duty cycle, if on.
    pub duty: Option<DutyReport>,
    /// Why the heap was not traced, if it was not.
    pub heap_not_traced: Option<String>,
    /// Samples over time.
    pub timeline: &'a Timeline,
    /// The verdict, decided from the same state.
    pub verdict: Verdict,
    /// Where RSS goes.
    pub memory: MemoryMap,
    /// Blocks younger than this are left out of the heap stacks (0: none).
    pub min_age_s: f64,
    /// glibc heaps walked now, if the target has them and is alive.
    pub walk: Option<&'a HeapWalk>,
    /// pymalloc's arenas, walked at the end.
    pub pymalloc: Option<&'a crate::heap::pymalloc::PymallocWalk>,
    /// Other allocators' own state (jemalloc's arenas), where read.
    pub other: Option<&'a crate::heap::OtherState>,
    /// The live heap by type.
    pub census: Option<&'a crate::heap::census::Census>,
    /// Who keeps the heap alive (the final report's).
    pub reach: Option<&'a crate::heap::reach::Reachability>,
    /// glibc's arena limit.
    pub arena_limit: Option<ArenaLimit>,
    /// malloc settings in the target's environment.
    pub malloc_env: Vec<String>,
    /// The target's CPython interpreter, if it is one.
    pub python: Option<PythonInfo>,
    /// Names of the target's threads.
    pub thread_names: &'a rustc_hash::FxHashMap<u32, String>,
    /// The unwinder in use.
    pub unwinder: Unwinder,
    /// The unwind tables loaded, with CFI.
    pub unwind: Option<&'a UnwindStats>,
    /// Objects in which some stack addresses had no symbol.
    pub unnamed: &'a [crate::symbolize::native::Unnamed],
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
        i.stacks
            .get(id)
            .map_or((Vec::new(), false), |s| (s.frames.clone(), s.truncated))
    };
    let heap: Vec<(i64, Totals)> = if i.min_age_s > 0.0 {
        aged_heap(i.ledger, i.now_ns, i.min_age_s)
    } else {
        i.ledger
            .heap_by_stack()
            .iter()
            .map(|(&id, t)| (id, *t))
            .collect()
    };
    // Every stack (pprof, folded): those whose blocks were all freed too.
    let churned: Vec<(i64, Totals)> = if i.top == usize::MAX {
        let live: rustc_hash::FxHashSet<i64> = heap.iter().map(|h| h.0).collect();
        i.ledger
            .stack_activities()
            .keys()
            .filter(|id| !live.contains(id))
            .map(|&id| (id, Totals::default()))
            .collect()
    } else {
        Vec::new()
    };
    let stacks_total = heap.len() as u64;
    let heap_stacks = largest(heap, i.top, |t| t.bytes)
        .into_iter()
        .chain(churned)
        .map(|(id, t)| {
            let (frames, truncated) = frames(id);
            let a = i.ledger.stack_activity(id);
            HeapStack {
                live_bytes: t.bytes,
                live_allocations: t.count,
                samples: t.samples,
                live_bytes_error95: error95(t.variance),
                oldest_age_s: age(id),
                allocations: a.alloc_count,
                allocated_bytes: a.alloc_bytes,
                growth: i.timeline.stack_growth(id),
                stack_id: id,
                truncated,
                frames,
            }
        })
        .collect();
    let mapped: Vec<_> = i
        .ledger
        .mapped_by_stack()
        .iter()
        .map(|(&id, t)| (id, t.bytes))
        .collect();
    let map_stacks = largest(mapped, i.top, |&b| b)
        .into_iter()
        .map(|(id, bytes)| {
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

    let Losses {
        lost,
        counters,
        total: lost_total,
    } = Losses::tally(i.kernel_counters, &i.ledger.counters);

    Report {
        follow: None,
        execs: Vec::new(),
        pid: i.pid,
        duration_s: (i.duration_s * 1000.0).round() / 1000.0,
        rss_bytes: i.rss.rss_bytes,
        rss: i.rss,
        memory: i.memory.clone(),
        final_report: i.final_report,
        end_reason: i.end_reason.clone(),
        target_exited: i.target_exited,
        heap: Heap {
            live_bytes: i.ledger.live_bytes(),
            live_allocations: i.ledger.live_allocations(),
            live_bytes_error95: error95(i.ledger.live_variance()),
            sample_rate_bytes: i.ledger.sample_rate(),
            duty_cycle: i.duty.clone(),
            not_traced: i.heap_not_traced.clone(),
            stacks: heap_stacks,
            stacks_total,
        },
        mappings: Mappings {
            anon_mapped_bytes: i.ledger.anon_mapped_bytes(),
            brk_bytes: i.ledger.brk_bytes().unwrap_or(0),
            brk_grown_bytes: i.ledger.brk_grown_bytes(),
            split: i.ledger.anon_split(),
            arenas: {
                let mut a = i.ledger.arenas();
                a.sort_by(|x, y| {
                    y.committed_bytes
                        .cmp(&x.committed_bytes)
                        .then(x.start.cmp(&y.start))
                });
                a.into_iter()
                    .take(i.top)
                    .map(|r| ArenaInfo {
                        address: format!("{:#x}", r.start),
                        reserved_bytes: r.reserved_bytes,
                        committed_bytes: r.committed_bytes,
                        stack_id: r.stack_id,
                        thread: r.tid,
                        thread_name: i.thread_names.get(&r.tid).cloned(),
                        frames: frames(r.stack_id).0,
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
        verdict: i.verdict.clone(),
        allocator: Allocator {
            found: i.allocators.to_vec(),
            notes: allocator_notes(i.allocators, i.other),
            glibc_heaps: i.walk.map(|w| glibc_heaps(i, w)),
            arena_limit: i.arena_limit.clone(),
            environment: i.malloc_env.clone(),
            mmap_threshold_raised_to: i.ledger.mmap_threshold_raised_to(),
            pymalloc: i.pymalloc.cloned(),
            state: i.other.cloned().unwrap_or_default(),
        },
        census: i.census.cloned(),
        reachability: i.reach.map(|r| reachability(i, r)),
        python: i.python.clone(),
        stacks: stack_info(i),
        timeline: i.timeline.points().to_vec(),
    }
}

/// The scans' findings, unreferenced blocks grouped by the stack that allocated them
/// (looked up in the ledger: a block allocated since attach, before the first scan),
/// else by size.
fn reachability(i: &Inputs<'_>, r: &crate::heap::reach::Reachability) -> Reachability {
    let mut by_stack: rustc_hash::FxHashMap<i64, (u64, u64)> = Default::default();
    let mut by_size: rustc_hash::FxHashMap<u64, (u64, u64)> = Default::default();
    for &(addr, len) in &r.unreferenced {
        match i.ledger.live().get(&addr) {
            Some(b) if b.ts_ns < r.first_pass_ns => {
                let e = by_stack.entry(b.stack_id).or_default();
                e.0 += 1;
                e.1 += b.size;
            }
            _ => {
                let e = by_size.entry(len).or_default();
                e.0 += 1;
                e.1 += len;
            }
        }
    }
    let mut groups: Vec<UnreferencedGroup> = by_stack
        .into_iter()
        .map(|(id, (blocks, bytes))| UnreferencedGroup {
            blocks,
            bytes,
            stack_id: Some(id),
            frames: i.stacks.get(id).map_or_else(Vec::new, |s| s.frames.clone()),
            size: None,
        })
        .chain(
            by_size
                .into_iter()
                .map(|(size, (blocks, bytes))| UnreferencedGroup {
                    blocks,
                    bytes,
                    stack_id: None,
                    frames: Vec::new(),
                    size: Some(size),
                }),
        )
        .collect();
    groups.sort_unstable_by(|a, b| {
        b.bytes
            .cmp(&a.bytes)
            .then(a.stack_id.cmp(&b.stack_id))
            .then(a.size.cmp(&b.size))
    });
    groups.truncate(i.top.max(1));
    Reachability {
        unreferenced: Unreferenced {
            blocks: r.unreferenced_blocks,
            bytes: r.unreferenced_bytes,
            listed: r.unreferenced.len() as u64,
            groups,
        },
        held_by: r.held_by.clone(),
        scan: r.scan.clone(),
    }
}

fn stack_info(i: &Inputs<'_>) -> StackInfo {
    let (mut complete, mut all, mut cs, mut ts) = (0u64, 0u64, 0, 0);
    const COPIES: [u64; 4] = [8, 16, 32, 64];
    let mut fit = [0u64; 4];
    for (&id, t) in i.ledger.heap_by_stack() {
        let Some(s) = i.stacks.get(id) else {
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
        unwinder: i.unwinder,
        complete_pct: if all == 0 {
            100.0
        } else {
            complete as f64 * 100.0 / all as f64
        },
        complete_stacks: cs,
        truncated_stacks: ts,
        tables: i.unwind.cloned(),
        copy_would_fit: if i.unwinder == Unwinder::Cfi {
            COPIES
                .iter()
                .zip(fit)
                .map(|(&k, f)| (k, f as f64 * 100.0 / all.max(1) as f64))
                .collect()
        } else {
            Vec::new()
        },
        unnamed_objects: i.unnamed.to_vec(),
    }
}

/// The `n` stacks with the most bytes (`bytes` of their figures), ties by stack id.
fn largest<T>(mut v: Vec<(i64, T)>, n: usize, bytes: impl Fn(&T) -> u64) -> Vec<(i64, T)> {
    v.sort_by(|a, b| bytes(&b.1).cmp(&bytes(&a.1)).then(a.0.cmp(&b.0)));
    v.truncate(n);
    v
}

/// Heap totals per stack counting only blocks at least `min_age_s` old.
fn aged_heap(ledger: &Ledger, now_ns: u64, min_age_s: f64) -> Vec<(i64, Totals)> {
    let cutoff = now_ns.saturating_sub((min_age_s * 1e9) as u64);
    let mut m: rustc_hash::FxHashMap<i64, Totals> = rustc_hash::FxHashMap::default();
    for b in ledger.live().values().filter(|b| b.ts_ns <= cutoff) {
        let (bytes, count, var) = weigh(b.size, ledger.sample_rate(), b.duty_ppm);
        let t = m.entry(b.stack_id).or_default();
        t.bytes += bytes;
        t.count += count;
        t.samples += 1;
        t.variance += var;
    }
    m.into_iter().collect()
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
                let c = first.and_then(|h| created.iter().find(|c| c.start == h));
                WalkedArena {
                    stats: a.clone(),
                    created_by_thread: c.map(|c| c.tid),
                    created_by_thread_name: c.and_then(|c| i.thread_names.get(&c.tid).cloned()),
                    created_by_stack: c.map(|c| c.stack_id),
                    frames: c
                        .map(|c| {
                            i.stacks
                                .get(c.stack_id)
                                .map_or(Vec::new(), |s| s.frames.clone())
                        })
                        .unwrap_or_default(),
                    pinned_by: pinned_by(i, a),
                }
            })
            .collect(),
        unwalkable: w.unwalkable.clone(),
    }
}

/// The blocks pinning an arena's free memory, joined to their allocations.
fn pinned_by(i: &Inputs<'_>, a: &crate::heap::glibc::ArenaStats) -> Vec<PinnedBy> {
    a.pins
        .iter()
        .map(|p| {
            let user = p.chunk + 16;
            let block = i.ledger.live().get(&user);
            PinnedBy {
                address: format!("{user:#x}"),
                bytes_held: p.held_resident_bytes,
                block_bytes: block.map_or(p.chunk_bytes.saturating_sub(8), |b| b.size),
                since_attach: block.is_some(),
                stack_id: block.map(|b| b.stack_id),
                frames: block
                    .and_then(|b| i.stacks.get(b.stack_id))
                    .map_or(Vec::new(), |s| s.frames.clone()),
            }
        })
        .collect()
}

/// 95% half-width from a variance.
fn error95(variance: f64) -> u64 {
    (1.96 * variance.max(0.0).sqrt()).round() as u64
}

/// Where an allocator's own state is read from.
fn state_source(a: crate::probes::allocators::Allocator) -> &'static str {
    use crate::probes::allocators::Allocator;
    match a {
        Allocator::Mimalloc => "its arenas and pages",
        Allocator::Tcmalloc => "its page heap and caches",
        _ => "its arenas",
    }
}

/// What the report must say about the allocators found: what is traced and what is
/// not read.
fn allocator_notes(
    found: &[crate::probes::allocators::Found],
    state: Option<&crate::heap::OtherState>,
) -> Vec<String> {
    use crate::probes::allocators::Allocator;
    let read = |f: &crate::probes::allocators::Found| {
        state.is_some_and(|s| {
            s.jemalloc.iter().any(|j| j.object == f.object)
                || s.mimalloc.iter().any(|m| m.object == f.object)
                || s.tcmalloc.iter().any(|t| t.object == f.object)
        })
    };
    // Why an allocator's state is not read, where leaktrace tried.
    let why_not = |f: &crate::probes::allocators::Found| {
        state
            .and_then(|s| s.not_read.iter().find(|n| n.object == f.object))
            .map_or(String::new(), |n| format!(" ({})", n.why))
    };
    let mut notes = Vec::new();
    let serving = found.iter().find(|f| f.serves_malloc);
    for f in found {
        let name = f.allocator.as_str();
        match f.allocator {
            Allocator::Go => notes.push(format!(
                "{} program: the Go runtime's heap is its own, with no malloc to probe, so Go allocations are not traced; \
                 what is traced is C code's malloc (cgo and the C libraries{}), the mappings, brk and RSS. \
                 {}",
                f.version.as_deref().unwrap_or("A Go"),
                serving.map_or(String::new(), |s| format!(", through {}", s.allocator.as_str())),
                if state.is_some_and(|s| s.go.is_some()) {
                    "The runtime's own heap statistics are read from outside (HeapInuse, HeapIdle, HeapReleased, stacks): \
                     \"where RSS goes\" splits Go's arena space with them.".to_owned()
                } else {
                    format!(
                        "Go's heap arenas are counted by address under \"where RSS goes\" (go-heap); the runtime's own statistics are not read{}.",
                        why_not(f)
                    )
                }
            )),
            Allocator::Jemalloc | Allocator::Tcmalloc | Allocator::Mimalloc | Allocator::Musl | Allocator::Other
                if f.serves_malloc =>
            {
                let who = if f.allocator == Allocator::Other {
                    let object = f.object.rsplit('/').next().unwrap_or(&f.object);
                    format!("{object}'s (an allocator leaktrace does not know)")
                } else {
                    format!(
                        "{name}'s{}",
                        f.version.as_ref().map_or(String::new(), |v| format!(" ({v})"))
                    )
                };
                let glibc = if found.iter().any(|g| g.allocator == Allocator::Glibc) {
                    "; glibc's heaps, still walked, hold only what glibc allocated itself"
                } else {
                    ""
                };
                notes.push(if read(f) {
                    format!(
                        "malloc is {who}: its own state is read from {}, so \"where RSS goes\" counts what it holds for the program \
                         and the freed memory it keeps (allocator-in-use, allocator-free){glibc}",
                        state_source(f.allocator)
                    )
                } else {
                    format!(
                        "malloc is {who}: its own state (what it keeps free and resident) is not read{}, so \"where RSS goes\" counts its memory \
                         as anonymous mappings (and heap pages, where it uses brk), and what it keeps is measured from the mappings it makes while traced{glibc}",
                        why_not(f)
                    )
                });
            }
            Allocator::Jemalloc | Allocator::Tcmalloc | Allocator::Mimalloc if !f.prefix.is_empty()
                && f.probes > 0 && !f.serves_malloc => {
                    notes.push(format!(
                        "{name} linked into {} is called through its own API ({}malloc…), beside {}'s malloc: both are traced; its own state is {}",
                        f.object,
                        f.prefix,
                        serving.map_or("the C library", |s| s.allocator.as_str()),
                        if read(f) { format!("read from {}", state_source(f.allocator)) } else { format!("not read{}", why_not(f)) }
                    ));
                }
            _ => {}
        }
    }
    notes
}
