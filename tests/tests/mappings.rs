//! Address-space accounting: mmap with partial munmap, mremap, brk.

use leaktrace_tests::{functions, require_root, stack_at, stacks_at, trace_scenario};

const PAGE: u64 = 4096;

/// (function, mapped bytes still in place)
const EXPECTED: &[(&str, u64)] = &[
    ("map_region", 7 * PAGE),     // 10 pages, 3 in the middle unmapped
    ("remap_region", 16 * PAGE),  // 4 pages grown to 16 by mremap (may move)
    ("grow_brk", 3 * PAGE + 100), // brk moved by an exact byte count
];

/// mmap/munmap/mremap/brk intervals shrink, split, move and grow exactly.
#[test]
fn root_mmap_munmap_mremap_brk() {
    require_root();
    let (_fx, r) = trace_scenario("mappings", &[], &[]);
    for &(func, bytes) in EXPECTED {
        let s = stack_at(&r, "mappings", func);
        assert_eq!(s["mapped_bytes"].as_u64(), Some(bytes), "{func}: {s:#}");
        assert!(
            functions(s).iter().any(|f| f == "main"),
            "{func}: {:?}",
            functions(s)
        );
    }
    assert!(
        stacks_at(&r, "mappings", "map_temporary").is_empty(),
        "fully unmapped regions leave nothing"
    );
    assert_eq!(
        r["mappings"]["anon_mapped_bytes"].as_u64(),
        Some(23 * PAGE),
        "{r:#}"
    );
    let split = &r["mappings"]["split"];
    assert_eq!(
        (
            split["other_anon_bytes"].as_u64(),
            split["allocator_chunk_bytes"].as_u64(),
            split["arenas"].as_u64()
        ),
        (Some(23 * PAGE), Some(0), Some(0)),
        "{split}"
    );
    assert_eq!(
        r["mappings"]["brk_grown_bytes"].as_u64(),
        Some(3 * PAGE + 100)
    );
    assert!(r["mappings"]["brk_bytes"].as_u64().unwrap() >= 3 * PAGE + 100);
    assert_eq!(
        r["heap"]["live_bytes"], 0,
        "no heap activity in this fixture"
    );
    assert_eq!(r["lost_total"], 0, "{}", r["lost"]);
}
