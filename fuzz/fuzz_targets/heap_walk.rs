//! A target's heap memory, laid out by the fuzzer: glibc's heap walk (as the brk
//! heap, and as a 64 MiB-aligned arena heap) and the pymalloc walk (3.8's and 3.11's
//! layouts) end within their budget, never panic, and never count more bytes than
//! the region holds; nor does the census of the same memory (Python objects in the
//! pools and chunks, their types read from the same bytes; C++ objects by vtable).
#![no_main]

use leaktrace::{
    heap::{census, glibc, pymalloc},
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
        for v in [(3, 8), (3, 11), (2, 7), (3, 13)] {
            if let Some(l) = pymalloc::Layout::for_version(v.0, v.1) {
                let p = pymalloc::walk(&m, &l, &[(base, base + len)]);
                let _ = p.summary();
                // The type of types somewhere in the fuzzed bytes.
                let cl = census::Layout::for_version(v.0, v.1, base + 0x40).expect("layout");
                let mut c = census::PyCensus::new(&m, cl);
                let budget = std::time::Duration::from_millis(200);
                let _ = pymalloc::walk_with_census(&m, &l, &[(base, base + len)], budget, &mut |a, b| {
                    c.block(a, b)
                });
                let deadline = std::time::Instant::now() + budget;
                let _ = glibc::each_in_use(&m, &w.chains, deadline, &mut |u, n, h| c.chunk(u, n, h));
                let mut done = c.finish(0.0, 0.0, None);
                assert!(done.attributed_bytes <= done.heap_in_use_bytes, "{done:?}");
                done.rank(None);
            }
        }
        let mut vt = census::Vtables::default();
        vt.add_object(data, base);
        let mut cx = census::CxxCensus::new(&vt);
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(200);
        let _ = glibc::each_in_use(&m, &w.chains, deadline, &mut |u, n, h| cx.chunk(u, n, h));
        let _ = cx.finish(0.0, 0.0, None);
        let _ = glibc::mmapped_chunks(&m, &[(base, base + len)]);
    }
});
