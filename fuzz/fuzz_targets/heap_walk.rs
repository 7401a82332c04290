//! A target's heap memory, laid out by the fuzzer: glibc's heap walk (as the brk
//! heap, and as a 64 MiB-aligned arena heap) and the pymalloc walk (3.8's and 3.11's
//! layouts) end within their budget, never panic, and never count more bytes than
//! the region holds.
#![no_main]

use leaktrace::{
    heap::{glibc, pymalloc},
    process::memory::Laid,
};
use libfuzzer_sys::fuzz_target;

const PAGE: u64 = 4096;

fuzz_target!(|data: &[u8]| {
    for base in [0x5555_0000_0000u64, 0x7f00_0000_0000] {
        // The fuzzer's bytes at `base`, padded to whole pages, every page resident.
        let len = (data.len() as u64).next_multiple_of(PAGE).max(PAGE);
        let mut m = Laid::new(base, len);
        m.bytes[..data.len()].copy_from_slice(data);
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
