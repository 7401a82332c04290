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

/// Memory laid out in a buffer, as an allocator would lay it out: the walkers'
/// unit tests read it through [`Memory`].
#[cfg(test)]
pub struct Laid {
    /// Address of the first byte.
    pub base: u64,
    /// The bytes.
    pub bytes: Vec<u8>,
    /// Residency of each page.
    pub resident: Vec<bool>,
}

#[cfg(test)]
impl Laid {
    /// `len` zero bytes at `base`, every page resident.
    pub fn new(base: u64, len: u64) -> Self {
        Self {
            base,
            bytes: vec![0; len as usize],
            resident: vec![true; (len / PAGE) as usize],
        }
    }

    /// Writes an 8-byte word.
    pub fn put(&mut self, addr: u64, v: u64) {
        let o = (addr - self.base) as usize;
        self.bytes[o..o + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// Writes a 4-byte word.
    pub fn put32(&mut self, addr: u64, v: u32) {
        let o = (addr - self.base) as usize;
        self.bytes[o..o + 4].copy_from_slice(&v.to_le_bytes());
    }
}

#[cfg(test)]
impl Memory for Laid {
    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        let o = addr
            .checked_sub(self.base)
            .ok_or(io::ErrorKind::InvalidInput)? as usize;
        let src = self
            .bytes
            .get(o..o + buf.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn resident(&self, start: u64, end: u64) -> io::Result<Vec<bool>> {
        let page = |a: u64| ((a - self.base) / PAGE) as usize;
        self.resident
            .get(page(start)..page(end))
            .map(<[bool]>::to_vec)
            .ok_or_else(|| io::ErrorKind::UnexpectedEof.into())
    }
}
