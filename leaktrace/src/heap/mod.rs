//! Allocator state read from the target's memory, from outside: the heap as the
//! allocator itself sees it (in use, free, free but resident, trimmable).
//! [`glibc`] walks glibc's arenas, [`pymalloc`] CPython's small-object arenas;
//! other allocators get a module beside them.

pub mod glibc;
pub mod jemalloc;
pub mod pymalloc;
