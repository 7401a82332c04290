//! The probes: where they go in the target's allocator ([`allocators`],
//! [`placement`]), loading the BPF object ([`load`]), attaching it ([`attach`],
//! with [`uprobe_session`] for what aya cannot attach), the kernel facts they need
//! ([`btf`]), and what they cost the target ([`cost`] for the model, [`meter`] for
//! the measurement).

pub mod allocators;
pub mod attach;
pub mod btf;
pub mod calibrate;
pub mod cost;
pub mod load;
pub mod meter;
pub mod placement;
pub mod uprobe_session;
