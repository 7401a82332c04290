//! Conclusions drawn from the books: the [`verdict`] (leak, fragmentation, growth
//! outside the heap, none) with the evidence, suspects and remedies behind it.

pub mod verdict;
