//! leaktrace's BPF programs.
//!
//! Allocator uprobes (`heap.rs`) and address-space syscall tracepoints
//! (`syscalls.rs`) share the maps, the configuration and the stack capture
//! (`stack.rs`) defined here. The kernel keeps only what must live there:
//! per-thread in-flight state and deduplicated stacks. Everything else streams
//! to userspace as fixed-size [`Event`] records through one ring buffer.
#![no_std]
#![no_main]
#![allow(
    missing_docs,
    reason = "program shims are documented where they are generated"
)]

mod calibrate;
mod heap;
mod python;
mod stack;
mod syscalls;
mod window;

use aya_ebpf::{
    Global,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use leaktrace_common::{
    AllocEntry, CONFIG_FOLLOW_FORKS, Config, DEFAULT_INFLIGHT_CAPACITY, DEFAULT_RING_BYTES,
    DEFAULT_STACK_CAPACITY, Event, MAX_TARGETS, StackTrace, SyscallEntry, counter,
};

/// Load-time configuration (read-only data, set by the loader).
#[unsafe(no_mangle)]
static CONFIG: Global<Config> = Global::new(Config {
    tgid: 0,
    flags: 0,
    wakeup_bytes: 0,
    sample_bytes: 0,
    returns: leaktrace_common::ReturnOffsets {
        utask: 0,
        instances: 0,
        stack: 0,
        orig: 0,
        next: 0,
        _pad: [0; 3],
    },
    signals: leaktrace_common::SignalOffsets {
        sighand: 0,
        action: 0,
        k_sigaction: 0,
        blocked: 0,
    },
});

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);

#[map]
static TARGETS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_TARGETS, 0);

/// Whether process `tgid` is traced: the target, or a followed descendant.
#[inline(always)]
fn is_target(tgid: u32) -> bool {
    let c = CONFIG.load();
    tgid == c.tgid
        || (c.flags & CONFIG_FOLLOW_FORKS != 0
            // SAFETY: a plain lookup; the value is not kept.
            && unsafe { TARGETS.get(&tgid) }.is_some())
}

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[map]
static STACKS: HashMap<i64, StackTrace> = HashMap::with_max_entries(DEFAULT_STACK_CAPACITY, 0);

#[map]
static STACK_SCRATCH: PerCpuArray<StackTrace> = PerCpuArray::with_max_entries(1, 0);

#[map]
static ALLOC_INFLIGHT: LruHashMap<u32, AllocEntry> =
    LruHashMap::with_max_entries(DEFAULT_INFLIGHT_CAPACITY, 0);

#[map]
static SAMPLE_COUNTDOWN: LruHashMap<u32, i64> =
    LruHashMap::with_max_entries(DEFAULT_INFLIGHT_CAPACITY, 0);

#[map]
static EXP_DRAWS: Array<u64> = Array::with_max_entries(leaktrace_common::EXP_DRAWS, 0);

#[map]
static SAMPLED: HashMap<u64, u8> =
    HashMap::with_max_entries(leaktrace_common::DEFAULT_SAMPLED_CAPACITY, 0);

#[map]
static HITS: PerCpuArray<u64> = PerCpuArray::with_max_entries(leaktrace_common::maps::HIT_SLOTS, 0);

#[map]
static ENABLED: Array<u32> = Array::with_max_entries(2, 0);

/// Where a traced process has mapped a file's code, (tgid, start) → 1: a code
/// mapping made again at one of these addresses (a library unloaded and another, or
/// the same, loaded where it was) bumps [`CODE_GENERATION`].
#[map]
static CODE_STARTS: LruHashMap<[u64; 2], u8> = LruHashMap::with_max_entries(8192, 0);

/// Bumped when code is mapped where other code was: part of every native stack's
/// id from then on, so the same addresses in the new code make new stacks (named
/// after the new code) instead of adding to the old code's.
#[map]
static CODE_GENERATION: Array<u64> = Array::with_max_entries(1, 0);

#[map]
static LAST_RETURN: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

#[map]
static PY_CONFIG: Array<leaktrace_common::PyConfig> = Array::with_max_entries(1, 0);

#[map]
static PY_STACKS: HashMap<i64, leaktrace_common::PyStack> =
    HashMap::with_max_entries(DEFAULT_STACK_CAPACITY, 0);

#[map]
static PY_WALK: PerCpuArray<python::WalkState> = PerCpuArray::with_max_entries(1, 0);

#[map]
static PY_SCRATCH: PerCpuArray<leaktrace_common::PyStack> = PerCpuArray::with_max_entries(1, 0);

#[map]
static PY_TSTATES: LruHashMap<u32, u64> =
    LruHashMap::with_max_entries(leaktrace_common::DEFAULT_PY_TSTATE_CAPACITY, 0);

#[map]
static PY_THREAD_SEARCH: PerCpuArray<python::ThreadSearch> = PerCpuArray::with_max_entries(1, 0);

#[map]
static UNWIND_OBJECTS: LpmTrie<[u8; 8], leaktrace_common::UnwindObject> =
    LpmTrie::with_max_entries(leaktrace_common::DEFAULT_UNWIND_PREFIXES, 0);

#[map]
static UNWIND_GEN: Array<u64> = Array::with_max_entries(1, 0);

#[map]
static UNWIND_ROWS: Array<leaktrace_common::UnwindRow> = Array::with_max_entries(
    leaktrace_common::DEFAULT_UNWIND_ROWS,
    aya_ebpf::bindings::BPF_F_MMAPABLE,
);

#[map]
// u64 slots: an mmapable array strides its elements by 8 bytes anyway.
static UNWIND_PAGES: Array<u64> = Array::with_max_entries(
    leaktrace_common::DEFAULT_UNWIND_PAGES,
    aya_ebpf::bindings::BPF_F_MMAPABLE,
);

#[map]
static STACK_COPIES: RingBuf = RingBuf::with_byte_size(4096, 0);

#[map]
static STACK_WINDOW: PerCpuArray<window::StackWindow> = PerCpuArray::with_max_entries(1, 0);

#[map]
static UNWIND_WALK: PerCpuArray<stack::UnwindState> = PerCpuArray::with_max_entries(1, 0);

#[map]
static FREE_MARK: LruHashMap<u32, leaktrace_common::FreeMark> =
    LruHashMap::with_max_entries(DEFAULT_INFLIGHT_CAPACITY, 0);

#[map]
static SYSCALL_INFLIGHT: HashMap<u32, SyscallEntry> =
    HashMap::with_max_entries(DEFAULT_INFLIGHT_CAPACITY, 0);

/// The heap probes' current window: an allocator entry recorded in an earlier window
/// (the probes were detached before its return) is not in flight. Userspace bumps
/// `ENABLED[1]` at each window; entries store it plus one, so 0 stays "none".
#[inline(always)]
fn window_generation() -> u32 {
    ENABLED.get(1).copied().unwrap_or(0).wrapping_add(1).max(1)
}

/// Adds one to a per-CPU counter.
#[inline(always)]
fn count(id: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(id) {
        // SAFETY: the pointer comes from a successful map lookup and the slot is
        // this CPU's own, so no other program writes it concurrently.
        unsafe { *slot += 1 };
    }
}

/// Counts one entry-probe hit of allocator function `func`.
#[inline(always)]
fn hit(func: u32) {
    if let Some(slot) = HITS.get_ptr_mut(func) {
        // SAFETY: this CPU's own slot from a successful lookup.
        unsafe { *slot += 1 };
    }
}

/// The thread a program runs for: its id and its process's, read once per run.
#[derive(Clone, Copy)]
struct Caller {
    tid: u32,
    tgid: u32,
}

impl Caller {
    #[inline(always)]
    fn current() -> Self {
        let pid_tgid = bpf_get_current_pid_tgid();
        Self {
            tid: pid_tgid as u32,
            tgid: (pid_tgid >> 32) as u32,
        }
    }
}

/// The caller, if it belongs to a traced process and the `what` bit of `ENABLED` is
/// set.
#[inline(always)]
fn traced_thread(what: u32) -> Option<Caller> {
    let me = Caller::current();
    if !is_target(me.tgid) {
        return None;
    }
    // Userspace flips this once all probes are attached: an entry probe without its
    // return probe (or the reverse) would otherwise pair calls wrongly during attach.
    // Userspace also clears the heap bit before detaching the heap probes, so they
    // all stop at once.
    if ENABLED.get(0).copied().unwrap_or(0) & what == 0 {
        return None;
    }
    Some(me)
}

/// Sends one event of `who`'s, counting a full ring buffer as a loss.
///
/// The consumer is woken only when enough data waits (it drains on a timer
/// otherwise): a wakeup per event doubled the cost of a traced malloc+free.
#[inline(always)]
fn emit(who: Caller, ev: Event) {
    match EVENTS.reserve::<Event>(0) {
        Some(mut slot) => {
            slot.write(Event {
                tid: who.tid,
                tgid: who.tgid,
                ..ev
            });
            let waiting = EVENTS.query(aya_ebpf::bindings::BPF_RB_AVAIL_DATA as u64);
            let flag = if waiting >= u64::from(CONFIG.load().wakeup_bytes) {
                aya_ebpf::bindings::BPF_RB_FORCE_WAKEUP
            } else {
                aya_ebpf::bindings::BPF_RB_NO_WAKEUP
            };
            slot.submit(flag as u64);
            count(counter::EVENTS_SENT);
        }
        None => count(counter::RINGBUF_FULL),
    }
}

/// Monotonic timestamp in nanoseconds.
#[inline(always)]
fn now() -> u64 {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
