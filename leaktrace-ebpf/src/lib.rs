//! Empty library target: lets `leaktrace` depend on this crate so cargo rebuilds
//! the BPF object when it changes (the programs are in the `leaktrace` binary target).
#![no_std]
