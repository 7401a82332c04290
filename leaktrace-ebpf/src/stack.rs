//! User stack capture: a frame-pointer walk with in-kernel deduplication.
//!
//! This is the one place that turns a register state into a stack id, so that
//! a different unwinder (DWARF CFI tables) can replace the walk without touching
//! the probes. Two entry points match the two places we capture from:
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
        bpf_get_current_task_btf, bpf_probe_read_kernel, bpf_probe_read_user, bpf_task_pt_regs,
    },
};
use leaktrace_common::{
    CONFIG_CAPTURE_STACKS, MAX_STACK_DEPTH, STACK_NONE, STACK_SYSCALL, STACK_TRUNCATED, counter,
};

use crate::{CONFIG, STACK_SCRATCH, STACKS, count};

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
    #[allow(
        dead_code,
        reason = "kept for unwinders that start from the instruction pointer"
    )]
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
    capture(ret, None, regs.bp, regs.sp, 0)
}

/// Stack of the current task, stopped in a syscall.
#[inline(always)]
pub fn at_syscall() -> i64 {
    if CONFIG.load().flags & CONFIG_CAPTURE_STACKS == 0 {
        return STACK_NONE;
    }
    // SAFETY: bpf_get_current_task_btf returns the current task, always valid in
    // a syscall tracepoint; bpf_task_pt_regs gives its saved user registers.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) }
        as *const aya_ebpf::bindings::pt_regs;
    if regs.is_null() {
        count(counter::STACK_ERROR);
        return -ENOENT;
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
        return -EFAULT;
    }
    // SAFETY: as above, for user memory.
    let guess = unsafe { bpf_probe_read_user(sp as *const u64) }.unwrap_or(0);
    capture(ip, Some(guess), bp, sp, STACK_SYSCALL)
}

#[inline(always)]
fn mix(h: u64, v: u64, mul: u64) -> u64 {
    (h ^ v).wrapping_mul(mul).rotate_left(29)
}

/// Walks the frame-pointer chain from `bp` and stores the stack, returning its id.
#[inline(always)]
fn capture(first: u64, second: Option<u64>, mut bp: u64, sp: u64, mut flags: u32) -> i64 {
    // Walked first: after the native walk the verifier would check it once per
    // native depth.
    let py = crate::python::capture();
    let Some(st) = STACK_SCRATCH.get_ptr_mut(0) else {
        count(counter::STACK_ERROR);
        return -ENOENT;
    };
    // SAFETY: `st` is this CPU's private scratch slot from a successful lookup.
    let st = unsafe { &mut *st };
    const M1: u64 = 0x9E37_79B9_7F4A_7C15;
    const M2: u64 = 0xC2B2_AE3D_27D4_EB4F;
    let mut h1: u64 = 0xcbf2_9ce4_8422_2325;
    let mut h2: u64 = 0x8422_2325_cbf2_9ce4;
    st.frames[0] = first;
    h1 = mix(h1, first, M1);
    h2 = mix(h2, first, M2);
    let mut n: usize = 1;
    if let Some(s) = second {
        st.frames[1] = s;
        h1 = mix(h1, s, M1);
        h2 = mix(h2, s, M2);
        n = 2;
    }
    for _ in 0..MAX_STACK_DEPTH {
        if bp == 0 || bp < sp || bp - sp > MAX_STACK_SPAN {
            break;
        }
        // SAFETY: reading user memory through the helper cannot fault the kernel.
        let Ok(pair) = (unsafe { bpf_probe_read_user(bp as *const [u64; 2]) }) else {
            flags |= STACK_TRUNCATED;
            break;
        };
        let (next_bp, ret) = (pair[0], pair[1]);
        if ret == 0 {
            break;
        }
        if n >= MAX_STACK_DEPTH {
            flags |= STACK_TRUNCATED;
            break;
        }
        st.frames[n] = ret;
        n += 1;
        h1 = mix(h1, ret, M1);
        h2 = mix(h2, ret, M2);
        if next_bp <= bp {
            break;
        }
        bp = next_bp;
    }
    if flags & STACK_TRUNCATED != 0 {
        count(counter::STACK_TRUNCATED);
    }
    // The Python frames of the same moment are part of the stack's identity.
    st.py_stack = py;
    h1 = mix(h1, py as u64, M1);
    h2 = mix(h2, py as u64, M2);
    h1 = mix(h1, n as u64, M1);
    h2 = mix(h2, n as u64, M2);
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
