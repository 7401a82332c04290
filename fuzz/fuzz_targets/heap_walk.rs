//! A target's heap memory, laid out by the fuzzer: glibc's heap walk (as the brk
//! heap, and as a 64 MiB-aligned arena heap) and the pymalloc walk (3.8's and 3.11's
//! layouts) end within their budget, never panic, and never count more bytes than
//! the region holds.
#![no_main]

use std::io;

use leaktrace::{
    heap::{glibc, pymalloc},
    process::Memory,
};
use libfuzzer_sys::fuzz_target;

const PAGE: u64 = 4096;

/// The fuzzer's bytes at `base`, padded to whole pages, every page resident.
struct Laid {
    base: u64,
    bytes: Vec<u8>,
}

impl Memory for Laid {
    fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        let o = addr
            .checked_sub(self.base)
            .ok_or(io::ErrorKind::InvalidInput)? as usize;
        let src = self
            .bytes
            .get(o..o.saturating_add(buf.len()))
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn resident(&self, start: u64, end: u64) -> io::Result<Vec<bool>> {
        let len = self.bytes.len() as u64;
        Ok((start..end)
            .step_by(PAGE as usize)
            .map(|p| p >= self.base && p < self.base + len)
            .collect())
    }
}

fuzz_target!(|data: &[u8]| {
    for base in [0x5555_0000_0000u64, 0x7f00_0000_0000] {
        let mut bytes = data.to_vec();
        bytes.resize(
            bytes
                .len()
                .next_multiple_of(PAGE as usize)
                .max(PAGE as usize),
            0,
        );
        let len = bytes.len() as u64;
        let m = Laid { base, bytes };
        let sites = glibc::HeapSites {
            main: Some((base, base + len)),
            thread_heaps: vec![base],
        };
        let w = glibc::walk_heaps(&m, &sites);
        for a in &w.arenas {
            assert!(a.resident_bytes <= 2 * len, "{a:?}");
        }
        for v in [(3, 8), (3, 11), (2, 7)] {
            if let Some(l) = pymalloc::Layout::for_version(v.0, v.1) {
                let p = pymalloc::walk(&m, &l, &[(base, base + len)]);
                let _ = p.summary();
            }
        }
        let _ = glibc::mmapped_chunks(&m, &[(base, base + len)]);
    }
});
