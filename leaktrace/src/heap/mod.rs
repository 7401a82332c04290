//! Allocator state read from the target's memory, from outside: the heap as the
//! allocator itself sees it (in use, free, free but resident, trimmable).
//! [`glibc`] walks glibc's arenas, [`pymalloc`] CPython's small-object arenas;
//! [`jemalloc`] reads jemalloc's arena counters where its layout is known.

pub mod glibc;
pub mod jemalloc;
pub mod pymalloc;

/// Other allocators' own state, read from outside where their layout is known.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct OtherState {
    /// jemalloc's arenas, per object that holds a jemalloc.
    pub jemalloc: Vec<jemalloc::JemallocState>,
    /// Allocators found whose state is not read, and why.
    pub not_read: Vec<NotRead>,
}

/// An allocator whose own state is not read.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct NotRead {
    /// Which allocator (`jemalloc`, `tcmalloc`, `mimalloc`).
    pub allocator: String,
    /// The object holding it, as the target names it.
    pub object: String,
    /// Why not.
    pub why: String,
}

impl OtherState {
    /// Freed memory these allocators keep resident, as they count it.
    pub fn kept_bytes(&self) -> u64 {
        self.jemalloc
            .iter()
            .map(jemalloc::JemallocState::kept_bytes)
            .sum()
    }
}
