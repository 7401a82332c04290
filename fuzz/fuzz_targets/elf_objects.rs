//! Files a target maps or launches (its executable, its libraries, a planted file):
//! the dynamic section and ld.so.cache readers, the load-bias computation, the
//! allocator search (symbols, thunks, probe placement, version strings, Go build
//! info), the unwind-table builder (.eh_frame, CIEs, FDEs, CFI programs) and the
//! struct layouts read from DWARF (jemalloc's arenas, mimalloc's
//! arenas and pages, tcmalloc's page heap and caches, the Go runtime's statistics)
//! never panic or run away, whatever the bytes.
#![no_main]

use leaktrace::{
    heap::{go, jemalloc, mimalloc, tcmalloc},
    probes::allocators,
    process::{dwarf, elf, ldso},
    unwind::table,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ldso::dynamic_of(data);
    let _ = ldso::read_cache(data);
    let _ = allocators::find_in_bytes("fuzzed", std::path::Path::new("fuzzed"), data);
    for (start, offset) in [(0x5555_0000_0000, 0), (0x7f00_0000_1000, 0x1000)] {
        let _ = elf::load_bias(data, start, offset, true);
        let _ = elf::load_bias(data, start, offset, false);
    }
    if let Ok(t) = table::build(data) {
        let _ = t.lookup(t.base());
        let _ = t.lookup(t.base().wrapping_add(0x1234));
        let _ = t.pages();
    }
    let _ = table::fde_ranges(data);
    let _ = jemalloc::Layout::find(data, data, "_rjem_");
    let _ = mimalloc::Layout::find(data);
    let _ = tcmalloc::Layout::find(data);
    let _ = go::Layout::find(data);
    let _ = dwarf::resolve(data, &[("s", "a.b"), ("t", "")], dwarf::Language::C);
    let _ = dwarf::resolve(data, &[("const", "k"), ("C", "m_")], dwarf::Language::Cpp);
    let _ = elf::data_symbol(data, &["je_arenas", "runtime.memstats"]);
});
