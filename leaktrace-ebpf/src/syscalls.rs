//! Address-space syscall tracepoints: mmap, munmap, mremap, brk, mprotect and
//! madvise(MADV_DONTNEED/MADV_FREE).
//!
//! The entry tracepoint saves the arguments per thread (this kernel has no
//! kprobes, and the exit tracepoint only carries the return value); the exit
//! tracepoint emits one event for a successful call. A syscall made from inside
//! a probed allocator call (glibc's malloc growing the heap with brk, or mapping
//! a large chunk) takes the allocator call's stack, which names the code that
//! asked for memory rather than glibc internals.
//!
//! Argument offsets are those of
//! `/sys/kernel/tracing/events/syscalls/sys_enter_<name>/format` on x86-64:
//! the common header takes 8 bytes, `__syscall_nr` is at 8, and the arguments
//! follow at 16, 24, 32, 40, 48 (8 bytes each); `sys_exit_*` has `ret` at 16.

use aya_ebpf::{
    EbpfContext as _, bindings::BPF_ANY, macros::tracepoint, programs::TracePointContext,
};
use leaktrace_common::{
    CONFIG_FOLLOW_FORKS, CONFIG_FREE_MARK, CONFIG_STOP_ON_EXEC_MAP, ENABLE_SYSCALLS,
    EVENT_IN_ALLOCATOR, Event, STACK_IN_ALLOCATOR, STACK_NONE, SyscallEntry, counter, kind, nr,
};

use aya_ebpf::helpers::{
    bpf_get_current_task, bpf_get_current_task_btf, bpf_probe_read_kernel, bpf_probe_read_user,
    bpf_task_pt_regs,
};

use aya_ebpf::helpers::bpf_send_signal_thread;

use crate::{
    ALLOC_INFLIGHT, CODE_GENERATION, CODE_STARTS, CONFIG, Caller, FREE_MARK, SYSCALL_INFLIGHT,
    TARGETS, count, emit, is_target, now, stack, traced_thread,
};

const MADV_DONTNEED: u64 = 4;
const MADV_FREE: u64 = 8;

/// Whether the current thread is inside a `free` call (see [`leaktrace_common::FreeMark`]).
#[inline(always)]
fn inside_free(tid: u32) -> bool {
    // SAFETY: a lookup returns a pointer valid for this program run; we copy it out.
    let Some(mark) = (unsafe { FREE_MARK.get(&tid) }).copied() else {
        return false;
    };
    // SAFETY: bpf_get_current_task_btf returns the current task; bpf_task_pt_regs its user registers.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) }
        as *const aya_ebpf::bindings::pt_regs;
    if regs.is_null() {
        return false;
    }
    // SAFETY: probe reads of kernel and user memory cannot fault.
    let sp = unsafe { bpf_probe_read_kernel(&raw const (*regs).rsp) }.unwrap_or(u64::MAX);
    sp < mark.sp
        && unsafe { bpf_probe_read_user(mark.sp as *const u64) }.is_ok_and(|r| r == mark.ret)
}

/// Reads the `i`-th syscall argument (or, on exit, `ret` for `i == 0`).
#[inline(always)]
fn field(ctx: &TracePointContext, i: usize) -> u64 {
    // SAFETY: tracepoint context is readable up to the size of its format; the
    // syscall formats we attach to have at least `i + 1` 8-byte fields after offset 16.
    unsafe { *(ctx.as_ptr() as *const u8).add(16 + 8 * i).cast::<u64>() }
}

#[inline(always)]
fn sys_enter(ctx: &TracePointContext, nr: u32, nargs: usize, want_stack: bool) -> u32 {
    let Some(me) = traced_thread(ENABLE_SYSCALLS) else {
        return 0;
    };
    let tid = me.tid;
    let mut args = [0u64; 5];
    // Reading past the format's last field makes the kernel refuse to attach (EACCES).
    for (i, a) in args.iter_mut().enumerate().take(nargs) {
        *a = field(ctx, i);
    }
    if nr == nr::MADVISE && args[2] != MADV_DONTNEED && args[2] != MADV_FREE {
        return 0;
    }
    // SAFETY: a lookup returns a pointer valid for this program run.
    let (stack_id, flags) = match unsafe { ALLOC_INFLIGHT.get(&tid) }
        .filter(|e| e.active == crate::window_generation())
    {
        Some(alloc) => (alloc.stack_id, EVENT_IN_ALLOCATOR),
        None if CONFIG.load().flags & CONFIG_FREE_MARK != 0 => {
            let flags = if inside_free(tid) {
                EVENT_IN_ALLOCATOR
            } else {
                0
            };
            (
                if want_stack {
                    stack::at_syscall(true).0
                } else {
                    STACK_NONE
                },
                flags,
            )
        }
        // CFI stacks: the walk itself tells whether a `free` call (or a malloc/calloc
        // under a uprobe session, which leaves no entry when unsampled) is on the stack;
        // syscalls whose stack is not kept are walked for that alone.
        None => {
            let (id, walk) = stack::at_syscall(want_stack);
            (
                id,
                if walk & STACK_IN_ALLOCATOR != 0 {
                    EVENT_IN_ALLOCATOR
                } else {
                    0
                },
            )
        }
    };
    let entry = SyscallEntry {
        args,
        stack_id,
        nr,
        flags,
    };
    if SYSCALL_INFLIGHT.insert(tid, entry, BPF_ANY as u64).is_err() {
        count(counter::SYSCALL_INFLIGHT_FULL);
    }
    0
}

#[inline(always)]
fn sys_exit(ctx: &TracePointContext, nr: u32) -> u32 {
    let Some(me) = traced_thread(ENABLE_SYSCALLS) else {
        return 0;
    };
    let tid = me.tid;
    // SAFETY: a lookup returns a pointer valid for this program run; we copy it out.
    let Some(e) = (unsafe { SYSCALL_INFLIGHT.get(tid) }).copied() else {
        // madvise with other advice is not recorded at entry.
        if nr != nr::MADVISE {
            count(counter::SYSCALL_WITHOUT_ENTRY);
        }
        return 0;
    };
    let _ = SYSCALL_INFLIGHT.remove(tid);
    if e.nr != nr {
        count(counter::SYSCALL_WITHOUT_ENTRY);
        return 0;
    }
    let ret = field(ctx, 0);
    // brk returns the (possibly unchanged) break; the others return -errno on failure.
    if nr != nr::BRK && (ret as i64) < 0 && (ret as i64) > -4096 {
        return 0;
    }
    let a = e.args;
    let (k, addr, size, aux, aux2) = match nr {
        nr::MMAP => (kind::MMAP, ret, a[1], a[2] | (a[3] << 32), a[4]),
        nr::MUNMAP => (kind::MUNMAP, a[0], a[1], 0, 0),
        nr::MREMAP => (kind::MREMAP, ret, a[2], a[0], a[1]),
        nr::BRK => (kind::BRK, ret, 0, a[0], 0),
        nr::MPROTECT => (kind::MPROTECT, a[0], a[1], a[2], 0),
        _ => (kind::MADVISE, a[0], a[1], a[2], 0),
    };
    emit(
        me,
        Event {
            kind: k,
            ts_ns: now(),
            addr,
            size,
            aux,
            aux2,
            stack_id: e.stack_id,
            func: nr,
            flags: e.flags,
            ..Event::default()
        },
    );
    // A file's code mapped where code was mapped before: the same addresses are other
    // code now, and stacks through them get new ids.
    if nr == nr::MMAP && a[2] & PROT_EXEC != 0 && (a[4] as i64) >= 0 {
        let key = [u64::from(me.tgid), ret];
        // SAFETY: a lookup returns a pointer valid for this program run.
        if unsafe { CODE_STARTS.get(&key) }.is_some() {
            if let Some(g) = CODE_GENERATION.get_ptr_mut(0) {
                // SAFETY: the map's one slot. Not atomic: two CPUs bumping at once may
                // both write the same value, which still differs from the old one.
                unsafe { *g = (*g).wrapping_add(1) };
            }
        } else {
            let _ = CODE_STARTS.insert(&key, &1, 0);
        }
    }
    // A launched command's main thread mapped a file's code: hold it (leaktrace is
    // its tracer and resumes it) until that code's unwind tables are loaded.
    if nr == nr::MMAP
        && a[2] & PROT_EXEC != 0
        && (a[4] as i64) >= 0
        && CONFIG.load().flags & CONFIG_STOP_ON_EXEC_MAP != 0
        && tid == CONFIG.load().tgid
    {
        if !sigurg_unseen() {
            count(counter::EXEC_MAP_NOT_HELD);
        // SAFETY: signals the current thread; the helper has no memory arguments.
        } else if unsafe { bpf_send_signal_thread(SIGURG) } == 0 {
            count(counter::EXEC_MAP_STOPS);
        }
    }
    0
}

/// Whether a SIGURG delivered to the current thread would go unseen: its handler is
/// the default (ignore) or SIG_IGN, and it is not blocked (a blocked one would stay
/// pending). leaktrace drops the signal when it resumes the thread; only if leaktrace
/// dies during the hold does the kernel deliver it.
#[inline(always)]
fn sigurg_unseen() -> bool {
    let o = CONFIG.load().signals;
    if o.sighand == 0 || o.k_sigaction == 0 {
        return false;
    }
    // SAFETY: the helper has no preconditions.
    let task = unsafe { bpf_get_current_task() };
    let read = |a: u64| {
        // SAFETY: reading kernel memory through the helper cannot fault the kernel.
        unsafe { bpf_probe_read_kernel(a as *const u64) }.ok()
    };
    let Some(sighand) = read(task + u64::from(o.sighand)) else {
        return false;
    };
    let slot = u64::from(o.action) + (u64::from(SIGURG) - 1) * u64::from(o.k_sigaction);
    let (Some(handler), Some(blocked)) = (read(sighand + slot), read(task + u64::from(o.blocked)))
    else {
        return false;
    };
    // SIG_DFL is 0, SIG_IGN 1.
    handler <= 1 && blocked & (1 << (SIGURG - 1)) == 0
}

const PROT_EXEC: u64 = 4;
// SIGURG: ignored by default, so if leaktrace died with the thread stopped, its
// re-delivery would do nothing (SIGSTOP would stop the whole process).
const SIGURG: u32 = 23;

macro_rules! syscall_probes {
    ($enter:ident, $exit:ident, $nr:expr, $nargs:expr, $want_stack:expr) => {
        #[doc = concat!("`", stringify!($enter), "` tracepoint.")]
        #[tracepoint]
        pub fn $enter(ctx: TracePointContext) -> u32 {
            sys_enter(&ctx, $nr, $nargs, $want_stack)
        }
        #[doc = concat!("`", stringify!($exit), "` tracepoint.")]
        #[tracepoint]
        pub fn $exit(ctx: TracePointContext) -> u32 {
            sys_exit(&ctx, $nr)
        }
    };
}

/// `sched:sched_process_exec`: the traced process replaced its program (its books
/// restart). Sent in order with the events of the old program, before the new one
/// runs.
#[tracepoint]
pub fn sched_process_exec(_ctx: TracePointContext) -> u32 {
    let Some(me) = traced_thread(ENABLE_SYSCALLS) else {
        return 0;
    };
    emit(
        me,
        Event {
            kind: kind::EXEC,
            ts_ns: now(),
            stack_id: STACK_NONE,
            ..Event::default()
        },
    );
    // A followed descendant that runs another program is no longer followed.
    if me.tgid != CONFIG.load().tgid {
        let _ = TARGETS.remove(&me.tgid);
    }
    0
}

/// `CLONE_THREAD`: the new task is a thread of its creator's process.
const CLONE_THREAD: u64 = 0x10000;

/// `task:task_newtask`, with [`CONFIG_FOLLOW_FORKS`]: a traced process made a new
/// process; it joins [`TARGETS`] before it first runs. (Fields: `pid` at 8,
/// `clone_flags` at 32, the same on Linux 5.10 to 6.18.)
#[tracepoint]
pub fn task_newtask(ctx: TracePointContext) -> u32 {
    if CONFIG.load().flags & CONFIG_FOLLOW_FORKS == 0 {
        return 0;
    }
    let me = Caller::current();
    if !is_target(me.tgid) {
        return 0;
    }
    // SAFETY: offsets within the tracepoint's record (format above).
    let (Ok(child), Ok(flags)) = (unsafe { ctx.read_at::<i32>(8) }, unsafe {
        ctx.read_at::<u64>(32)
    }) else {
        return 0;
    };
    if flags & CLONE_THREAD != 0 || child <= 0 {
        return 0;
    }
    if TARGETS
        .insert(&(child as u32), &1, u64::from(BPF_ANY))
        .is_err()
    {
        count(counter::FORKS_NOT_FOLLOWED);
        return 0;
    }
    emit(
        me,
        Event {
            kind: kind::FORK,
            ts_ns: now(),
            addr: child as u64,
            stack_id: STACK_NONE,
            ..Event::default()
        },
    );
    0
}

/// `sched:sched_process_exit`, with [`CONFIG_FOLLOW_FORKS`]: a followed descendant's
/// leader thread exits; the process leaves [`TARGETS`].
#[tracepoint]
pub fn sched_process_exit(_ctx: TracePointContext) -> u32 {
    if CONFIG.load().flags & CONFIG_FOLLOW_FORKS == 0 {
        return 0;
    }
    let me = Caller::current();
    if me.tid != me.tgid || me.tgid == CONFIG.load().tgid {
        return 0;
    }
    // SAFETY: a plain lookup; the value is not kept.
    if unsafe { TARGETS.get(&me.tgid) }.is_none() {
        return 0;
    }
    let _ = TARGETS.remove(&me.tgid);
    emit(
        me,
        Event {
            kind: kind::EXIT,
            ts_ns: now(),
            stack_id: STACK_NONE,
            ..Event::default()
        },
    );
    0
}

// (enter, exit, number, arguments read, capture a stack)
syscall_probes!(sys_enter_mmap, sys_exit_mmap, nr::MMAP, 5, true);
syscall_probes!(sys_enter_munmap, sys_exit_munmap, nr::MUNMAP, 2, false);
syscall_probes!(sys_enter_mremap, sys_exit_mremap, nr::MREMAP, 5, true);
syscall_probes!(sys_enter_brk, sys_exit_brk, nr::BRK, 1, true);
syscall_probes!(
    sys_enter_mprotect,
    sys_exit_mprotect,
    nr::MPROTECT,
    3,
    false
);
syscall_probes!(sys_enter_madvise, sys_exit_madvise, nr::MADVISE, 3, false);
