//! Ctrl-C and SIGTERM in every phase, not only once the event loop runs.
//!
//! Attaching to a Python process can take seconds (unwind tables, the interpreter),
//! and a signal that comes then must not be lost nor kill leaktrace half-attached. The
//! handlers installed at startup ([`install`]) only note the signal; the slow phases
//! ask [`requested`] between their steps, and the event loop stops at its next turn,
//! still printing what it gathered. A signal ignored by the shell that started
//! leaktrace in the background (job control off) is caught all the same.

use std::sync::atomic::{AtomicI32, Ordering};

static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn note(sig: libc::c_int) {
    SIGNAL.store(sig, Ordering::SeqCst);
}

/// Notes SIGINT and SIGTERM from now on.
pub fn install() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction is valid; the handler only stores to an atomic,
        // which is async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = note as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&raw mut sa.sa_mask);
            libc::sigaction(sig, &raw const sa, std::ptr::null_mut());
        }
    }
}

/// The signal that asked leaktrace to stop, if one did.
pub fn requested() -> Option<i32> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}
