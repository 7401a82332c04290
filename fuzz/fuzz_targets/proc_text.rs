//! /proc text the target shapes (its mappings' paths, its name in status): the
//! parsers of maps, smaps and status never panic, whatever the bytes.
#![no_main]

use leaktrace::process::procfs;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let maps = procfs::parse_maps(&text);
    for m in &maps {
        let _ = (m.is_exec(), m.is_file());
    }
    let _ = procfs::parse_smaps(&text);
    let _ = procfs::parse_status(&text);
});
