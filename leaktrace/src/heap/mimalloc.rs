//! mimalloc 3's own state, read from outside: per arena, the slices it has handed to
//! pages, the blocks in use in them, the freed blocks inside pages it keeps, and the
//! free slices it has not purged yet (resident until it does).
//!
//! mimalloc 3 keeps every arena of a sub-process in `subproc_main.arenas[]`. An arena
//! starts with its own header and is cut into slices (64 KiB); its bitmaps say which
//! slices are free and committed, and which slice starts a page of the main heap. A
//! page's header (`mi_page_t`, at its first slice or in the arena's page table) counts
//! its blocks: `used` in use, `capacity` carved (written) so far, each of `block_size`.
//! Free committed slices are counted by their resident pages (`/proc/PID/pagemap`): a
//! purge by reset leaves them committed but gives their pages back. What is read
//! (mimalloc 3.3's names):
//!
//! ```text
//!   subproc_main.arenas[], .stats.{committed,reserved}.current
//!   mi_arena_s.{arena_idx, slice_count, info_slices, pages_meta, memid.is_pinned}
//!   mi_arena_s.{slices_free, slices_committed, pages_main.pages}
//!         mi_bitmap_s / mi_bbitmap_s .{chunk_count, chunks}: 512 bits a chunk
//!   mi_page_s.{used, capacity, block_size, page_start,
//!              memid.mem.arena.{arena, slice_index, slice_count}}
//! ```
//!
//! The layout comes from the object's DWARF and `subproc_main` from its symbol table,
//! never guessed: mimalloc 2 (segments, not arenas of pages) is said not to be read.
//! Nothing stops the target: a page's count may be one operation old, and a page is
//! believed only when its header names the arena and slice it was found at and its
//! blocks start within its own slices (which fixes the slice size).

use serde::{Deserialize, Serialize};

use crate::process::{dwarf, memory::Memory};

/// Arenas read at most (mimalloc 3's `MI_MAX_ARENAS` is 160).
const MAX_ARENAS: u64 = 1024;
/// Chunks a bitmap may have (`MI_BITMAP_MAX_CHUNK_COUNT`: 512 chunks of 512 bits).
const MAX_CHUNKS: u64 = 512;
/// Pages read at most per reading (16 M slices of 64 KiB: 1 TiB of arenas).
const MAX_PAGES: u64 = 1 << 24;
/// Bytes a figure may hold before it is taken as garbage (128 TiB).
const MAX_BYTES: u64 = 1 << 47;
/// Slice sizes mimalloc 3 builds with: 64 KiB, 128 KiB (guard pages), 32 KiB.
const SLICE_SHIFTS: [u32; 3] = [16, 17, 15];

/// Where mimalloc's state lies in one object, once found.
#[derive(Clone, Debug)]
pub struct Layout {
    /// Link-time address of `subproc_main`.
    subproc: u64,
    /// Offsets in `mi_subproc_s`: arena_count, arenas (and its slots), committed and
    /// reserved statistics.
    arena_count: u64,
    arenas: u64,
    arena_slots: u64,
    committed: u64,
    reserved: u64,
    /// Offsets in `mi_arena_s`.
    arena: ArenaFields,
    /// Offsets in `mi_bitmap_s` and `mi_bbitmap_s` of the chunk count and the chunks,
    /// and a chunk's size.
    bitmap: [u64; 2],
    bbitmap: [u64; 2],
    chunk_bytes: u64,
    /// Offsets in `mi_page_s`, and its size.
    page: PageFields,
}

#[derive(Clone, Debug)]
struct ArenaFields {
    arena_idx: u64,
    slice_count: u64,
    info_slices: u64,
    slices_free: u64,
    slices_committed: u64,
    /// `memid.is_pinned`: never purged.
    pinned: u64,
    pages_meta: u64,
    pages: u64,
}

#[derive(Clone, Debug)]
struct PageFields {
    used: u64,
    capacity: u64,
    block_size: u64,
    arena: u64,
    slice_index: u64,
    slice_count: u64,
    size: u64,
    page_start: u64,
}

impl Layout {
    /// Finds the layout in an object (or its debug file) with a symbol table and DWARF.
    pub fn find(data: &[u8]) -> Result<Self, String> {
        let (subproc, _) = crate::process::elf::data_symbol(data, &["subproc_main"])
            .ok_or("no symbol subproc_main (stripped, or not mimalloc 3)")?;
        let (s, a, p) = ("mi_subproc_s", "mi_arena_s", "mi_page_s");
        let q = [
            (s, "arena_count"),
            (s, "arenas"),
            (s, "stats.committed.current"),
            (s, "stats.reserved.current"),
            (a, "arena_idx"),
            (a, "slice_count"),
            (a, "info_slices"),
            (a, "slices_free"),
            (a, "slices_committed"),
            (a, "memid.is_pinned"),
            (a, "pages_meta"),
            (a, "pages_main.pages"),
            ("mi_bitmap_s", "chunk_count"),
            ("mi_bitmap_s", "chunks"),
            ("mi_bbitmap_s", "chunk_count"),
            ("mi_bbitmap_s", "chunks"),
            ("mi_bchunk_s", ""),
            (p, "used"),
            (p, "capacity"),
            (p, "block_size"),
            (p, "memid.mem.arena.arena"),
            (p, "memid.mem.arena.slice_index"),
            (p, "memid.mem.arena.slice_count"),
            (p, ""),
            (p, "page_start"),
        ];
        let m = dwarf::resolve(data, &q, dwarf::Language::C)
            .map_err(|e| format!("{e} (mimalloc 3's arenas and pages)"))?;
        let sizes: Vec<u64> = m.iter().map(|m| m.size).collect();
        let words = [0, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 14, 19, 20, 24];
        if words.iter().any(|&i| sizes[i] != 8)
            || sizes[9] != 1
            || !(64..=1024).contains(&sizes[23])
            || !sizes[1].is_multiple_of(8)
            || sizes[16] != 64
            || sizes[17] != 2
            || sizes[18] != 2
            || sizes[21] != 4
            || sizes[22] != 4
        {
            return Err("its fields are not the sizes mimalloc 3.3 has".into());
        }
        // A page's fields are read from a copy of its header: each must lie inside it.
        if (17..23)
            .chain([24])
            .any(|i| m[i].offset.saturating_add(m[i].size) > sizes[23])
        {
            return Err("its page fields lie outside its page header".into());
        }
        let o = |i: usize| m[i].offset;
        Ok(Self {
            subproc,
            arena_count: o(0),
            arenas: o(1),
            arena_slots: (sizes[1] / 8).clamp(1, MAX_ARENAS),
            committed: o(2),
            reserved: o(3),
            arena: ArenaFields {
                arena_idx: o(4),
                slice_count: o(5),
                info_slices: o(6),
                slices_free: o(7),
                slices_committed: o(8),
                pinned: o(9),
                pages_meta: o(10),
                pages: o(11),
            },
            bitmap: [o(12), o(13)],
            bbitmap: [o(14), o(15)],
            chunk_bytes: sizes[16],
            page: PageFields {
                used: o(17),
                capacity: o(18),
                block_size: o(19),
                arena: o(20),
                slice_index: o(21),
                slice_count: o(22),
                size: sizes[23],
                page_start: o(24),
            },
        })
    }
}

/// One arena, in bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MiArena {
    /// Its index in the sub-process.
    pub arena: u32,
    /// Its address space (slices × slice size).
    pub reserved_bytes: u64,
    /// Slices committed.
    pub committed_bytes: u64,
    /// Pages of the main heap in it.
    pub pages: u64,
    /// The slices those pages span.
    pub page_bytes: u64,
    /// Blocks in use in those pages (`used` × `block_size`).
    pub in_use_bytes: u64,
    /// Freed blocks inside pages, carved (written) and free: kept resident with the page.
    pub page_free_bytes: u64,
    /// Free slices' resident pages: freed pages mimalloc has not purged yet.
    pub free_resident_bytes: u64,
    /// Pages whose header did not read back as the page found there.
    pub unreadable_pages: u64,
    /// Its memory is pinned (huge OS pages): mimalloc never purges it.
    pub pinned: bool,
}

/// mimalloc's state: its arenas and their totals.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MimallocState {
    /// The object it was read from, as the target names it.
    pub object: String,
    /// Its slice size.
    pub slice_bytes: u64,
    /// Arenas with any slice, by index.
    pub arenas: Vec<MiArena>,
    /// Sums over the arenas: address space (see [`MiArena`] for each).
    pub reserved_bytes: u64,
    /// Slices committed.
    pub committed_bytes: u64,
    /// Pages of the main heap.
    pub pages: u64,
    /// Blocks in use.
    pub in_use_bytes: u64,
    /// Freed blocks inside pages.
    pub page_free_bytes: u64,
    /// Free slices' resident pages, not purged yet.
    pub free_resident_bytes: u64,
    /// Of those, what purging would return (in arenas that are not pinned).
    pub purgeable_bytes: u64,
    /// mimalloc's own statistic of the sub-process (kept without `MI_STAT`): memory
    /// committed, in arenas and taken from the OS directly alike.
    pub stat_committed_bytes: u64,
    /// Likewise, memory reserved.
    pub stat_reserved_bytes: u64,
    /// Arenas that did not read back (skipped).
    pub unreadable_arenas: u32,
    /// Pages whose header did not read back (skipped).
    pub unreadable_pages: u64,
    /// Why the walk stopped short, if it did.
    pub incomplete: Option<String>,
}

impl MimallocState {
    /// Freed memory mimalloc keeps resident: free blocks in its pages and free slices
    /// it has not purged.
    pub fn kept_bytes(&self) -> u64 {
        self.page_free_bytes
            .saturating_add(self.free_resident_bytes)
    }
}

fn word(mem: &impl Memory, at: u64) -> Option<u64> {
    let mut w = [0u8; 8];
    mem.read(at, &mut w).ok()?;
    Some(u64::from_le_bytes(w))
}

/// The set bits of a bitmap at `at` (`fields`: offsets of its chunk count and chunks),
/// below `limit`, as 64-bit words (bit i of word j is slice 64 j + i).
fn bitmap(
    mem: &impl Memory,
    at: u64,
    fields: [u64; 2],
    chunk_bytes: u64,
    limit: u64,
) -> Option<Vec<u64>> {
    let count = word(mem, at.checked_add(fields[0])?)?;
    if count == 0 || count > MAX_CHUNKS {
        return None;
    }
    let bits_per_chunk = chunk_bytes * 8;
    let chunks = count.min(limit.div_ceil(bits_per_chunk));
    let mut buf = vec![0u8; usize::try_from(chunks * chunk_bytes).ok()?];
    mem.read(at.checked_add(fields[1])?, &mut buf).ok()?;
    let mut words: Vec<u64> = buf
        .chunks_exact(8)
        .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
        .collect();
    // Bits past the arena's slices are not its.
    let whole = usize::try_from(limit / 64).ok()?;
    if whole < words.len() {
        let rest = limit % 64;
        if rest > 0 {
            words[whole] &= (1u64 << rest) - 1;
            words.truncate(whole + 1);
        } else {
            words.truncate(whole);
        }
    }
    Some(words)
}

fn ones(words: &[u64]) -> u64 {
    words.iter().map(|w| u64::from(w.count_ones())).sum()
}

/// Reads mimalloc's arenas through `mem`; `bias` maps the layout's link-time addresses
/// to the target's.
pub fn read(
    mem: &impl Memory,
    layout: &Layout,
    bias: u64,
    object: &str,
) -> Result<MimallocState, String> {
    let sub = layout.subproc.wrapping_add(bias);
    let stat = |o: u64| {
        sub.checked_add(o)
            .and_then(|a| word(mem, a))
            .filter(|&b| b <= MAX_BYTES)
            .ok_or_else(|| "its statistics do not read as mimalloc's".to_owned())
    };
    let mut s = MimallocState {
        object: object.to_owned(),
        stat_committed_bytes: stat(layout.committed)?,
        stat_reserved_bytes: stat(layout.reserved)?,
        ..MimallocState::default()
    };
    let count = sub
        .checked_add(layout.arena_count)
        .and_then(|a| word(mem, a))
        .filter(|&n| n <= layout.arena_slots)
        .ok_or("its arena count does not read as mimalloc's")?;
    let mut slots = vec![0u8; (count * 8) as usize];
    mem.read(sub.wrapping_add(layout.arenas), &mut slots)
        .map_err(|e| format!("reading its arenas: {e}"))?;
    let mut budget = MAX_PAGES;
    for (i, slot) in slots.chunks_exact(8).enumerate() {
        let p = u64::from_le_bytes(slot.try_into().expect("8 bytes"));
        if p == 0 {
            continue;
        }
        match read_arena(mem, layout, p, i as u64, &mut s.slice_bytes, &mut budget) {
            Some(a) => {
                s.reserved_bytes += a.reserved_bytes;
                s.committed_bytes += a.committed_bytes;
                s.pages += a.pages;
                s.in_use_bytes += a.in_use_bytes;
                s.page_free_bytes += a.page_free_bytes;
                s.free_resident_bytes += a.free_resident_bytes;
                if !a.pinned {
                    s.purgeable_bytes += a.free_resident_bytes;
                }
                s.unreadable_pages += a.unreadable_pages;
                s.arenas.push(a);
            }
            None => s.unreadable_arenas += 1,
        }
        if budget == 0 {
            s.incomplete = Some(format!("stopped after {MAX_PAGES} pages"));
            break;
        }
    }
    Ok(s)
}

/// Consecutive page headers that may fail to read back before an arena is given up
/// (a garbage page bitmap costs this many reads, not one per bit).
const MAX_MISSES: u32 = 64;

/// One arena at `p`, index `index`. `slice` is the slice size, 0 until a page has
/// confirmed one.
fn read_arena(
    mem: &impl Memory,
    l: &Layout,
    p: u64,
    index: u64,
    slice: &mut u64,
    budget: &mut u64,
) -> Option<MiArena> {
    let f = &l.arena;
    let at = |o: u64| word(mem, p.checked_add(o)?);
    if !p.is_multiple_of(64) || at(f.arena_idx)? != index {
        return None;
    }
    let slices = at(f.slice_count)?;
    if slices == 0 || slices > MAX_CHUNKS * l.chunk_bytes * 8 || at(f.info_slices)? > slices {
        return None;
    }
    let map = |ptr: u64, fields: [u64; 2]| -> Option<Vec<u64>> {
        bitmap(mem, at(ptr)?, fields, l.chunk_bytes, slices)
    };
    let free = map(f.slices_free, l.bbitmap)?;
    let committed = map(f.slices_committed, l.bitmap)?;
    let pages = map(f.pages, l.bitmap)?;
    let meta = at(f.pages_meta)?;
    let mut pinned = [0u8; 1];
    mem.read(p.checked_add(f.pinned)?, &mut pinned).ok()?;
    let mut a = MiArena {
        arena: index as u32,
        pinned: pinned[0] != 0,
        ..MiArena::default()
    };
    let committed_slices = ones(&committed);
    // The headers: in the arena's page table where the build separates them (checked
    // against the page's own slice range, which fixes the slice size), else at the
    // page's first slice.
    let psize = l.page.size as usize;
    let mut meta_buf = vec![0u8; psize];
    let mut buf = vec![0u8; psize];
    let u = |b: &[u8], o: u64, n: usize| -> u64 {
        let o = o as usize;
        let mut w = [0u8; 8];
        w[..n].copy_from_slice(&b[o..o + n]);
        u64::from_le_bytes(w)
    };
    // (shift, block size, used, capacity, slices) if `b` is the header of the page
    // at slice `idx` with slices of `1 << shift`.
    let check = |b: &[u8], idx: u64, shift: u32| -> Option<(u32, u64, u64, u64, u64)> {
        let (bsize, used, cap, count) = (
            u(b, l.page.block_size, 8),
            u(b, l.page.used, 2),
            u(b, l.page.capacity, 2),
            u(b, l.page.slice_count, 4),
        );
        let first = p.checked_add(idx << shift)?;
        let end = first.checked_add(count.min(slices) << shift)?;
        let start = u(b, l.page.page_start, 8);
        (u(b, l.page.arena, 8) == p
            && u(b, l.page.slice_index, 4) == idx
            && (first..end).contains(&start)
            && bsize > 0
            && bsize <= MAX_BYTES
            && used <= cap)
            .then_some((shift, bsize, used, cap, count))
    };
    let mut misses = 0u32;
    'pages: for (j, w) in pages.iter().enumerate() {
        let mut bits = *w;
        while bits != 0 {
            let idx = j as u64 * 64 + u64::from(bits.trailing_zeros());
            bits &= bits - 1;
            if *budget == 0 || misses >= MAX_MISSES {
                break 'pages;
            }
            *budget -= 1;
            let from_meta = meta != 0
                && meta
                    .checked_add(idx * l.page.size)
                    .is_some_and(|m| mem.read(m, &mut meta_buf).is_ok());
            let mut found = None;
            for shift in SLICE_SHIFTS {
                if *slice > 0 && shift != slice.trailing_zeros() {
                    continue;
                }
                if from_meta && let Some(f) = check(&meta_buf, idx, shift) {
                    found = Some(f);
                    break;
                }
                let at_slice = p
                    .checked_add(idx << shift)
                    .is_some_and(|h| mem.read(h, &mut buf).is_ok());
                if at_slice && let Some(f) = check(&buf, idx, shift) {
                    found = Some(f);
                    break;
                }
            }
            let Some((shift, bsize, used, cap, count)) = found else {
                a.unreadable_pages += 1;
                misses += 1;
                continue;
            };
            misses = 0;
            *slice = 1 << shift;
            a.pages += 1;
            a.page_bytes = a.page_bytes.saturating_add(count.min(slices) << shift);
            a.in_use_bytes = a.in_use_bytes.saturating_add(used * bsize);
            a.page_free_bytes = a.page_free_bytes.saturating_add((cap - used) * bsize);
        }
    }
    if *slice == 0 {
        // No page confirmed a slice size: mimalloc 3's usual one.
        *slice = 1 << SLICE_SHIFTS[0];
    }
    // Free slices still resident: freed pages mimalloc has not purged (a purge by
    // reset leaves them committed, so residency, not the bitmaps, says).
    let mut run: Option<u64> = None;
    for idx in 0..=slices {
        let bit = |v: &[u64]| {
            v.get((idx / 64) as usize)
                .is_some_and(|w| w >> (idx % 64) & 1 == 1)
        };
        let kept = idx < slices && bit(&free) && bit(&committed);
        match (kept, run) {
            (true, None) => run = Some(idx),
            (false, Some(first)) => {
                run = None;
                let (s, e) = (
                    p.saturating_add(first * *slice),
                    p.saturating_add(idx * *slice),
                );
                if let Ok(r) = mem.residency(s, e) {
                    a.free_resident_bytes += r.total();
                }
            }
            _ => {}
        }
    }
    a.reserved_bytes = slices * *slice;
    a.committed_bytes = committed_slices * *slice;
    (a.in_use_bytes <= MAX_BYTES && a.page_free_bytes <= MAX_BYTES).then_some(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::memory::Laid;

    fn layout() -> Layout {
        Layout {
            subproc: 0x1000,
            arena_count: 0,
            arenas: 8,
            arena_slots: 4,
            committed: 0x100,
            reserved: 0x108,
            arena: ArenaFields {
                arena_idx: 0,
                slice_count: 8,
                info_slices: 16,
                slices_free: 24,
                slices_committed: 32,
                pinned: 40,
                pages_meta: 48,
                pages: 56,
            },
            bitmap: [0, 64],
            bbitmap: [0, 128],
            chunk_bytes: 64,
            page: PageFields {
                used: 0,
                capacity: 2,
                block_size: 8,
                arena: 16,
                slice_index: 24,
                slice_count: 28,
                size: 64,
                page_start: 32,
            },
        }
    }

    const ARENA: u64 = 0x10_0000;

    /// A sub-process with one arena of 4 slices: slice 0 its header, slice 1 a page of
    /// 1 KiB blocks (3 used of 10 carved), slices 2 and 3 free and committed (resident:
    /// all of this memory is).
    fn heap() -> Laid {
        let mut m = Laid::new(0, ARENA + 4 * 0x10000);
        m.put(0x1000, 1);
        m.put(0x1008, ARENA);
        m.put(0x1100, 1 << 20);
        m.put(0x1108, 1 << 30);
        for (at, ptr) in [(0, 0), (8, 4), (16, 1), (24, 0x2000), (32, 0x3000)] {
            m.put(ARENA + at, ptr);
        }
        m.put(ARENA + 56, 0x5000);
        // Chunk counts, and the first word of each bitmap's first chunk.
        for (map, chunks, bits) in [
            (0x2000, 128, 0b1100),
            (0x3000, 64, 0b1111),
            (0x5000, 64, 0b0010),
        ] {
            m.put(map, 1);
            m.put(map + chunks, bits);
        }
        let page = ARENA + 0x10000;
        m.put32(page, 3 | (10 << 16));
        m.put(page + 8, 1024);
        m.put(page + 16, ARENA);
        m.put32(page + 24, 1);
        m.put32(page + 28, 1);
        m.put(page + 32, page + 0x100);
        m
    }

    #[test]
    fn arenas_and_pages_are_read() {
        let s = read(&heap(), &layout(), 0, "alloc").expect("read");
        assert_eq!(s.slice_bytes, 0x10000);
        assert_eq!(s.arenas.len(), 1);
        assert_eq!(
            (s.pages, s.in_use_bytes, s.page_free_bytes),
            (1, 3072, 7168)
        );
        assert_eq!(s.free_resident_bytes, 0x20000);
        assert_eq!(s.purgeable_bytes, 0x20000);
        assert_eq!(s.committed_bytes, 4 * 0x10000);
        assert_eq!(s.reserved_bytes, 4 * 0x10000);
        assert_eq!(
            (s.stat_committed_bytes, s.stat_reserved_bytes),
            (1 << 20, 1 << 30)
        );
        assert_eq!(s.kept_bytes(), 7168 + 0x20000);
        // A pinned arena's free slices are never purged.
        let mut m = heap();
        m.put(ARENA + 40, 1);
        let s = read(&m, &layout(), 0, "alloc").expect("read");
        assert_eq!((s.free_resident_bytes, s.purgeable_bytes), (0x20000, 0));
    }

    /// The fuzz seed (fuzz/regressions/elf_objects/mimalloc-layout-seed.so: mimalloc 3's
    /// structs, cut down) is read as a layout, so the fuzzer starts from one.
    #[test]
    fn the_fuzz_seed_has_a_layout() {
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../fuzz/regressions/elf_objects/mimalloc-layout-seed.so"
        );
        let l = Layout::find(&std::fs::read(p).expect("seed")).expect("a layout");
        assert_eq!((l.arena_slots, l.chunk_bytes, l.page.used), (160, 64, 16));
    }

    #[test]
    fn garbage_is_refused() {
        // A page header naming another slice is not believed.
        let mut m = heap();
        m.put32(ARENA + 0x10000 + 24, 2);
        let s = read(&m, &layout(), 0, "x").expect("read");
        assert_eq!((s.pages, s.arenas[0].unreadable_pages), (0, 1));
        // More blocks in use than carved.
        let mut m = heap();
        m.put32(ARENA + 0x10000, 11 | (10 << 16));
        let s = read(&m, &layout(), 0, "x").expect("read");
        assert_eq!(s.unreadable_pages, 1);
        // An arena that names another index, one past the slots, a bitmap of too many
        // chunks, an arena pointer outside the target.
        let mut m = heap();
        m.put(ARENA, 3);
        assert_eq!(
            read(&m, &layout(), 0, "x").expect("read").unreadable_arenas,
            1
        );
        let mut m = heap();
        m.put(0x1000, 5);
        assert!(read(&m, &layout(), 0, "x").is_err());
        let mut m = heap();
        m.put(0x3000, MAX_CHUNKS + 1);
        assert_eq!(
            read(&m, &layout(), 0, "x").expect("read").unreadable_arenas,
            1
        );
        let mut m = heap();
        m.put(0x1008, 0xdead_0000);
        assert_eq!(
            read(&m, &layout(), 0, "x").expect("read").unreadable_arenas,
            1
        );
        // Statistics past any real heap.
        let mut m = heap();
        m.put(0x1100, u64::MAX);
        assert!(read(&m, &layout(), 0, "x").is_err());
    }
}
