//! CPython frames of the calling thread, walked at the same moment as its native
//! stack.
//!
//! Userspace fills [`PY_CONFIG`] from the interpreter's version, symbols, debug
//! offsets and type introspection (see `leaktrace/src/symbolize/python/`). Here, per
//! captured stack: the thread's `PyThreadState` comes from its pthread TSD slot
//! (glibc: `fsbase + 0x310 + key * 16 + 8`, the key being `_PyRuntime`'s
//! `autoTSSkey`; CPython 3.7+) or, on 2.7, from the interpreter's list of thread
//! states, searched once per thread for the one whose `thread_id` is the thread's
//! `pthread_self()` (its fsbase). Both stay bound to the OS thread while the GIL is
//! released — so an allocation made with the GIL dropped still gets its own thread's
//! Python stack, never the GIL holder's. Then the frame chain is followed,
//! recording `(code object, instruction)`; userspace turns those into file,
//! qualified name and line by reading the code objects. Stacks are deduplicated
//! in [`PY_STACKS`] like native ones.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_task, bpf_loop, bpf_probe_read_kernel, bpf_probe_read_user},
};
use leaktrace_common::{
    MAX_PY_FRAMES, MAX_PY_THREADS, PY_EDGE_IS_ENTRY, PY_EDGE_SHIM, PY_FRAME_EDGE,
    PY_FRAME_TAG_MASK, PY_FRAME_TAG_SHIFT, PY_TSTATE_LIST, PyConfig, STACK_NONE, STACK_TRUNCATED,
    counter, py_name_tag,
};

use crate::{
    PY_CONFIG, PY_SCRATCH, PY_STACKS, PY_THREAD_SEARCH, PY_TSTATES, PY_WALK, count,
    window::{WINDOW, clear_window, window_word},
};

/// How far below a frame a window refill starts: room for the outer frames.
const BELOW: u64 = (WINDOW - 128) as u64;

/// The lowest `owner` of a frame C pushed where it entered the eval loop:
/// `FRAME_OWNED_BY_CSTACK` on 3.12/3.13 (3), `FRAME_OWNED_BY_INTERPRETER` (3) and
/// `FRAME_OWNED_BY_CSTACK` (4) on 3.14. Owners below are threads, generators and
/// frame objects.
const OWNED_BY_C: u8 = 3;

/// A code reference's tag bits: 3.14's `_PyStackRef` marks deferred references in
/// the low bit of `f_executable`; objects are 16-byte aligned on every version.
const REF_TAG_BITS: u64 = 7;

/// State of a search of 2.7's thread-state list, in map memory like [`WalkState`].
#[derive(Clone, Copy)]
pub struct ThreadSearch {
    /// The thread state to look at next (0: the list ended).
    next: u64,
    /// The caller's `pthread_self()`.
    want: u64,
    /// The caller's thread state, once found.
    found: u64,
}

/// State of one walk, kept in map memory ([`PY_WALK`]) rather than on the stack:
/// the verifier does not track values read back from a map, so the loop's states
/// converge after one step instead of being re-checked once per frame count.
#[derive(Clone, Copy)]
pub struct WalkState {
    frame: u64,
    n: u64,
    flags: u64,
    h1: u64,
    h2: u64,
}

/// One frame of the walk; returns 1 to stop.
extern "C" fn step(_i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    const M1: u64 = 0x9E37_79B9_7F4A_7C15;
    const M2: u64 = 0xC2B2_AE3D_27D4_EB4F;
    // SAFETY: bpf_loop passes back the pointer to our config copy, live for the loop.
    let cfg = unsafe { &*ctx.cast::<PyConfig>() };
    let (Some(w), Some(st)) = (PY_WALK.get_ptr_mut(0), PY_SCRATCH.get_ptr_mut(0)) else {
        return 1;
    };
    // SAFETY: this CPU's private slots from successful lookups.
    let (w, st) = unsafe { (&mut *w, &mut *st) };
    if w.frame == 0 {
        return 1;
    }
    // Fields are read through the stack-read window: on 3.11+ frames sit next to each
    // other in the thread's data stack, outer ones below, so one read serves many.
    let f = w.frame;
    let word = |off: u32| window_word(f + u64::from(off & 0x7f), BELOW);
    let (Some(code), Some(previous), Some(instr_word)) = (
        word(cfg.frame_code),
        word(cfg.frame_previous),
        word(cfg.frame_instr),
    ) else {
        w.flags |= u64::from(STACK_TRUNCATED);
        return 1;
    };
    let mut instr = if cfg.instr_is_int != 0 {
        instr_word & 0xffff_ffff
    } else {
        instr_word
    };
    let edge_at = f + u64::from(cfg.frame_edge & 0x7f);
    let Some(edge_word) = window_word(edge_at & !7, BELOW) else {
        w.flags |= u64::from(STACK_TRUNCATED);
        return 1;
    };
    let edge_byte = (edge_word >> ((edge_at & 7) * 8)) as u8;
    let code = code & !REF_TAG_BITS;
    let shim = (cfg.edge_kind == PY_EDGE_SHIM && edge_byte >= OWNED_BY_C)
        || (cfg.none_addr != 0 && code == cfg.none_addr);
    let n = w.n as usize;
    if shim {
        // Where C entered the eval loop: the frame recorded last is its run's first.
        if n > 0 {
            st.frames[(n - 1) & (MAX_PY_FRAMES - 1)].instr |= PY_FRAME_EDGE;
            // The mark changes a frame already hashed: hash the edge's position too.
            w.h1 = (w.h1 ^ PY_FRAME_EDGE ^ n as u64)
                .wrapping_mul(M1)
                .rotate_left(29);
            w.h2 = (w.h2 ^ PY_FRAME_EDGE ^ n as u64)
                .wrapping_mul(M2)
                .rotate_left(31);
        }
        w.frame = previous;
        return 0;
    }
    if n >= MAX_PY_FRAMES {
        w.flags |= u64::from(STACK_TRUNCATED);
        return 1;
    }
    if cfg.edge_kind == PY_EDGE_IS_ENTRY && edge_byte != 0 {
        instr |= PY_FRAME_EDGE;
    }
    if cfg.code_name != 0 {
        // The name's cached hash tags the frame: another code object at this address
        // later (freed, reused) makes another stack, and userspace can tell them apart.
        let read = |a: u64| {
            // SAFETY: reading user memory through the helper cannot fault the kernel.
            unsafe { bpf_probe_read_user(a as *const u64) }.ok()
        };
        let hash = read(code + u64::from(cfg.code_name & 0xfff))
            .and_then(|name| read(name + 24))
            .unwrap_or(0);
        instr = (instr & !(PY_FRAME_TAG_MASK << PY_FRAME_TAG_SHIFT))
            | (py_name_tag(hash) << PY_FRAME_TAG_SHIFT);
    }
    let slot = &mut st.frames[n & (MAX_PY_FRAMES - 1)];
    slot.code = code;
    slot.instr = instr;
    w.n += 1;
    w.h1 = (w.h1 ^ code).wrapping_mul(M1).rotate_left(29);
    w.h1 = (w.h1 ^ instr).wrapping_mul(M1).rotate_left(29);
    w.h2 = (w.h2 ^ code).wrapping_mul(M2).rotate_left(31);
    w.h2 = (w.h2 ^ instr).wrapping_mul(M2).rotate_left(31);
    w.frame = previous;
    0
}

/// One thread state of the list: stops at the caller's or at the list's end.
extern "C" fn next_thread(_i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: bpf_loop passes back the pointer to our config copy, live for the loop.
    let cfg = unsafe { &*ctx.cast::<PyConfig>() };
    let Some(s) = PY_THREAD_SEARCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's private slot from a successful lookup.
    let s = unsafe { &mut *s };
    let t = s.next;
    if t == 0 {
        return 1;
    }
    // SAFETY: user memory reads through the helper cannot fault.
    let id = unsafe { bpf_probe_read_user((t + u64::from(cfg.tstate_thread_id)) as *const u64) };
    // SAFETY: as above.
    let next = unsafe { bpf_probe_read_user((t + u64::from(cfg.tstate_next)) as *const u64) };
    let (Ok(id), Ok(next)) = (id, next) else {
        return 1;
    };
    if id == s.want {
        s.found = t;
        return 1;
    }
    s.next = next;
    0
}

/// The calling thread's `PyThreadState*` from 2.7's thread list: the cached one if
/// it still belongs to this thread, else the list is searched.
#[inline(always)]
fn listed_thread_state(cfg: &PyConfig, fsbase: u64) -> Option<u64> {
    let tid = aya_ebpf::helpers::bpf_get_current_pid_tgid() as u32;
    // SAFETY: a lookup returns a pointer valid for this program run; we copy it out.
    if let Some(&t) = unsafe { PY_TSTATES.get(&tid) } {
        // SAFETY: user memory reads through the helper cannot fault.
        let id =
            unsafe { bpf_probe_read_user((t + u64::from(cfg.tstate_thread_id)) as *const u64) };
        if id == Ok(fsbase) {
            return Some(t);
        }
    }
    // SAFETY: user memory reads through the helper cannot fault.
    let interp = unsafe { bpf_probe_read_user(cfg.interp_head as *const u64) }.ok()?;
    if interp == 0 {
        return None;
    }
    // SAFETY: as above.
    let head =
        unsafe { bpf_probe_read_user((interp + u64::from(cfg.interp_tstate_head)) as *const u64) }
            .ok()?;
    let s = PY_THREAD_SEARCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's private slot from a successful lookup.
    unsafe {
        *s = ThreadSearch {
            next: head,
            want: fsbase,
            found: 0,
        }
    };
    let mut cfg = *cfg;
    // SAFETY: the callback only reads the config we pass, for the duration of the call.
    unsafe {
        bpf_loop(
            MAX_PY_THREADS,
            next_thread as *mut core::ffi::c_void,
            (&raw mut cfg).cast(),
            0,
        )
    };
    let s = PY_THREAD_SEARCH.get(0)?;
    let t = s.found;
    if t == 0 {
        return None;
    }
    let _ = PY_TSTATES.insert(&tid, &t, 0);
    Some(t)
}

/// The calling thread's Python stack id, or [`STACK_NONE`] when the target is not
/// CPython or this thread has no Python frames.
#[inline(always)]
pub fn capture() -> i64 {
    let Some(cfg) = PY_CONFIG.get(0) else {
        return STACK_NONE;
    };
    if cfg.enabled == 0 {
        return STACK_NONE;
    }
    let cfg: PyConfig = *cfg;
    // SAFETY: bpf_get_current_task returns the current task; reading kernel memory through the helper cannot fault.
    let task = unsafe { bpf_get_current_task() };
    let Ok(fsbase) = (unsafe { bpf_probe_read_kernel((task + cfg.fsbase_offset) as *const u64) })
    else {
        return STACK_NONE;
    };
    let tstate = if cfg.tstate_lookup == PY_TSTATE_LIST {
        listed_thread_state(&cfg, fsbase)
    } else {
        // SAFETY: user memory reads through the helper cannot fault.
        unsafe { bpf_probe_read_user((fsbase + cfg.tss_slot_offset) as *const u64) }.ok()
    };
    let Some(tstate) = tstate.filter(|&t| t != 0) else {
        return STACK_NONE;
    };
    let Ok(mut frame) =
        (unsafe { bpf_probe_read_user((tstate + u64::from(cfg.tstate_frame)) as *const u64) })
    else {
        return STACK_NONE;
    };
    if cfg.cframe_frame != u32::MAX && frame != 0 {
        let Ok(f) =
            (unsafe { bpf_probe_read_user((frame + u64::from(cfg.cframe_frame)) as *const u64) })
        else {
            return STACK_NONE;
        };
        frame = f;
    }
    if frame == 0 {
        return STACK_NONE;
    }
    let Some(w) = PY_WALK.get_ptr_mut(0) else {
        return STACK_NONE;
    };
    clear_window();
    // SAFETY: this CPU's private slot from a successful lookup.
    unsafe {
        *w = WalkState {
            frame,
            n: 0,
            flags: 0,
            h1: 0x5bd1_e995_cbf2_9ce4,
            h2: 0x2722_0a95_8422_2325,
        }
    };
    let mut cfg = cfg;
    // bpf_loop: the verifier checks one step, not one per frame.
    // Two steps per recorded frame at most (a shim frame between two runs).
    // SAFETY: the callback only reads the config we pass, for the duration of the call.
    unsafe {
        bpf_loop(
            2 * MAX_PY_FRAMES as u32,
            step as *mut core::ffi::c_void,
            (&raw mut cfg).cast(),
            0,
        )
    };
    let (Some(w), Some(st)) = (PY_WALK.get_ptr_mut(0), PY_SCRATCH.get_ptr_mut(0)) else {
        return STACK_NONE;
    };
    // SAFETY: this CPU's private slots from successful lookups.
    let (w, st) = unsafe { (*w, &mut *st) };
    let (frame, n, mut flags, mut h1, h2) = (w.frame, w.n as usize, w.flags as u32, w.h1, w.h2);
    const M1: u64 = 0x9E37_79B9_7F4A_7C15;
    if frame != 0 && flags & STACK_TRUNCATED == 0 {
        flags |= STACK_TRUNCATED;
    }
    if flags & STACK_TRUNCATED != 0 {
        count(counter::PY_TRUNCATED);
    }
    if n == 0 {
        return STACK_NONE;
    }
    h1 = (h1 ^ n as u64).wrapping_mul(M1);
    let id = (h1 & (i64::MAX as u64)) as i64;
    st.len = n as u32;
    st.flags = flags;
    st.check = h2;
    // SAFETY: a lookup returns a pointer valid for this program run.
    if let Some(existing) = unsafe { PY_STACKS.get(&id) } {
        if existing.check == h2 && existing.len == n as u32 {
            return id;
        }
        count(counter::PY_COLLISION);
        return STACK_NONE;
    }
    match PY_STACKS.insert(&id, st, BPF_NOEXIST as u64) {
        Ok(()) => id,
        Err(e) if e == -17 => id,
        Err(_) => {
            count(counter::PY_STACK_MAP_FULL);
            STACK_NONE
        }
    }
}
