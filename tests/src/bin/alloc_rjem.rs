//! The Rust allocator scenarios on jemalloc linked statically (tikv-jemallocator:
//! `_rjem_`-prefixed, so the C library's malloc stays beside it).

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[path = "../alloc_fixtures/scenarios.rs"]
mod scenarios;

/// jemalloc's own page counts over all arenas, as `mallctl` gives them after an
/// epoch refresh: `pactive N pdirty N pmuzzy N` (pages).
fn counts(_: &str) -> String {
    use std::ffi::c_void;
    let mallctl = |name: &std::ffi::CStr| -> usize {
        let mut v: usize = 0;
        let mut len = size_of::<usize>();
        // SAFETY: `v` and `len` describe a size_t, which these entries are.
        let rc = unsafe {
            tikv_jemalloc_sys::mallctl(
                name.as_ptr(),
                (&raw mut v).cast::<c_void>(),
                &raw mut len,
                std::ptr::null_mut(),
                0,
            )
        };
        assert_eq!(rc, 0, "mallctl {name:?}");
        v
    };
    // Refresh the counts mallctl reports.
    let mut epoch: u64 = 1;
    let mut len = size_of::<u64>();
    // SAFETY: `epoch` is a uint64_t, read and written.
    unsafe {
        tikv_jemalloc_sys::mallctl(
            c"epoch".as_ptr(),
            (&raw mut epoch).cast::<c_void>(),
            &raw mut len,
            (&raw mut epoch).cast::<c_void>(),
            size_of::<u64>(),
        );
    }
    // 4096: MALLCTL_ARENAS_ALL, the sum over arenas.
    format!(
        "pactive {} pdirty {} pmuzzy {}",
        mallctl(c"stats.arenas.4096.pactive"),
        mallctl(c"stats.arenas.4096.pdirty"),
        mallctl(c"stats.arenas.4096.pmuzzy")
    )
}

fn main() {
    scenarios::run(counts);
}
