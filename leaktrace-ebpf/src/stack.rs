//! User stack capture: the one place that turns a register state into a stack id.
//! The walk follows the objects' compact CFI tables (built in userspace from
//! `.eh_frame`, see `leaktrace/src/unwind/`) inside `bpf_loop`, falls back to frame
//! pointers where an object has no table (or everywhere with `--unwind fp`), and can
//! hand the CPython walk its turn (`python.rs`). Two entry points match the two
//! places we capture from:
//!
//! * [`at_function_entry`]: a uprobe on a function's first instruction. The
//!   return address sits at `[sp]` and `rbp` still holds the caller's frame
//!   pointer, so the immediate caller — which `bpf_get_stackid` would skip,
//!   since the callee has not pushed a frame yet — is recorded first.
//! * [`at_syscall`]: a syscall tracepoint. The interrupted instruction pointer
//!   (inside the libc wrapper) comes first, then `[sp]`, which is the wrapper's
//!   return address when the wrapper is a leaf that has not touched the stack
//!   (glibc's `mmap64`, `munmap`, `brk`, `syscall`); userspace keeps that guess
//!   only if it lands in executable code.
//!
//! Stacks are deduplicated by a 64-bit hash of their frames used as the map key,
//! with a second independent hash stored beside the frames: two different stacks
//! with the same key are detected and counted as a collision, never merged.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{
        bpf_get_current_task, bpf_get_current_task_btf, bpf_loop, bpf_probe_read_kernel,
        bpf_probe_read_user, bpf_probe_read_user_buf, bpf_task_pt_regs,
    },
    maps::lpm_trie::Key,
};
use leaktrace_common::{
    CONFIG_CAPTURE_STACKS, CONFIG_COPY_STACKS, CONFIG_FP_STACKS, CONFIG_RETURN_FIXUP,
    MAX_STACK_DEPTH, STACK_CFI, STACK_COPY_BYTES, STACK_FP_FALLBACK, STACK_IN_ALLOCATOR,
    STACK_NONE, STACK_SYSCALL, STACK_TRUNCATED, StackTrace, UNWIND_CFA_RBP, UNWIND_CFA_RSP,
    UNWIND_END, UNWIND_GAP, UNWIND_PAGE_SHIFT, UNWIND_PLT, UNWIND_SEARCH_STEPS, UnwindObject,
    counter,
};

use crate::{
    CONFIG, STACK_COPIES, STACK_SCRATCH, STACKS, UNWIND_GEN, UNWIND_OBJECTS, UNWIND_PAGES,
    UNWIND_ROWS, UNWIND_WALK, count,
    window::{clear_window, window_word},
};

/// A frame pointer more than this far above the stack pointer is not followed:
/// it is a register reused for data, not a frame in this thread's stack.
const MAX_STACK_SPAN: u64 = 64 << 20;

const E2BIG: i64 = 7;
const EEXIST: i64 = 17;
const ENOENT: i64 = 2;
const EFAULT: i64 = 14;

/// x86-64 user registers the walk needs.
#[derive(Clone, Copy)]
pub struct Regs {
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
}

/// Stack of a function whose entry uprobe fired with `regs`.
#[inline(always)]
pub fn at_function_entry(regs: Regs) -> i64 {
    if CONFIG.load().flags & CONFIG_CAPTURE_STACKS == 0 {
        return STACK_NONE;
    }
    // SAFETY: reading user memory through the helper cannot fault the kernel.
    let Ok(ret) = (unsafe { bpf_probe_read_user(regs.sp as *const u64) }) else {
        count(counter::STACK_ERROR);
        return -EFAULT;
    };
    capture(ret, None, regs.ip, regs.bp, regs.sp, 0, true, true).0
}

/// Stack of a function's caller, from `regs` at the function's return (a return
/// probe): the same frames as [`at_function_entry`] would have found, the caller's
/// return address first. For calls whose stack is only needed once their result is
/// known (a realloc that moved its block).
#[inline(always)]
pub fn at_return(regs: Regs) -> i64 {
    if CONFIG.load().flags & CONFIG_CAPTURE_STACKS == 0 {
        return STACK_NONE;
    }
    capture(regs.ip, None, regs.ip, regs.bp, regs.sp, 0, true, false).0
}

/// Stack of the current task, stopped in a syscall, with the walk's flags. With
/// `keep` false the stack is walked (for [`STACK_IN_ALLOCATOR`]) but not stored, and the
/// id is [`STACK_NONE`].
#[inline(always)]
pub fn at_syscall(keep: bool) -> (i64, u32) {
    if CONFIG.load().flags & CONFIG_CAPTURE_STACKS == 0 {
        return (STACK_NONE, 0);
    }
    // SAFETY: bpf_get_current_task_btf returns the current task, always valid in
    // a syscall tracepoint; bpf_task_pt_regs gives its saved user registers.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) }
        as *const aya_ebpf::bindings::pt_regs;
    if regs.is_null() {
        count(counter::STACK_ERROR);
        return (-ENOENT, 0);
    }
    // SAFETY: probe reads of kernel memory cannot fault; `regs` points at the task's pt_regs.
    let (ip, sp, bp) = unsafe {
        (
            bpf_probe_read_kernel(&raw const (*regs).rip).unwrap_or(0),
            bpf_probe_read_kernel(&raw const (*regs).rsp).unwrap_or(0),
            bpf_probe_read_kernel(&raw const (*regs).rbp).unwrap_or(0),
        )
    };
    if ip == 0 || sp == 0 {
        count(counter::STACK_ERROR);
        return (-EFAULT, 0);
    }
    // SAFETY: as above, for user memory.
    let guess = unsafe { bpf_probe_read_user(sp as *const u64) }.unwrap_or(0);
    capture(ip, Some(guess), ip, bp, sp, STACK_SYSCALL, keep, true)
}

#[inline(always)]
fn mix(h: u64, v: u64, mul: u64) -> u64 {
    (h ^ v).wrapping_mul(mul).rotate_left(29)
}

const M1: u64 = 0x9E37_79B9_7F4A_7C15;
const M2: u64 = 0xC2B2_AE3D_27D4_EB4F;

/// Walks the stack from the captured registers and stores it, returning its id.
///
/// `first` is recorded as frame 0 (the caller's return address at a function
/// entry or its return, the interrupted instruction pointer in a syscall); `ip` is
/// where the thread stands, from which the CFI walk starts: an instruction about to
/// run (`exact`), or a return address.
#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "the registers and how to read them"
)]
fn capture(
    first: u64,
    second: Option<u64>,
    ip: u64,
    bp: u64,
    sp: u64,
    flags: u32,
    keep: bool,
    exact: bool,
) -> (i64, u32) {
    let config = CONFIG.load().flags;
    if config & CONFIG_COPY_STACKS != 0 {
        if keep {
            copy_stack(ip, sp, bp);
        }
        return (STACK_NONE, 0);
    }
    // Walked first: after the native walk the verifier would check it once per
    // native depth.
    let py = if keep {
        crate::python::capture()
    } else {
        STACK_NONE
    };
    let Some(st) = STACK_SCRATCH.get_ptr_mut(0) else {
        count(counter::STACK_ERROR);
        return (-ENOENT, 0);
    };
    // SAFETY: `st` is this CPU's private scratch slot from a successful lookup.
    let st = unsafe { &mut *st };
    let (n, flags, h1, h2) = if config & CONFIG_FP_STACKS != 0 {
        walk_fp(st, first, second, bp, sp, flags)
    } else {
        walk_cfi(st, flags & STACK_SYSCALL != 0, exact, ip, bp, sp, flags)
    };
    if !keep {
        return (STACK_NONE, flags);
    }
    (store(st, py, n, flags, h1, h2), flags)
}

/// Benchmark of the other design: copy the registers and [`STACK_COPY_BYTES`] of
/// stack above sp for a userspace unwinder. Near the top of a stack the full copy
/// faults, so shorter copies are tried, as perf clips its copy to the stack's end.
#[inline(always)]
fn copy_stack(ip: u64, sp: u64, bp: u64) {
    let Some(mut e) = STACK_COPIES.reserve_bytes(24 + STACK_COPY_BYTES, 0) else {
        count(counter::RINGBUF_FULL);
        return;
    };
    e[..8].copy_from_slice(&ip.to_le_bytes());
    e[8..16].copy_from_slice(&sp.to_le_bytes());
    e[16..24].copy_from_slice(&bp.to_le_bytes());
    let buf = &mut e[24..];
    // SAFETY: user memory reads through the helper cannot fault; sizes are constants.
    unsafe {
        if bpf_probe_read_user_buf(sp as *const u8, &mut buf[..STACK_COPY_BYTES]).is_err()
            && bpf_probe_read_user_buf(sp as *const u8, &mut buf[..STACK_COPY_BYTES / 2]).is_err()
        {
            let _ = bpf_probe_read_user_buf(sp as *const u8, &mut buf[..STACK_COPY_BYTES / 8]);
        }
    }
    e.submit(0);
}

/// Frame-pointer walk: `first` and `second` (a syscall's guessed return address),
/// then the rbp chain, one frame per [`fp_step`] call of a `bpf_loop` (a loop in the
/// program itself made the verifier walk every iteration's branches: syscall programs
/// came near its million-instruction limit).
#[inline(always)]
fn walk_fp(
    st: &mut StackTrace,
    first: u64,
    second: Option<u64>,
    bp: u64,
    sp: u64,
    flags: u32,
) -> (usize, u32, u64, u64) {
    let mut h1: u64 = 0xcbf2_9ce4_8422_2325;
    let mut h2: u64 = 0x8422_2325_cbf2_9ce4;
    clear_window();
    st.span = 0;
    st.frames[0] = first;
    h1 = mix(h1, first, M1);
    h2 = mix(h2, first, M2);
    let mut n = 1u64;
    if let Some(s) = second {
        st.frames[1] = s;
        h1 = mix(h1, s, M1);
        h2 = mix(h2, s, M2);
        n = 2;
    }
    // `ip` holds the last frame record followed, for the span.
    if begin_walk(0, sp, bp, n, flags, h1, h2).is_none() {
        return (n as usize, flags | STACK_TRUNCATED, h1, h2);
    }
    let Some(w) = run_walk(MAX_STACK_DEPTH as u32 + 1, fp_step) else {
        return (n as usize, flags | STACK_TRUNCATED, h1, h2);
    };
    // The last frame followed ends at its saved rbp and return address.
    st.span = if w.ip > sp { w.ip + 16 - sp } else { 0 };
    (
        (w.n as usize).min(MAX_STACK_DEPTH),
        w.flags as u32,
        w.h1,
        w.h2,
    )
}

/// One frame of the frame-pointer walk; returns 1 to stop.
extern "C" fn fp_step(_i: u64, _ctx: *mut core::ffi::c_void) -> i64 {
    let (Some(w), Some(st)) = (UNWIND_WALK.get_ptr_mut(0), STACK_SCRATCH.get_ptr_mut(0)) else {
        return 1;
    };
    // SAFETY: this CPU's private slots from successful lookups.
    let (w, st) = unsafe { (&mut *w, &mut *st) };
    let bp = w.bp;
    if bp == 0 || bp < w.sp0 || bp - w.sp0 > MAX_STACK_SPAN {
        return 1;
    }
    let (Some(next_bp), Some(ret)) = (stack_word(bp), stack_word(bp + 8)) else {
        w.flags |= u64::from(STACK_TRUNCATED);
        return 1;
    };
    let ret = restore_return(w, bp + 8, ret);
    if ret == 0 {
        return 1;
    }
    let n = w.n as usize;
    if n >= MAX_STACK_DEPTH {
        w.flags |= u64::from(STACK_TRUNCATED);
        return 1;
    }
    st.frames[n] = ret;
    w.n += 1;
    w.h1 = mix(w.h1, ret, M1);
    w.h2 = mix(w.h2, ret, M2);
    w.ip = bp;
    if next_bp <= bp {
        return 1;
    }
    w.bp = next_bp;
    0
}

/// State of one CFI walk, in map memory ([`UNWIND_WALK`]) so that the verifier
/// checks the [`cfi_step`] callback once.
#[derive(Clone, Copy)]
pub struct UnwindState {
    /// Instruction pointer of the frame being unwound.
    ip: u64,
    sp: u64,
    bp: u64,
    /// Stack pointer at capture, for the span.
    sp0: u64,
    n: u64,
    flags: u64,
    h1: u64,
    h2: u64,
    /// Nonzero while `ip` is the exact instruction (frame 0), not a return address.
    exact: u64,
    /// The object of the previous frame (`end == 0`: none yet): consecutive frames
    /// in one object skip the trie lookup.
    obj: UnwindObject,
    /// Objects met by earlier walks on this CPU, kept across walks: a process's stacks
    /// pass through a handful of objects (the program, libc, libpython), and a trie
    /// lookup costs ~0.1 µs. Valid while `cache_gen` equals [`UNWIND_GEN`].
    cache: [UnwindObject; OBJECT_CACHE],
    cache_gen: u64,
    cache_next: u64,
    /// The thread's oldest-unmatched pending return probe (a kernel `struct
    /// return_instance *`, 0: none left) and the stack slot whose return address it
    /// replaced. See [`restore_return`].
    ri: u64,
    ri_slot: u64,
    /// Nonzero once `ri` was read for this walk: only a walk that needs it pays for it.
    ri_loaded: u64,
    /// The stack slot `ip` was read from (0: `ip` is not a return address read by the walk).
    ip_slot: u64,
}

/// Entries of the per-CPU object cache.
const OBJECT_CACHE: usize = 4;

#[inline(always)]
fn lpm_key(addr: u64) -> Key<[u8; 8]> {
    Key::new(64, addr.to_be_bytes())
}

/// The unwind row in effect at `pc`, as (kind, cfa_off, rbp); `None` when no
/// known object holds `pc`. The walk's state holds the objects of earlier lookups.
#[inline(always)]
fn find_row(pc: u64, w: &mut UnwindState) -> Option<(u8, i16, i8)> {
    if pc < w.obj.start || pc >= w.obj.end {
        let mut found = false;
        for i in 0..OBJECT_CACHE {
            let c = &w.cache[i];
            if pc >= c.start && pc < c.end {
                w.obj = *c;
                found = true;
                break;
            }
        }
        if !found {
            w.obj = *UNWIND_OBJECTS.get(lpm_key(pc))?;
            w.cache[(w.cache_next as usize) % OBJECT_CACHE] = w.obj;
            w.cache_next += 1;
        }
    }
    let obj = w.obj;
    let gap = Some((UNWIND_GAP, 0, 0));
    if obj.rows_count == 0 {
        return gap;
    }
    let rel = pc.wrapping_sub(obj.bias);
    if rel < obj.base {
        return gap;
    }
    let page = (rel - obj.base) >> UNWIND_PAGE_SHIFT;
    let (mut lo, mut hi) = if page + 1 < u64::from(obj.pages_count) {
        let p = obj.pages_start + page as u32;
        (
            *UNWIND_PAGES.get(p)? as u32,
            *UNWIND_PAGES.get(p + 1)? as u32,
        )
    } else {
        let last = obj.rows_start + obj.rows_count - 1;
        (last, last)
    };
    for _ in 0..UNWIND_SEARCH_STEPS {
        if lo >= hi {
            break;
        }
        let mid = lo + (hi - lo).div_ceil(2);
        if u64::from(UNWIND_ROWS.get(mid)?.pc) <= rel {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    let row = UNWIND_ROWS.get(lo)?;
    if u64::from(row.pc) > rel {
        return gap;
    }
    Some((row.kind, row.cfa_off, row.rbp))
}

/// The 8-byte word at user address `addr` (a stack slot), from the window when it
/// holds it, else after refilling the window from `addr` (a shorter read near the top
/// of the stack, where a full window would cross its end; one word as a last resort).
#[inline(always)]
fn stack_word(addr: u64) -> Option<u64> {
    window_word(addr, 0)
}

/// One frame of the CFI walk; returns 1 to stop.
extern "C" fn cfi_step(_i: u64, _ctx: *mut core::ffi::c_void) -> i64 {
    let (Some(w), Some(st)) = (UNWIND_WALK.get_ptr_mut(0), STACK_SCRATCH.get_ptr_mut(0)) else {
        return 1;
    };
    // SAFETY: this CPU's private slots from successful lookups.
    let (w, st) = unsafe { (&mut *w, &mut *st) };
    let truncated = u64::from(STACK_TRUNCATED);
    // A return address points after its call; the call's own row is the one before.
    let mut pc = if w.exact != 0 { w.ip } else { w.ip - 1 };
    let mut row = find_row(pc, w);
    if row.is_none() && w.exact == 0 && w.ip_slot != 0 {
        // Perhaps a return probe's trampoline (ours or another tool's): the address
        // it replaced is in the thread's list of pending returns.
        let slot = w.ip_slot;
        let orig = restore_return(w, slot, w.ip);
        if orig != w.ip {
            w.ip = orig;
            pc = orig - 1;
            row = find_row(pc, w);
        }
    }
    let Some((kind, cfa_off, rbp)) = row else {
        // Not code we know: junk, or an object mapped after the tables were loaded.
        count(counter::UNWIND_UNKNOWN_PC);
        w.flags |= truncated;
        return 1;
    };
    if w.exact == 0 {
        // A return address that lands in known code is a frame.
        let n = w.n as usize;
        if n >= MAX_STACK_DEPTH {
            w.flags |= truncated;
            return 1;
        }
        st.frames[n] = w.ip;
        w.n += 1;
        w.h1 = mix(w.h1, w.ip, M1);
        w.h2 = mix(w.h2, w.ip, M2);
    }
    // A return address, or a syscall's own instruction (an allocator may make the
    // syscall inline), inside an allocator function whose call left no record in flight.
    // Only syscalls consult the flag: an allocator entry's walk (every malloc) skips it.
    if w.flags & u64::from(STACK_SYSCALL) != 0 {
        let rel = pc.wrapping_sub(w.obj.bias);
        for r in &w.obj.alloc_ranges {
            if rel >= u64::from(r[0]) && rel < u64::from(r[1]) {
                w.flags |= u64::from(STACK_IN_ALLOCATOR);
            }
        }
    }
    let exact = w.exact != 0;
    w.exact = 0;
    let cfa = match kind {
        UNWIND_CFA_RSP => w.sp.wrapping_add(cfa_off as u64),
        UNWIND_CFA_RBP => w.bp.wrapping_add(cfa_off as u64),
        UNWIND_PLT => w.sp + 8 + if (w.ip & 15) >= cfa_off as u64 { 8 } else { 0 },
        UNWIND_END => return 1,
        // At the thread's own instruction with no CFI for it (a function's first
        // instruction, or a leaf syscall wrapper): nothing is pushed yet, so the
        // return address is at [sp]; following rbp would skip the caller.
        UNWIND_GAP if exact => w.sp + 8,
        UNWIND_GAP => {
            // No CFI here: trust rbp if it points into this thread's stack above sp.
            if w.bp == 0 {
                return 1;
            }
            if w.bp < w.sp || w.bp - w.sp > MAX_STACK_SPAN {
                w.flags |= truncated;
                return 1;
            }
            count(counter::UNWIND_FP_FRAMES);
            w.flags |= u64::from(STACK_FP_FALLBACK);
            w.bp + 16
        }
        _ => {
            count(counter::UNWIND_UNSUPPORTED);
            w.flags |= truncated;
            return 1;
        }
    };
    if cfa <= w.sp || cfa - w.sp > MAX_STACK_SPAN {
        w.flags |= truncated;
        return 1;
    }
    let Some(ra) = stack_word(cfa - 8) else {
        w.flags |= truncated;
        return 1;
    };
    // A return probe's trampoline is put back only where the walk would stop (below):
    // every walk pays nothing for it until then.
    w.ip_slot = cfa - 8;
    if kind == UNWIND_GAP && !exact {
        let Some(b) = stack_word(w.bp) else {
            w.flags |= truncated;
            return 1;
        };
        w.bp = b;
    } else if rbp != 0 {
        let Some(b) = stack_word(cfa.wrapping_add((rbp as i64 * 8) as u64)) else {
            w.flags |= truncated;
            return 1;
        };
        w.bp = b;
    }
    w.sp = cfa;
    w.ip = ra;
    if ra == 0 {
        return 1;
    }
    0
}

/// Sets the walk state both walks share; `None` when the per-CPU slot is missing.
#[inline(always)]
fn begin_walk(
    ip: u64,
    sp: u64,
    bp: u64,
    n: u64,
    flags: u32,
    h1: u64,
    h2: u64,
) -> Option<&'static mut UnwindState> {
    let w = UNWIND_WALK.get_ptr_mut(0)?;
    // SAFETY: this CPU's private slot from a successful lookup.
    let w = unsafe { &mut *w };
    w.ip = ip;
    w.sp = sp;
    w.bp = bp;
    w.sp0 = sp;
    w.n = n;
    w.flags = u64::from(flags);
    w.h1 = h1;
    w.h2 = h2;
    w.ri = 0;
    w.ri_slot = 0;
    w.ri_loaded = 0;
    w.ip_slot = 0;
    Some(w)
}

/// Reads the thread's newest pending return probe into the walk, once per walk.
#[inline(always)]
fn load_return_instances(w: &mut UnwindState) {
    if w.ri_loaded != 0 {
        return;
    }
    w.ri_loaded = 1;
    let c = CONFIG.load();
    if c.flags & CONFIG_RETURN_FIXUP == 0 {
        return;
    }
    // SAFETY: the current task is valid while the program runs; probe reads of kernel
    // memory cannot fault.
    let task = unsafe { bpf_get_current_task() };
    let utask = kernel_word(task + u64::from(c.returns.utask));
    if utask != 0 {
        set_return_instance(w, kernel_word(utask + u64::from(c.returns.instances)));
    }
}

/// The 8-byte kernel word at `addr`, 0 when unreadable.
#[inline(always)]
fn kernel_word(addr: u64) -> u64 {
    // SAFETY: probe reads of kernel memory cannot fault.
    unsafe { bpf_probe_read_kernel(addr as *const u64) }.unwrap_or(0)
}

/// Makes `ri` the walk's next pending return instance.
#[inline(always)]
fn set_return_instance(w: &mut UnwindState, ri: u64) {
    w.ri = ri;
    w.ri_slot = if ri != 0 {
        kernel_word(ri + u64::from(CONFIG.load().returns.stack))
    } else {
        0
    };
    if w.ri_slot == 0 {
        w.ri = 0;
    }
}

/// Return instances skipped per lookup: those of frames below the slot (the call a
/// return probe is handling, frames the walk passed without needing theirs), and a
/// tail call's second instance on a slot.
const RETURN_SKIPS: usize = 8;

/// The return address in stack slot `slot`, read as `ra`, as the program wrote it. A
/// return probe on a call (ours, or another tool's on the same library: the kernel
/// arms every consumer's return, whichever process it traces) replaces the address
/// with its trampoline's, which lies in no object; the original is in the thread's
/// list of pending returns, newest first, so in the order a walk up the stack meets
/// their slots.
#[inline(always)]
fn restore_return(w: &mut UnwindState, slot: u64, ra: u64) -> u64 {
    load_return_instances(w);
    for _ in 0..RETURN_SKIPS {
        if w.ri == 0 || w.ri_slot >= slot {
            break;
        }
        let next = kernel_word(w.ri + u64::from(CONFIG.load().returns.next));
        set_return_instance(w, next);
    }
    if w.ri == 0 || w.ri_slot != slot {
        return ra;
    }
    let orig = kernel_word(w.ri + u64::from(CONFIG.load().returns.orig));
    let next = kernel_word(w.ri + u64::from(CONFIG.load().returns.next));
    set_return_instance(w, next);
    if orig == 0 {
        return ra;
    }
    count(counter::RETURNS_RESTORED);
    orig
}

/// Runs up to `steps` calls of `step` over the walk state, then returns it (by
/// reference: with its object cache it is too big for the BPF stack).
#[inline(always)]
fn run_walk(
    steps: u32,
    step: extern "C" fn(u64, *mut core::ffi::c_void) -> i64,
) -> Option<&'static UnwindState> {
    // SAFETY: the callback takes no context.
    unsafe {
        bpf_loop(
            steps,
            step as *mut core::ffi::c_void,
            core::ptr::null_mut(),
            0,
        )
    };
    let w = UNWIND_WALK.get_ptr(0)?;
    // SAFETY: this CPU's private slot from a successful lookup.
    Some(unsafe { &*w })
}

/// CFI walk from (ip, sp, bp). A syscall's interrupted `ip` is recorded as frame 0;
/// at a function entry, `ip` is the function itself and its caller comes first.
#[inline(always)]
fn walk_cfi(
    st: &mut StackTrace,
    record_ip: bool,
    exact: bool,
    ip: u64,
    bp: u64,
    sp: u64,
    flags: u32,
) -> (usize, u32, u64, u64) {
    let mut h1: u64 = 0xcbf2_9ce4_8422_2325;
    let mut h2: u64 = 0x8422_2325_cbf2_9ce4;
    let mut n = 0u64;
    st.span = 0;
    if record_ip {
        st.frames[0] = ip;
        h1 = mix(h1, ip, M1);
        h2 = mix(h2, ip, M2);
        n = 1;
    }
    clear_window();
    let Some(w) = begin_walk(ip, sp, bp, n, flags | STACK_CFI, h1, h2) else {
        return (n as usize, flags | STACK_TRUNCATED, h1, h2);
    };
    // At a return address (a return probe) the first step records it as a frame.
    w.exact = u64::from(exact);
    w.obj = UnwindObject::default();
    let generation = UNWIND_GEN.get(0).copied().unwrap_or(0);
    if w.cache_gen != generation {
        w.cache = [UnwindObject::default(); OBJECT_CACHE];
        w.cache_gen = generation;
    }
    // Frame 0 plus MAX_STACK_DEPTH frames, and one more step that finds the stack full
    // and flags it truncated.
    let Some(w) = run_walk(MAX_STACK_DEPTH as u32 + 2, cfi_step) else {
        return (n as usize, flags | STACK_TRUNCATED, h1, h2);
    };
    st.span = w.sp - w.sp0;
    let n = (w.n as usize).min(MAX_STACK_DEPTH);
    (n, w.flags as u32, w.h1, w.h2)
}

/// Deduplicates the stack built in `st`, returning its id.
#[inline(always)]
fn store(st: &mut StackTrace, py: i64, n: usize, flags: u32, mut h1: u64, mut h2: u64) -> i64 {
    if flags & STACK_TRUNCATED != 0 {
        count(counter::STACK_TRUNCATED);
    }
    // The Python frames of the same moment are part of the stack's identity.
    st.py_stack = py;
    h1 = mix(h1, py as u64, M1);
    h2 = mix(h2, py as u64, M2);
    h1 = mix(h1, n as u64, M1);
    h2 = mix(h2, n as u64, M2);
    // Same frames read differently (a syscall's, a truncated walk) are another stack.
    h1 = mix(h1, u64::from(flags), M1);
    h2 = mix(h2, u64::from(flags), M2);
    // Same addresses in code mapped where other code was are another stack.
    let generation = crate::CODE_GENERATION.get(0).copied().unwrap_or(0);
    if generation != 0 {
        h1 = mix(h1, generation, M1);
        h2 = mix(h2, generation, M2);
    }
    let id = (h1 & (i64::MAX as u64)) as i64;
    st.len = n as u32;
    st.flags = flags;
    st.check = h2;

    // SAFETY: a lookup returns a pointer valid for this program run.
    if let Some(existing) = unsafe { STACKS.get(id) } {
        if existing.check == h2 && existing.len == n as u32 {
            return id;
        }
        count(counter::STACK_COLLISION);
        return -EEXIST;
    }
    match STACKS.insert(id, st, BPF_NOEXIST as u64) {
        Ok(()) => id,
        // Another CPU inserted the same stack between our lookup and insert.
        Err(e) if e as i64 == -EEXIST => id,
        Err(e) => {
            count(counter::STACK_MAP_FULL);
            if e == 0 { -E2BIG } else { e as i64 }
        }
    }
}
