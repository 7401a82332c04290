//! The target's memory, read from outside: `/proc/PID/mem` for bytes and
//! `/proc/PID/pagemap` for residency. Everything that reads the target's memory
//! goes through [`Memory`], so the readers (heap walks, CPython's state) are tested
//! on memory laid out in a buffer.

use std::{fs::File, io, os::unix::fs::FileExt as _};

use crate::units::PAGE;

/// The target's memory, as the walker reads it.
pub trait Memory {
    /// Fills `buf` from `addr`.
    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Whether each page of `[start, end)` (page-aligned) is resident.
    fn resident(&self, start: u64, end: u64) -> io::Result<Vec<bool>>;
}

/// `/proc/PID/mem` and `/proc/PID/pagemap`.
pub struct ProcMemory {
    mem: File,
    pagemap: File,
}

impl ProcMemory {
    /// Opens the target's memory for reading.
    pub fn open(pid: u32) -> io::Result<Self> {
        Ok(Self {
            mem: File::open(format!("/proc/{pid}/mem"))?,
            pagemap: File::open(format!("/proc/{pid}/pagemap"))?,
        })
    }
}

impl Memory for ProcMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        self.mem.read_exact_at(buf, addr)
    }

    fn resident(&self, start: u64, end: u64) -> io::Result<Vec<bool>> {
        let pages = ((end - start) / PAGE) as usize;
        let mut raw = vec![0u8; pages * 8];
        self.pagemap.read_exact_at(&mut raw, start / PAGE * 8)?;
        // Bit 63: page present in RAM.
        Ok(raw
            .chunks_exact(8)
            .map(|e| u64::from_le_bytes(e.try_into().expect("8 bytes")) >> 63 == 1)
            .collect())
    }
}
