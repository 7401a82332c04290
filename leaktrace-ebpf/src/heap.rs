//! Allocator uprobes: one entry body and one return body for the whole malloc
//! family, plus `free`.
//!
//! Entry saves the request in [`ALLOC_INFLIGHT`] keyed by thread id, together
//! with the stack pointer; the return probe pairs with it only when the stack
//! pointer shows it is the return of that very call. That makes nested calls
//! (glibc's `reallocarray` calls `realloc` through the probed address) count
//! once, as the outer call, and lets a lost return be detected instead of
//! shifting every later pairing on the thread.

use aya_ebpf::helpers::{bpf_get_attach_cookie, bpf_get_func_ip, bpf_get_prandom_u32};
use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_ANY, pt_regs},
    helpers::bpf_probe_read_user,
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use leaktrace_common::{
    AllocEntry, AllocFn, CONFIG_COUNT_ONLY, CONFIG_FREE_MARK, ENABLE_FREES, ENABLE_HEAP,
    ENTRY_UNSAMPLED, EVENT_IN_PLACE, EVENT_REUSED, EXP_DRAWS as N_DRAWS, Event, STACK_AT_RETURN,
    STACK_NONE, counter, kind,
};

use crate::{
    ALLOC_INFLIGHT, CONFIG, Caller, EXP_DRAWS, LAST_RETURN, SAMPLE_COUNTDOWN, SAMPLED, count, emit,
    hit, now,
    stack::{self, Regs},
    traced_thread, window_generation,
};

#[inline(always)]
fn regs_of(ctx: *mut core::ffi::c_void) -> Regs {
    let r = ctx.cast::<pt_regs>();
    // SAFETY: uprobe programs receive a pointer to the user registers as context.
    unsafe {
        Regs {
            ip: (*r).rip,
            sp: (*r).rsp,
            bp: (*r).rbp,
        }
    }
}

#[inline(always)]
fn arg(ctx: &ProbeContext, n: usize) -> u64 {
    ctx.arg::<u64>(n).unwrap_or(0)
}

/// `a * b`, saturating; `u64::saturating_mul` lowers to a 128-bit multiply BPF lacks.
#[inline(always)]
fn mul_sat(a: u64, b: u64) -> u64 {
    // Split into 32-bit halves so LLVM cannot fold this into `umul.with.overflow`.
    let (ah, al, bh, bl) = (a >> 32, a & 0xffff_ffff, b >> 32, b & 0xffff_ffff);
    if ah != 0 && bh != 0 {
        return u64::MAX;
    }
    let cross = ah * bl + al * bh;
    if cross > 0xffff_ffff {
        return u64::MAX;
    }
    let low = al * bl;
    let r = low.wrapping_add(cross << 32);
    if r < low { u64::MAX } else { r }
}

/// Byte-weighted Poisson sampling: whether an allocation of `size` bytes is
/// sampled. Each thread counts down an exponentially distributed number of
/// bytes (mean = the sampling interval); an allocation that reaches zero is
/// sampled and draws a new countdown. That samples it with probability
/// 1 − e^(−size/interval), which userspace inverts into an unbiased weight.
#[inline(always)]
fn sampled(tid: u32, size: u64) -> bool {
    if CONFIG.load().sample_bytes == 0 {
        return true;
    }
    let draw = || {
        // SAFETY: bpf_get_prandom_u32 has no preconditions.
        let i = unsafe { bpf_get_prandom_u32() } % N_DRAWS;
        EXP_DRAWS.get(i).copied().unwrap_or(0) as i64
    };
    let slot = SAMPLE_COUNTDOWN.get_ptr_mut(&tid);
    // SAFETY: a lookup returns a pointer valid for this program run.
    let left = slot.map(|p| unsafe { *p }).unwrap_or_else(draw) - size as i64;
    let (hit, next) = if left <= 0 {
        (true, draw())
    } else {
        (false, left)
    };
    match slot {
        // SAFETY: the thread's own slot; written in place.
        Some(p) => unsafe { *p = next },
        None => {
            let _ = SAMPLE_COUNTDOWN.insert(&tid, &next, 0);
        }
    }
    hit
}

/// Records an allocator call in flight; returns whether its return must be seen.
///
/// `session`: the call runs under a uprobe session ([`alloc_session`]), whose return
/// runs only if this returns true; an unsampled call then leaves no entry behind.
#[inline(always)]
fn alloc_enter(ctx: &ProbeContext, func: AllocFn, size: u64, aux: u64, session: bool) -> bool {
    let Some(me) = traced_thread(ENABLE_HEAP) else {
        return false;
    };
    let tid = me.tid;
    hit(func as u32);
    if CONFIG.load().flags & CONFIG_COUNT_ONLY != 0 {
        return false;
    }
    let regs = regs_of(ctx.as_ptr());
    let slot = ALLOC_INFLIGHT.get_ptr_mut(&tid);
    let generation = window_generation();
    // SAFETY: a lookup returns a pointer valid for this program run.
    if let Some(prev) = slot.map(|p| unsafe { &*p })
        && prev.active == generation
    {
        if regs.sp <= prev.sp {
            // Called from inside the outer allocator call (sp below), or tail-called by it
            // (same sp: `realloc(NULL, n)` jumps to `malloc`): the outer call accounts for it.
            count(counter::NESTED_CALL);
            return false;
        }
        // The previous call on this thread never returned through our probe.
        count(counter::STALE_ENTRY);
    }
    // An unsampled call still needs its entry, so its return is recognised (and a
    // realloc of a sampled block can release it), but no stack walk.
    let take = sampled(tid, size);
    if !take {
        count(counter::UNSAMPLED);
        if session {
            // No return trap, and so no entry for it to pair with.
            if let Some(p) = slot {
                // SAFETY: the thread's own slot from a successful lookup.
                unsafe { (*p).active = 0 };
            }
            return false;
        }
    }
    let entry = AllocEntry {
        size,
        aux,
        sp: regs.sp,
        // Only a realloc's entry time is used (userspace: was the old address handed
        // out again after this call started?); a clock read is ~30 ns.
        ts_ns: if func.reallocates() { now() } else { 0 },
        stack_id: if !take {
            STACK_NONE
        } else if func.reallocates() && CONFIG.load().sample_bytes == 0 {
            // Most reallocs resize in place (84% of CPython's, measured), keeping their
            // block's stack: the walk waits for the return, and a move.
            STACK_AT_RETURN
        } else {
            stack::at_function_entry(regs)
        },
        func: func as u32 | if take { 0 } else { ENTRY_UNSAMPLED },
        active: generation,
    };
    match slot {
        // SAFETY: the thread's own slot from a successful lookup; only this thread writes it.
        Some(p) => unsafe { *p = entry },
        None => {
            if ALLOC_INFLIGHT.insert(&tid, &entry, BPF_ANY as u64).is_err() {
                count(counter::ALLOC_INFLIGHT_FULL);
                return false;
            }
        }
    }
    true
}

/// malloc and calloc as one uprobe session program (Linux 6.13+, loaded by
/// userspace with the session attach type when sampling): it runs at the entry and,
/// only when the entry returns 0, at the return. Unsampled calls return 1 and so
/// skip the return trap. The attach cookie is the [`AllocFn`]; at the return, the
/// instruction pointer is the caller's.
///
/// Written without `#[uprobe]`, whose wrapper returns 0 whatever the body returns:
/// here the return value is the decision.
#[unsafe(no_mangle)]
#[unsafe(link_section = "uprobe")]
pub extern "C" fn alloc_session(ctx: *mut core::ffi::c_void) -> u32 {
    session(ProbeContext::new(ctx))
}

#[inline(always)]
fn session(ctx: ProbeContext) -> u32 {
    let regs = regs_of(ctx.as_ptr());
    // SAFETY: the helper takes the program's own context.
    if regs.ip != unsafe { bpf_get_func_ip(ctx.as_ptr()) } {
        return exit(ctx.as_ptr());
    }
    // Only the entry needs to know which function it is.
    // SAFETY: as above.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let wanted = if cookie == AllocFn::Calloc as u64 {
        alloc_enter(
            &ctx,
            AllocFn::Calloc,
            mul_sat(arg(&ctx, 0), arg(&ctx, 1)),
            0,
            true,
        )
    } else {
        alloc_enter(&ctx, AllocFn::Malloc, arg(&ctx, 0), 0, true)
    };
    u32::from(!wanted)
}

/// Every allocator function's entry as one program, which learns the function from
/// its attach cookie (an [`AllocFn`]): one program for the verifier to check (about
/// 0.3 s each on this VM) instead of one per function, attached through aya's uprobes
/// (cookies since Linux 5.15) or, in sampled mode's duty cycle, through `uprobe_multi`
/// links (one per object, so that detaching them waits for one RCU grace period
/// instead of one per probe).
#[uprobe]
pub fn heap_enter(ctx: ProbeContext) -> u32 {
    // SAFETY: the helper takes the program's own context.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let Some(func) = AllocFn::from_u32(cookie as u32) else {
        return 0;
    };
    let (size, aux) = match func {
        AllocFn::Free | AllocFn::OperatorDelete | AllocFn::SizedFree => {
            return free_like(&ctx, func);
        }
        AllocFn::Calloc => (mul_sat(arg(&ctx, 0), arg(&ctx, 1)), 0),
        AllocFn::Realloc | AllocFn::Rallocx => (arg(&ctx, 1), arg(&ctx, 0)),
        AllocFn::Reallocarray => (mul_sat(arg(&ctx, 1), arg(&ctx, 2)), arg(&ctx, 0)),
        AllocFn::PosixMemalign => (arg(&ctx, 2), arg(&ctx, 0)),
        AllocFn::AlignedAlloc | AllocFn::Memalign => (arg(&ctx, 1), 0),
        AllocFn::Malloc
        | AllocFn::Valloc
        | AllocFn::Pvalloc
        | AllocFn::OperatorNew
        | AllocFn::Mallocx => (arg(&ctx, 0), 0),
    };
    alloc_enter(&ctx, func, size, aux, false);
    0
}

/// Return probe shared by every allocator function.
#[uretprobe]
pub fn alloc_exit(ctx: RetProbeContext) -> u32 {
    exit(ctx.as_ptr())
}

/// The return of an allocator call, from the user registers at its return.
#[inline(always)]
fn exit(ctx: *mut core::ffi::c_void) -> u32 {
    let Some(me) = traced_thread(ENABLE_HEAP) else {
        return 0;
    };
    let tid = me.tid;
    // Bare probes (benchmark): the trap, and nothing else.
    if CONFIG.load().flags & CONFIG_COUNT_ONLY != 0 {
        return 0;
    }
    let regs = regs_of(ctx);
    let slot = ALLOC_INFLIGHT.get_ptr_mut(&tid);
    // SAFETY: a lookup returns a pointer valid for this program run; we copy it out.
    let generation = window_generation();
    let Some(entry) = slot
        .map(|p| unsafe { *p })
        .filter(|e| e.active == generation)
    else {
        // A tail call leaves two return probes on one return: the first consumed the entry.
        if let Some(last) = LAST_RETURN.get_ptr(0)
            // SAFETY: this CPU's slot from a successful lookup.
            && unsafe { *last } == [tid as u64, regs.sp]
        {
            return 0;
        }
        count(counter::RETURN_WITHOUT_ENTRY);
        return 0;
    };
    // After `ret`, sp is one slot above the entry's sp.
    let expected_sp = entry.sp + 8;
    if regs.sp < expected_sp {
        // Return of a nested call we did not record.
        return 0;
    }
    if let Some(p) = slot {
        // SAFETY: the thread's own slot from a successful lookup.
        unsafe { (*p).active = 0 };
    }
    if let Some(last) = LAST_RETURN.get_ptr_mut(0) {
        // SAFETY: this CPU's slot from a successful lookup.
        unsafe { *last = [tid as u64, regs.sp] };
    }
    if regs.sp > expected_sp {
        // The recorded call's return was lost and this is some outer frame's return.
        count(counter::STALE_ENTRY);
        return 0;
    }
    // SAFETY: uprobe programs receive a pointer to the user registers as context.
    let ret: u64 = unsafe { (*ctx.cast::<pt_regs>()).rax };
    let unsampled = entry.func & ENTRY_UNSAMPLED != 0;
    let func = entry.func & !ENTRY_UNSAMPLED;
    let is_realloc = AllocFn::from_u32(func).is_some_and(AllocFn::reallocates);
    let sampling = CONFIG.load().sample_bytes != 0;
    if sampling && is_realloc && entry.aux != 0 && (ret != 0 || entry.size == 0) {
        // The old block is gone; if it was sampled (the delete finds it), userspace must hear of it.
        if SAMPLED.remove(&entry.aux).is_ok() {
            if unsampled {
                emit(
                    me,
                    Event {
                        kind: kind::FREE,
                        ts_ns: now(),
                        addr: entry.aux,
                        func: AllocFn::Free as u32,
                        stack_id: STACK_NONE,
                        ..Event::default()
                    },
                );
            }
        } else if !unsampled {
            // Userspace never saw the old block: report the new one as a plain allocation.
            return emit_alloc(me, &entry, func, ret, 0, sampling, 0);
        }
    }
    // An address handed out while a sampled block is still recorded there: that block
    // was freed while the probes were detached (sampled mode attaches them for windows).
    if sampling
        && ret != 0
        && func != AllocFn::PosixMemalign as u32
        && !(is_realloc && ret == entry.aux)
        && SAMPLED.remove(&ret).is_ok()
    {
        emit(
            me,
            Event {
                kind: kind::FREE,
                ts_ns: now(),
                addr: ret,
                func: AllocFn::Free as u32,
                stack_id: STACK_NONE,
                flags: EVENT_REUSED,
                ..Event::default()
            },
        );
    }
    if unsampled {
        return 0;
    }
    let mut entry = entry;
    let mut flags = 0;
    if entry.stack_id == STACK_AT_RETURN {
        if ret != 0 && ret == entry.aux {
            flags = EVENT_IN_PLACE;
            entry.stack_id = STACK_NONE;
        } else if ret != 0 {
            entry.stack_id = stack::at_return(regs);
        } else {
            entry.stack_id = STACK_NONE;
        }
    }
    emit_alloc(
        me,
        &entry,
        func,
        ret,
        if is_realloc { entry.aux } else { 0 },
        sampling,
        flags,
    )
}

#[inline(always)]
fn emit_alloc(
    me: Caller,
    entry: &AllocEntry,
    func: u32,
    ret: u64,
    old: u64,
    sampling: bool,
    flags: u32,
) -> u32 {
    let addr = if func == AllocFn::PosixMemalign as u32 {
        if ret as u32 == 0 {
            // SAFETY: reading user memory through the helper cannot fault the kernel.
            unsafe { bpf_probe_read_user(entry.aux as *const u64) }.unwrap_or(0)
        } else {
            0
        }
    } else {
        ret
    };
    if sampling && addr != 0 && SAMPLED.insert(&addr, &1u8, 0).is_err() {
        count(counter::SAMPLED_FULL);
    }
    emit(
        me,
        Event {
            kind: kind::ALLOC,
            ts_ns: now(),
            addr,
            size: entry.size,
            aux: old,
            aux2: entry.ts_ns,
            stack_id: entry.stack_id,
            func,
            flags,
            ..Event::default()
        },
    );
    0
}

/// A call that frees its first argument.
#[inline(always)]
fn free_like(ctx: &ProbeContext, func: AllocFn) -> u32 {
    let Some(me) = traced_thread(ENABLE_FREES) else {
        return 0;
    };
    let tid = me.tid;
    let ptr = arg(ctx, 0);
    if ptr == 0 {
        return 0;
    }
    hit(func as u32);
    if CONFIG.load().flags & CONFIG_COUNT_ONLY != 0 {
        return 0;
    }
    // Mark where this free sits on the stack, so that syscalls glibc makes from inside
    // it (arena creation, unmapping an mmapped chunk, heap trims) count as the allocator's.
    // The probe sits before free's first push, so the return address is at [sp].
    // Only without CFI stacks: with them, a syscall's own walk finds free's frame, and
    // this read and map update (~0.17 µs per free, measured) are saved.
    let sp = regs_of(ctx.as_ptr()).sp;
    // SAFETY: reading user memory through the helper cannot fault the kernel.
    if CONFIG.load().flags & CONFIG_FREE_MARK != 0
        && let Ok(ret) = unsafe { bpf_probe_read_user(sp as *const u64) }
    {
        let mark = leaktrace_common::FreeMark { sp, ret };
        match crate::FREE_MARK.get_ptr_mut(&tid) {
            // SAFETY: the thread's own slot from a successful lookup; written in place,
            // which costs far less than an LRU update (~0.3 µs per free, measured).
            Some(p) => unsafe { *p = mark },
            None => {
                let _ = crate::FREE_MARK.insert(&tid, &mark, 0);
            }
        }
    }
    // Only frees of sampled blocks matter; the rest cost this one delete attempt.
    if CONFIG.load().sample_bytes != 0 && SAMPLED.remove(&ptr).is_err() {
        return 0;
    }
    emit(
        me,
        Event {
            kind: kind::FREE,
            ts_ns: now(),
            addr: ptr,
            size: 0,
            aux: 0,
            aux2: 0,
            stack_id: leaktrace_common::STACK_NONE,
            func: func as u32,
            flags: 0,
            ..Event::default()
        },
    );
    0
}
