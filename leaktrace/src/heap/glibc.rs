//! glibc's malloc heaps, read from outside the process.
//!
//! The chunks of the main (brk) heap and of every per-thread arena heap are
//! walked through `/proc/PID/mem`, and `/proc/PID/pagemap` says which of their
//! pages are resident. That gives, per arena and without touching the target,
//! what `malloc_stats()`/`mallinfo2()` would say in-process — bytes in use, free
//! bytes the allocator keeps — plus what neither says: how much of the free
//! memory is resident, and what `malloc_trim(0)` would give back.
//!
//! Layout facts used (glibc ≥ 2.26, x86-64; `malloc/malloc.c`, `malloc/arena.c`):
//! * a chunk's size word sits 8 bytes into the chunk, its low bits are flags
//!   (`PREV_INUSE` = 1); a chunk is in use when the *next* chunk's `PREV_INUSE`
//!   is set; the last chunk of the live heap is the top chunk;
//! * a per-thread arena heap is a 64 MiB-aligned mapping that starts with
//!   `heap_info { ar_ptr, prev, size, mprotect_size, … }`; the first heap of an
//!   arena holds the arena's `malloc_state` right after it; a heap that was
//!   abandoned for a new one ends in two fencepost chunks (sizes 16 and 0);
//! * `malloc_trim(0)` (`mtrim`) madvises the whole pages inside every free chunk
//!   past its 48-byte header, and shrinks the main heap's top chunk down to
//!   `MINSIZE` (`systrim`); it does not shrink the top of other arenas.
//!
//! The target keeps running while it is read, so a walk that does not chain
//! exactly from its first chunk to the end of the heap is retried, then
//! reported as not walkable — never guessed. Chunks parked in tcache or fastbins
//! look in use from outside (they are small: at most 7 per size class per thread).

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::{
    process::{Memory, procfs::MapEntry},
    units::{PAGE, page_down, page_up},
};

/// glibc's `HEAP_MAX_SIZE` on 64-bit: arena heaps are aligned to it.
pub const HEAP_MAX: u64 = 64 << 20;
/// `sizeof(struct malloc_chunk)`: `mtrim` keeps this much of a free chunk.
const CHUNK_STRUCT: u64 = 48;
const MINSIZE: u64 = 32;
const PREV_INUSE: u64 = 1;
/// Bytes read from the target at a time.
const WINDOW: usize = 64 << 10;
/// What [`Words`] reads where chunks are sparse (a page).
const SPARSE_WINDOW: usize = 4096;
/// Attempts per heap before it is reported as changing too fast to walk.
const ATTEMPTS: usize = 3;

/// Reads 8-byte words through a window, so that small chunks cost no syscall each.
struct Words<'a, M: Memory> {
    mem: &'a M,
    limit: u64,
    base: u64,
    buf: Vec<u8>,
    len: usize,
}

impl<'a, M: Memory> Words<'a, M> {
    fn new(mem: &'a M, limit: u64) -> Self {
        Self {
            mem,
            limit,
            base: 0,
            buf: vec![0; WINDOW],
            len: 0,
        }
    }

    fn at(&mut self, addr: u64) -> Option<u64> {
        if addr < self.base || addr + 8 > self.base + self.len as u64 {
            // Chunks larger than the window are read header by header: a jump past
            // twice the last window (or back) reads a page, not a whole window.
            let sparse =
                self.len > 0 && (addr < self.base || addr - self.base >= 2 * self.len as u64);
            let window = if sparse { SPARSE_WINDOW } else { WINDOW };
            let len = (self.limit.saturating_sub(addr) as usize).min(window);
            if len < 8 {
                return None;
            }
            self.mem.read(addr, &mut self.buf[..len]).ok()?;
            self.base = addr;
            self.len = len;
        }
        let o = (addr - self.base) as usize;
        Some(u64::from_le_bytes(
            self.buf[o..o + 8].try_into().expect("8 bytes"),
        ))
    }
}

/// One heap's chunks, as walked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Chunks {
    /// The first chunk (where the chain was found).
    first: u64,
    in_use_bytes: u64,
    in_use_chunks: u64,
    /// Free chunks other than the top: (address, size).
    free: Vec<(u64, u64)>,
    /// In-use chunks right above a free chunk of [`PIN_MIN_BYTES`] or more:
    /// (in-use address, size, free address, free size).
    pins: Vec<(u64, u64, u64, u64)>,
    /// The top chunk, if this heap holds its arena's top.
    top: Option<(u64, u64)>,
}

/// Time one walk of all heaps may take: the event loop waits meanwhile, so a
/// huge heap of small chunks is reported as not walked rather than stall it.
pub const WALK_BUDGET: std::time::Duration = std::time::Duration::from_millis(500);

/// Chunks walked between two looks at the clock (each chunk is at most one read).
const CHUNKS_PER_CLOCK: u32 = 256;

/// Why a heap was not walked when the budget ran out.
const OVER_BUDGET: &str = "not walked: over the time budget (a very large heap, or many)";

/// Walks the chunks from `first` to `end`; `Err` says why the chain broke.
fn walk<M: Memory>(
    mem: &M,
    first: u64,
    end: u64,
    deadline: std::time::Instant,
) -> Result<Chunks, &'static str> {
    let mut w = Words::new(mem, end);
    let mut c = Chunks {
        first,
        ..Chunks::default()
    };
    let mut p = first;
    let mut prev: Option<(u64, u64)> = None;
    // The chunk classified just before `prev`, when it was free.
    let mut free_below: Option<(u64, u64)> = None;
    let mut n = 0u32;
    loop {
        // Checked before the first chunk too: a target can make every walk fail
        // quickly, and the retries (starts, attempts, heaps) add up.
        if n.is_multiple_of(CHUNKS_PER_CLOCK) && std::time::Instant::now() > deadline {
            return Err(OVER_BUDGET);
        }
        n = n.wrapping_add(1);
        let Some(field) = w.at(p + 8) else {
            return Err("chunk header unreadable");
        };
        let size = field & !7;
        if let Some((pa, ps)) = prev {
            if field & PREV_INUSE == 0 {
                c.free.push((pa, ps));
                free_below = Some((pa, ps));
            } else {
                if let Some((fa, fs)) = free_below.take()
                    && fs >= PIN_MIN_BYTES
                {
                    c.pins.push((pa, ps, fa, fs));
                }
                c.in_use_bytes += ps;
                c.in_use_chunks += 1;
            }
        }
        if size == 0 {
            // The fencepost pair that closes an abandoned heap: a 16-byte chunk, then 0.
            return match prev {
                Some((_, 16)) if c.in_use_chunks >= 2 => {
                    c.in_use_bytes -= 16;
                    c.in_use_chunks -= 1;
                    Ok(c)
                }
                _ => Err("chunk of size 0"),
            };
        }
        if size % 16 != 0 || (size < MINSIZE && size != 16) {
            return Err("misaligned chunk size");
        }
        let next = p.checked_add(size).ok_or("chunk size overflows")?;
        if next > end {
            return Err("chunk runs past the heap end");
        }
        if next == end || end - next < 16 {
            if size < MINSIZE {
                return Err("top chunk too small");
            }
            c.top = Some((p, size));
            return Ok(c);
        }
        prev = Some((p, size));
        p = next;
    }
}

/// Which kind of arena.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArenaKind {
    /// The main arena: the brk heap.
    #[default]
    Main,
    /// A per-thread arena: 64 MiB-aligned heaps of its own.
    Thread,
}

impl ArenaKind {
    /// The kind as named in the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Main => "main",
            Self::Thread => "thread",
        }
    }
}

/// What the walk says about one arena.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArenaStats {
    /// Main or per-thread.
    pub kind: ArenaKind,
    /// Address of the arena's `malloc_state` (the main arena's is not needed: "brk").
    pub arena: String,
    /// Heaps the arena spans (thread arenas grow by adding 64 MiB heaps).
    pub heaps: Vec<String>,
    /// Bytes of its heaps in use by the allocator (the heaps' current extent).
    pub extent_bytes: u64,
    /// Of that, resident.
    pub resident_bytes: u64,
    /// Bytes in chunks in use (including chunk headers and tcache/fastbin chunks).
    pub in_use_bytes: u64,
    /// Chunks in use.
    pub in_use_chunks: u64,
    /// Bytes in free chunks, top chunk excluded.
    pub free_bytes: u64,
    /// Free chunks, top excluded.
    pub free_chunks: u64,
    /// Largest free chunk.
    pub largest_free_bytes: u64,
    /// The top chunk (free space at the end of the live heap).
    pub top_bytes: u64,
    /// Resident pages wholly inside free chunks and the top chunk.
    pub free_resident_bytes: u64,
    /// Of those, in the top chunk.
    pub top_resident_bytes: u64,
    /// Resident bytes `malloc_trim(0)` would release from this arena.
    pub trimmable_bytes: u64,
    /// Bytes of its heaps whose residency was not read (past the pagemap scan limit
    /// of a kernel older than 6.7; counted as not resident). Absent when 0.
    #[serde(default, skip_serializing_if = "crate::units::is_zero")]
    pub residency_unread_bytes: u64,
    /// In-use chunks sitting right above a large free chunk, largest held first: the
    /// heap cannot shrink past them, so the free memory below stays (but for an
    /// explicit `malloc_trim`).
    #[serde(default, skip_serializing_if = "crate::capture::outside")]
    pub pins: Vec<Pin>,
}

/// An in-use chunk right above a free chunk of at least [`PIN_MIN_BYTES`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pin {
    /// The in-use chunk's address (its user pointer is 16 bytes on).
    pub chunk: u64,
    /// Its size.
    pub chunk_bytes: u64,
    /// Resident bytes of the free chunk below it.
    pub held_resident_bytes: u64,
    /// Size of the free chunk below it.
    pub held_bytes: u64,
}

/// Free chunks at least this large, below an in-use chunk, are reported as pinned.
pub const PIN_MIN_BYTES: u64 = 1 << 20;
/// Pins kept per arena.
const PINS_KEPT: usize = 8;

/// A heap that could not be walked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unwalkable {
    /// Heap start.
    pub heap: String,
    /// Why.
    pub reason: String,
}

/// glibc's arena limit for this process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArenaLimit {
    /// Maximum number of arenas.
    pub limit: u64,
    /// Where it comes from.
    pub source: String,
}

/// The whole walk.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeapWalk {
    /// Arenas, main first, then by resident free bytes.
    pub arenas: Vec<ArenaStats>,
    /// Heaps whose chunks could not be chained (the target changed them while read).
    pub unwalkable: Vec<Unwalkable>,
    /// Sums over the arenas.
    pub in_use_bytes: u64,
    /// Free bytes (top chunks included).
    pub free_bytes: u64,
    /// Resident free bytes (top chunks included).
    pub free_resident_bytes: u64,
    /// What `malloc_trim(0)` would release.
    pub trimmable_bytes: u64,
    /// Resident bytes of all heaps.
    pub resident_bytes: u64,
    /// Each walked heap's chunk chain: (first chunk, heap end), for the census.
    #[serde(default, skip_serializing_if = "crate::capture::outside")]
    pub chains: Vec<(u64, u64)>,
}

/// Bytes of an in-use chunk's start handed to a census (an object's header, behind a
/// GC head and a pre-header at most).
pub const CHUNK_HEAD: usize = 64;

/// Calls `each(user address, chunk size, first bytes)` for every in-use chunk of the
/// walked chains, within `deadline`; `false` if a chain broke (the target changed it
/// since the walk) or the time ran out.
pub fn each_in_use<M: Memory>(
    mem: &M,
    chains: &[(u64, u64)],
    deadline: std::time::Instant,
    each: &mut dyn FnMut(u64, u64, &[u8]),
) -> bool {
    let mut complete = true;
    let mut head = [0u8; CHUNK_HEAD];
    for &(first, end) in chains {
        let mut w = Words::new(mem, end);
        let mut p = first;
        let mut prev: Option<(u64, u64)> = None;
        let mut n = 0u32;
        loop {
            if n.is_multiple_of(CHUNKS_PER_CLOCK) && std::time::Instant::now() > deadline {
                return false;
            }
            n = n.wrapping_add(1);
            let Some(field) = w.at(p + 8) else {
                complete = false;
                break;
            };
            if let Some((pa, ps)) = prev
                && field & PREV_INUSE != 0
            {
                let words = ((ps.saturating_sub(16)) / 8).min(CHUNK_HEAD as u64 / 8) as usize;
                let mut got = 0;
                while got < words {
                    let Some(v) = w.at(pa + 16 + 8 * got as u64) else {
                        break;
                    };
                    head[got * 8..got * 8 + 8].copy_from_slice(&v.to_le_bytes());
                    got += 1;
                }
                each(pa + 16, ps, &head[..got * 8]);
                // Back to this chunk's header for the next step.
                if w.at(p + 8).is_none() {
                    complete = false;
                    break;
                }
            }
            let size = field & !7;
            let Some(next) = p.checked_add(size).filter(|_| size >= 16 && size % 16 == 0) else {
                // The fencepost's size 0 ends an abandoned heap; anything else broke.
                complete &= size == 0;
                break;
            };
            if next > end {
                complete = false;
                break;
            }
            if next == end || end - next < 16 {
                break;
            }
            prev = Some((p, size));
            p = next;
        }
    }
    complete
}

/// Where the walker looks: the main heap's extent and the per-thread arena heaps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeapSites {
    /// `[start_brk, brk)`, if the process has a brk heap.
    pub main: Option<(u64, u64)>,
    /// Start of each 64 MiB-aligned anonymous read-write mapping (candidate arena heaps).
    pub thread_heaps: Vec<u64>,
}

/// Finds the candidate heaps in a memory map. `brk` is the current break if
/// known (else the `[heap]` mapping's end is used).
pub fn find_sites(maps: &[MapEntry], start_brk: Option<u64>, brk: Option<u64>) -> HeapSites {
    // The brk heap may be several mappings end to end: a forked child (a PostgreSQL
    // backend) that grows the heap it inherited gets a new mapping the kernel cannot
    // merge with the old one, and the chunks run on across the seam.
    let first = maps.iter().position(|m| m.path == "[heap]");
    let main = first.map(|i| {
        let m = &maps[i];
        let last_end = maps[i + 1..]
            .iter()
            .scan(m.end, |end, n| {
                (n.path == "[heap]" && n.start == *end).then(|| {
                    *end = n.end;
                    n.end
                })
            })
            .last()
            .unwrap_or(m.end);
        let start = start_brk
            .filter(|&s| s >= m.start && s < m.end)
            .unwrap_or(m.start);
        let end = brk
            .filter(|&b| b > start && b <= last_end)
            .unwrap_or(last_end);
        (start, end)
    });
    let thread_heaps = maps
        .iter()
        .filter(|m| {
            m.path.is_empty() && m.inode == 0 && m.start % HEAP_MAX == 0 && &m.perms[..2] == b"rw"
        })
        .map(|m| m.start)
        .collect();
    HeapSites { main, thread_heaps }
}

fn hex(a: u64) -> String {
    format!("{a:#x}")
}

/// Accumulates one walked heap into its arena's figures.
fn add_heap<M: Memory>(mem: &M, a: &mut ArenaStats, start: u64, end: u64, c: &Chunks, main: bool) {
    let (ps, pe) = (page_down(start), page_up(end));
    // Runs of resident pages: as large as what is resident, whatever extent the
    // target gives its heap.
    let resident = mem.residency(ps, pe).unwrap_or_default();
    let present = |s: u64, e: u64| resident.bytes(s, e);
    a.heaps.push(hex(start));
    a.extent_bytes += end - start;
    a.resident_bytes += present(ps, pe);
    a.residency_unread_bytes += resident.unread_bytes;
    a.in_use_bytes += c.in_use_bytes;
    a.in_use_chunks += c.in_use_chunks;
    for &(p, size) in &c.free {
        a.free_bytes += size;
        a.free_chunks += 1;
        a.largest_free_bytes = a.largest_free_bytes.max(size);
        let (s, e) = (page_up(p + CHUNK_STRUCT), page_down(p + size));
        let r = present(s, e);
        a.free_resident_bytes += r;
        a.trimmable_bytes += r;
    }
    for &(p, size, fa, fs) in &c.pins {
        a.pins.push(Pin {
            chunk: p,
            chunk_bytes: size,
            held_resident_bytes: present(page_up(fa + CHUNK_STRUCT), page_down(fa + fs)),
            held_bytes: fs,
        });
    }
    a.pins.sort_by(|x, y| {
        y.held_resident_bytes
            .cmp(&x.held_resident_bytes)
            .then(x.chunk.cmp(&y.chunk))
    });
    a.pins.truncate(PINS_KEPT);
    if let Some((p, size)) = c.top {
        a.top_bytes += size;
        let r = present(page_up(p + 16), page_down(p + size));
        a.free_resident_bytes += r;
        a.top_resident_bytes += r;
        if main {
            // systrim(0): keep MINSIZE of the top, give the whole pages above back.
            // (A top of MINSIZE or less gives nothing back.)
            let extra = page_down(size.saturating_sub(MINSIZE + 1));
            a.trimmable_bytes += present(page_down(p + size) - extra, page_down(p + size));
        }
    }
}

/// Walks the main heap; the first chunk is at the heap start, 16-aligned.
fn walk_main<M: Memory>(
    mem: &M,
    start: u64,
    end: u64,
    deadline: std::time::Instant,
) -> Result<Chunks, String> {
    let mut why = "no chunk chain from the heap start";
    for _ in 0..ATTEMPTS {
        for first in (start.next_multiple_of(16)..start + 64).step_by(16) {
            match walk(mem, first, end, deadline) {
                Ok(c) if c.top.is_some() => return Ok(c),
                Ok(_) => why = "main heap ends in a fencepost",
                Err(OVER_BUDGET) => return Err(OVER_BUDGET.to_owned()),
                Err(e) => why = e,
            }
        }
    }
    Err(why.to_owned())
}

/// Reads a thread heap's `heap_info` and walks it: (arena address, chunks, extent end).
fn walk_thread<M: Memory>(
    mem: &M,
    h: u64,
    heaps: &[u64],
    deadline: std::time::Instant,
) -> Result<(u64, Chunks, u64), String> {
    let mut why = String::from("no chunk chain");
    for _ in 0..ATTEMPTS {
        if std::time::Instant::now() > deadline {
            return Err(OVER_BUDGET.to_owned());
        }
        let mut info = [0u8; 32];
        mem.read(h, &mut info)
            .map_err(|e| format!("heap_info unreadable: {e}"))?;
        let word =
            |i: usize| u64::from_le_bytes(info[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        let (ar_ptr, size, mprotect_size) = (word(0), word(2), word(3));
        // ar_ptr points just past this heap's heap_info, or another heap's.
        let owner_ok = heaps.iter().any(|&o| ar_ptr > o && ar_ptr < o + 256);
        if !owner_ok || !(PAGE..=HEAP_MAX).contains(&size) || mprotect_size < size {
            return Err("not a glibc arena heap (heap_info does not check out)".into());
        }
        let end = h + size;
        // The first heap of an arena holds its malloc_state right after heap_info;
        // later heaps start their chunks right after heap_info (32 or 48 bytes by version).
        let firsts: Vec<u64> = if ar_ptr > h && ar_ptr < h + 256 {
            (ar_ptr + 2048..ar_ptr + 2560).step_by(16).collect()
        } else {
            vec![h + 48, h + 32]
        };
        for first in firsts {
            match walk(mem, first, end, deadline) {
                Ok(c)
                    if c.in_use_chunks + c.free.len() as u64 + u64::from(c.top.is_some()) >= 1 =>
                {
                    return Ok((ar_ptr, c, end));
                }
                Ok(_) => {}
                Err(OVER_BUDGET) => return Err(OVER_BUDGET.to_owned()),
                Err(e) => why = e.to_owned(),
            }
        }
    }
    Err(why)
}

/// Walks every heap the sites name.
pub fn walk_heaps<M: Memory>(mem: &M, sites: &HeapSites) -> HeapWalk {
    walk_heaps_until(mem, sites, std::time::Instant::now() + WALK_BUDGET)
}

/// [`walk_heaps`] within `deadline`: past it, the heaps left are reported as not walked
/// without a read.
fn walk_heaps_until<M: Memory>(
    mem: &M,
    sites: &HeapSites,
    deadline: std::time::Instant,
) -> HeapWalk {
    let mut out = HeapWalk::default();
    if let Some((start, end)) = sites.main {
        match walk_main(mem, start, end, deadline) {
            Ok(c) => {
                let mut a = ArenaStats {
                    kind: ArenaKind::Main,
                    arena: "brk heap".into(),
                    ..ArenaStats::default()
                };
                add_heap(mem, &mut a, start, end, &c, true);
                out.arenas.push(a);
                out.chains.push((c.first, end));
            }
            Err(reason) => out.unwalkable.push(Unwalkable {
                heap: hex(start),
                reason,
            }),
        }
    }
    let mut thread: FxHashMap<u64, ArenaStats> = FxHashMap::default();
    for &h in &sites.thread_heaps {
        match walk_thread(mem, h, &sites.thread_heaps, deadline) {
            Ok((ar, c, end)) => {
                let a = thread.entry(ar).or_insert_with(|| ArenaStats {
                    kind: ArenaKind::Thread,
                    arena: hex(ar),
                    ..ArenaStats::default()
                });
                add_heap(mem, a, h, end, &c, false);
                out.chains.push((c.first, end));
            }
            Err(reason) if reason.starts_with("not a glibc") => {}
            Err(reason) => out.unwalkable.push(Unwalkable {
                heap: hex(h),
                reason,
            }),
        }
    }
    let mut thread: Vec<ArenaStats> = thread.into_values().collect();
    thread.sort_by(|a, b| {
        b.free_resident_bytes
            .cmp(&a.free_resident_bytes)
            .then(a.arena.cmp(&b.arena))
    });
    out.arenas.extend(thread);
    for a in &out.arenas {
        out.in_use_bytes += a.in_use_bytes;
        out.free_bytes += a.free_bytes + a.top_bytes;
        out.free_resident_bytes += a.free_resident_bytes;
        out.trimmable_bytes += a.trimmable_bytes;
        out.resident_bytes += a.resident_bytes;
    }
    out
}

/// glibc's arena limit: `MALLOC_ARENA_MAX` or the `glibc.malloc.arena_max`
/// tunable from the target's environment, else 8 × online CPUs (64-bit).
pub fn arena_limit(environ: &[(String, String)], cpus: u64) -> ArenaLimit {
    let get = |k: &str| {
        environ
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    };
    let tunable = get("GLIBC_TUNABLES").and_then(|t| {
        t.split(':')
            .find_map(|kv| kv.strip_prefix("glibc.malloc.arena_max="))
            .and_then(|v| v.parse::<u64>().ok())
    });
    if let Some(n) = get("MALLOC_ARENA_MAX")
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&n| n > 0)
    {
        return ArenaLimit {
            limit: n,
            source: format!("MALLOC_ARENA_MAX={n} in the target's environment"),
        };
    }
    if let Some(n) = tunable.filter(|&n| n > 0) {
        return ArenaLimit {
            limit: n,
            source: format!("GLIBC_TUNABLES glibc.malloc.arena_max={n}"),
        };
    }
    ArenaLimit {
        limit: 8 * cpus,
        source: format!("glibc default: 8 × {cpus} CPUs"),
    }
}

/// Chunks glibc's malloc mapped on their own (requests above the mmap threshold,
/// 128 KiB by default): each is a page-aligned mapping that starts with a chunk header
/// whose size has `IS_MMAPPED` set and covers whole pages. Neighbouring chunks share one
/// kernel mapping, so each region is followed from chunk to chunk. Returns `(start, end)`
/// of each chunk found in `regions` (anonymous read-write mappings outside the heaps).
pub fn mmapped_chunks<M: Memory>(mem: &M, regions: &[(u64, u64)]) -> Vec<(u64, u64)> {
    const IS_MMAPPED: u64 = 2;
    const NON_MAIN_ARENA: u64 = 4;
    let mut out = Vec::new();
    for &(start, end) in regions {
        let mut at = start;
        // At most one chunk per page: the loop ends even on a hostile layout.
        for _ in 0..(end.saturating_sub(start) / PAGE) {
            if at + PAGE > end {
                break;
            }
            let mut hdr = [0u8; 16];
            if mem.read(at, &mut hdr).is_err() {
                break;
            }
            let prev = u64::from_le_bytes(hdr[..8].try_into().expect("8 bytes"));
            let word = u64::from_le_bytes(hdr[8..].try_into().expect("8 bytes"));
            let size = word & !7;
            // `prev_size` holds the alignment padding of a memaligned chunk (< a page);
            // the mapping is the padding plus the chunk.
            let len = size.saturating_add(prev);
            let ok = word & IS_MMAPPED != 0
                && word & NON_MAIN_ARENA == 0
                && prev < PAGE
                && size >= PAGE
                && len % PAGE == 0
                && len <= end - at;
            if !ok {
                break;
            }
            out.push((at, at + len));
            at += len;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::memory::Laid;

    /// Lays out chunks (size, in_use) from `first`; the last one is the top.
    fn lay_chunks(m: &mut Laid, first: u64, chunks: &[(u64, bool)]) {
        let mut p = first;
        let mut prev_in_use = true;
        for &(size, in_use) in chunks {
            m.put(p + 8, size | u64::from(prev_in_use));
            prev_in_use = in_use;
            p += size;
        }
    }

    fn heap_map(start: u64, end: u64) -> MapEntry {
        MapEntry {
            start,
            end,
            perms: *b"rw-p",
            offset: 0,
            inode: 0,
            path: "[heap]".into(),
        }
    }

    /// A PostgreSQL backend's brk heap is two mappings end to end (the part inherited
    /// from the postmaster, and the growth since the fork): the heap is both. The walk
    /// stopped at the first one's end ("chunk runs past the heap end").
    #[test]
    fn main_heap_spans_adjacent_heap_mappings() {
        let maps = [
            heap_map(0x1000_0000, 0x100b_9000),
            heap_map(0x100b_9000, 0x1015_a000),
            heap_map(0x1100_0000, 0x1100_1000),
        ];
        let s = find_sites(&maps, Some(0x1000_0000), Some(0x1015_a000));
        assert_eq!(s.main, Some((0x1000_0000, 0x1015_a000)));
        // brk below the end of the mappings bounds the heap; one past it is ignored.
        let s = find_sites(&maps, Some(0x1000_0000), Some(0x1010_0000));
        assert_eq!(s.main, Some((0x1000_0000, 0x1010_0000)));
        let s = find_sites(&maps, Some(0x1000_0000), Some(0x1100_1000));
        assert_eq!(s.main, Some((0x1000_0000, 0x1015_a000)));
    }

    /// Main heap: used, a free 64 KiB hole (half resident), used, top of 40 KiB.
    #[test]
    fn main_heap_counts_free_resident_and_trimmable() {
        let base = 0x5555_0000_0000;
        let len = 0x2_0000; // 128 KiB heap
        let mut m = Laid::new(base, len);
        let chunks = [
            (0x290, true),
            (0x1_0000, false),
            (0x5d70, true),
            (len - 0x290 - 0x1_0000 - 0x5d70, false),
        ];
        lay_chunks(&mut m, base, &chunks);
        // The hole spans [base+0x290, base+0x10290): pages 1..=15 lie wholly past its header.
        for pg in 1..8 {
            m.resident[pg] = false;
        }
        let w = walk_heaps(
            &m,
            &HeapSites {
                main: Some((base, base + len)),
                thread_heaps: vec![],
            },
        );
        assert!(w.unwalkable.is_empty(), "{:?}", w.unwalkable);
        let a = &w.arenas[0];
        assert_eq!(
            (a.kind, a.in_use_chunks, a.in_use_bytes),
            (ArenaKind::Main, 2, 0x290 + 0x5d70)
        );
        assert_eq!(
            (a.free_chunks, a.free_bytes, a.largest_free_bytes),
            (1, 0x1_0000, 0x1_0000)
        );
        let top = len - 0x290 - 0x1_0000 - 0x5d70;
        assert_eq!(a.top_bytes, top);
        // Hole: pages 1..16 (after the 48-byte header rounds up to page 1, ends before 0x10290 → page 16),
        // of which 1..8 are not resident: 8 pages. Top: starts at 0x16000, 10 whole pages to 0x20000.
        assert_eq!(a.free_resident_bytes, 8 * PAGE + 9 * PAGE);
        // malloc_trim: the hole's 8 resident pages, plus the top above MINSIZE (9 whole pages).
        assert_eq!(a.trimmable_bytes, 8 * PAGE + 9 * PAGE);
        assert_eq!(a.resident_bytes, len - 7 * PAGE);
    }

    /// A main heap whose top chunk is exactly MINSIZE (or less) gives nothing back; the
    /// trimmable figure underflowed (a panic in debug builds, a wrap in release).
    #[test]
    fn main_heap_with_a_minimal_top_trims_nothing() {
        let base = 0x5555_0000_0000;
        let len = 0x1_0000;
        let mut m = Laid::new(base, len);
        lay_chunks(&mut m, base, &[(len - MINSIZE, true), (MINSIZE, false)]);
        let w = walk_heaps(
            &m,
            &HeapSites {
                main: Some((base, base + len)),
                thread_heaps: vec![],
            },
        );
        assert!(w.unwalkable.is_empty(), "{:?}", w.unwalkable);
        let a = &w.arenas[0];
        assert_eq!((a.top_bytes, a.trimmable_bytes), (MINSIZE, 0));
    }

    /// A thread arena: heap_info, malloc_state, then chunks; and a second heap of the
    /// same arena that was abandoned with fenceposts.
    #[test]
    fn thread_arena_heaps_group_by_arena() {
        let h1 = 0x7f00_0000_0000u64;
        let h2 = h1 + HEAP_MAX;
        let mut m = Laid::new(h1, HEAP_MAX + 0x10000);
        let size = 0x8000;
        // First heap: heap_info{ar_ptr = h1+48, prev 0, size, mprotect_size}; chunks at h1+2256.
        m.put(h1, h1 + 48);
        m.put(h1 + 16, size);
        m.put(h1 + 24, size);
        let first = h1 + 2256;
        lay_chunks(
            &mut m,
            first,
            &[
                (0x1000, true),
                (0x3000, false),
                (0x800, true),
                (h1 + size - first - 0x4800, false),
            ],
        );
        // Second heap of the same arena, abandoned: chunks at h2+48 end with fenceposts 16, 0.
        m.put(h2, h1 + 48);
        m.put(h2 + 8, h1);
        m.put(h2 + 16, 0x4000);
        m.put(h2 + 24, 0x4000);
        lay_chunks(
            &mut m,
            h2 + 48,
            &[(0x2000, true), (0x1000, false), (0x100, true), (16, true)],
        );
        m.put(h2 + 48 + 0x3100 + 16 + 8, PREV_INUSE); // size 0 | PREV_INUSE
        let w = walk_heaps(
            &m,
            &HeapSites {
                main: None,
                thread_heaps: vec![h1, h2],
            },
        );
        assert!(w.unwalkable.is_empty(), "{:?}", w.unwalkable);
        assert_eq!(w.arenas.len(), 1);
        let a = &w.arenas[0];
        assert_eq!(a.heaps, vec![hex(h1), hex(h2)]);
        assert_eq!(
            (a.in_use_chunks, a.in_use_bytes),
            (4, 0x1000 + 0x800 + 0x2000 + 0x100)
        );
        assert_eq!((a.free_chunks, a.free_bytes), (2, 0x3000 + 0x1000));
        // Thread arenas' tops are not trimmed by malloc_trim; free chunks' inner pages are:
        // 0x3000 at h1+0x18d0 → pages [h1+0x2000, h1+0x4000): 2; 0x1000 at h2+0x2030 → none whole.
        assert_eq!(a.trimmable_bytes, 2 * PAGE);
    }

    /// A chain that breaks (a size running past the end) is reported, not guessed.
    #[test]
    fn broken_chain_is_unwalkable() {
        let base = 0x5555_0000_0000;
        let mut m = Laid::new(base, 0x4000);
        lay_chunks(&mut m, base, &[(0x100, true), (0x9000, false)]);
        let w = walk_heaps(
            &m,
            &HeapSites {
                main: Some((base, base + 0x4000)),
                thread_heaps: vec![],
            },
        );
        assert!(w.arenas.is_empty());
        assert_eq!(w.unwalkable.len(), 1, "{w:?}");
    }

    /// A walk over its time budget stops and says so.
    #[test]
    fn walk_stops_at_its_deadline() {
        let base = 0x5555_0000_0000;
        let len = 0x4_0000;
        let mut m = Laid::new(base, len);
        let n = (len / 32) as usize;
        let chunks: Vec<(u64, bool)> = (0..n).map(|i| (32, i + 1 < n)).collect();
        lay_chunks(&mut m, base, &chunks);
        let past = std::time::Instant::now() - std::time::Duration::from_secs(1);
        assert!(walk(&m, base, base + len, past).is_err());
        let later = std::time::Instant::now() + std::time::Duration::from_secs(60);
        assert_eq!(
            walk(&m, base, base + len, later).map(|c| c.in_use_chunks),
            Ok(n as u64 - 1)
        );
    }

    /// Past the budget nothing more is read: every walk looks at the clock before its
    /// first chunk, and the retries stop. Before, a walk that failed within 4096 chunks
    /// never looked, and each heap's starts and attempts were all tried (crafted heaps
    /// stretched a 3 s trace to 21.8 s).
    #[test]
    fn no_reads_past_the_budget() {
        struct Counting<'a>(&'a Laid, std::cell::Cell<u64>);
        impl Memory for Counting<'_> {
            fn read(&self, addr: u64, buf: &mut [u8]) -> std::io::Result<()> {
                self.1.set(self.1.get() + 1);
                self.0.read(addr, buf)
            }
            fn resident(&self, start: u64, end: u64) -> std::io::Result<Vec<bool>> {
                self.0.resident(start, end)
            }
        }
        let base = 0x5555_0000_0000;
        let len = 0x1_0000;
        let mut m = Laid::new(base, len);
        lay_chunks(&mut m, base, &[(0x100, true), (len - 0x100, false)]);
        let counting = Counting(&m, std::cell::Cell::new(0));
        let sites = HeapSites {
            main: Some((base, base + len)),
            thread_heaps: (0..64).map(|i| 0x7f00_0000_0000 + (i << 26)).collect(),
        };
        let past = std::time::Instant::now() - std::time::Duration::from_secs(1);
        let w = walk_heaps_until(&counting, &sites, past);
        assert_eq!(counting.1.get(), 0, "reads past the deadline");
        assert!(w.arenas.is_empty());
        assert!(
            w.unwalkable.iter().all(|u| u.reason == OVER_BUDGET),
            "{:?}",
            w.unwalkable
        );
        // With time left, the same main heap is walked.
        let w = walk_heaps_until(
            &counting,
            &HeapSites {
                main: Some((base, base + len)),
                thread_heaps: vec![],
            },
            std::time::Instant::now() + std::time::Duration::from_secs(60),
        );
        assert_eq!(w.arenas.len(), 1, "{:?}", w.unwalkable);
    }

    /// The arena limit comes from the environment, else from the CPU count.
    #[test]
    fn arena_limit_sources() {
        let env = |kv: &[(&str, &str)]| {
            kv.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<Vec<_>>()
        };
        assert_eq!(arena_limit(&env(&[]), 2).limit, 16);
        assert_eq!(arena_limit(&env(&[("MALLOC_ARENA_MAX", "2")]), 2).limit, 2);
        assert_eq!(
            arena_limit(
                &env(&[(
                    "GLIBC_TUNABLES",
                    "glibc.malloc.tcache_count=0:glibc.malloc.arena_max=3"
                )]),
                2
            )
            .limit,
            3
        );
    }

    /// Two mmapped chunks sharing one mapping are both found; a region that starts
    /// with anything else yields nothing, and a size past the region is refused.
    #[test]
    fn finds_mmapped_chunks() {
        let base = 0x7f00_0000_0000u64;
        let mut bytes = vec![0u8; 6 * PAGE as usize];
        let mut put = |at: usize, prev: u64, size: u64| {
            bytes[at..at + 8].copy_from_slice(&prev.to_le_bytes());
            bytes[at + 8..at + 16].copy_from_slice(&size.to_le_bytes());
        };
        put(0, 0, (2 * PAGE) | 2);
        put(2 * PAGE as usize, 0, (3 * PAGE) | 2);
        // A chunk whose size runs past the mapping's end.
        put(5 * PAGE as usize, 0, (4 * PAGE) | 2);
        let mem = Laid {
            base,
            bytes,
            resident: Vec::new(),
        };
        let end = base + 6 * PAGE;
        assert_eq!(
            mmapped_chunks(&mem, &[(base, end)]),
            vec![(base, base + 2 * PAGE), (base + 2 * PAGE, base + 5 * PAGE)]
        );
        assert_eq!(mmapped_chunks(&mem, &[(base + PAGE, end)]), vec![]);
    }
}
