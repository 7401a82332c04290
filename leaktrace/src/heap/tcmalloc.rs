//! gperftools' tcmalloc, its own state read from outside: what
//! `MallocExtension::GetStats` would print, without running anything in the target.
//! Its memory is the page heap's (`Static::pageheap_`): spans handed out, free spans
//! kept resident, free spans returned to the system (unmapped); and the freed objects
//! its caches hold: per size class the central free lists (`Static::central_cache_[]`:
//! `counter_` objects, plus `used_slots_` transfer batches of `num_objects_to_move`),
//! and every thread's cache (the `ThreadCache::thread_heaps_` list, `size_` bytes each).
//! What is read (gperftools 2.x's names, `tcmalloc::` omitted):
//!
//! ```text
//!   Static::pageheap_  PageHeap.stats_.{system_bytes, free_bytes, unmapped_bytes}
//!   Static::sizemap_   SizeMap.{num_size_classes, class_to_size_[], num_objects_to_move_[], class_to_pages_[]}
//!   Static::central_cache_[]  CentralFreeList.{size_class_, num_spans_, counter_, used_slots_}
//!   ThreadCache::thread_heaps_  ThreadCache.{size_, next_}; ThreadCache::thread_heap_count_
//!   kPageShift (a constant in its DWARF)
//! ```
//!
//! The layout comes from the object's DWARF and its symbol table: never guessed. The
//! figures are read without its locks: one may be an operation old.

use serde::{Deserialize, Serialize};

use crate::process::{dwarf, elf, memory::Memory};

/// Bytes a figure may hold before it is taken as garbage (128 TiB).
const MAX_BYTES: u64 = 1 << 47;
/// Size classes read at most (gperftools' `kClassSizesMax` is 128).
const MAX_CLASSES: u64 = 1024;
/// Thread caches followed at most.
const MAX_THREADS: u64 = 1 << 16;

/// Where tcmalloc's state lies in one object, once found.
#[derive(Clone, Debug)]
pub struct Layout {
    /// Link-time addresses: the page heap, the size map, the central caches, the
    /// thread cache list and its count.
    pageheap: u64,
    sizemap: u64,
    central: u64,
    thread_heaps: u64,
    thread_count: u64,
    /// Offsets of `PageHeap.stats_`'s system, free and unmapped bytes.
    stats: [u64; 3],
    /// `SizeMap`: num_size_classes, class_to_size_ (int32), num_objects_to_move_
    /// (int32), class_to_pages_ (size_t), and its arrays' length.
    num_classes: u64,
    class_to_size: u64,
    objects_to_move: u64,
    class_to_pages: u64,
    classes_max: u64,
    /// `CentralFreeList`: size_class_, num_spans_, counter_, used_slots_ (int32), and
    /// each padded entry's size.
    cfl: [u64; 4],
    cfl_size: u64,
    /// `ThreadCache`: size_ (int32), next_.
    tc_size: u64,
    tc_next: u64,
    page_bytes: u64,
}

fn symbol(data: &[u8], name: &str, what: &str) -> Result<(u64, u64), String> {
    elf::data_symbol(data, &[name]).ok_or_else(|| format!("no symbol for {what} (stripped)"))
}

impl Layout {
    /// Finds the layout in an object (or its debug file) with a symbol table and DWARF.
    pub fn find(data: &[u8]) -> Result<Self, String> {
        let (pageheap, _) = symbol(data, "_ZN8tcmalloc6Static9pageheap_E", "Static::pageheap_")?;
        let (sizemap, _) = symbol(data, "_ZN8tcmalloc6Static8sizemap_E", "Static::sizemap_")?;
        let (central, central_bytes) = symbol(
            data,
            "_ZN8tcmalloc6Static14central_cache_E",
            "Static::central_cache_",
        )?;
        let (thread_heaps, _) = symbol(
            data,
            "_ZN8tcmalloc11ThreadCache13thread_heaps_E",
            "ThreadCache::thread_heaps_",
        )?;
        let (thread_count, _) = symbol(
            data,
            "_ZN8tcmalloc11ThreadCache18thread_heap_count_E",
            "ThreadCache::thread_heap_count_",
        )?;
        let (p, s, c, t) = ("PageHeap", "SizeMap", "CentralFreeList", "ThreadCache");
        // Each class where a unit defines it: no unit need define them all.
        let one = |q: &[(&str, &str)]| {
            dwarf::resolve(data, q, dwarf::Language::Cpp)
                .map_err(|e| format!("{e} (gperftools' {})", q[0].0))
        };
        let ph = one(&[
            (p, "stats_.system_bytes"),
            (p, "stats_.free_bytes"),
            (p, "stats_.unmapped_bytes"),
        ])?;
        let sm = one(&[
            (s, "num_size_classes"),
            (s, "class_to_size_"),
            (s, "num_objects_to_move_"),
            (s, "class_to_pages_"),
        ])?;
        let cf = one(&[
            (c, "size_class_"),
            (c, "num_spans_"),
            (c, "counter_"),
            (c, "used_slots_"),
            (c, ""),
        ])?;
        let tc = one(&[(t, "size_"), (t, "next_")])?;
        let shift = one(&[("const", "kPageShift")])?[0].offset;
        let classes_max = sm[1].size / 4;
        if ph.iter().any(|m| m.size != 8)
            || sm[0].size != 8
            || !(1..=MAX_CLASSES).contains(&classes_max)
            || !sm[1].size.is_multiple_of(4)
            || sm[2].size != sm[1].size
            || sm[3].size != 8 * classes_max
            || cf[0].size != 8
            || cf[1].size != 8
            || cf[2].size != 8
            || cf[3].size != 4
            || tc[0].size != 4
            || tc[1].size != 8
            || !(12..=18).contains(&shift)
        {
            return Err("its fields are not the sizes gperftools 2.x has".into());
        }
        // Fields are read from copies of a central cache and of the size map: each must
        // lie inside its copy, and the copies stay small.
        if cf[..4]
            .iter()
            .any(|m| m.offset.saturating_add(m.size) > cf[4].size)
            || cf[4].size > 1 << 16
            || sm.iter().any(|m| m.offset > 1 << 20)
        {
            return Err("its fields lie outside its structs".into());
        }
        // Each central cache is padded to a multiple of 64 bytes; the array holds
        // `classes_max` of them.
        let cfl_size = cf[4].size.div_ceil(64) * 64;
        if cfl_size == 0 || central_bytes != cfl_size * classes_max {
            return Err(format!(
                "its central caches take {central_bytes} bytes, not {classes_max} of {cfl_size}"
            ));
        }
        Ok(Self {
            pageheap,
            sizemap,
            central,
            thread_heaps,
            thread_count,
            stats: [ph[0].offset, ph[1].offset, ph[2].offset],
            num_classes: sm[0].offset,
            class_to_size: sm[1].offset,
            objects_to_move: sm[2].offset,
            class_to_pages: sm[3].offset,
            classes_max,
            cfl: [cf[0].offset, cf[1].offset, cf[2].offset, cf[3].offset],
            cfl_size,
            tc_size: tc[0].offset,
            tc_next: tc[1].offset,
            page_bytes: 1 << shift,
        })
    }
}

/// tcmalloc's state, in bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcmallocState {
    /// The object it was read from, as the target names it.
    pub object: String,
    /// Its page size.
    pub page_bytes: u64,
    /// Bytes the page heap took from the system (its heap size; metadata apart).
    pub system_bytes: u64,
    /// Free spans kept resident in the page heap.
    pub page_heap_free_bytes: u64,
    /// Free spans returned to the system (address space only).
    pub unmapped_bytes: u64,
    /// Freed objects in the central free lists (with the space spans lose to rounding).
    pub central_cache_bytes: u64,
    /// Freed objects in the transfer caches.
    pub transfer_cache_bytes: u64,
    /// Freed objects in the threads' caches.
    pub thread_cache_bytes: u64,
    /// How many thread caches there are.
    pub thread_caches: u64,
    /// What the application holds: the heap less all of the above (tcmalloc's own
    /// `generic.current_allocated_bytes`).
    pub in_use_bytes: u64,
}

impl TcmallocState {
    /// Freed memory tcmalloc keeps resident: free spans and its caches.
    pub fn kept_bytes(&self) -> u64 {
        self.page_heap_free_bytes
            .saturating_add(self.caches_bytes())
    }

    /// Freed objects its thread, central and transfer caches hold.
    pub fn caches_bytes(&self) -> u64 {
        self.central_cache_bytes
            .saturating_add(self.transfer_cache_bytes)
            .saturating_add(self.thread_cache_bytes)
    }
}

fn read_u64(mem: &impl Memory, at: u64) -> Option<u64> {
    let mut w = [0u8; 8];
    mem.read(at, &mut w).ok()?;
    Some(u64::from_le_bytes(w))
}

fn read_bytes(mem: &impl Memory, at: u64, n: u64) -> Option<Vec<u8>> {
    let mut b = vec![0u8; usize::try_from(n).ok()?];
    mem.read(at, &mut b).ok()?;
    Some(b)
}

fn word(b: &[u8], o: u64, n: usize) -> u64 {
    let o = o as usize;
    let mut w = [0u8; 8];
    w[..n].copy_from_slice(&b[o..o + n]);
    u64::from_le_bytes(w)
}

/// Reads tcmalloc's state through `mem`; `bias` maps the layout's link-time addresses
/// to the target's.
pub fn read(
    mem: &impl Memory,
    l: &Layout,
    bias: u64,
    object: &str,
) -> Result<TcmallocState, String> {
    let at = |a: u64| a.wrapping_add(bias);
    let bad = |what: &str| format!("its {what} does not read as tcmalloc's");
    let stat = |i: usize| {
        at(l.pageheap)
            .checked_add(l.stats[i])
            .and_then(|a| read_u64(mem, a))
            .filter(|&b| b <= MAX_BYTES)
            .ok_or_else(|| bad("page heap"))
    };
    let (system, free, unmapped) = (stat(0)?, stat(1)?, stat(2)?);
    if free.saturating_add(unmapped) > system {
        return Err(bad("page heap"));
    }
    // The size map: read whole (a few KiB), its arrays within it.
    let sm_len = l.class_to_pages + 8 * l.classes_max;
    let sm_len = sm_len
        .max(l.num_classes + 8)
        .max(l.class_to_size + 4 * l.classes_max)
        .max(l.objects_to_move + 4 * l.classes_max);
    let sm = read_bytes(mem, at(l.sizemap), sm_len).ok_or_else(|| bad("size map"))?;
    let classes = word(&sm, l.num_classes, 8);
    if classes == 0 || classes > l.classes_max {
        return Err(bad("size map"));
    }
    let cc = read_bytes(mem, at(l.central), l.cfl_size * classes)
        .ok_or_else(|| bad("central caches"))?;
    let (mut central, mut transfer) = (0u64, 0u64);
    for cl in 0..classes {
        let e = &cc[(cl * l.cfl_size) as usize..((cl + 1) * l.cfl_size) as usize];
        let class = word(e, l.cfl[0], 8);
        let spans = word(e, l.cfl[1], 8);
        let objects = word(e, l.cfl[2], 8);
        let slots = word(e, l.cfl[3], 4);
        if class != cl || spans > MAX_BYTES || objects > MAX_BYTES || slots > 1 << 16 {
            return Err(bad("central cache"));
        }
        let size = word(&sm, l.class_to_size + 4 * cl, 4);
        let batch = word(&sm, l.objects_to_move + 4 * cl, 4);
        let pages = word(&sm, l.class_to_pages + 8 * cl, 8);
        if size > MAX_BYTES || batch > 1 << 16 || pages > 1 << 20 {
            return Err(bad("size map"));
        }
        // Spans of `pages` pages lose what does not divide into objects.
        let overhead = if cl == 0 || size == 0 {
            Some(0)
        } else {
            spans.checked_mul((pages * l.page_bytes) % size)
        };
        let figures = size
            .checked_mul(objects)
            .zip(overhead)
            .and_then(|(o, v)| o.checked_add(v))
            .and_then(|c| central.checked_add(c))
            .zip(
                size.checked_mul(slots * batch)
                    .and_then(|t| transfer.checked_add(t)),
            )
            .filter(|&(c, t)| c <= MAX_BYTES && t <= MAX_BYTES);
        (central, transfer) = figures.ok_or_else(|| bad("central cache"))?;
    }
    // The threads' caches: a list, bounded by its count and a cap.
    let count = read_u64(mem, at(l.thread_count)).map_or(0, |c| c & 0xffff_ffff);
    let mut p = read_u64(mem, at(l.thread_heaps)).unwrap_or(0);
    let (mut threads, mut thread_bytes) = (0u64, 0u64);
    while p != 0 && threads < count.min(MAX_THREADS) {
        let size = p
            .checked_add(l.tc_size)
            .and_then(|a| read_u64(mem, a))
            .map(|w| w & 0xffff_ffff)
            .ok_or_else(|| bad("thread cache list"))?;
        // `size_` is an int32: a negative one is garbage.
        if size > i32::MAX as u64 {
            return Err(bad("thread cache list"));
        }
        thread_bytes += size;
        threads += 1;
        p = p
            .checked_add(l.tc_next)
            .and_then(|a| read_u64(mem, a))
            .ok_or_else(|| bad("thread cache list"))?;
    }
    let held = free + unmapped + central + transfer + thread_bytes;
    Ok(TcmallocState {
        object: object.to_owned(),
        page_bytes: l.page_bytes,
        system_bytes: system,
        page_heap_free_bytes: free,
        unmapped_bytes: unmapped,
        central_cache_bytes: central,
        transfer_cache_bytes: transfer,
        thread_cache_bytes: thread_bytes,
        thread_caches: threads,
        in_use_bytes: system.saturating_sub(held),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::memory::Laid;

    /// Two size classes (0 and one of 64-byte objects in 1-page spans), 8 KiB pages.
    fn layout() -> Layout {
        Layout {
            pageheap: 0x1000,
            sizemap: 0x2000,
            central: 0x3000,
            thread_heaps: 0x4000,
            thread_count: 0x4008,
            stats: [0, 8, 16],
            num_classes: 0,
            class_to_size: 8,
            objects_to_move: 16,
            class_to_pages: 24,
            classes_max: 2,
            cfl: [0, 8, 16, 24],
            cfl_size: 64,
            tc_size: 0,
            tc_next: 8,
            page_bytes: 8192,
        }
    }

    fn heap() -> Laid {
        let mut m = Laid::new(0, 0x10000);
        // Page heap: 1 MiB from the system, 256 KiB free, 64 KiB returned.
        m.put(0x1000, 1 << 20);
        m.put(0x1008, 256 << 10);
        m.put(0x1010, 64 << 10);
        // Size map: 2 classes; class 1 is 64 bytes, moved 32 at a time, 1-page spans.
        m.put(0x2000, 2);
        m.put32(0x2008 + 4, 64);
        m.put32(0x2010 + 4, 32);
        m.put(0x2018 + 8, 1);
        // Central caches: class 1 has 3 spans, 10 free objects, 2 transfer batches.
        m.put(0x3040, 1);
        m.put(0x3048, 3);
        m.put(0x3050, 10);
        m.put32(0x3058, 2);
        // Two thread caches of 1000 and 500 bytes.
        m.put(0x4000, 0x5000);
        m.put(0x4008, 2);
        m.put32(0x5000, 1000);
        m.put(0x5008, 0x5100);
        m.put32(0x5100, 500);
        m
    }

    #[test]
    fn page_heap_and_caches_are_read() {
        let s = read(&heap(), &layout(), 0, "libtcmalloc.so").expect("read");
        assert_eq!(s.page_heap_free_bytes, 256 << 10);
        assert_eq!(s.unmapped_bytes, 64 << 10);
        // 10 objects of 64 bytes; 8192 divides into 64-byte objects: no overhead.
        assert_eq!(s.central_cache_bytes, 640);
        assert_eq!(s.transfer_cache_bytes, 2 * 32 * 64);
        assert_eq!((s.thread_cache_bytes, s.thread_caches), (1500, 2));
        let held = (256 << 10) + (64 << 10) + 640 + 4096 + 1500;
        assert_eq!(s.in_use_bytes, (1 << 20) - held);
        assert_eq!(s.kept_bytes(), held - (64 << 10));
    }

    /// The fuzz seed (fuzz/regressions/elf_objects/tcmalloc-layout-seed.so: gperftools'
    /// classes, cut down) is read as a layout, so the fuzzer starts from one.
    #[test]
    fn the_fuzz_seed_has_a_layout() {
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../fuzz/regressions/elf_objects/tcmalloc-layout-seed.so"
        );
        let l = Layout::find(&std::fs::read(p).expect("seed")).expect("a layout");
        assert_eq!((l.classes_max, l.cfl_size, l.page_bytes), (128, 64, 8192));
    }

    #[test]
    fn garbage_is_refused() {
        // More free than the heap.
        let mut m = heap();
        m.put(0x1008, 2 << 20);
        assert!(read(&m, &layout(), 0, "x").is_err());
        // More size classes than the array holds; a central cache of another class.
        let mut m = heap();
        m.put(0x2000, 3);
        assert!(read(&m, &layout(), 0, "x").is_err());
        let mut m = heap();
        m.put(0x3040, 7);
        assert!(read(&m, &layout(), 0, "x").is_err());
        // A negative thread cache size; a list that loops stops at the count.
        let mut m = heap();
        m.put32(0x5100, u32::MAX);
        assert!(read(&m, &layout(), 0, "x").is_err());
        let mut m = heap();
        m.put(0x5108, 0x5000);
        m.put(0x4008, 0x7fff_ffff);
        let s = read(&m, &layout(), 0, "x").expect("read");
        assert_eq!(s.thread_caches, MAX_THREADS);
        // A list pointer outside the target.
        let mut m = heap();
        m.put(0x5008, 0xdead_0000);
        assert!(read(&m, &layout(), 0, "x").is_err());
    }
}
