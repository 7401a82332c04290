//! Conclusions drawn from the books and the target's state: where RSS goes
//! ([`memory`]) and the [`verdict`] (leak, fragmentation, growth outside the heap,
//! none) with the evidence, suspects and remedies behind it.

pub mod memory;
pub mod verdict;
