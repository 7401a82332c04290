//! leaktrace: attach to a live process and account its outstanding memory by call stack.
//!
//! The engine behind the `leaktrace` binary. [`session::run`] loads the BPF
//! programs, attaches them to a process (or a command it launches), keeps the
//! [`ledger::Ledger`] up to date from the event stream, and produces
//! [`report::Report`]s.

pub mod allocators;
pub mod btf;
pub mod error;
pub mod glibc_heap;
pub mod intervals;
pub mod launch;
pub mod ledger;
pub mod overhead;
pub mod placement;
pub mod procfs;
pub mod python;
pub mod report;
pub mod session;
pub mod symbols;
pub mod target;
pub mod timeline;
pub mod unwind;
pub mod uprobe_session;
pub mod verdict;

pub use error::Error;
pub use session::{Config, Format, Outcome, Target, run};
