//! ELF objects as the target maps them.

use object::{Object as _, ObjectSegment as _};

/// The load bias of an object mapped at `start` from file offset `offset`: the
/// runtime address of file address `v` is `bias + v`. `executable` is whether the
/// mapping is (its permissions include x).
pub fn load_bias(data: &[u8], start: u64, offset: u64, executable: bool) -> Option<u64> {
    let file = object::File::parse(data).ok()?;
    // The mapping's offset is the segment's rounded down to a page: lld does not align
    // p_offset, so the segment can start after `offset`. Of two segments sharing the
    // page, the one whose executability matches the mapping's is the one mapped there.
    let maps = |s: &object::Segment<'_, '_>| {
        let (o, n) = s.file_range();
        (o & !0xfff) <= offset && offset < o + n.max(1)
    };
    let is_exec = |s: &object::Segment<'_, '_>| matches!(s.flags(), object::SegmentFlags::Elf { p_flags } if p_flags & object::elf::PF_X != 0);
    let seg = file
        .segments()
        .find(|s| maps(s) && is_exec(s) == executable)
        .or_else(|| file.segments().find(|s| maps(s)))?;
    let (seg_off, _) = seg.file_range();
    // address(v) = start + (v − (vaddr − seg_off)) − offset
    Some(
        start
            .wrapping_sub(offset)
            .wrapping_sub(seg.address().wrapping_sub(seg_off)),
    )
}

/// A section's bytes: as they are, or decompressed where the section is
/// zlib-compressed and says it holds at most `max` bytes (the decompressor fills only
/// what was declared). zstd-compressed sections are refused: their decoder grows
/// with the data, whatever the section declared. `None` for those, and for bytes
/// the file does not have.
pub fn section_bytes<'d>(
    s: &object::Section<'d, '_>,
    max: u64,
) -> Option<std::borrow::Cow<'d, [u8]>> {
    use object::{CompressionFormat, ObjectSection as _};
    let c = s.compressed_data().ok()?;
    match c.format {
        CompressionFormat::None => Some(std::borrow::Cow::Borrowed(c.data)),
        CompressionFormat::Zlib if c.uncompressed_size <= max => c.decompress().ok(),
        _ => None,
    }
}

/// The link-time address and size of the first of `names` the object's symbol tables
/// (`.symtab`, then `.dynsym`) define.
pub fn data_symbol(data: &[u8], names: &[&str]) -> Option<(u64, u64)> {
    use object::ObjectSymbol as _;
    let file = object::File::parse(data).ok()?;
    let mut found: Vec<Option<(u64, u64)>> = vec![None; names.len()];
    for s in file.symbols().chain(file.dynamic_symbols()) {
        let Ok(n) = s.name() else { continue };
        if let Some(i) = names.iter().position(|w| *w == n)
            && s.is_definition()
        {
            found[i].get_or_insert((s.address(), s.size()));
        }
    }
    found.into_iter().flatten().next()
}

/// Link-time addresses of file offsets of the ELF file at `path`, through its
/// loadable segments (`None` for an offset no segment maps from the file). Reads the
/// headers only. A separate debug file has the same addresses but no file contents
/// behind its code segments: its own offsets say nothing.
pub fn file_offsets_to_addresses(
    path: &std::path::Path,
    offsets: &[u64],
) -> Option<Vec<Option<u64>>> {
    let f = std::fs::File::open(path).ok()?;
    let cache = object::ReadCache::new(f);
    let file = object::File::parse(&cache).ok()?;
    let loads: Vec<(u64, u64, u64)> = file
        .segments()
        .map(|s| {
            let (o, n) = s.file_range();
            (o, n, s.address())
        })
        .filter(|&(_, n, _)| n > 0)
        .collect();
    Some(
        offsets
            .iter()
            .map(|&off| {
                loads
                    .iter()
                    .find(|&&(o, n, _)| o <= off && off - o < n)
                    .map(|&(o, _, a)| a + (off - o))
            })
            .collect(),
    )
}

/// An object's data symbols (objects and TLS variables) by link-time range, sorted by
/// start, C++ names demangled: built once per object, then looked up by address.
pub fn data_symbol_table(data: &[u8]) -> Vec<(u64, u64, String)> {
    use object::{Object as _, ObjectSymbol as _};
    let Ok(file) = object::File::parse(data) else {
        return Vec::new();
    };
    let mut t: Vec<(u64, u64, String)> = file
        .symbols()
        .chain(file.dynamic_symbols())
        .filter(|s| s.kind() == object::SymbolKind::Data && s.is_definition())
        .filter_map(|s| {
            let name = s.name().ok()?;
            let shown = cpp_demangle::Symbol::new(name)
                .ok()
                .and_then(|d| d.demangle().ok())
                .unwrap_or_else(|| name.to_owned());
            Some((
                s.address(),
                s.address().saturating_add(s.size().max(1)),
                shown,
            ))
        })
        .collect();
    t.sort_unstable();
    t.dedup_by_key(|e| e.0);
    t
}

/// The symbol of `table` ([`data_symbol_table`]) holding the link-time address `addr`.
pub fn symbol_containing(table: &[(u64, u64, String)], addr: u64) -> Option<&str> {
    let i = table.partition_point(|e| e.0 <= addr).checked_sub(1)?;
    (addr < table[i].1).then(|| table[i].2.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[inline(never)]
    fn probe_target() -> u64 {
        std::hint::black_box(42)
    }

    /// This test binary: its path, its bytes, and `probe_target`'s runtime and
    /// link-time addresses.
    fn this_binary() -> (String, Vec<u8>, u64, u64) {
        use object::{Object as _, ObjectSymbol as _};
        let exe = std::fs::canonicalize("/proc/self/exe").expect("own executable");
        let data = std::fs::read(&exe).expect("readable");
        let file = object::File::parse(&*data).expect("ELF");
        let link = file
            .symbols()
            .find(|s| s.name().is_ok_and(|n| n.contains("probe_target")))
            .expect("symbol of probe_target in the test binary")
            .address();
        let runtime = probe_target as fn() -> u64 as usize as u64;
        (exe.display().to_string(), data, runtime, link)
    }

    /// The load bias of this test binary's code mapping puts a function's symbol at
    /// its runtime address. Rust links with lld (rustc 1.90+), which does not
    /// page-align segment file offsets, so the mapping's offset lies before the
    /// code segment's: the segment covering it must still be the code's.
    #[test]
    fn bias_of_own_code_mapping() {
        let (_, data, runtime, link) = this_binary();
        let maps = crate::process::procfs::read_maps(std::process::id()).expect("own maps");
        let code = maps
            .iter()
            .find(|m| m.is_exec() && (m.start..m.end).contains(&runtime))
            .expect("the code mapping holding probe_target");
        let b = load_bias(&data, code.start, code.offset, true).expect("a segment for the mapping");
        assert_eq!(
            b.wrapping_add(link),
            runtime,
            "mapping at {:#x} offset {:#x}, symbol {link:#x}",
            code.start,
            code.offset
        );
    }

    /// The read-only mapping at offset 0 of the same binary gives the same bias: the
    /// segment holding the ELF header is chosen, not the code segment sharing its page.
    #[test]
    fn bias_of_own_first_mapping() {
        let (exe, data, runtime, link) = this_binary();
        let maps = crate::process::procfs::read_maps(std::process::id()).expect("own maps");
        let first = maps
            .iter()
            .find(|m| m.path == exe && m.offset == 0)
            .expect("the mapping of the executable at offset 0");
        let b = load_bias(&data, first.start, first.offset, first.is_exec()).expect("a segment");
        assert_eq!(b.wrapping_add(link), runtime);
    }
}
