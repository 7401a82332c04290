//! The engine's books: live heap blocks, per-stack totals and the address
//! space, kept up to date from the kernel's event stream.
//!
//! Everything here is pure bookkeeping over [`Event`]s, so it is unit-tested
//! without a kernel. Semantics follow the C library:
//! * a NULL result is not an allocation (counted as a failed call);
//! * `realloc` releases the old block only when it succeeds, except that
//!   glibc's `realloc(p, 0)` frees `p` and returns NULL;
//! * a free of an address we never saw allocated (a block from before attach)
//!   is counted on its own and subtracts nothing.

use leaktrace_common::{AllocFn, EVENT_IN_ALLOCATOR, EVENT_IN_PLACE, EVENT_REUSED, Event, kind};
use rustc_hash::FxHashMap;

use crate::{
    accounting::intervals::{Region, RegionKind, RegionMap},
    units::page_up,
};

const MAP_ANONYMOUS: u64 = 0x20;
const PROT_READ_WRITE: u64 = 0x3;

/// A glibc arena reservation (a 64 MiB-aligned heap) seen being made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArenaReservation {
    /// Its start.
    pub start: u64,
    /// Bytes reserved (mapped `PROT_NONE`).
    pub reserved_bytes: u64,
    /// Of those, committed (made read-write).
    pub committed_bytes: u64,
    /// The stack of the allocation that created it.
    pub stack_id: i64,
    /// The thread that made it.
    pub tid: u32,
}

/// A live heap block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    /// Requested size.
    pub size: u64,
    /// Stack id of the allocating call.
    pub stack_id: i64,
    /// Monotonic time of allocation, ns.
    pub ts_ns: u64,
    /// Share of the time, in millionths, the heap probes were attached when it was
    /// allocated (sampled mode's duty cycle; 0 or a million: always).
    pub duty_ppm: u32,
}

/// [`Block::duty_ppm`] of probes attached all the time.
pub const FULL_DUTY: u32 = 1_000_000;

/// Outstanding totals for one stack (estimates when sampling).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Totals {
    /// Bytes.
    pub bytes: u64,
    /// Blocks (heap) or regions (mappings).
    pub count: u64,
    /// Sampled blocks behind the estimate (equal to `count` when exact).
    pub samples: u64,
    /// Variance of the `bytes` estimate (0 when exact).
    pub variance: f64,
}

/// What one recorded block stands for under byte-weighted Poisson sampling with
/// mean interval `rate` (0: exact), made while the probes were attached a share
/// `duty_ppm` (millionths) of the time: (estimated bytes, estimated blocks, variance).
///
/// A block of `size` bytes is sampled with probability p = d·(1 − e^(−size/rate)) (d the
/// duty: its allocation fell in a window with probability d, windows being placed at
/// random), so counting it as size/p bytes and 1/p blocks is unbiased
/// (Horvitz–Thompson), and (1 − p)·(size/p)² estimates its contribution to the variance.
pub fn weigh(size: u64, rate: u64, duty_ppm: u32) -> (u64, u64, f64) {
    let duty_ppm = if duty_ppm == 0 { FULL_DUTY } else { duty_ppm };
    let d = f64::from(duty_ppm.min(FULL_DUTY)) / f64::from(FULL_DUTY);
    if (rate == 0 && duty_ppm >= FULL_DUTY) || size == 0 {
        return (size, 1, 0.0);
    }
    let bytes_p = if rate == 0 {
        1.0
    } else {
        -(-(size as f64) / rate as f64).exp_m1()
    };
    let p = d * bytes_p;
    if p <= 0.0 {
        return (size, 1, 0.0);
    }
    let est = size as f64 / p;
    (
        est.round() as u64,
        (1.0 / p).round().max(1.0) as u64,
        (1.0 - p) * est * est,
    )
}

/// Whether a region counts among the stacks' mapped bytes: memory (not a reservation,
/// whose committed parts are counted apart, nor a file), and not made by a probed
/// allocator call — that is the memory the heap's blocks stand for, which the heap
/// section counts already (each byte is shown once).
fn counts_as_mapped(r: &Region) -> bool {
    !r.by_allocator
        && !matches!(
            r.kind,
            RegionKind::File
                | RegionKind::ArenaReserve
                | RegionKind::Reserved
                | RegionKind::AllocatorChunk
        )
}

/// A region made now by the thread and stack of `ev`.
fn region_of(ev: &Event, kind: RegionKind) -> Region {
    Region {
        end: 0,
        kind,
        stack_id: ev.stack_id,
        ts_ns: ev.ts_ns,
        tid: ev.tid,
        by_allocator: ev.flags & EVENT_IN_ALLOCATOR != 0,
    }
}

/// Counters kept by userspace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct UserCounters {
    /// Frees of addresses not allocated since attach: blocks from before attach, and
    /// glibc freeing an exiting thread's cache (chunks already freed once, and the
    /// cache itself, which glibc allocates without calling malloc).
    pub free_unknown: u64,
    /// Successful reallocs of blocks never seen allocated.
    pub realloc_unknown: u64,
    /// Allocations returned at an address we still held as live (its free was not seen).
    pub alloc_over_live: u64,
    /// Allocator calls that returned NULL (or a non-zero error for posix_memalign).
    pub failed_allocs: u64,
    /// Events the engine could not decode.
    pub bad_events: u64,
    /// Bytes unmapped from ranges not tracked since attach.
    pub untracked_unmapped_bytes: u64,
    /// Stack ids sent by the kernel that could not be read back from its stack map.
    pub stack_unreadable: u64,
    /// Sampled blocks found freed without their free call being seen, when the
    /// allocator handed their address out again (sampled mode: the probes were detached).
    pub freed_unseen: u64,
    /// Stacks forgotten because nothing of them was live or allocated for a while
    /// (`--continuous`).
    pub stacks_aged_out: u64,
}

/// Cumulative activity since attach.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Activity {
    /// Successful allocations.
    pub allocs: u64,
    /// Bytes requested by successful allocations.
    pub alloc_bytes: u64,
    /// Frees (non-NULL).
    pub frees: u64,
    /// mmap calls.
    pub mmaps: u64,
    /// munmap calls.
    pub munmaps: u64,
    /// mremap calls.
    pub mremaps: u64,
    /// brk calls.
    pub brks: u64,
    /// Programs the target exec'd since attach (the books restart at each).
    pub execs: u64,
    /// mprotect calls.
    pub mprotects: u64,
    /// madvise(MADV_DONTNEED/MADV_FREE) calls.
    pub madvises: u64,
    /// Bytes given back with madvise(MADV_DONTNEED/MADV_FREE).
    pub madvised_bytes: u64,
}

/// Anonymous memory mapped since attach, by origin.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct AnonSplit {
    /// Anonymous mappings not made from inside an allocator call.
    pub other_anon_bytes: u64,
    /// Accessible mappings made by an allocator (glibc: chunks above the mmap threshold).
    pub allocator_chunk_bytes: u64,
    /// Address space reserved inaccessible by an allocator (glibc: per-thread arena heaps).
    pub arena_reserved_bytes: u64,
    /// The parts of those reservations made accessible with mprotect.
    pub arena_committed_bytes: u64,
    /// Number of arena reservations.
    pub arenas: u64,
    /// pymalloc arenas (CPython's small-object heap) mapped since attach.
    pub pymalloc_arena_bytes: u64,
    /// Their number.
    pub pymalloc_arenas: u64,
}

/// Allocations and frees since attach of the blocks one stack allocated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackActivity {
    /// Blocks allocated (sampled blocks when sampling).
    pub allocs: u64,
    /// Of those, freed.
    pub frees: u64,
    /// Blocks allocated, estimated when sampling (as live blocks are).
    pub alloc_count: u64,
    /// Bytes allocated, estimated when sampling.
    pub alloc_bytes: u64,
}

/// The books.
#[derive(Debug, Default)]
pub struct Ledger {
    live: FxHashMap<u64, Block>,
    heap_by_stack: FxHashMap<i64, Totals>,
    live_bytes: u64,
    live_count: u64,
    live_variance: f64,
    /// Mean sampling interval in bytes (0: exact).
    sample_rate: u64,
    /// The heap probes' current duty (millionths of the time they are attached; 0: always).
    duty_ppm: u32,
    regions: RegionMap,
    /// The accessible (mprotect-committed) parts of arena reservations.
    committed: RegionMap,
    mapped_by_stack: FxHashMap<i64, Totals>,
    /// Current program break, once known.
    brk: Option<u64>,
    /// Start of the brk heap.
    start_brk: Option<u64>,
    /// Per-stack allocations and frees since attach.
    stack_activity: FxHashMap<i64, StackActivity>,
    /// Size of a pymalloc arena if the target is CPython.
    pymalloc_arena: Option<u64>,
    /// Largest mmapped chunk glibc freed (≤ 32 MiB): its dynamic mmap threshold rose to it.
    mmap_threshold_raised_to: Option<u64>,
    /// Userspace counters.
    pub counters: UserCounters,
    /// Activity since attach.
    pub activity: Activity,
    /// Monotonic time of the newest event, ns.
    pub last_ts_ns: u64,
}

impl Ledger {
    /// A ledger for a process whose brk heap spans `[start_brk, brk)` at attach.
    pub fn new(start_brk: Option<u64>, brk: Option<u64>) -> Self {
        Self {
            start_brk,
            brk,
            ..Self::default()
        }
    }

    /// The heap probes will be attached a share `duty` of the time (sampled mode's
    /// windows) while the blocks recorded next are allocated: each stands for 1/duty.
    pub fn set_duty(&mut self, duty: f64) {
        self.duty_ppm = (duty.clamp(1e-6, 1.0) * f64::from(FULL_DUTY)).round() as u32;
    }

    /// Treats heap events as byte-weighted samples with this mean interval.
    pub fn with_sampling(mut self, rate: u64) -> Self {
        self.sample_rate = rate;
        self
    }

    /// Classifies anonymous read-write mappings of exactly `size` bytes made
    /// outside the malloc family as pymalloc arenas (the target is CPython).
    pub fn with_pymalloc_arena(mut self, size: Option<u64>) -> Self {
        self.pymalloc_arena = size;
        self
    }

    /// The target turned out to be CPython with `size`-byte pymalloc arenas (learned
    /// once the interpreter is identified, after the first mappings may have come):
    /// the anonymous mappings of exactly that size made outside the allocator so far
    /// become arenas too. `None`: not CPython (any more).
    pub fn set_pymalloc_arena(&mut self, size: Option<u64>) {
        if let Some(size) = size {
            self.regions
                .reclassify(RegionKind::Anon, page_up(size), RegionKind::PyArena);
        }
        self.pymalloc_arena = size;
    }

    /// The target exec'd: its address space, blocks and break are the new program's,
    /// none of the old ones survive. Activity and counters go on.
    pub fn exec(&mut self) {
        *self = Self {
            sample_rate: self.sample_rate,
            duty_ppm: self.duty_ppm,
            counters: std::mem::take(&mut self.counters),
            activity: std::mem::take(&mut self.activity),
            last_ts_ns: self.last_ts_ns,
            ..Self::default()
        };
        self.activity.execs += 1;
    }

    /// The mean sampling interval (0: exact).
    pub fn sample_rate(&self) -> u64 {
        self.sample_rate
    }

    /// Applies one event.
    pub fn apply(&mut self, ev: &Event) {
        self.last_ts_ns = self.last_ts_ns.max(ev.ts_ns);
        match ev.kind {
            kind::ALLOC => self.on_alloc(ev),
            kind::FREE if ev.flags & EVENT_REUSED != 0 => {
                // No free was seen: the address was handed out again while the probes were
                // detached (sampled mode's windows), so the block recorded there is gone.
                if self.take(ev.addr).is_some() {
                    self.counters.freed_unseen += 1;
                }
            }
            kind::FREE => {
                self.activity.frees += 1;
                if self.take(ev.addr).is_none() {
                    self.counters.free_unknown += 1;
                }
            }
            kind::MMAP => {
                self.activity.mmaps += 1;
                let flags = ev.aux >> 32;
                let prot = ev.aux & 0xffff_ffff;
                let by_allocator = ev.flags & EVENT_IN_ALLOCATOR != 0;
                let k = match (
                    flags & MAP_ANONYMOUS != 0,
                    by_allocator,
                    prot & PROT_READ_WRITE != 0,
                ) {
                    (false, ..) => RegionKind::File,
                    (true, true, false) => RegionKind::ArenaReserve,
                    (true, true, true) => RegionKind::AllocatorChunk,
                    (true, false, true) if Some(ev.size) == self.pymalloc_arena => {
                        RegionKind::PyArena
                    }
                    (true, false, true) => RegionKind::Anon,
                    (true, false, false) => RegionKind::Reserved,
                };
                self.map(ev.addr, page_up(ev.size), region_of(ev, k));
            }
            kind::MUNMAP => {
                self.activity.munmaps += 1;
                let len = page_up(ev.size);
                if ev.flags & EVENT_IN_ALLOCATOR != 0 {
                    // glibc's free of an mmapped chunk raises its mmap threshold to the chunk's size
                    // (up to DEFAULT_MMAP_THRESHOLD_MAX, 32 MiB) unless a threshold was set by hand.
                    for (s, r) in self.regions.overlapping(ev.addr, len) {
                        let size = r.end - s;
                        if r.kind == RegionKind::AllocatorChunk && size <= 32 << 20 {
                            self.mmap_threshold_raised_to =
                                self.mmap_threshold_raised_to.max(Some(size));
                        }
                    }
                }
                let removed = self.unmap(ev.addr, len);
                self.counters.untracked_unmapped_bytes += len - removed;
            }
            kind::MREMAP => self.on_mremap(ev),
            kind::BRK => self.on_brk(ev),
            kind::MPROTECT => {
                self.activity.mprotects += 1;
                self.on_mprotect(ev);
            }
            kind::EXEC => self.exec(),
            kind::MADVISE => {
                self.activity.madvises += 1;
                self.activity.madvised_bytes += page_up(ev.size);
            }
            _ => self.counters.bad_events += 1,
        }
    }

    fn on_alloc(&mut self, ev: &Event) {
        let Some(func) = AllocFn::from_u32(ev.func) else {
            self.counters.bad_events += 1;
            return;
        };
        let is_realloc = func.reallocates();
        if ev.addr == 0 {
            if is_realloc && ev.aux != 0 && ev.size == 0 {
                // glibc: realloc(p, 0) frees p and returns NULL.
                self.release_old(ev);
            } else {
                self.counters.failed_allocs += 1;
            }
            return;
        }
        // Resized in place: the block keeps the stack (and age) of its allocation, and
        // its stack neither allocated nor freed a block.
        if is_realloc && ev.flags & EVENT_IN_PLACE != 0 && ev.aux == ev.addr {
            self.activity.allocs += 1;
            self.activity.alloc_bytes += ev.size;
            if let Some(&b) = self.live.get(&ev.addr)
                && b.ts_ns <= ev.aux2
            {
                self.sub_heap(b);
                let block = Block { size: ev.size, ..b };
                self.live.insert(ev.addr, block);
                let _ = self.add_heap(block);
                return;
            }
            // A block from before attach (or one whose allocation was missed): from now on
            // it is known, without a stack.
            self.counters.realloc_unknown += 1;
            let block = self.block_of(ev);
            if let Some(old) = self.live.insert(ev.addr, block) {
                self.sub_heap(old);
            }
            let _ = self.add_heap(block);
            return;
        }
        if is_realloc && ev.aux != 0 {
            self.release_old(ev);
        }
        self.activity.allocs += 1;
        self.activity.alloc_bytes += ev.size;
        let block = self.block_of(ev);
        if let Some(old) = self.live.insert(ev.addr, block) {
            self.counters.alloc_over_live += 1;
            self.sub_heap(old);
        }
        let (bytes, count) = self.add_heap(block);
        let a = self.stack_activity.entry(block.stack_id).or_default();
        a.allocs += 1;
        a.alloc_count += count;
        a.alloc_bytes += bytes;
    }

    /// Adds a live block; returns what it stands for (estimated bytes, blocks).
    fn add_heap(&mut self, b: Block) -> (u64, u64) {
        let (bytes, count, var) = weigh(b.size, self.sample_rate, b.duty_ppm);
        self.live_bytes += bytes;
        self.live_count += count;
        self.live_variance += var;
        let t = self.heap_by_stack.entry(b.stack_id).or_default();
        t.bytes += bytes;
        t.count += count;
        t.samples += 1;
        t.variance += var;
        (bytes, count)
    }

    /// Releases a realloc's old block, unless the address was handed out again
    /// by another thread after this realloc started (it freed the block
    /// internally, and that newer block's event arrived first).
    fn release_old(&mut self, ev: &Event) {
        match self.live.get(&ev.aux) {
            Some(b) if b.ts_ns > ev.aux2 => {}
            Some(_) => {
                self.take(ev.aux);
            }
            None => self.counters.realloc_unknown += 1,
        }
    }

    fn take(&mut self, addr: u64) -> Option<Block> {
        let b = self.live.remove(&addr)?;
        if let Some(a) = self.stack_activity.get_mut(&b.stack_id) {
            a.frees += 1;
        }
        self.sub_heap(b);
        Some(b)
    }

    /// The live block an allocation event makes, weighed by the current duty.
    fn block_of(&self, ev: &Event) -> Block {
        Block {
            size: ev.size,
            stack_id: ev.stack_id,
            ts_ns: ev.ts_ns,
            duty_ppm: self.duty_ppm,
        }
    }

    fn sub_heap(&mut self, b: Block) {
        let (bytes, count, var) = weigh(b.size, self.sample_rate, b.duty_ppm);
        self.live_bytes -= bytes;
        self.live_count -= count;
        self.live_variance = (self.live_variance - var).max(0.0);
        if let Some(t) = self.heap_by_stack.get_mut(&b.stack_id) {
            t.bytes -= bytes;
            t.count -= count;
            t.samples -= 1;
            t.variance = (t.variance - var).max(0.0);
            if t.samples == 0 {
                self.heap_by_stack.remove(&b.stack_id);
            }
        }
    }

    /// Commits or decommits the parts of arena reservations in a range. The
    /// allocator also grows arenas it reserved before attach: those parts of an
    /// in-allocator mprotect count as arena commits too.
    fn on_mprotect(&mut self, ev: &Event) {
        let (start, len, prot) = (ev.addr, page_up(ev.size), ev.aux);
        let commit = prot & PROT_READ_WRITE != 0;
        let mut next = start;
        for (s, r) in self.regions.overlapping(start, len) {
            if ev.flags & EVENT_IN_ALLOCATOR != 0 && s > next && commit {
                self.commit_untracked(next, s - next, ev);
            }
            next = next.max(r.end);
            if r.kind != RegionKind::ArenaReserve && r.kind != RegionKind::Reserved {
                continue;
            }
            if commit {
                self.committed.insert(s, r.end - s, r);
            } else {
                self.committed.remove(s, r.end - s);
            }
        }
        if ev.flags & EVENT_IN_ALLOCATOR != 0 && next < start + len {
            if commit {
                self.commit_untracked(next, start + len - next, ev);
            } else {
                self.committed.remove(next, start + len - next);
            }
        }
    }

    /// An allocator commit inside an arena reserved before attach.
    fn commit_untracked(&mut self, start: u64, len: u64, ev: &Event) {
        let r = Region {
            end: 0,
            kind: RegionKind::ArenaReserve,
            stack_id: ev.stack_id,
            ts_ns: ev.ts_ns,
            tid: ev.tid,
            by_allocator: true,
        };
        self.committed.insert(start, len, r);
    }

    fn map(&mut self, start: u64, len: u64, r: Region) {
        let removed = self.regions.insert(start, len, r);
        self.sub_regions(&removed);
        self.committed.remove(start, len);
        if counts_as_mapped(&r) {
            self.mapped_by_stack.entry(r.stack_id).or_default().bytes += len;
        }
    }

    /// Unmaps a range; returns the tracked bytes it removed.
    fn unmap(&mut self, start: u64, len: u64) -> u64 {
        self.committed.remove(start, len);
        let removed = self.regions.remove(start, len);
        self.sub_regions(&removed);
        removed.iter().map(|(s, r)| r.end - s).sum()
    }

    fn sub_regions(&mut self, removed: &[(u64, Region)]) {
        for (s, r) in removed {
            if !counts_as_mapped(r) {
                continue;
            }
            if let Some(t) = self.mapped_by_stack.get_mut(&r.stack_id) {
                t.bytes -= r.end - s;
                if t.bytes == 0 {
                    self.mapped_by_stack.remove(&r.stack_id);
                }
            }
        }
    }

    fn on_mremap(&mut self, ev: &Event) {
        self.activity.mremaps += 1;
        let (old, old_len, new, new_len) = (ev.aux, page_up(ev.aux2), ev.addr, page_up(ev.size));
        if old_len == 0 {
            return; // duplicates a shared mapping; nothing is released
        }
        let pieces = self.regions.overlapping(old, old_len);
        let tracked = pieces.first().map(|(_, r)| *r);
        self.unmap(old, old_len);
        let kept = old_len.min(new_len);
        match tracked {
            Some(r) => {
                // The mapping keeps its creator, grown or not: mremap is usually called
                // by an allocator or a container resizing what it owns, and glibc's
                // mremap wrapper is no leaf, so its own stack misses that caller.
                self.map(new, kept, r);
                if new_len > old_len {
                    self.map(
                        new + old_len,
                        new_len - old_len,
                        Region {
                            ts_ns: ev.ts_ns,
                            ..r
                        },
                    );
                }
            }
            None if new_len > old_len => {
                // A mapping from before attach grew: only the growth is new.
                self.map(
                    new + old_len,
                    new_len - old_len,
                    region_of(ev, RegionKind::Anon),
                );
            }
            None => {}
        }
    }

    fn on_brk(&mut self, ev: &Event) {
        self.activity.brks += 1;
        let new = ev.addr;
        if self.start_brk.is_none() {
            self.start_brk = Some(new);
        }
        match self.brk {
            Some(cur) if new > cur => self.map(cur, new - cur, region_of(ev, RegionKind::Brk)),
            Some(cur) if new < cur => {
                self.unmap(new, cur - new);
            }
            _ => {}
        }
        self.brk = Some(new);
    }

    /// Live heap bytes (requested sizes; estimated when sampling).
    pub fn live_bytes(&self) -> u64 {
        self.live_bytes
    }

    /// Live heap blocks (estimated when sampling).
    pub fn live_allocations(&self) -> u64 {
        self.live_count
    }

    /// Variance of the live-bytes estimate (0 when exact).
    pub fn live_variance(&self) -> f64 {
        self.live_variance
    }

    /// Accessible anonymous bytes mapped since attach and still mapped: plain
    /// anonymous mappings, allocator chunks, and the committed parts of arena
    /// reservations (not the reservations themselves, which are address space only).
    pub fn anon_mapped_bytes(&self) -> u64 {
        self.regions.bytes_of(RegionKind::Anon)
            + self.regions.bytes_of(RegionKind::AllocatorChunk)
            + self.regions.bytes_of(RegionKind::PyArena)
            + self.committed.bytes_of(RegionKind::ArenaReserve)
            + self.committed.bytes_of(RegionKind::Reserved)
    }

    /// Anonymous mappings since attach split by who made them and how.
    pub fn anon_split(&self) -> AnonSplit {
        AnonSplit {
            other_anon_bytes: self.regions.bytes_of(RegionKind::Anon)
                + self.committed.bytes_of(RegionKind::Reserved),
            allocator_chunk_bytes: self.regions.bytes_of(RegionKind::AllocatorChunk),
            arena_reserved_bytes: self.regions.bytes_of(RegionKind::ArenaReserve),
            arena_committed_bytes: self.committed.bytes_of(RegionKind::ArenaReserve),
            arenas: self
                .regions
                .iter()
                .filter(|(_, r)| r.kind == RegionKind::ArenaReserve)
                .count() as u64,
            pymalloc_arena_bytes: self.regions.bytes_of(RegionKind::PyArena),
            pymalloc_arenas: self
                .regions
                .iter()
                .filter(|(_, r)| r.kind == RegionKind::PyArena)
                .count() as u64,
        }
    }

    /// glibc arena reservations made since attach.
    pub fn arenas(&self) -> Vec<ArenaReservation> {
        self.regions
            .iter()
            .filter(|(_, r)| r.kind == RegionKind::ArenaReserve)
            .map(|(s, r)| {
                let committed = self
                    .committed
                    .overlapping(s, r.end - s)
                    .iter()
                    .map(|(cs, c)| c.end - cs)
                    .sum();
                ArenaReservation {
                    start: s,
                    reserved_bytes: r.end - s,
                    committed_bytes: committed,
                    stack_id: r.stack_id,
                    tid: r.tid,
                }
            })
            .collect()
    }

    /// Of stacks given with the time of their last event, those with nothing live (no
    /// heap block, no mapping) and no event since `before_ns`: they no longer matter
    /// to any report.
    pub fn idle_stacks(&self, ids: impl Iterator<Item = (i64, u64)>, before_ns: u64) -> Vec<i64> {
        ids.filter(|&(id, last_ns)| {
            last_ns < before_ns
                && !self.heap_by_stack.contains_key(&id)
                && !self.mapped_by_stack.contains_key(&id)
        })
        .map(|(id, _)| id)
        .collect()
    }

    /// Forgets stacks that aged out: their churn since attach goes with them.
    pub fn forget_stacks(&mut self, ids: &[i64]) {
        for id in ids {
            self.stack_activity.remove(id);
        }
        self.counters.stacks_aged_out += ids.len() as u64;
    }

    /// Allocations and frees since attach by allocating stack.
    pub fn stack_activity(&self, id: i64) -> StackActivity {
        self.stack_activity.get(&id).copied().unwrap_or_default()
    }

    /// Every stack that allocated since attach, with its activity.
    pub fn stack_activities(&self) -> &FxHashMap<i64, StackActivity> {
        &self.stack_activity
    }

    /// Largest mmapped chunk the allocator freed (≤ 32 MiB), to which glibc raised its mmap threshold.
    pub fn mmap_threshold_raised_to(&self) -> Option<u64> {
        self.mmap_threshold_raised_to
    }

    /// Current program break, if known.
    pub fn brk(&self) -> Option<u64> {
        self.brk
    }

    /// Size of the brk heap (`brk - start_brk`), if known.
    pub fn brk_bytes(&self) -> Option<u64> {
        Some(self.brk?.saturating_sub(self.start_brk?))
    }

    /// brk growth since attach still in place.
    pub fn brk_grown_bytes(&self) -> u64 {
        self.regions.bytes_of(RegionKind::Brk)
    }

    /// Outstanding heap totals per stack.
    pub fn heap_by_stack(&self) -> &FxHashMap<i64, Totals> {
        &self.heap_by_stack
    }

    /// Outstanding anonymous and brk bytes per stack (`count` is unused).
    pub fn mapped_by_stack(&self) -> &FxHashMap<i64, Totals> {
        &self.mapped_by_stack
    }

    /// The live blocks.
    pub fn live(&self) -> &FxHashMap<u64, Block> {
        &self.live
    }

    /// The tracked regions.
    pub fn regions(&self) -> &RegionMap {
        &self.regions
    }

    /// Oldest block timestamp per stack.
    pub fn oldest_by_stack(&self) -> FxHashMap<i64, u64> {
        let mut m: FxHashMap<i64, u64> = FxHashMap::default();
        for b in self.live.values() {
            let e = m.entry(b.stack_id).or_insert(u64::MAX);
            *e = (*e).min(b.ts_ns);
        }
        for (s, r) in self.regions.iter() {
            let _ = s;
            if r.kind != RegionKind::File {
                let e = m.entry(r.stack_id).or_insert(u64::MAX);
                *e = (*e).min(r.ts_ns);
            }
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::PAGE;

    fn alloc(func: AllocFn, addr: u64, size: u64, old: u64, stack: i64, ts: u64) -> Event {
        Event {
            kind: kind::ALLOC,
            addr,
            size,
            aux: old,
            aux2: ts.saturating_sub(1),
            stack_id: stack,
            func: func as u32,
            ts_ns: ts,
            ..Event::default()
        }
    }
    fn free(addr: u64) -> Event {
        Event {
            kind: kind::FREE,
            addr,
            func: AllocFn::Free as u32,
            ..Event::default()
        }
    }

    /// A realloc that resized its block in place (no stack walked) keeps the block's
    /// stack and age and counts neither an allocation nor a free for that stack; one
    /// of a block from before attach becomes known, without a stack.
    /// A stack is idle once nothing it allocated is live and its last event is older
    /// than the cut; forgetting it drops its churn and counts it.
    #[test]
    fn idle_stacks_are_those_with_nothing_live_and_no_recent_allocation() {
        let mut l = Ledger::new(None, None);
        l.apply(&alloc(AllocFn::Malloc, 0x1000, 100, 0, 1, 1_000));
        l.apply(&alloc(AllocFn::Malloc, 0x2000, 100, 0, 2, 1_000));
        l.apply(&alloc(AllocFn::Malloc, 0x3000, 100, 0, 3, 9_000));
        l.apply(&free(0x2000));
        l.apply(&free(0x3000));
        // 1 holds a live block; 2 is freed and old; 3 is freed but recent; 4 has
        // no block and an old event.
        let seen = [(1, 1_000), (2, 1_000), (3, 9_000), (4, 0)];
        assert_eq!(l.idle_stacks(seen.into_iter(), 5_000), vec![2, 4]);
        l.forget_stacks(&[2, 4]);
        assert_eq!(l.stack_activity(2), StackActivity::default());
        assert_eq!(l.stack_activity(3).allocs, 1);
        assert_eq!(l.counters.stacks_aged_out, 2);
    }

    #[test]
    fn realloc_in_place_keeps_its_stack() {
        let in_place = |addr, size, ts| Event {
            flags: EVENT_IN_PLACE,
            ..alloc(AllocFn::Realloc, addr, size, addr, STACK_NONE_ID, ts)
        };
        const STACK_NONE_ID: i64 = leaktrace_common::STACK_NONE;
        let mut l = Ledger::default();
        l.apply(&alloc(AllocFn::Malloc, 0x10, 100, 0, 7, 1));
        l.apply(&in_place(0x10, 300, 5));
        assert_eq!((l.live_bytes(), l.live_allocations()), (300, 1));
        let b = l.live()[&0x10];
        assert_eq!((b.size, b.stack_id, b.ts_ns), (300, 7, 1));
        assert_eq!(l.heap_by_stack()[&7].bytes, 300);
        let a = l.stack_activity(7);
        assert_eq!((a.allocs, a.frees), (1, 0), "a resize is neither");
        // A block from before attach: known from now on, stackless.
        l.apply(&in_place(0x80, 64, 9));
        assert_eq!(l.live()[&0x80].stack_id, STACK_NONE_ID);
        assert_eq!(l.counters.realloc_unknown, 1);
        assert_eq!(l.live_bytes(), 364);
        // Freed later: both gone.
        l.apply(&free(0x10));
        l.apply(&free(0x80));
        assert_eq!((l.live_bytes(), l.live_allocations()), (0, 0));
    }

    /// malloc/free/realloc sequences end in exact live bytes, blocks, and counters.
    #[test]
    fn heap_semantics() {
        use AllocFn::*;
        // (events, live bytes, live blocks, free_unknown, failed, realloc_unknown)
        let cases: Vec<(Vec<Event>, u64, u64, u64, u64, u64)> = vec![
            (vec![alloc(Malloc, 0x10, 100, 0, 1, 1)], 100, 1, 0, 0, 0),
            (
                vec![alloc(Malloc, 0x10, 100, 0, 1, 1), free(0x10)],
                0,
                0,
                0,
                0,
                0,
            ),
            // NULL result is no allocation.
            (vec![alloc(Malloc, 0, 100, 0, 1, 1)], 0, 0, 0, 1, 0),
            // Free of a block from before attach.
            (vec![free(0x99)], 0, 0, 1, 0, 0),
            // realloc(NULL, n) allocates.
            (vec![alloc(Realloc, 0x20, 64, 0, 1, 1)], 64, 1, 0, 0, 0),
            // Grow in place, then move.
            (
                vec![
                    alloc(Malloc, 0x10, 10, 0, 1, 1),
                    alloc(Realloc, 0x10, 20, 0x10, 2, 2),
                    alloc(Realloc, 0x30, 40, 0x10, 3, 3),
                ],
                40,
                1,
                0,
                0,
                0,
            ),
            // Failed realloc keeps the old block.
            (
                vec![
                    alloc(Malloc, 0x10, 10, 0, 1, 1),
                    alloc(Realloc, 0, 1 << 40, 0x10, 2, 2),
                ],
                10,
                1,
                0,
                1,
                0,
            ),
            // realloc(p, 0) frees p in glibc.
            (
                vec![
                    alloc(Malloc, 0x10, 10, 0, 1, 1),
                    alloc(Realloc, 0, 0, 0x10, 2, 2),
                ],
                0,
                0,
                0,
                0,
                0,
            ),
            // realloc of a pre-attach block: new block counted, old unknown.
            (vec![alloc(Realloc, 0x50, 30, 0x40, 1, 1)], 30, 1, 0, 0, 1),
            // Another thread got the old address before the realloc's event arrived.
            // (its realloc entered at t=2, freed 0x10 inside, another thread's malloc got 0x10 at t=3).
            (
                vec![
                    alloc(Malloc, 0x10, 10, 0, 1, 1),
                    alloc(Malloc, 0x10, 7, 0, 9, 3),
                    Event {
                        aux2: 2,
                        ..alloc(Realloc, 0x30, 40, 0x10, 2, 5)
                    },
                ],
                47,
                2,
                0,
                0,
                0,
            ),
        ];
        for (i, (evs, bytes, blocks, fu, failed, ru)) in cases.into_iter().enumerate() {
            let mut l = Ledger::default();
            for e in &evs {
                l.apply(e);
            }
            assert_eq!(
                (l.live_bytes(), l.live_allocations()),
                (bytes, blocks),
                "case {i}"
            );
            assert_eq!(
                (
                    l.counters.free_unknown,
                    l.counters.failed_allocs,
                    l.counters.realloc_unknown
                ),
                (fu, failed, ru),
                "case {i}"
            );
            let per_stack: u64 = l.heap_by_stack().values().map(|t| t.bytes).sum();
            assert_eq!(
                per_stack,
                l.live_bytes(),
                "case {i}: per-stack totals add up"
            );
        }
    }

    /// Sampling weights are exact without sampling and unbiased with it: blocks much
    /// larger than the interval count as themselves, small ones as size/p.
    #[test]
    fn sampling_weights() {
        assert_eq!(weigh(100, 0, FULL_DUTY), (100, 1, 0.0));
        let (b, c, v) = weigh(64 << 20, 512 << 10, FULL_DUTY);
        assert_eq!((b, c), (64 << 20, 1));
        assert!(v < 1.0);
        // 100 bytes at 512 KiB: p = 1 - e^(-100/524288) ≈ 1.907e-4; weight ≈ 5243.
        let (b, c, _) = weigh(100, 512 << 10, FULL_DUTY);
        assert_eq!(c, 5243);
        assert!((b as i64 - 524_338).abs() <= 1, "{b}");
        // Simulate: 200,000 blocks of 100 bytes sampled at p; the estimate lands within 4 sigma.
        let rate = 64 << 10;
        let p = -(-(100f64) / rate as f64).exp_m1();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut l = Ledger::default().with_sampling(rate);
        for i in 0..200_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if ((x >> 11) as f64 / (1u64 << 53) as f64) < p {
                l.apply(&alloc(AllocFn::Malloc, 0x1000 + i * 16, 100, 0, 1, 1));
            }
        }
        let truth = 20_000_000f64;
        let err = (l.live_bytes() as f64 - truth).abs();
        assert!(
            err < 4.0 * l.live_variance().sqrt(),
            "estimate {} vs {truth}, sd {}",
            l.live_bytes(),
            l.live_variance().sqrt()
        );
    }

    fn sys(k: u32, addr: u64, size: u64, aux: u64, aux2: u64, stack: i64) -> Event {
        Event {
            kind: k,
            addr,
            size,
            aux,
            aux2,
            stack_id: stack,
            ..Event::default()
        }
    }

    /// Allocator reservations (glibc arena heaps) count by their committed parts.
    #[test]
    fn arena_reservations_and_commits() {
        let anon = MAP_ANONYMOUS << 32;
        let in_alloc = |e: Event| Event {
            flags: EVENT_IN_ALLOCATOR,
            ..e
        };
        let mut l = Ledger::default();
        // glibc new_heap: reserve 128 MiB PROT_NONE, trim to a 64 MiB aligned heap, commit 132 KiB.
        l.apply(&in_alloc(sys(
            kind::MMAP,
            0x7f00_0000_0000 - (32 << 20),
            128 << 20,
            anon,
            u64::MAX,
            9,
        )));
        l.apply(&in_alloc(sys(
            kind::MUNMAP,
            0x7f00_0000_0000 - (32 << 20),
            32 << 20,
            0,
            0,
            9,
        )));
        l.apply(&in_alloc(sys(
            kind::MUNMAP,
            0x7f00_0000_0000 + (64 << 20),
            32 << 20,
            0,
            0,
            9,
        )));
        l.apply(&in_alloc(sys(
            kind::MPROTECT,
            0x7f00_0000_0000,
            132 << 10,
            3,
            0,
            9,
        )));
        // A large chunk mapped by malloc, and a plain anonymous mapping.
        l.apply(&in_alloc(sys(
            kind::MMAP,
            0x7e00_0000_0000,
            1 << 20,
            anon | 3,
            u64::MAX,
            8,
        )));
        l.apply(&sys(
            kind::MMAP,
            0x7d00_0000_0000,
            8 * PAGE,
            anon | 3,
            u64::MAX,
            7,
        ));
        let split = l.anon_split();
        assert_eq!(
            split,
            AnonSplit {
                other_anon_bytes: 8 * PAGE,
                allocator_chunk_bytes: 1 << 20,
                arena_reserved_bytes: 64 << 20,
                arena_committed_bytes: 132 << 10,
                arenas: 1,
                ..AnonSplit::default()
            }
        );
        assert_eq!(l.anon_mapped_bytes(), 8 * PAGE + (1 << 20) + (132 << 10));
        assert_eq!(
            l.arenas(),
            vec![ArenaReservation {
                start: 0x7f00_0000_0000,
                reserved_bytes: 64 << 20,
                committed_bytes: 132 << 10,
                stack_id: 9,
                tid: 0
            }]
        );
        // The arena grows, then shrinks (glibc shrink_heap re-protects its top).
        l.apply(&in_alloc(sys(
            kind::MPROTECT,
            0x7f00_0000_0000 + (132 << 10),
            1 << 20,
            3,
            0,
            9,
        )));
        assert_eq!(
            l.anon_split().arena_committed_bytes,
            (132 << 10) + (1 << 20)
        );
        l.apply(&in_alloc(sys(
            kind::MPROTECT,
            0x7f00_0000_0000 + (132 << 10),
            1 << 20,
            0,
            0,
            9,
        )));
        assert_eq!(l.anon_split().arena_committed_bytes, 132 << 10);
        // The arena is unmapped whole.
        l.apply(&sys(kind::MUNMAP, 0x7f00_0000_0000, 64 << 20, 0, 0, -1));
        assert_eq!(
            (l.anon_split().arenas, l.anon_split().arena_committed_bytes),
            (0, 0)
        );
        assert!(
            !l.mapped_by_stack().contains_key(&9),
            "reservations are not counted as mapped memory per stack"
        );
    }

    /// mmap, partial munmap, mremap and brk move the mapped totals exactly.
    #[test]
    fn address_space_semantics() {
        let anon = (MAP_ANONYMOUS | 0x02) << 32;
        let mut l = Ledger::new(Some(0x10_0000), Some(0x12_1000));
        l.apply(&sys(
            kind::MMAP,
            0x7000_0000,
            10 * PAGE,
            anon | 3,
            u64::MAX,
            1,
        ));
        assert_eq!(l.anon_mapped_bytes(), 10 * PAGE);
        l.apply(&sys(
            kind::MUNMAP,
            0x7000_0000 + 2 * PAGE,
            3 * PAGE,
            0,
            0,
            -1,
        ));
        assert_eq!(l.anon_mapped_bytes(), 7 * PAGE);
        assert_eq!(l.regions().len(), 2);
        // Grow the tail piece [5,10) pages to 8 pages, moving it.
        l.apply(&sys(
            kind::MREMAP,
            0x8000_0000,
            8 * PAGE,
            0x7000_0000 + 5 * PAGE,
            5 * PAGE,
            2,
        ));
        assert_eq!(l.anon_mapped_bytes(), 10 * PAGE);
        assert_eq!(
            l.mapped_by_stack()[&1].bytes,
            10 * PAGE,
            "growth stays with the mapping's creator"
        );
        // A mapping from before attach that grows: only the growth is counted, to the mremap caller.
        l.apply(&sys(
            kind::MREMAP,
            0x6000_0000,
            6 * PAGE,
            0x5000_0000,
            2 * PAGE,
            2,
        ));
        assert_eq!(l.mapped_by_stack()[&2].bytes, 4 * PAGE);
        l.apply(&sys(kind::MUNMAP, 0x6000_0000, 6 * PAGE, 0, 0, -1));
        // File mappings are not anonymous memory.
        l.apply(&sys(kind::MMAP, 0x9000_0000, PAGE, 1, 3, 4));
        assert_eq!(l.anon_mapped_bytes(), 10 * PAGE);
        // Unmapping something from before attach subtracts nothing.
        l.apply(&sys(kind::MUNMAP, 0x1000, PAGE, 0, 0, -1));
        // (2 pages of the grown pre-attach mapping, and this page.)
        assert_eq!(l.counters.untracked_unmapped_bytes, 3 * PAGE);
        // brk growth and shrink.
        assert_eq!(l.brk_bytes(), Some(0x2_1000));
        l.apply(&sys(kind::BRK, 0x12_1000 + 5000, 0, 0x12_1000 + 5000, 0, 5));
        assert_eq!(
            (l.brk_bytes(), l.brk_grown_bytes()),
            (Some(0x2_1000 + 5000), 5000)
        );
        l.apply(&sys(kind::BRK, 0x12_1000 + 1000, 0, 0x12_1000 + 1000, 0, 6));
        assert_eq!(
            (l.brk_bytes(), l.brk_grown_bytes()),
            (Some(0x2_1000 + 1000), 1000)
        );
        assert_eq!(l.mapped_by_stack()[&5].bytes, 1000);
        // Unmap everything tracked.
        l.apply(&sys(kind::MUNMAP, 0x7000_0000, 5 * PAGE, 0, 0, -1));
        l.apply(&sys(kind::MUNMAP, 0x8000_0000, 8 * PAGE, 0, 0, -1));
        assert_eq!(l.anon_mapped_bytes(), 0);
        assert!(!l.mapped_by_stack().contains_key(&1));
    }

    /// CPython: anonymous 1 MiB read-write mappings made outside malloc are pymalloc
    /// arenas; glibc freeing a 1 MiB mmapped chunk raises its mmap threshold.
    #[test]
    fn pymalloc_arenas_and_mmap_threshold() {
        let anon_rw = (MAP_ANONYMOUS << 32) | 3;
        let in_alloc = |e: Event| Event {
            flags: EVENT_IN_ALLOCATOR,
            ..e
        };
        let mut l = Ledger::default().with_pymalloc_arena(Some(1 << 20));
        l.apply(&sys(
            kind::MMAP,
            0x7d00_0000_0000,
            1 << 20,
            anon_rw,
            u64::MAX,
            5,
        ));
        l.apply(&sys(
            kind::MMAP,
            0x7d00_0010_0000,
            1 << 20,
            anon_rw,
            u64::MAX,
            5,
        ));
        l.apply(&sys(
            kind::MMAP,
            0x7d00_0100_0000,
            2 << 20,
            anon_rw,
            u64::MAX,
            6,
        ));
        l.apply(&in_alloc(sys(
            kind::MMAP,
            0x7e00_0000_0000,
            1 << 20,
            anon_rw,
            u64::MAX,
            8,
        )));
        let split = l.anon_split();
        assert_eq!(
            (
                split.pymalloc_arenas,
                split.pymalloc_arena_bytes,
                split.other_anon_bytes,
                split.allocator_chunk_bytes
            ),
            (2, 2 << 20, 2 << 20, 1 << 20)
        );
        assert_eq!(l.anon_mapped_bytes(), 5 << 20);
        assert_eq!(l.mmap_threshold_raised_to(), None);
        l.apply(&in_alloc(sys(
            kind::MUNMAP,
            0x7e00_0000_0000,
            1 << 20,
            0,
            0,
            8,
        )));
        assert_eq!(l.mmap_threshold_raised_to(), Some(1 << 20));
        // Not a pymalloc process: the same mapping is plain anonymous memory.
        let mut l = Ledger::default();
        l.apply(&sys(
            kind::MMAP,
            0x7d00_0000_0000,
            1 << 20,
            anon_rw,
            u64::MAX,
            5,
        ));
        assert_eq!(
            (
                l.anon_split().pymalloc_arenas,
                l.anon_split().other_anon_bytes
            ),
            (0, 1 << 20)
        );
    }

    /// Arenas reserved before attach grow by mprotect from inside malloc: those
    /// commits count, and shrink again when the allocator re-protects them.
    #[test]
    fn commits_in_arenas_from_before_attach() {
        let in_alloc = |e: Event| Event {
            flags: EVENT_IN_ALLOCATOR,
            ..e
        };
        let mut l = Ledger::default();
        l.apply(&in_alloc(sys(
            kind::MPROTECT,
            0x7f00_0002_1000,
            1 << 20,
            3,
            0,
            4,
        )));
        assert_eq!(l.anon_split().arena_committed_bytes, 1 << 20);
        l.apply(&in_alloc(sys(
            kind::MPROTECT,
            0x7f00_0008_0000,
            1 << 19,
            0,
            0,
            4,
        )));
        assert_eq!(l.anon_split().arena_committed_bytes, (1 << 20) - (1 << 19));
        // The same mprotect outside an allocator call is not the allocator's.
        let mut l = Ledger::default();
        l.apply(&sys(kind::MPROTECT, 0x7f00_0002_1000, 1 << 20, 3, 0, 4));
        assert_eq!(l.anon_split().arena_committed_bytes, 0);
    }
}
