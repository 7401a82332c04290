//! jemalloc 5.3's own accounting, read from outside: per arena, the pages holding
//! allocations (active), the freed pages it keeps resident (dirty), the ones it gave
//! back lazily with `MADV_FREE` (muzzy: resident until the kernel needs them) and the
//! address space it keeps for reuse (retained: not resident).
//!
//! The layout is never guessed: it comes from the object's DWARF (a Rust program
//! linking tikv-jemallocator carries it in a debug build; a distribution's debug
//! package puts it under `/usr/lib/debug/.build-id`), and the arrays from its symbol
//! table. What is read (jemalloc 5.3's names):
//!
//! ```text
//!   je_arenas[]                                     arena_t *, one per arena, some null
//!   arena_s.ind                                     its index (checked)
//!   arena_s.pa_shard.nactive                        pages in active extents
//!   arena_s.pa_shard.pac.ecache_dirty.eset.npages   + .guarded_eset.npages
//!   arena_s.pa_shard.pac.ecache_muzzy.…, ecache_retained.…
//!   je_sz_pind2sz_tab[0]                            the page size jemalloc was built for
//! ```
//!
//! These counters are kept whether or not jemalloc was built with statistics. They
//! are read without stopping the target: a count may be one operation old. The
//! paths are jemalloc 5.3's (`pa_shard`, `pac`, `ecache`); a version that names them
//! otherwise is said not to be read.

use serde::{Deserialize, Serialize};

use crate::process::{dwarf, elf, memory::Memory};

/// Arenas read at most (jemalloc's `MALLOCX_ARENA_LIMIT` is 4095).
const MAX_ARENAS: u64 = 4096;
/// Bytes one arena's counter may hold before it is taken as garbage (128 TiB).
const MAX_BYTES: u64 = 1 << 47;

/// Where jemalloc's state lies in one object, once found.
#[derive(Clone, Debug)]
pub struct Layout {
    /// Link-time address of `je_arenas` and its entries.
    arenas: u64,
    arena_slots: u64,
    /// Link-time address of `je_sz_pind2sz_tab`.
    pind2sz: u64,
    /// Offsets in `arena_s`.
    ind: u64,
    nactive: u64,
    /// dirty, muzzy, retained: each the `eset` and the `guarded_eset` count.
    ecaches: [[u64; 2]; 3],
}

const ECACHES: [&str; 3] = ["ecache_dirty", "ecache_muzzy", "ecache_retained"];

impl Layout {
    /// Finds the layout from `symbols` (an object or its debug file: the symbol
    /// table) and `debug` (the object or debug file with DWARF). `prefix` is the API
    /// prefix found (`_rjem_`, `je_`, or empty).
    pub fn find(symbols: &[u8], debug: &[u8], prefix: &str) -> Result<Self, String> {
        let (arenas, arena_slots) = symbol(symbols, prefix, "je_arenas")?;
        let (pind2sz, _) = symbol(symbols, prefix, "je_sz_pind2sz_tab")?;
        let mut queries: Vec<(&str, String)> = vec![
            ("arena_s", "ind".into()),
            ("arena_s", "pa_shard.nactive".into()),
        ];
        for e in ECACHES {
            for set in ["eset", "guarded_eset"] {
                queries.push(("arena_s", format!("pa_shard.pac.{e}.{set}.npages")));
            }
        }
        let q: Vec<(&str, &str)> = queries.iter().map(|(t, p)| (*t, p.as_str())).collect();
        let m = dwarf::resolve(debug, &q, dwarf::Language::C)?;
        if m[0].size != 4 || m[1..].iter().any(|m| m.size != 8) {
            return Err("its counters are not the sizes jemalloc 5.3 has".into());
        }
        let o = |i: usize| m[i].offset;
        Ok(Self {
            arenas,
            arena_slots: (arena_slots / 8).clamp(1, MAX_ARENAS),
            pind2sz,
            ind: o(0),
            nactive: o(1),
            ecaches: [[o(2), o(3)], [o(4), o(5)], [o(6), o(7)]],
        })
    }
}

/// The link-time address and size of `{prefix}{name}`, else of the unprefixed name.
fn symbol(data: &[u8], prefix: &str, name: &str) -> Result<(u64, u64), String> {
    elf::data_symbol(data, &[&format!("{prefix}{name}"), name])
        .ok_or_else(|| format!("no symbol {prefix}{name} (stripped)"))
}

/// One arena's pages, in bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArenaPages {
    /// The arena's index.
    pub arena: u32,
    /// Pages in active extents: allocations, slab space around them, thread caches.
    pub active_bytes: u64,
    /// Freed pages kept resident, waiting for `dirty_decay_ms`.
    pub dirty_bytes: u64,
    /// Freed pages given back with `MADV_FREE`: counted in RSS until the kernel
    /// reclaims them under pressure.
    pub muzzy_bytes: u64,
    /// Address space kept for reuse, not resident (it counts in VIRT only).
    pub retained_bytes: u64,
}

/// jemalloc's state: its arenas and their totals.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JemallocState {
    /// The object it was read from, as the target names it.
    pub object: String,
    /// jemalloc's page size.
    pub page_bytes: u64,
    /// Arenas with any page, by index.
    pub arenas: Vec<ArenaPages>,
    /// Sums over the arenas.
    pub active_bytes: u64,
    /// See [`ArenaPages::dirty_bytes`].
    pub dirty_bytes: u64,
    /// See [`ArenaPages::muzzy_bytes`].
    pub muzzy_bytes: u64,
    /// See [`ArenaPages::retained_bytes`].
    pub retained_bytes: u64,
    /// Arenas whose header did not read back as an arena (skipped).
    pub unreadable_arenas: u32,
}

impl JemallocState {
    /// Freed memory jemalloc keeps resident: dirty and muzzy pages.
    pub fn kept_bytes(&self) -> u64 {
        self.dirty_bytes + self.muzzy_bytes
    }
}

/// Reads jemalloc's arenas through `mem`; `bias` maps the layout's link-time
/// addresses to the target's.
pub fn read(
    mem: &impl Memory,
    layout: &Layout,
    bias: u64,
    object: &str,
) -> Result<JemallocState, String> {
    let at = |a: u64| a.wrapping_add(bias);
    let mut word = [0u8; 8];
    mem.read(at(layout.pind2sz), &mut word)
        .map_err(|e| format!("reading its page size: {e}"))?;
    let page = u64::from_le_bytes(word);
    if !page.is_power_of_two() || !(4096..=65536).contains(&page) {
        return Err(format!("its page size reads {page}: not jemalloc's"));
    }
    let mut slots = vec![0u8; (layout.arena_slots * 8) as usize];
    mem.read(at(layout.arenas), &mut slots)
        .map_err(|e| format!("reading its arenas: {e}"))?;
    let mut s = JemallocState {
        object: object.to_owned(),
        page_bytes: page,
        ..JemallocState::default()
    };
    for (i, slot) in slots.chunks_exact(8).enumerate() {
        let p = u64::from_le_bytes(slot.try_into().expect("8 bytes"));
        if p == 0 {
            continue;
        }
        // Field by field: an arena is some 80 KiB, of which these are 36 bytes.
        let u64_at = |o: u64| {
            let mut w = [0u8; 8];
            mem.read(p.checked_add(o)?, &mut w).ok()?;
            Some(u64::from_le_bytes(w))
        };
        let pages = |o: [u64; 2]| u64_at(o[0])?.checked_add(u64_at(o[1])?);
        let counts = (p % 8 == 0)
            .then(|| {
                let mut w = [0u8; 4];
                mem.read(p.checked_add(layout.ind)?, &mut w).ok()?;
                (u32::from_le_bytes(w) as usize == i).then_some(())?;
                let c = [
                    u64_at(layout.nactive)?,
                    pages(layout.ecaches[0])?,
                    pages(layout.ecaches[1])?,
                    pages(layout.ecaches[2])?,
                ];
                // In bytes, each bounded: the sums over 4096 arenas stay far from overflow.
                let b = c.map(|n| n.checked_mul(page).filter(|&b| b <= MAX_BYTES));
                Some([b[0]?, b[1]?, b[2]?, b[3]?])
            })
            .flatten();
        let Some([active, dirty, muzzy, retained]) = counts else {
            s.unreadable_arenas += 1;
            continue;
        };
        if active + dirty + muzzy + retained == 0 {
            continue;
        }
        let a = ArenaPages {
            arena: i as u32,
            active_bytes: active,
            dirty_bytes: dirty,
            muzzy_bytes: muzzy,
            retained_bytes: retained,
        };
        s.active_bytes += a.active_bytes;
        s.dirty_bytes += a.dirty_bytes;
        s.muzzy_bytes += a.muzzy_bytes;
        s.retained_bytes += a.retained_bytes;
        s.arenas.push(a);
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::memory::Laid;

    fn layout() -> Layout {
        Layout {
            arenas: 0x1000,
            arena_slots: 4,
            pind2sz: 0x2000,
            ind: 0,
            nactive: 8,
            ecaches: [[16, 24], [32, 40], [48, 56]],
        }
    }

    /// An arena laid out at `at` with index `ind` and these page counts.
    fn arena(m: &mut Laid, at: u64, ind: u32, pages: [u64; 7]) {
        m.put32(at, ind);
        for (i, p) in pages.iter().enumerate() {
            m.put(at + 8 + 8 * i as u64, *p);
        }
    }

    #[test]
    fn arenas_are_summed_and_checked() {
        let mut m = Laid::new(0, 0x10000);
        m.put(0x2000, 4096);
        m.put(0x1000, 0x4000);
        m.put(0x1010, 0x5000);
        // Slot 3's arena says it is arena 7: not an arena.
        m.put(0x1018, 0x6000);
        arena(&mut m, 0x4000, 0, [10, 100, 1, 2, 0, 50, 0]);
        arena(&mut m, 0x5000, 2, [5, 0, 0, 0, 0, 0, 0]);
        arena(&mut m, 0x6000, 7, [5, 0, 0, 0, 0, 0, 0]);
        let s = read(&m, &layout(), 0, "libjemalloc.so.2").expect("read");
        assert_eq!(s.arenas.len(), 2);
        assert_eq!(s.arenas[0].arena, 0);
        assert_eq!(s.active_bytes, 15 * 4096);
        assert_eq!(s.dirty_bytes, 101 * 4096);
        assert_eq!(s.muzzy_bytes, 2 * 4096);
        assert_eq!(s.retained_bytes, 50 * 4096);
        assert_eq!(s.kept_bytes(), 103 * 4096);
        assert_eq!(s.unreadable_arenas, 1);
    }

    #[test]
    fn garbage_is_refused() {
        let mut m = Laid::new(0, 0x10000);
        m.put(0x2000, 4097);
        assert!(read(&m, &layout(), 0, "x").is_err());
        m.put(0x2000, 4096);
        m.put(0x1000, 0x4000);
        // Counts past any real heap, and an overflowing sum.
        arena(&mut m, 0x4000, 0, [1 << 40, 0, 0, 0, 0, 0, 0]);
        let s = read(&m, &layout(), 0, "x").expect("read");
        assert_eq!((s.arenas.len(), s.unreadable_arenas), (0, 1));
        arena(&mut m, 0x4000, 0, [0, u64::MAX, 1, 0, 0, 0, 0]);
        let s = read(&m, &layout(), 0, "x").expect("read");
        assert_eq!((s.arenas.len(), s.unreadable_arenas), (0, 1));
        // An arena pointer outside the target's memory.
        m.put(0x1000, 0xdead_0000);
        let s = read(&m, &layout(), 0, "x").expect("read");
        assert_eq!(s.unreadable_arenas, 1);
    }
}
