//! The target's memory, read from outside: `/proc/PID/mem` for bytes and
//! `/proc/PID/pagemap` for residency. Everything that reads the target's memory
//! goes through [`Memory`], so the readers (heap walks, CPython's state) are tested
//! on memory laid out in a buffer.

use std::{fs::File, io, os::unix::fs::FileExt as _};

use crate::units::PAGE;

/// Most pages [`Memory::resident`] is asked for at once (a 512 KiB pagemap read):
/// callers with larger ranges use [`Memory::residency`].
pub const RESIDENT_WINDOW: u64 = 64 << 10;

/// Most pages [`Memory::residency`] reads one pagemap entry at a time (256 GiB of
/// address space, 512 MiB of pagemap): past it, the rest of the range counts as
/// unread. The kernel's page-table scan ([`ProcMemory`], Linux 6.7+) skips holes and
/// has no such limit.
pub const SCAN_PAGES: u64 = 1 << 26;

/// The target's memory, as the walker reads it.
pub trait Memory {
    /// Fills `buf` from `addr`.
    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Whether each page of `[start, end)` (page-aligned, at most
    /// [`RESIDENT_WINDOW`] pages) is resident.
    fn resident(&self, start: u64, end: u64) -> io::Result<Vec<bool>>;

    /// The resident pages of `[start, end)` (page-aligned), of any extent, as runs:
    /// what it holds grows with what is resident, not with the range (a target's
    /// 8 TiB of untouched heap costs nothing). Read in windows of
    /// [`RESIDENT_WINDOW`] pages, at most [`SCAN_PAGES`] of them.
    fn residency(&self, start: u64, end: u64) -> io::Result<Residency> {
        scan_windows(self, start, end)
    }
}

/// A NUL-terminated string of at most `max` bytes at `addr` (a name that may sit near
/// the end of a mapping: the read shrinks until it succeeds).
pub fn read_cstr<M: Memory + ?Sized>(mem: &M, addr: u64, max: usize) -> Option<String> {
    let mut b = vec![0u8; max];
    let mut len = b.len();
    while mem.read(addr, &mut b[..len]).is_err() {
        len /= 2;
        if len < 8 {
            return None;
        }
    }
    let end = b[..len].iter().position(|&c| c == 0)?;
    Some(String::from_utf8_lossy(&b[..end]).into_owned())
}

/// [`Memory::residency`] from [`Memory::resident`] windows.
fn scan_windows<M: Memory + ?Sized>(mem: &M, start: u64, end: u64) -> io::Result<Residency> {
    let mut runs = Residency::builder();
    let limit = start.saturating_add(SCAN_PAGES * PAGE).min(end);
    let mut at = start;
    while at < limit {
        let to = at.saturating_add(RESIDENT_WINDOW * PAGE).min(limit);
        for (i, r) in mem.resident(at, to)?.into_iter().enumerate() {
            if r {
                let p = at + i as u64 * PAGE;
                runs.add(p, p + PAGE);
            }
        }
        at = to;
    }
    Ok(runs.finish(end - limit))
}

/// Resident pages of a range as sorted, disjoint runs, with the bytes before each
/// run, so that any sub-range's resident bytes are two binary searches away.
#[derive(Debug, Default)]
pub struct Residency {
    runs: Vec<(u64, u64)>,
    /// `before[i]`: resident bytes in `runs[..i]` (one more entry than `runs`).
    before: Vec<u64>,
    /// Bytes of the range whose residency was not read (counted as not resident).
    pub unread_bytes: u64,
}

/// Collects runs in address order, joining adjacent ones.
pub struct RunsBuilder(Vec<(u64, u64)>);

impl RunsBuilder {
    /// Adds `[s, e)`, at or after every run added before.
    pub fn add(&mut self, s: u64, e: u64) {
        match self.0.last_mut() {
            Some(last) if last.1 >= s => last.1 = last.1.max(e),
            _ => self.0.push((s, e)),
        }
    }

    /// The residency, with `unread_bytes` not read.
    pub fn finish(self, unread_bytes: u64) -> Residency {
        let mut before = Vec::with_capacity(self.0.len() + 1);
        let mut sum = 0;
        before.push(0);
        for &(s, e) in &self.0 {
            sum += e - s;
            before.push(sum);
        }
        Residency {
            runs: self.0,
            before,
            unread_bytes,
        }
    }
}

impl Residency {
    /// Starts an empty set of runs.
    pub fn builder() -> RunsBuilder {
        RunsBuilder(Vec::new())
    }

    /// Resident bytes of `[s, e)`.
    pub fn bytes(&self, s: u64, e: u64) -> u64 {
        if e <= s {
            return 0;
        }
        let i = self.runs.partition_point(|r| r.1 <= s);
        let j = self.runs.partition_point(|r| r.0 < e);
        if i >= j {
            return 0;
        }
        self.before[j]
            - self.before[i]
            - s.saturating_sub(self.runs[i].0)
            - self.runs[j - 1].1.saturating_sub(e)
    }

    /// The resident runs, `[start, end)` in address order.
    pub fn runs(&self) -> &[(u64, u64)] {
        &self.runs
    }

    /// Resident bytes of the whole range.
    pub fn total(&self) -> u64 {
        self.before.last().copied().unwrap_or(0)
    }
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

    fn residency(&self, start: u64, end: u64) -> io::Result<Residency> {
        match scan::present(&self.pagemap, start, end) {
            Some(r) => r,
            // An older kernel: pagemap entry by entry.
            None => scan_windows(self, start, end),
        }
    }

    fn resident(&self, start: u64, end: u64) -> io::Result<Vec<bool>> {
        if end < start || (end - start) / PAGE > RESIDENT_WINDOW {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "pagemap range over the window",
            ));
        }
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

/// `PAGEMAP_SCAN` (Linux 6.7+): the kernel walks the page tables and returns runs of
/// present pages, skipping unmapped and untouched ranges without a per-page entry.
mod scan {
    use std::{
        fs::File,
        io,
        os::fd::AsRawFd as _,
        sync::atomic::{AtomicBool, Ordering},
    };

    use super::{Residency, RunsBuilder};

    /// `struct page_region` (include/uapi/linux/fs.h).
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct PageRegion {
        start: u64,
        end: u64,
        categories: u64,
    }

    /// `struct pm_scan_arg`.
    #[repr(C)]
    #[derive(Default)]
    struct PmScanArg {
        size: u64,
        flags: u64,
        start: u64,
        end: u64,
        walk_end: u64,
        vec: u64,
        vec_len: u64,
        max_pages: u64,
        category_inverted: u64,
        category_mask: u64,
        category_anyof_mask: u64,
        return_mask: u64,
    }

    /// `_IOWR('f', 16, struct pm_scan_arg)`.
    const PAGEMAP_SCAN: u64 =
        (3 << 30) | ((size_of::<PmScanArg>() as u64) << 16) | (0x66 << 8) | 16;
    const PAGE_IS_PRESENT: u64 = 1 << 3;
    /// Regions returned per call.
    const REGIONS: usize = 4096;

    /// Set once the kernel refused the ioctl: later calls go straight to the fallback.
    static UNSUPPORTED: AtomicBool = AtomicBool::new(false);

    /// Present pages of `[start, end)`, or `None` where the kernel lacks `PAGEMAP_SCAN`.
    pub(super) fn present(pagemap: &File, start: u64, end: u64) -> Option<io::Result<Residency>> {
        if UNSUPPORTED.load(Ordering::Relaxed) {
            return None;
        }
        let mut regions = vec![PageRegion::default(); REGIONS];
        let mut runs = RunsBuilder(Vec::new());
        let mut at = start;
        while at < end {
            let mut arg = PmScanArg {
                size: size_of::<PmScanArg>() as u64,
                start: at,
                end,
                vec: regions.as_mut_ptr() as u64,
                vec_len: REGIONS as u64,
                category_mask: PAGE_IS_PRESENT,
                return_mask: PAGE_IS_PRESENT,
                ..PmScanArg::default()
            };
            // SAFETY: `arg` describes `regions`, which outlives the call; the kernel
            // writes at most `vec_len` regions and `walk_end`.
            let n = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg) };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::ENOTTY | libc::EINVAL | libc::EOPNOTSUPP) if at == start => {
                        UNSUPPORTED.store(true, Ordering::Relaxed);
                        None
                    }
                    _ => Some(Err(e)),
                };
            }
            for r in &regions[..(n as usize).min(REGIONS)] {
                let (s, e) = (r.start.max(at), r.end.min(end));
                if s < e {
                    runs.add(s, e);
                }
            }
            // The walk stops early when the regions are full; a walk_end that does not
            // advance would loop: take it as the end.
            if arg.walk_end <= at {
                break;
            }
            at = arg.walk_end;
        }
        Some(Ok(runs.finish(0)))
    }
}

/// Memory laid out in a buffer, as an allocator would lay it out: the walkers'
/// unit tests and the fuzzer (`fuzz/`) read it through [`Memory`].
pub struct Laid {
    /// Address of the first byte.
    pub base: u64,
    /// The bytes.
    pub bytes: Vec<u8>,
    /// Residency of each page.
    pub resident: Vec<bool>,
}

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

impl Memory for Laid {
    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        // Any address may be asked for: outside the buffer is unreadable, as in a process.
        let o = usize::try_from(
            addr.checked_sub(self.base)
                .ok_or(io::ErrorKind::InvalidInput)?,
        )
        .map_err(|_| io::ErrorKind::InvalidInput)?;
        let src = self
            .bytes
            .get(o..o.saturating_add(buf.len()))
            .filter(|s| s.len() == buf.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn resident(&self, start: u64, end: u64) -> io::Result<Vec<bool>> {
        let page = |a: u64| a.checked_sub(self.base).map(|o| (o / PAGE) as usize);
        let (Some(s), Some(e)) = (page(start), page(end)) else {
            return Err(io::ErrorKind::InvalidInput.into());
        };
        self.resident
            .get(s..e)
            .map(<[bool]>::to_vec)
            .ok_or_else(|| io::ErrorKind::UnexpectedEof.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resident bytes of sub-ranges: runs joined, clipped at both ends, holes empty.
    #[test]
    fn residency_counts_sub_ranges() {
        let mut b = Residency::builder();
        b.add(0x1000, 0x3000);
        b.add(0x3000, 0x4000); // adjacent: one run
        b.add(0x8000, 0x9000);
        let r = b.finish(0);
        assert_eq!(r.runs, vec![(0x1000, 0x4000), (0x8000, 0x9000)]);
        let cases = [
            ((0, 0x10000), 0x4000),
            ((0x2000, 0x3000), 0x1000),
            ((0x1800, 0x8800), 0x2800 + 0x800),
            ((0x4000, 0x8000), 0),
            ((0x9000, 0x9000), 0),
            ((0x5000, 0x1000), 0),
        ];
        for ((s, e), want) in cases {
            assert_eq!(r.bytes(s, e), want, "[{s:#x}, {e:#x})");
        }
        assert_eq!(r.total(), 0x4000);
    }

    /// Memory whose every page is resident, of any extent, counting the pages asked for.
    struct Everywhere(std::cell::Cell<u64>);
    impl Memory for Everywhere {
        fn read(&self, _: u64, _: &mut [u8]) -> io::Result<()> {
            Err(io::ErrorKind::UnexpectedEof.into())
        }
        fn resident(&self, start: u64, end: u64) -> io::Result<Vec<bool>> {
            let pages = (end - start) / PAGE;
            assert!(pages <= RESIDENT_WINDOW, "{pages} pages in one read");
            self.0.set(self.0.get() + pages);
            Ok(vec![true; pages as usize])
        }
    }

    /// 8 TiB of range: windows of bounded size, the scan limit honoured, the rest
    /// counted as unread; what is kept is one run.
    #[test]
    fn residency_of_a_huge_range_is_bounded() {
        let m = Everywhere(std::cell::Cell::new(0));
        let (s, e) = (0x5555_0000_0000u64, 0x5555_0000_0000 + (8u64 << 40));
        let r = m.residency(s, e).unwrap();
        assert_eq!(m.0.get(), SCAN_PAGES);
        assert_eq!(r.total(), SCAN_PAGES * PAGE);
        assert_eq!(r.unread_bytes, (8u64 << 40) - SCAN_PAGES * PAGE);
        assert_eq!(r.runs.len(), 1);
    }

    /// This process's own memory: the kernel's scan (where it exists) and the entry
    /// by entry read agree on a mapping with every other page touched.
    #[test]
    fn pagemap_scan_agrees_with_pagemap_entries() {
        let pages = 64u64;
        // SAFETY: a fresh private anonymous mapping, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                (pages * PAGE) as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let base = p as u64;
        for i in (0..pages).step_by(2) {
            // SAFETY: inside the mapping made above.
            unsafe { *((base + i * PAGE) as *mut u8) = 1 };
        }
        let Ok(mem) = ProcMemory::open(std::process::id()) else {
            // SAFETY: the mapping made above.
            unsafe { libc::munmap(p, (pages * PAGE) as usize) };
            panic!("cannot open this process's pagemap");
        };
        // The kernel's scan must be there from 6.7 on; older kernels take the fallback.
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let mut v = release
            .split(['.', '-'])
            .map(|x| x.parse::<u32>().unwrap_or(0));
        let (major, minor) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
        if (major, minor) >= (6, 7) {
            assert!(
                scan::present(&mem.pagemap, base, base + pages * PAGE).is_some(),
                "PAGEMAP_SCAN refused on {release}"
            );
        }
        let fast = mem.residency(base, base + pages * PAGE).unwrap();
        let slow = scan_windows(&mem, base, base + pages * PAGE).unwrap();
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(p, (pages * PAGE) as usize) };
        // Reading the flags needs no privilege; present bits are given to anyone.
        assert_eq!(slow.total(), pages / 2 * PAGE, "{slow:?}");
        assert_eq!(
            (fast.total(), fast.runs.len()),
            (slow.total(), slow.runs.len())
        );
        assert_eq!(fast.bytes(base, base + 3 * PAGE), 2 * PAGE);
    }
}
