//! CPython's line tables: from an instruction offset to a source line.
//!
//! * 2.7–3.9 `co_lnotab`: (address increment, line increment) byte pairs;
//! * 3.10 `co_linetable` (PEP 626): (bytes, signed line delta) pairs, -128 = no line;
//! * 3.11+ location table: entries of a code, a length in code units and varints.

/// Line of bytecode byte offset `off` from a `co_lnotab` (2.7–3.9): pairs of
/// (address increment, line increment), the line increment signed from 3.6 on and
/// unsigned before (`signed`).
pub fn lnotab_line(t: &[u8], first: u32, off: u64, signed: bool) -> Option<u32> {
    let (mut addr, mut line) = (0u64, i64::from(first));
    for p in t.chunks_exact(2) {
        addr += u64::from(p[0]);
        if addr > off {
            break;
        }
        line += if signed {
            i64::from(p[1] as i8)
        } else {
            i64::from(p[1])
        };
    }
    u32::try_from(line).ok()
}

/// Line of bytecode byte offset `off` from a 3.10 `co_linetable` (PEP 626).
pub fn linetable310_line(t: &[u8], first: u32, off: u64) -> Option<u32> {
    let (mut end, mut line) = (0u64, i64::from(first));
    for p in t.chunks_exact(2) {
        let start = end;
        end += u64::from(p[0]);
        let ld = p[1] as i8;
        let here = if ld == -128 {
            None
        } else {
            line += i64::from(ld);
            Some(line)
        };
        if off >= start && off < end {
            return here.and_then(|l| u32::try_from(l).ok());
        }
    }
    None
}

/// Line of code unit `off` from a 3.11+ location table.
pub fn location_line(t: &[u8], first: u32, off: u64) -> Option<u32> {
    let mut i = 0;
    let varint = |i: &mut usize| -> u64 {
        let (mut v, mut shift) = (0u64, 0);
        while let Some(&b) = t.get(*i) {
            *i += 1;
            // A hostile table's endless continuation bytes add nothing past 64 bits.
            v |= u64::from(b & 63).checked_shl(shift).unwrap_or(0);
            shift = shift.saturating_add(6);
            if b & 64 == 0 {
                break;
            }
        }
        v
    };
    let signed = |v: u64| {
        if v & 1 == 1 {
            -((v >> 1) as i64)
        } else {
            (v >> 1) as i64
        }
    };
    let (mut addr, mut line) = (0u64, i64::from(first));
    while let Some(&b) = t.get(i) {
        i += 1;
        let code = (b >> 3) & 15;
        let len = u64::from(b & 7) + 1;
        let here = match code {
            15 => None,
            14 => {
                line = line.saturating_add(signed(varint(&mut i)));
                varint(&mut i);
                varint(&mut i);
                varint(&mut i);
                Some(line)
            }
            13 => {
                line = line.saturating_add(signed(varint(&mut i)));
                Some(line)
            }
            10..=12 => {
                line = line.saturating_add(i64::from(code) - 10);
                i = i.saturating_add(2);
                Some(line)
            }
            _ => {
                i += 1;
                Some(line)
            }
        };
        if off >= addr && off < addr.saturating_add(len) {
            return here.and_then(|l| u32::try_from(l).ok());
        }
        addr = addr.saturating_add(len);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the fuzzer (fuzz/regressions/python_code): a varint of endless
    /// continuation bytes shifted past 64 bits and panicked (debug builds), and
    /// huge deltas overflowed the line. Now they saturate, and no line is made up.
    #[test]
    fn hostile_location_tables_end() {
        let mut t = vec![0xf0u8]; // code 14, then varints
        t.extend(std::iter::repeat_n(0x7f, 40)); // continuation forever, then ends
        t.extend([0x3f, 0, 0, 0]);
        assert_eq!(location_line(&t, 1, 0), None);
        let huge = [
            0xe8u8, 0x7f, 0x7f, 0x7f, 0x7f, 0x7f, 0x7f, 0x7f, 0x7f, 0x7f, 0x7f, 0x3e,
        ];
        assert_eq!(location_line(&huge, u32::MAX, 0), None);
    }

    /// Line tables of each format, against lines CPython itself reports (the
    /// tables are from `compile()` of small functions; see the comments).
    #[test]
    fn line_tables() {
        // 3.11 location table: first line 10; 2 units on line 10 (code 0, 1 column byte),
        // 3 units on line 11 (code 11: delta 1), 1 unit with no location (15), 2 units
        // on line 14 (code 13, signed varint +3 = 6), 1 unit on line 12 (code 14: -2 = 5).
        let t = [0x81, 5, 0xda, 1, 2, 0xf8, 0xe9, 6, 0xf0, 5, 0, 0, 0];
        let cases = [
            (0, Some(10)),
            (1, Some(10)),
            (2, Some(11)),
            (4, Some(11)),
            (5, None),
            (6, Some(14)),
            (7, Some(14)),
            (8, Some(12)),
            (9, None),
        ];
        for (off, want) in cases {
            assert_eq!(location_line(&t, 10, off), want, "3.11 offset {off}");
        }
        // 3.10: (bytes, line delta): 4 bytes on line 20, 6 on 21, 2 with no line, 4 on 19.
        let t = [4, 0, 6, 1, 2, 0x80, 4, 0xfe];
        let cases = [
            (0, Some(20)),
            (3, Some(20)),
            (4, Some(21)),
            (9, Some(21)),
            (10, None),
            (12, Some(19)),
            (16, None),
        ];
        for (off, want) in cases {
            assert_eq!(linetable310_line(&t, 20, off), want, "3.10 offset {off}");
        }
        // 3.9 lnotab: (address increment, line increment): line 5 at 0, 6 at 4, 8 at 10.
        let t = [4, 1, 6, 2];
        let cases = [
            (0, Some(5)),
            (3, Some(5)),
            (4, Some(6)),
            (9, Some(6)),
            (10, Some(8)),
            (40, Some(8)),
        ];
        for (off, want) in cases {
            assert_eq!(lnotab_line(&t, 5, off, true), want, "3.9 offset {off}");
        }
        // 3.9: a negative increment (0xfe = -2) moves the line back; 2.7 reads the same
        // byte as +254 (its increments are unsigned).
        let t = [2, 3, 4, 0xfe];
        assert_eq!(lnotab_line(&t, 10, 6, true), Some(11), "3.9 signed");
        assert_eq!(lnotab_line(&t, 10, 6, false), Some(267), "2.7 unsigned");
    }
}
