//! Captures come from elsewhere (`--replay` reads a file someone sent): whatever the
//! bytes, the reader and the replay never panic, and a replayed capture reports.
//! The input is split into records framed as the recorder frames them (so that the
//! fuzzer reaches the JSON and the events behind the checksums), and is also read as
//! a whole file.
#![no_main]

use std::io::Write as _;

use leaktrace::capture::{EVENTS, MAGIC, RECORD, Replay};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The bytes as a file.
    let _ = Replay::read(data).map(|r| r.report(5));
    // The bytes as records: [kind][len u16][payload], each deflated and framed.
    let mut file = MAGIC.to_vec();
    let mut rest = data;
    while rest.len() >= 3 {
        let kind = if rest[0] & 1 == 0 { RECORD } else { EVENTS };
        let len = (usize::from(u16::from_le_bytes([rest[1], rest[2]]))).min(rest.len() - 3);
        let payload = &rest[3..3 + len];
        rest = &rest[3 + len..];
        let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        z.write_all(payload).expect("deflate");
        let packed = z.finish().expect("deflate");
        file.push(kind);
        file.extend_from_slice(&(packed.len() as u32).to_le_bytes());
        file.extend_from_slice(&crc32fast::hash(&packed).to_le_bytes());
        file.extend_from_slice(&packed);
    }
    if let Ok(r) = Replay::read(&file[..]) {
        let _ = r.report(5);
        let _ = r.report(usize::MAX);
    }
});
