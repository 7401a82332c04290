//! CPython's small-object allocator (pymalloc), read from outside the process.
//!
//! Objects of up to 512 bytes (256 in 2.7) come from pymalloc, not malloc. It
//! maps *arenas* (256 KiB, 1 MiB from 3.10), carves them into *pools* (4 KiB,
//! 16 KiB from 3.10) and each pool into blocks of one size class. An arena is
//! unmapped only when every block in every one of its pools is free: a few
//! long-lived objects keep a whole arena resident, which is how a Python
//! process fragments.
//!
//! The walk needs no symbols and no interpreter state, so it sees every arena,
//! made before attach or since: it steps through the anonymous read-write
//! mappings at pool alignment and reads each resident pool's header
//! (`Objects/obmalloc.c`, the same from 2.7 to 3.14 on 64-bit):
//!
//! ```text
//!   0  union { block *_padding; uint count; } ref;   blocks in use
//!   8  block *freeblock;                             free list head
//!  16  pool_header *nextpool, *prevpool;
//!  32  uint arenaindex;                              arena it belongs to
//!  36  uint szidx;                                   size class index
//!  40  uint nextoffset;                              first never-used block
//!  44  uint maxnextoffset;                           POOL_SIZE - block size
//! ```
//!
//! A header is taken only if every field agrees with the others (the block
//! size from `szidx` gives `maxnextoffset` exactly, `nextoffset` lies on a block
//! boundary, the count fits the blocks carved, the free list points into the
//! pool): random data passes that by chance about never. Consecutive pools with
//! the same `arenaindex` within an arena's span form one arena. Emptied pools
//! keep their header (count 0), and pymalloc never gives their pages back, so
//! their resident pages are free memory the interpreter keeps.
//!
//! The target keeps running while it is read: a header that fails the checks is
//! read once more, then counted as in use when it lies inside an arena (never as
//! free), and the walk stops at a time budget, saying so.

use serde::{Deserialize, Serialize};

use crate::{
    process::Memory,
    units::{PAGE, bytes},
};

/// `sizeof(struct pool_header)` rounded to the alignment: 48 bytes on 64-bit.
const POOL_OVERHEAD: u64 = 48;

/// Time one walk may take.
pub const WALK_BUDGET: std::time::Duration = std::time::Duration::from_millis(500);

/// Arenas reported one by one; the others are in the totals.
const ARENAS_KEPT: usize = 16;

/// An arena is mostly empty when less than this share of its resident bytes holds
/// live blocks: the few it has keep the rest from being returned.
pub const MOSTLY_EMPTY_SHARE: f64 = 0.25;

/// pymalloc's geometry for one CPython version (64-bit).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    /// `POOL_SIZE`.
    pub pool_bytes: u64,
    /// `ARENA_SIZE`.
    pub arena_bytes: u64,
    /// `ALIGNMENT`: size classes are its multiples.
    pub alignment: u64,
    /// Number of size classes (`SMALL_REQUEST_THRESHOLD / ALIGNMENT`).
    pub classes: u32,
    /// The alignment of the version's earlier point releases, also accepted: 16-byte
    /// alignment on 64-bit (bpo-27987) reached 2.7.15 and 3.6/3.7's late releases.
    pub older_alignment: Option<u64>,
}

impl Layout {
    /// The layout of CPython `major.minor`, if leaktrace knows it.
    pub fn for_version(major: u32, minor: u32) -> Option<Self> {
        let (pool_bytes, arena_bytes, threshold, older_alignment) = match (major, minor) {
            // 2.7: a 256-byte threshold; 8-byte alignment before 2.7.15 (measured: pyenv's
            // 2.7.18 aligns to 16).
            (2, 7) => (4 << 10, 256 << 10, 256, Some(8)),
            // 3.0–3.7: the threshold rose to 512; 8-byte alignment in early releases
            // (measured: pyenv's 3.6.15 and 3.7.16 align to 16).
            (3, 0..=7) => (4 << 10, 256 << 10, 512, Some(8)),
            // 3.8–3.9: 16-byte alignment on 64-bit.
            (3, 8..=9) => (4 << 10, 256 << 10, 512, None),
            // 3.10 on: the radix tree's large pools and arenas.
            (3, 10..) => (16 << 10, 1 << 20, 512, None),
            _ => return None,
        };
        Some(Self {
            pool_bytes,
            arena_bytes,
            alignment: 16,
            classes: (threshold / 16) as u32,
            older_alignment,
        })
    }

    /// `SMALL_REQUEST_THRESHOLD`.
    fn threshold(&self) -> u64 {
        u64::from(self.classes) * self.alignment
    }

    /// Size-class slots counted in units of the smallest alignment (8 bytes).
    fn slots(&self) -> usize {
        (self.threshold() / 8) as usize
    }
}

/// A pool header that passed the checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Pool {
    arena_index: u32,
    block_bytes: u64,
    in_use: u64,
    capacity: u64,
    /// Blocks carved so far (up to `nextoffset`).
    carved: u64,
}

/// Checks a pool header read at `addr`; `None` if it is not one.
fn parse(raw: &[u8; POOL_OVERHEAD as usize], addr: u64, l: &Layout) -> Option<Pool> {
    let u32_at = |o: usize| u64::from(u32::from_le_bytes(raw[o..o + 4].try_into().expect("4")));
    let freeblock = u64::from_le_bytes(raw[8..16].try_into().expect("8"));
    let (count, arena_index, szidx) = (u32_at(0), u32_at(32), u32_at(36));
    let (next, max_next) = (u32_at(40), u32_at(44));
    let size = std::iter::once(l.alignment)
        .chain(l.older_alignment)
        .map(|a| (szidx + 1) * a)
        .find(|&size| size <= l.threshold() && max_next == l.pool_bytes - size)?;
    let capacity = (l.pool_bytes - POOL_OVERHEAD) / size;
    let carved = next.checked_sub(POOL_OVERHEAD)? / size;
    let valid = max_next == l.pool_bytes - size
        && next >= POOL_OVERHEAD + size
        && next <= max_next + size
        && (next - POOL_OVERHEAD).is_multiple_of(size)
        && count <= carved
        && (freeblock == 0
            || freeblock
                .checked_sub(addr + POOL_OVERHEAD)
                .is_some_and(|o| o.is_multiple_of(size) && o < next - POOL_OVERHEAD));
    valid.then_some(Pool {
        arena_index: arena_index as u32,
        block_bytes: size,
        in_use: count,
        capacity,
        carved: carved.min(capacity),
    })
}

/// Live blocks of one size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SizeClass {
    /// Block size.
    pub block_bytes: u64,
    /// Blocks in use.
    pub blocks: u64,
}

/// What the walk says about one arena.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PyArena {
    /// Address of its first pool (the arena's mapping starts at most a pool before).
    pub address: String,
    /// Pools that have held blocks.
    pub pools: u64,
    /// Of those, with blocks in use now.
    pub used_pools: u64,
    /// Blocks in use.
    pub blocks_in_use: u64,
    /// Blocks the pools that have held blocks can hold.
    pub block_capacity: u64,
    /// Bytes in live blocks (and the headers of pools holding them).
    pub in_use_bytes: u64,
    /// Resident bytes of its pools.
    pub resident_bytes: u64,
    /// Of those, not holding live blocks: memory the interpreter keeps.
    pub free_resident_bytes: u64,
    /// Live blocks by size, most bytes first.
    pub size_classes: Vec<SizeClass>,
    #[serde(default, skip_serializing_if = "crate::capture::outside")]
    start: u64,
    #[serde(default, skip_serializing_if = "crate::capture::outside")]
    classes: Vec<u64>,
}

impl PyArena {
    fn new(start: u64, l: &Layout) -> Self {
        Self {
            address: format!("{start:#x}"),
            start,
            classes: vec![0; l.slots()],
            ..Self::default()
        }
    }

    /// Whether its live blocks fill less than [`MOSTLY_EMPTY_SHARE`] of it.
    pub fn mostly_empty(&self) -> bool {
        (self.in_use_bytes as f64) < MOSTLY_EMPTY_SHARE * self.resident_bytes as f64
    }

    fn add(&mut self, p: Option<Pool>, resident: u64, _l: &Layout) {
        let in_use = match p {
            Some(p) => {
                self.pools += 1;
                self.block_capacity += p.capacity;
                if p.in_use > 0 {
                    self.used_pools += 1;
                    self.blocks_in_use += p.in_use;
                    self.classes[(p.block_bytes / 8 - 1) as usize] += p.in_use;
                    p.in_use * p.block_bytes + POOL_OVERHEAD
                } else {
                    0
                }
            }
            // Resident but unrecognized (changing while read): not claimed as free.
            None => resident,
        };
        let in_use = in_use.min(resident);
        self.in_use_bytes += in_use;
        self.resident_bytes += resident;
        self.free_resident_bytes += resident - in_use;
    }

    fn finish(&mut self, _l: &Layout) {
        self.size_classes = self
            .classes
            .iter()
            .enumerate()
            .filter(|&(_, &n)| n > 0)
            .map(|(i, &n)| SizeClass {
                block_bytes: (i as u64 + 1) * 8,
                blocks: n,
            })
            .collect();
        self.size_classes
            .sort_by_key(|c| std::cmp::Reverse(c.blocks * c.block_bytes));
    }
}

/// The mostly-empty arenas together: what their few live blocks keep.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pinned {
    /// Mostly-empty arenas.
    pub arenas: u64,
    /// Their resident bytes: what freeing their live blocks would return.
    pub resident_bytes: u64,
    /// Of those, free.
    pub free_resident_bytes: u64,
    /// Their live blocks.
    pub blocks_in_use: u64,
    /// Bytes in those blocks.
    pub in_use_bytes: u64,
    /// Those blocks by size, most bytes first.
    pub size_classes: Vec<SizeClass>,
}

/// The whole walk.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PymallocWalk {
    /// The geometry walked with.
    pub layout: Option<Layout>,
    /// Arenas found.
    pub arena_count: u64,
    /// Sums over the arenas.
    pub resident_bytes: u64,
    /// Bytes in live blocks.
    pub in_use_bytes: u64,
    /// Resident bytes not holding live blocks.
    pub free_resident_bytes: u64,
    /// Live blocks.
    pub blocks_in_use: u64,
    /// Blocks the arenas' pools can hold.
    pub block_capacity: u64,
    /// Live blocks by size over all arenas, most bytes first.
    pub size_classes: Vec<SizeClass>,
    /// The mostly-empty arenas and the live blocks that keep them.
    pub pinned: Pinned,
    /// The arenas keeping the most free memory, most first.
    pub arenas: Vec<PyArena>,
    /// Why the walk stopped early, if it did.
    pub incomplete: Option<String>,
    /// Pools that changed between their header's reading and the census's (skipped).
    #[serde(default, skip_serializing_if = "crate::capture::outside")]
    pub census_torn_pools: u64,
    /// Each arena: (first pool, end, resident in use, resident free).
    #[serde(default, skip_serializing_if = "crate::capture::outside")]
    pub spans: Vec<(u64, u64, u64, u64)>,
}

impl PymallocWalk {
    /// One line: "N arenas hold X with Y% of it in live blocks".
    pub fn summary(&self) -> String {
        format!(
            "{} pymalloc arena{} hold {} resident, {:.0}% of it in live blocks ({} of {} blocks in use)",
            self.arena_count,
            if self.arena_count == 1 { "" } else { "s" },
            bytes(self.resident_bytes),
            self.in_use_bytes as f64 * 100.0 / self.resident_bytes.max(1) as f64,
            self.blocks_in_use,
            self.block_capacity
        )
    }
}

/// Sums size classes (a per-class count vector) into [`SizeClass`]es.
fn merge(into: &mut Vec<u64>, a: &PyArena) {
    if into.len() < a.classes.len() {
        into.resize(a.classes.len(), 0);
    }
    for (t, n) in into.iter_mut().zip(&a.classes) {
        *t += n;
    }
}

fn classes_of(v: &[u64], l: &Layout) -> Vec<SizeClass> {
    let mut a = PyArena {
        classes: v.to_vec(),
        ..PyArena::default()
    };
    a.finish(l);
    a.size_classes
}

/// Walks the arenas in `regions` (anonymous read-write mappings, page-aligned).
pub fn walk<M: Memory>(mem: &M, l: &Layout, regions: &[(u64, u64)]) -> PymallocWalk {
    walk_until(
        mem,
        l,
        regions,
        std::time::Instant::now() + WALK_BUDGET,
        None,
    )
}

/// What a census is handed: each live block's address and bytes.
pub type BlockVisitor<'a> = dyn FnMut(u64, &[u8]) + 'a;

/// Walks the arenas like [`walk`], and hands each live block of every pool holding
/// any to `census` (read a pool at a time), within `budget`.
pub fn walk_with_census<M: Memory>(
    mem: &M,
    l: &Layout,
    regions: &[(u64, u64)],
    budget: std::time::Duration,
    census: &mut BlockVisitor<'_>,
) -> PymallocWalk {
    walk_until(
        mem,
        l,
        regions,
        std::time::Instant::now() + budget,
        Some(census),
    )
}

/// The live blocks of the pool read into `raw` (at `addr`): its header checked again
/// (the pool may have changed since), its free list followed inside the buffer.
/// Calls `each(block address, block bytes)` for every carved block not on the free
/// list; `false` if the header no longer reads as a pool's.
fn live_blocks(raw: &[u8], addr: u64, l: &Layout, each: &mut BlockVisitor<'_>) -> bool {
    let Some(header) = raw.get(..POOL_OVERHEAD as usize) else {
        return false;
    };
    let Some(p) = parse(header.try_into().expect("48 bytes"), addr, l) else {
        return false;
    };
    let next = u64::from(u32::from_le_bytes(raw[40..44].try_into().expect("4")));
    let carved = ((next - POOL_OVERHEAD) / p.block_bytes) as usize;
    let mut free = vec![false; carved];
    let mut at = u64::from_le_bytes(raw[8..16].try_into().expect("8"));
    // A free list longer than the pool's blocks loops: it ends there.
    for _ in 0..carved {
        let Some(i) = at
            .checked_sub(addr + POOL_OVERHEAD)
            .filter(|o| o.is_multiple_of(p.block_bytes))
            .map(|o| (o / p.block_bytes) as usize)
            .filter(|&i| i < carved && !free[i])
        else {
            break;
        };
        free[i] = true;
        let o = POOL_OVERHEAD as usize + i * p.block_bytes as usize;
        let Some(next) = raw.get(o..o + 8) else {
            break;
        };
        at = u64::from_le_bytes(next.try_into().expect("8"));
    }
    for (i, _) in free.iter().enumerate().filter(|(_, f)| !**f) {
        let o = POOL_OVERHEAD as usize + i * p.block_bytes as usize;
        if let Some(b) = raw.get(o..o + p.block_bytes as usize) {
            each(addr + o as u64, b);
        }
    }
    true
}

fn walk_until<M: Memory>(
    mem: &M,
    l: &Layout,
    regions: &[(u64, u64)],
    deadline: std::time::Instant,
    mut census: Option<&mut BlockVisitor<'_>>,
) -> PymallocWalk {
    let mut pool_buf = vec![
        0u8;
        if census.is_some() {
            l.pool_bytes as usize
        } else {
            0
        }
    ];
    let mut out = PymallocWalk {
        layout: Some(*l),
        ..PymallocWalk::default()
    };
    let mut arenas: Vec<PyArena> = Vec::new();
    let pages_per_pool = (l.pool_bytes / PAGE) as usize;
    // Pagemap is read this many pools at a time.
    const POOLS_PER_READ: u64 = 1024;
    'regions: for &(start, end) in regions {
        let first = start.next_multiple_of(l.pool_bytes);
        // The arena being filled: (index, end of its span).
        let mut current: Option<(u32, u64)> = None;
        let mut at = first;
        while at + l.pool_bytes <= end {
            if std::time::Instant::now() > deadline {
                out.incomplete = Some("stopped at the time budget (a very large heap)".into());
                break 'regions;
            }
            let chunk_end =
                (at + POOLS_PER_READ * l.pool_bytes).min(end - (end - at) % l.pool_bytes);
            let Ok(resident) = mem.resident(at, chunk_end) else {
                break;
            };
            for (i, pages) in resident.chunks_exact(pages_per_pool).enumerate() {
                let pool = at + i as u64 * l.pool_bytes;
                let resident = pages.iter().filter(|&&p| p).count() as u64 * PAGE;
                if current.is_some_and(|(_, e)| pool >= e) {
                    current = None;
                }
                if resident == 0 {
                    continue;
                }
                let header = pages[0]
                    .then(|| {
                        (0..2).find_map(|_| {
                            let mut raw = [0u8; POOL_OVERHEAD as usize];
                            mem.read(pool, &mut raw).ok()?;
                            parse(&raw, pool, l)
                        })
                    })
                    .flatten();
                // The census reads the pool up to its last carved block: pages past it
                // were never written and may not be resident.
                if let (Some(p), Some(each)) = (header, census.as_mut())
                    && p.in_use > 0
                {
                    let carved = (POOL_OVERHEAD + p.carved * p.block_bytes).min(l.pool_bytes);
                    let want = (carved.div_ceil(PAGE) as usize).min(pages.len());
                    let buf = &mut pool_buf[..want * PAGE as usize];
                    // Resident pages only: a page not resident was never written (a
                    // list's items past its length), or is swapped out, which the
                    // census does not bring back in. Zeros there hold no object.
                    let mut read = true;
                    for (i, page) in buf.chunks_mut(PAGE as usize).enumerate() {
                        if pages[i] {
                            read &= mem.read(pool + i as u64 * PAGE, page).is_ok();
                        } else {
                            page.fill(0);
                        }
                    }
                    if !read || !live_blocks(buf, pool, l, &mut **each) {
                        out.census_torn_pools += 1;
                    }
                }
                match (header, current) {
                    (Some(p), Some((idx, _))) if p.arena_index == idx => {}
                    (Some(p), _) => {
                        current = Some((p.arena_index, (pool + l.arena_bytes).min(end)));
                        arenas.push(PyArena::new(pool, l));
                    }
                    (None, Some(_)) => {}
                    (None, None) => continue,
                }
                arenas
                    .last_mut()
                    .expect("an arena")
                    .add(header, resident, l);
            }
            at = chunk_end;
        }
    }
    let mut all = Vec::new();
    let mut pinned = Vec::new();
    for a in &mut arenas {
        a.finish(l);
        out.arena_count += 1;
        out.resident_bytes += a.resident_bytes;
        out.in_use_bytes += a.in_use_bytes;
        out.free_resident_bytes += a.free_resident_bytes;
        out.blocks_in_use += a.blocks_in_use;
        out.block_capacity += a.block_capacity;
        merge(&mut all, a);
        out.spans.push((
            a.start,
            a.start + l.arena_bytes,
            a.resident_bytes - a.free_resident_bytes,
            a.free_resident_bytes,
        ));
        if a.mostly_empty() {
            let p = &mut out.pinned;
            p.arenas += 1;
            p.resident_bytes += a.resident_bytes;
            p.free_resident_bytes += a.free_resident_bytes;
            p.blocks_in_use += a.blocks_in_use;
            p.in_use_bytes += a.in_use_bytes;
            merge(&mut pinned, a);
        }
    }
    out.size_classes = classes_of(&all, l);
    out.pinned.size_classes = classes_of(&pinned, l);
    arenas.sort_by(|a, b| {
        b.free_resident_bytes
            .cmp(&a.free_resident_bytes)
            .then(a.start.cmp(&b.start))
    });
    arenas.truncate(ARENAS_KEPT);
    out.arenas = arenas;
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::memory::Laid;

    /// Lays out one pool header: `count` blocks in use of class `szidx`,
    /// `carved` blocks carved so far, the free list at block `free` (if any).
    fn lay_pool(
        m: &mut Laid,
        l: &Layout,
        pool: u64,
        arena_index: u32,
        szidx: u32,
        count: u32,
        carved: u64,
        free: Option<u64>,
    ) {
        let size = (u64::from(szidx) + 1) * l.alignment;
        m.put32(pool, count);
        m.put(
            pool + 8,
            free.map_or(0, |b| pool + POOL_OVERHEAD + b * size),
        );
        m.put32(pool + 32, arena_index);
        m.put32(pool + 36, szidx);
        m.put32(pool + 40, (POOL_OVERHEAD + carved * size) as u32);
        m.put32(pool + 44, (l.pool_bytes - size) as u32);
    }

    /// Every version's geometry, as obmalloc.c defines it on 64-bit.
    #[test]
    fn layouts_per_version() {
        let g = |maj, min| {
            Layout::for_version(maj, min)
                .map(|l| (l.pool_bytes, l.arena_bytes, l.alignment, l.classes))
        };
        assert_eq!(g(2, 7), Some((4096, 262144, 16, 16)));
        assert_eq!(g(3, 6), Some((4096, 262144, 16, 32)));
        assert_eq!(g(3, 7), Some((4096, 262144, 16, 32)));
        assert_eq!(Layout::for_version(2, 7).unwrap().older_alignment, Some(8));
        assert_eq!(Layout::for_version(3, 8).unwrap().older_alignment, None);
        assert_eq!(g(3, 8), Some((4096, 262144, 16, 32)));
        assert_eq!(g(3, 9), Some((4096, 262144, 16, 32)));
        assert_eq!(g(3, 10), Some((16384, 1 << 20, 16, 32)));
        assert_eq!(g(3, 14), Some((16384, 1 << 20, 16, 32)));
        assert_eq!(g(2, 6), None);
    }

    /// Two arenas of a version laid out in one mapping, as mmap places them side by
    /// side; the first is unaligned to its pool size (one pool fewer), the second
    /// holds a single survivor. Exact figures for each version's geometry.
    fn two_arenas(major: u32, minor: u32) {
        two_arenas_aligned(major, minor, None);
    }

    /// The same, laid out with `alignment` instead of the layout's own.
    fn two_arenas_aligned(major: u32, minor: u32, alignment: Option<u64>) {
        let walked = Layout::for_version(major, minor).unwrap();
        let mut l = walked;
        if let Some(a) = alignment {
            l.alignment = a;
        }
        let pool = l.pool_bytes;
        let pages = pool / PAGE;
        // The mapping starts one page past a pool boundary.
        let base = 0x7f00_0000_0000 + PAGE;
        let len = 2 * l.arena_bytes;
        let mut m = Laid::new(base, len);
        m.resident.iter_mut().for_each(|r| *r = false);
        let first = base.next_multiple_of(pool);
        let set_resident = |m: &mut Laid, p: u64, n: u64| {
            let i = ((p - base) / PAGE) as usize;
            m.resident[i..i + n as usize]
                .iter_mut()
                .for_each(|r| *r = true);
        };
        // Arena A (index 3): pool 0 full of class 0, pool 1 half used class 3,
        // pool 2 emptied (count 0, resident), pool 3 never used (not resident).
        let c0 = (pool - POOL_OVERHEAD) / l.alignment;
        lay_pool(&mut m, &l, first, 3, 0, c0 as u32, c0, None);
        set_resident(&mut m, first, pages);
        let c3 = (pool - POOL_OVERHEAD) / (4 * l.alignment);
        lay_pool(&mut m, &l, first + pool, 3, 3, (c3 / 2) as u32, c3, Some(1));
        set_resident(&mut m, first + pool, pages);
        lay_pool(&mut m, &l, first + 2 * pool, 3, 1, 0, 5, Some(0));
        set_resident(&mut m, first + 2 * pool, pages);
        // Arena B (index 4) starts where A's mapping ends, a page into a pool slot.
        let b_first = (base + l.arena_bytes).next_multiple_of(pool);
        // One live block of class 1 in an otherwise free, fully carved pool.
        let c1 = (pool - POOL_OVERHEAD) / (2 * l.alignment);
        lay_pool(&mut m, &l, b_first, 4, 1, 1, c1, Some(2));
        set_resident(&mut m, b_first, pages);
        lay_pool(&mut m, &l, b_first + pool, 4, 1, 0, c1, Some(0));
        set_resident(&mut m, b_first + pool, pages);
        // Garbage that looks half like a header in a slot of A's: rejected, and
        // counted as in use (it is resident inside A's span).
        m.put32(first + 4 * pool + 36, 1);
        set_resident(&mut m, first + 4 * pool, 1);

        let w = walk(&m, &walked, &[(base, base + len)]);
        assert_eq!(w.arena_count, 2, "{major}.{minor}");
        let size0 = l.alignment;
        let size3 = 4 * l.alignment;
        let size1 = 2 * l.alignment;
        let a_in_use = (c0 * size0 + POOL_OVERHEAD) + ((c3 / 2) * size3 + POOL_OVERHEAD) + PAGE;
        let b_in_use = size1 + POOL_OVERHEAD;
        assert_eq!(w.resident_bytes, 3 * pool + 2 * pool + PAGE);
        assert_eq!(w.in_use_bytes, a_in_use + b_in_use);
        assert_eq!(w.free_resident_bytes, 5 * pool + PAGE - a_in_use - b_in_use);
        assert_eq!(w.blocks_in_use, c0 + c3 / 2 + 1);
        assert_eq!(w.block_capacity, c0 + c3 + c1 + 2 * c1);
        assert_eq!(w.size_classes, {
            let mut v = vec![
                SizeClass {
                    block_bytes: size0,
                    blocks: c0,
                },
                SizeClass {
                    block_bytes: size3,
                    blocks: c3 / 2,
                },
                SizeClass {
                    block_bytes: size1,
                    blocks: 1,
                },
            ];
            v.sort_by_key(|c| std::cmp::Reverse(c.blocks * c.block_bytes));
            v
        });
        // B keeps two pools for one block: mostly empty; A is over a quarter used.
        let b = w.arenas.iter().find(|a| a.start == b_first).unwrap();
        assert!(b.mostly_empty());
        assert_eq!(w.pinned.arenas, 1);
        assert_eq!(w.pinned.blocks_in_use, 1);
        assert_eq!(w.pinned.resident_bytes, 2 * pool);
        assert_eq!(
            w.pinned.size_classes,
            vec![SizeClass {
                block_bytes: size1,
                blocks: 1
            }]
        );
        assert_eq!(w.spans.len(), 2);
        assert_eq!(w.spans[0].0, first);
        assert!(w.incomplete.is_none());
    }

    #[test]
    fn arenas_python_2_7() {
        two_arenas(2, 7);
    }

    /// 2.7 and 3.6 before 16-byte alignment was backported: 8-byte classes.
    #[test]
    fn arenas_early_releases_8_byte_aligned() {
        two_arenas_aligned(2, 7, Some(8));
        two_arenas_aligned(3, 6, Some(8));
    }

    #[test]
    fn arenas_python_3_6() {
        two_arenas(3, 6);
    }

    #[test]
    fn arenas_python_3_9() {
        two_arenas(3, 9);
    }

    #[test]
    fn arenas_python_3_11() {
        two_arenas(3, 11);
    }

    #[test]
    fn arenas_python_3_14() {
        two_arenas(3, 14);
    }

    /// Headers whose fields disagree are not pools; memory outside any arena is
    /// never claimed.
    #[test]
    fn rejects_inconsistent_headers() {
        let l = Layout::for_version(3, 11).unwrap();
        let base = 0x7f00_0000_0000;
        let mut m = Laid::new(base, 4 * l.pool_bytes);
        let good = |m: &mut Laid, p| lay_pool(m, &l, p, 7, 2, 3, 10, Some(4));
        let mut raw = [0u8; 48];
        good(&mut m, base);
        raw.copy_from_slice(&m.bytes[..48]);
        assert!(parse(&raw, base, &l).is_some());
        // Each field broken in turn.
        let breaks: [(usize, u32); 5] = [
            (36, 32),         // size class out of range
            (44, 16000),      // maxnextoffset not POOL_SIZE - size
            (40, 47 + 48),    // nextoffset off a block boundary
            (0, 11),          // more in use than carved
            (40, 16384 + 48), // nextoffset past the pool
        ];
        for (at, v) in breaks {
            let mut r = raw;
            r[at..at + 4].copy_from_slice(&v.to_le_bytes());
            assert!(parse(&r, base, &l).is_none(), "field at {at} = {v}");
        }
        // A free list pointing outside the pool.
        let mut r = raw;
        r[8..16].copy_from_slice(&(base + 3 * l.pool_bytes).to_le_bytes());
        assert!(parse(&r, base, &l).is_none());
        // Zeroed memory is not a pool, and resident junk alone makes no arena.
        let w = walk(
            &Laid::new(base, 4 * l.pool_bytes),
            &l,
            &[(base, base + 4 * l.pool_bytes)],
        );
        assert_eq!((w.arena_count, w.resident_bytes), (0, 0));
    }

    /// A walk past its deadline stops and says so.
    #[test]
    fn stops_at_deadline() {
        let l = Layout::for_version(3, 11).unwrap();
        let base = 0x7f00_0000_0000;
        let mut m = Laid::new(base, l.arena_bytes);
        lay_pool(&mut m, &l, base, 0, 0, 1, 1, None);
        let w = walk_until(
            &m,
            &l,
            &[(base, base + l.arena_bytes)],
            std::time::Instant::now(),
            None,
        );
        assert!(w.incomplete.is_some());
        assert_eq!(w.arena_count, 0);
    }
}
