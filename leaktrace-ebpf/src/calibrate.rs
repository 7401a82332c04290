//! A probe that does nothing, attached by leaktrace to functions of its own for a
//! moment at startup: the time a call takes with it, less the time without, is what
//! one trap costs on this machine (see `leaktrace/src/probes/calibrate.rs`).

use aya_ebpf::{macros::uprobe, programs::ProbeContext};

/// Entry (or return) probe of leaktrace's own calibration functions.
#[uprobe]
pub fn calibrate(_ctx: ProbeContext) -> u32 {
    0
}
