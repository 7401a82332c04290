//! The Rust allocator scenarios on mimalloc linked statically (the `mimalloc` crate:
//! `mi_`-named, so the C library's malloc stays beside it).

use std::ffi::c_void;

use libmimalloc_sys::{mi_collect, mi_heap_area_t, mi_heap_t, mi_heap_visit_blocks};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "../alloc_fixtures/scenarios.rs"]
mod scenarios;

/// Sums one page (an "area") of the main heap: blocks in use, pages, and the bytes of
/// blocks carved and free, each counted at its full size.
unsafe extern "C" fn visit(
    _heap: *const mi_heap_t,
    area: *const mi_heap_area_t,
    _block: *mut c_void,
    _size: usize,
    arg: *mut c_void,
) -> bool {
    // SAFETY: mimalloc passes a valid area; `arg` is the [u64; 3] below.
    let (a, sums) = unsafe { (&*area, &mut *arg.cast::<[u64; 3]>()) };
    // mimalloc 3: `used` counts blocks, `committed` is the carved blocks' bytes.
    let used = (a.used * a.full_block_size) as u64;
    sums[0] += used;
    sums[1] += a.committed as u64 - used;
    sums[2] += 1;
    true
}

/// A process's RssAnon, KiB.
fn rss_anon_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().strip_suffix(" kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// `counts`: mimalloc's own view of the main heap's pages, `in_use B page_free B pages N`
/// (no allocation while visiting: the other threads are parked). `release`: RssAnon
/// before and after `mi_collect(true)`, which purges the free slices of its arenas,
/// as `released <before> <after> mi_collect`.
fn counts(what: &str) -> String {
    if what == "release" {
        let before = rss_anon_kb();
        // SAFETY: no preconditions.
        unsafe { mi_collect(true) };
        return format!("released {before} {} mi_collect", rss_anon_kb());
    }
    let mut sums = [0u64; 3];
    // SAFETY: the visitor matches mimalloc's signature; a null heap is the main heap.
    let ok = unsafe {
        mi_heap_visit_blocks(
            std::ptr::null_mut(),
            false,
            Some(visit),
            (&raw mut sums).cast::<c_void>(),
        )
    };
    assert!(ok, "mi_heap_visit_blocks");
    format!("in_use {} page_free {} pages {}", sums[0], sums[1], sums[2])
}

fn main() {
    scenarios::run(counts);
}
