//! Conclusions drawn from the books and the target's state: where RSS goes
//! ([`memory`]) and the [`verdict`] (leak, fragmentation, growth outside the heap,
//! none) with the evidence, suspects and remedies behind it.

pub mod memory;
pub mod verdict;

use crate::{
    accounting::{ledger::Ledger, losses::Losses, timeline::Timeline},
    analysis::verdict::Facts,
    probes::allocators::{Allocator, Found},
    report::{self, Report, RunFacts},
    session::worker::Snapshot,
    symbolize::StackStore,
};

/// The books a report is built from: the live blocks and address space, the totals
/// over time, and the stacks named so far.
#[derive(Clone, Copy)]
pub struct Books<'a> {
    /// Live blocks and the address space.
    pub ledger: &'a Ledger,
    /// Totals and per-stack bytes over time.
    pub timeline: &'a Timeline,
    /// Stacks named so far.
    pub stacks: &'a StackStore,
}

/// The allocator whose memory the verdict measures besides glibc's: the one serving
/// malloc when it is not glibc's, else one called through its own prefixed API (a
/// Rust program's jemalloc or mimalloc), whose probes were placed.
pub fn other_allocator(allocators: &[Found]) -> Option<&Found> {
    let other = |f: &&Found| !matches!(f.allocator, Allocator::Glibc | Allocator::Go);
    allocators
        .iter()
        .filter(other)
        .find(|f| f.serves_malloc)
        .or_else(|| {
            allocators
                .iter()
                .filter(other)
                .find(|f| !f.prefix.is_empty() && f.probes > 0)
        })
}

/// The verdict, then the report (its `top` stacks), from the books, the worker's
/// snapshot and the run's facts: what a live run and a replayed capture both do.
pub fn analyse(books: Books<'_>, snap: &Snapshot, f: &RunFacts, top: usize) -> Report {
    // Unreferenced blocks allocated since attach (before the first scan), per stack.
    let reach_facts = snap.reach.as_ref().map(|r| {
        let mut by_stack: rustc_hash::FxHashMap<i64, (u64, u64)> = Default::default();
        for &(addr, _) in &r.unreferenced {
            if let Some(b) = books
                .ledger
                .live()
                .get(&addr)
                .filter(|b| b.ts_ns < r.first_pass_ns)
            {
                let e = by_stack.entry(b.stack_id).or_default();
                e.0 += 1;
                e.1 += b.size;
            }
        }
        // What holds each stack's blocks.
        let mut held: rustc_hash::FxHashMap<i64, rustc_hash::FxHashMap<u32, (u64, u64)>> =
            Default::default();
        for &(addr, name) in &r.reached {
            if let Some(b) = books.ledger.live().get(&addr) {
                let e = held.entry(b.stack_id).or_default().entry(name).or_default();
                e.0 += 1;
                e.1 += b.size;
            }
        }
        let held_by_stack = held
            .into_iter()
            .map(|(stack, by)| {
                let mut v: Vec<(String, u64, u64)> = by
                    .into_iter()
                    .filter_map(|(n, (blocks, bytes))| {
                        Some((r.holder_names.get(n as usize)?.clone(), blocks, bytes))
                    })
                    .collect();
                v.sort_unstable_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
                v.truncate(3);
                (stack, v)
            })
            .collect();
        verdict::ReachFacts {
            held_by_stack,
            unreferenced_by_stack: by_stack,
            held_by: r.held_by.clone(),
            complete: r.scan.incomplete.is_none(),
        }
    });
    let verdict = verdict::decide(&Facts {
        points: books.timeline.points(),
        candidates: verdict::candidates(books.ledger, books.timeline, books.stacks, f.now_ns),
        walk: snap.walk.as_ref(),
        arena_limit: snap.arena_limit.clone(),
        mmap_threshold_raised_to: books.ledger.mmap_threshold_raised_to(),
        malloc_env: snap.malloc_env.clone(),
        heap_detached: f.heap_detached.is_some(),
        frees_windowed: f.duty.as_ref().is_some_and(|d| !d.frees_always_attached),
        heap_untraced: f.heap_not_traced.is_some(),
        lost_total: Losses::tally(&f.kernel_counters, &books.ledger.counters).total,
        python: snap.python.is_some(),
        pymalloc: snap.pymalloc.as_ref(),
        allocator: other_allocator(&f.allocators),
        jemalloc: &snap.other.jemalloc,
        mimalloc: &snap.other.mimalloc,
        tcmalloc: &snap.other.tcmalloc,
        census: snap.census.as_ref(),
        reach: reach_facts.as_ref(),
        pygc: snap.python.as_ref().and_then(|p| p.gc.as_ref()),
    });
    let mut r = report::build(&report::Inputs {
        pid: f.pid,
        ledger: books.ledger,
        stacks: books.stacks,
        kernel_counters: &f.kernel_counters,
        rss: f.rss,
        duration_s: f.duration_s,
        now_ns: f.now_ns,
        top,
        final_report: f.final_report,
        end_reason: f.end_reason.clone(),
        target_exited: f.target_exited,
        probes: &f.probes,
        allocators: &f.allocators,
        overhead: f.overhead.clone(),
        heap_detached: f.heap_detached.clone(),
        duty: f.duty.clone(),
        heap_not_traced: f.heap_not_traced.clone(),
        timeline: books.timeline,
        verdict,
        memory: snap.memory.clone(),
        min_age_s: f.min_age_s,
        walk: snap.walk.as_ref(),
        pymalloc: snap.pymalloc.as_ref(),
        other: Some(&snap.other),
        census: snap.census.as_ref(),
        reach: snap.reach.as_ref(),
        arena_limit: snap.arena_limit.clone(),
        malloc_env: snap.malloc_env.clone(),
        python: snap.python.clone(),
        thread_names: &snap.thread_names,
        unwinder: f.unwinder,
        unwind: snap.unwind.as_ref(),
        unnamed: &snap.unnamed,
    });
    r.execs = f.execs.clone();
    r
}
