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

/// `Err(Stopped)` once a signal asked leaktrace to stop: the slow phases call it
/// between their steps (each well under a second; a verifier run is the longest).
pub fn check() -> Result<(), crate::error::Error> {
    match requested() {
        Some(signal) => Err(crate::error::Error::Stopped { signal }),
        None => Ok(()),
    }
}

/// While alive, SIGINT and SIGTERM are blocked on the calling thread. The BPF
/// verifier gives up on a program when a signal is pending (EAGAIN), and aya then
/// loads it again, with logs, up to three more times: a Ctrl-C during a verifier run
/// of most of a second cost seconds. Shielded, the run finishes; the signal goes to
/// another thread (the attach notice's), or waits until the shield is dropped, and
/// the check after the run stops leaktrace.
#[derive(Debug)]
pub struct Shield {
    old: libc::sigset_t,
}

impl Shield {
    /// Blocks SIGINT and SIGTERM on this thread until dropped.
    pub fn new() -> Self {
        // SAFETY: sigset_t is plain data, filled by sigemptyset/sigaddset before use;
        // pthread_sigmask only changes this thread's mask.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&raw mut set);
            libc::sigaddset(&raw mut set, libc::SIGINT);
            libc::sigaddset(&raw mut set, libc::SIGTERM);
            libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, &raw mut old);
            Self { old }
        }
    }
}

impl Default for Shield {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Shield {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved by `new`, on the same thread (not Send).
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &raw const self.old, std::ptr::null_mut());
        }
    }
}
