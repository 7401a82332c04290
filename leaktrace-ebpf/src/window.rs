//! Reading the user stack in windows: one helper call fetches up to 2 KiB, and the
//! native walks (`stack.rs`) and the CPython walk (`python.rs`) read their words
//! from it.

use aya_ebpf::helpers::{bpf_probe_read_user, bpf_probe_read_user_buf};

use crate::STACK_WINDOW;

/// Bytes of stack read at once by [`window_word`]: a 20-frame stack of -O2 code
/// spans about 1–2 KiB, so one read serves most walks.
pub const WINDOW: usize = 2048;

/// A slice of the user stack read in one helper call. One `bpf_probe_read_user`
/// costs about as much for 8 bytes as for a kilobyte (on the development VM ~0.1 µs
/// per call), so the walk reads the stack in windows instead of word by word.
pub struct StackWindow {
    base: u64,
    len: u64,
    buf: [u8; WINDOW],
}

/// Empties the window: it holds another moment's stack.
#[inline(always)]
pub fn clear_window() {
    if let Some(win) = STACK_WINDOW.get_ptr_mut(0) {
        // SAFETY: this CPU's private slot from a successful lookup.
        unsafe { (*win).len = 0 };
    }
}

/// The 8-byte word at user address `addr` through the window. A refill reads from
/// `addr - below` (rounded to 8), so that a walk moving towards lower addresses (CPython's
/// frames, outermost lowest in the thread's data stack) finds the next frames in it too;
/// the window stays within `addr`'s page, so the read does not fault on a neighbour
/// that is not mapped.
#[inline(always)]
pub fn window_word(addr: u64, below: u64) -> Option<u64> {
    let w = STACK_WINDOW.get_ptr_mut(0)?;
    // SAFETY: this CPU's private slot from a successful lookup.
    let w = unsafe { &mut *w };
    // `addr >= base` first: below the window the offset would wrap and pass the length test.
    if addr >= w.base && addr % 8 == 0 && addr - w.base + 8 <= w.len {
        let o = ((addr - w.base) as usize) & (WINDOW - 8);
        let b = &w.buf[o..o + 8];
        return Some(u64::from_le_bytes([
            b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
        ]));
    }
    if addr % 8 != 0 {
        // SAFETY: user memory reads through the helper cannot fault.
        return unsafe { bpf_probe_read_user(addr as *const u64) }.ok();
    }
    // Never across a page boundary: a read that faults costs far more than a second
    // refill (and the page holding `addr` is mapped if the word is readable at all).
    // The window lies within `addr`'s page, so when it can't be read neither can `addr`.
    let page = addr & !0xfff;
    let start = (addr.saturating_sub(below.min((WINDOW - 8) as u64)) & !7)
        .clamp(page, page + 4096 - WINDOW as u64);
    // SAFETY: user memory reads through the helper cannot fault; sizes are constants.
    if unsafe { bpf_probe_read_user_buf(start as *const u8, &mut w.buf[..]) }.is_err() {
        w.len = 0;
        return None;
    }
    w.base = start;
    w.len = WINDOW as u64;
    if addr < start || addr - start + 8 > w.len {
        return None;
    }
    let o = ((addr - start) as usize) & (WINDOW - 8);
    let b = &w.buf[o..o + 8];
    Some(u64::from_le_bytes([
        b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
    ]))
}
