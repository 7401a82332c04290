//! A target's heap memory, laid out by the fuzzer: glibc's heap walk (as the brk
//! heap, and as a 64 MiB-aligned arena heap) and the pymalloc walk (3.8's and 3.11's
//! layouts) end within their budget, never panic, and never count more bytes than
//! the region holds; nor does the census of the same memory (Python objects in the
//! pools and chunks, their types read from the same bytes; C++ objects by vtable); nor
//! do the readers of mimalloc's and tcmalloc's state (with the layouts of the seed
//! objects, their statics at the fuzzed bytes), nor the reachability scan (blocks and
//! roots taken from the same bytes), nor the reader of Python's collector (its
//! state, the builtin types and every object in the fuzzed bytes).
#![no_main]

use leaktrace::{
    heap::{census, glibc, mimalloc, pygc, pymalloc, reach, tcmalloc},
    process::{elf, memory::Laid},
};
use libfuzzer_sys::fuzz_target;

const PAGE: u64 = 4096;
const MIMALLOC_SEED: &[u8] = include_bytes!("../regressions/elf_objects/mimalloc-layout-seed.so");
const TCMALLOC_SEED: &[u8] = include_bytes!("../regressions/elf_objects/tcmalloc-layout-seed.so");

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
        // Allocator state: the seed's static at `base`.
        if let (Ok(l), Some((at, _))) = (
            mimalloc::Layout::find(MIMALLOC_SEED),
            elf::data_symbol(MIMALLOC_SEED, &["subproc_main"]),
        ) {
            if let Ok(s) = mimalloc::read(&m, &l, base.wrapping_sub(at), "fuzzed") {
                let _ = s.kept_bytes();
            }
        }
        if let (Ok(l), Some((at, _))) = (
            tcmalloc::Layout::find(TCMALLOC_SEED),
            elf::data_symbol(TCMALLOC_SEED, &["_ZN8tcmalloc6Static9pageheap_E"]),
        ) {
            if let Ok(s) = tcmalloc::read(&m, &l, base.wrapping_sub(at), "fuzzed") {
                let _ = s.kept_bytes();
            }
        }
        // Python's collector: its state at `base`, types in the first KiB.
        for v in [(2, 7), (3, 6), (3, 10), (3, 11), (3, 12), (3, 13), (3, 14)] {
            let l = pygc::Layout::for_version(v.0, v.1).expect("layout");
            let mut a = [0u64; 11];
            for (i, x) in a.iter_mut().enumerate() {
                *x = base + 0x400 + 0x40 * i as u64;
            }
            let types = pygc::Types::from_addresses(&a);
            let budget = std::time::Duration::from_millis(200);
            if let Ok(g) = pygc::read_within(&m, &l, &pygc::Place::modern_at(base), &types, budget) {
                assert!(g.scan.passes <= 2);
                assert!(g.cyclic_unreachable.objects <= g.tracked.iter().sum::<u64>(), "{g:?}");
            }
        }
        // Reachability: blocks from the walk's chains and from the bytes themselves,
        // the first page as a root.
        let mut blocks = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(200);
        let _ = glibc::each_in_use(&m, &w.chains, deadline, &mut |u, n, _| blocks.push((u, n)));
        for c in data.chunks_exact(16).take(4096) {
            let a = u64::from_le_bytes(c[..8].try_into().expect("8"));
            let n = u64::from_le_bytes(c[8..].try_into().expect("8"));
            blocks.push((a, n));
        }
        let blocks = reach::Blocks::new(blocks);
        let roots = [reach::Root {
            name: "fuzzed".into(),
            kind: reach::RootKind::Data,
            object: None,
            source: reach::Source::Memory {
                start: base,
                end: base + PAGE,
            },
        }];
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(200);
        let s = reach::scan(&m, &blocks, None, &roots, deadline, 64 << 20);
        assert_eq!(s.via.len(), blocks.len());
    }
});
