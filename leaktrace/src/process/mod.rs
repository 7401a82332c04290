//! The traced process: everything read from `/proc/PID` ([`procfs`]), its memory
//! ([`memory`]), its ELF objects ([`elf`]), validating a pid ([`target`]) and
//! launching a command under trace ([`launch`]), and struct layouts from debug
//! information ([`dwarf`]).

pub mod dwarf;
pub mod elf;
pub mod launch;
pub mod ldso;
pub mod memory;
pub mod procfs;
pub mod target;

pub use memory::{Memory, ProcMemory};
