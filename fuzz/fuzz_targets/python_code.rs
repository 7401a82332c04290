//! A CPython target's code objects, names and line tables, laid out by the fuzzer:
//! resolving frames that point into them (per version's layout) never panics, and
//! every name it returns is bounded.
#![no_main]

use leaktrace::{
    process::memory::Laid,
    symbolize::python::{PySymbols, PyTarget, lines},
};
use leaktrace_common::PyFrame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 16 {
        return;
    }
    let word = |i: usize| u64::from_le_bytes(data[i..i + 8].try_into().unwrap());
    // Line tables straight from the bytes, at an offset the fuzzer picks.
    let (first, off) = (word(0) as u32, word(8) % 4096);
    let _ = lines::lnotab_line(&data[16..], first, off, true);
    let _ = lines::lnotab_line(&data[16..], first, off, false);
    let _ = lines::linetable310_line(&data[16..], first, off);
    let _ = lines::location_line(&data[16..], first, off);
    // Code objects at the start of the bytes; pointers inside them lead anywhere.
    let base = 0x7f00_1000_0000u64;
    let len = (data.len() as u64).next_multiple_of(4096);
    let mut m = Laid::new(base, len);
    m.bytes[..data.len()].copy_from_slice(data);
    let code_type = word(8); // the object's own ob_type slot when the data says so
    for version in [(2, 7), (3, 9), (3, 10), (3, 11), (3, 12), (3, 14)] {
        let t = PyTarget::for_fuzzing(version, code_type);
        let mut s = PySymbols::default();
        for at in [0u64, 8, 64] {
            let f = s.frame(
                &m,
                &t,
                PyFrame {
                    code: base + at,
                    instr: word(0),
                },
            );
            for text in [&f.function, &f.file].into_iter().flatten() {
                assert!(text.chars().count() <= 4096, "{} chars", text.len());
            }
        }
    }
});
