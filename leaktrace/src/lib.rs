//! leaktrace: attach to a live process and account its outstanding memory by call stack.
//!
//! The engine behind the `leaktrace` binary. The modules follow the data, from the
//! process to the printed report (docs/design.md walks one allocation through them):
//!
//! * [`process`]: the target — `/proc`, its memory, its ELF objects, launching a command.
//! * [`probes`]: where the allocator probes go, loading and attaching the BPF programs,
//!   and what the probes cost.
//! * [`unwind`]: compact unwind tables for the in-kernel stack walk.
//! * [`symbolize`]: stack ids to frames, native (blazesym) and CPython.
//! * [`accounting`]: the books kept from the event stream — live blocks, address
//!   space, totals over time.
//! * [`heap`]: allocator state read from the target's memory (glibc's arenas).
//! * [`analysis`]: the verdict — leak or fragmentation — with evidence and remedies.
//! * [`report`]: the report model, its JSON, and its text.
//! * [`session`]: the pipeline that runs them — prepare, load, attach, the event loop
//!   and its worker thread, the final report.

pub mod accounting;
pub mod analysis;
pub mod capture;
pub mod error;
pub mod heap;
pub mod probes;
pub mod process;
pub mod report;
pub mod session;
pub mod symbolize;
pub mod units;
pub mod unwind;

pub use error::Error;
pub use session::{Config, Format, Outcome, Target, run};
