//! Who keeps the heap alive: a conservative scan from the roots through the in-use
//! blocks, read from outside while the target runs.
//!
//! The roots are every place a pointer to a block may sit that is not a block itself:
//! the writable segments of the loaded objects (`.data`, `.bss`), each thread's stack
//! from its stack pointer up (thread-local storage lies above it), the threads'
//! registers where they were read, and every other writable mapping that is not the
//! allocator's heap (pymalloc arenas, chunks malloc mapped on their own, other
//! allocators' regions: scanned whole, so what they point to counts as held). Every
//! aligned word that points into a block — at its start or inside it — reaches it; a
//! reached block's words are followed in turn, depth first, so each block is
//! attributed to the root word that reached it first. What nothing reaches is
//! unreferenced: no pointer to it is left anywhere in the process (a "definite" leak,
//! in valgrind's words), unless the pointer is hidden (xor'ed, tagged, or kept only as
//! an offset), which a conservative scan cannot see.
//!
//! Bounded: the blocks held at most ([`MAX_BLOCKS`]), the bytes read (`max_bytes`) and
//! the time (`deadline`); a scan cut short says so, and then nothing is called
//! unreferenced (a block may be referenced from what was not read).

use std::time::Instant;

use crate::process::memory::Memory;

/// Blocks a scan holds at most (12 bytes each, and 4 more for the result).
pub const MAX_BLOCKS: usize = 1 << 23;
/// A block's words are read this many bytes at a time.
const CHUNK: usize = 1 << 16;
/// Not reached by any root.
pub const UNREACHED: u32 = u32::MAX;

/// In-use blocks, by address: where each starts and how long it is.
#[derive(Clone, Debug, Default)]
pub struct Blocks {
    addr: Vec<u64>,
    len: Vec<u32>,
    /// The lowest start and the highest end: a word outside is no block's.
    lo: u64,
    hi: u64,
}

impl Blocks {
    /// From `(start, length)` pairs, in any order. Overlapping blocks (a heap changed
    /// while walked) keep the first by address; lengths above 4 GiB are cut (such a
    /// block was mapped on its own and is not in a heap).
    pub fn new(mut v: Vec<(u64, u64)>) -> Self {
        v.sort_unstable();
        let mut b = Self {
            lo: u64::MAX,
            ..Self::default()
        };
        let mut end = 0u64;
        for (a, n) in v {
            if n == 0 || a < end {
                continue;
            }
            let n = n.min(u64::from(u32::MAX));
            let Some(e) = a.checked_add(n) else { continue };
            b.addr.push(a);
            b.len.push(n as u32);
            b.lo = b.lo.min(a);
            b.hi = b.hi.max(e);
            end = e;
        }
        b
    }

    /// How many blocks.
    pub fn len(&self) -> usize {
        self.addr.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.addr.is_empty()
    }

    /// Block `i`: its start and length.
    pub fn get(&self, i: usize) -> (u64, u64) {
        (self.addr[i], u64::from(self.len[i]))
    }

    /// Whether a block starts at `a`.
    pub fn contains(&self, a: u64) -> bool {
        self.addr.binary_search(&a).is_ok()
    }

    /// The block `p` points into.
    fn find(&self, p: u64) -> Option<usize> {
        if p < self.lo || p >= self.hi {
            return None;
        }
        let i = self.addr.partition_point(|&a| a <= p).checked_sub(1)?;
        (p - self.addr[i] < u64::from(self.len[i])).then_some(i)
    }
}

/// Where a root's words are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// `[start, end)` of the target's memory.
    Memory {
        /// The first byte.
        start: u64,
        /// One past the last.
        end: u64,
    },
    /// Words read already (a thread's registers).
    Words(Vec<u64>),
}

/// A root: a name for the report, and its words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Root {
    /// `thread 4711's stack`, `/usr/lib/libfoo.so .bss`, `anonymous mapping at 0x7f…`.
    pub name: String,
    /// What kind of root: where a pointer in it lives.
    pub kind: RootKind,
    /// The loaded object whose data it is (its globals are named by its symbols).
    pub object: Option<String>,
    /// Its words.
    pub source: Source,
}

/// Where a root's pointers live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RootKind {
    /// A loaded object's writable data: its globals.
    Data,
    /// A thread's stack (and its thread-local storage above it).
    Stack,
    /// A thread's registers.
    Registers,
    /// Another writable mapping: memory outside the walked heap (pymalloc's arenas,
    /// chunks mapped on their own, other allocators').
    Mapping,
}

/// What a scan found.
#[derive(Clone, Debug, Default)]
pub struct Scan {
    /// Per block: the index in `holders` of the root word that reached it first, or
    /// [`UNREACHED`].
    pub via: Vec<u32>,
    /// Root words that reached a block: (root index, the word's address; 0 for a
    /// register).
    pub holders: Vec<(u32, u64)>,
    /// Bytes read: roots and blocks.
    pub bytes_scanned: u64,
    /// Why the scan stopped short, if it did.
    pub incomplete: Option<String>,
}

impl Scan {
    /// The blocks nothing reached, when the scan was complete.
    pub fn unreferenced(&self) -> impl Iterator<Item = usize> + '_ {
        self.via
            .iter()
            .enumerate()
            .filter(|(_, v)| **v == UNREACHED && self.incomplete.is_none())
            .map(|(i, _)| i)
    }
}

struct Scanner<'a, M: Memory> {
    mem: &'a M,
    blocks: &'a Blocks,
    /// The heap's resident runs, where known: a block is read only there (its pages
    /// never touched hold zeros; a page swapped out is not read in).
    resident: Option<&'a [(u64, u64)]>,
    scan: Scan,
    stack: Vec<u32>,
    buf: Vec<u8>,
    deadline: Instant,
    max_bytes: u64,
}

impl<M: Memory> Scanner<'_, M> {
    fn out_of_budget(&mut self) -> bool {
        if self.scan.incomplete.is_some() {
            return true;
        }
        if self.scan.bytes_scanned > self.max_bytes {
            self.scan.incomplete = Some(format!(
                "stopped after reading {} MiB",
                self.max_bytes >> 20
            ));
        } else if Instant::now() >= self.deadline {
            self.scan.incomplete = Some("stopped at the time budget".into());
        }
        self.scan.incomplete.is_some()
    }

    /// A word found: if it points into a block nothing reached yet, that block is
    /// reached through `holder`, and followed.
    #[inline]
    fn word(&mut self, w: u64, holder: u32) -> bool {
        match self.blocks.find(w) {
            Some(b) if self.scan.via[b] == UNREACHED => {
                self.scan.via[b] = holder;
                self.stack.push(b as u32);
                true
            }
            _ => false,
        }
    }

    /// A root word at `at` reached a block: it becomes a holder, and everything the
    /// block reaches is followed before the next root word.
    fn root_word(&mut self, w: u64, root: u32, at: u64) {
        let holder = self.scan.holders.len() as u32;
        if self.word(w, holder) {
            self.scan.holders.push((root, at));
            self.drain();
        }
    }

    fn drain(&mut self) {
        while let Some(b) = self.stack.pop() {
            if self.out_of_budget() {
                self.stack.clear();
                return;
            }
            let holder = self.scan.via[b as usize];
            let (start, len) = self.blocks.get(b as usize);
            let parts = match self.resident {
                Some(runs) => {
                    let end = start + len;
                    let first = runs.partition_point(|r| r.1 <= start);
                    runs[first..]
                        .iter()
                        .take_while(|r| r.0 < end)
                        .map(|r| (r.0.max(start), r.1.min(end)))
                        .collect()
                }
                None => vec![(start, start + len)],
            };
            for (start, end) in parts {
                let mut at = start.next_multiple_of(8);
                while at + 8 <= end {
                    let n = ((end - at) as usize / 8 * 8).min(CHUNK);
                    let mut buf = std::mem::take(&mut self.buf);
                    buf.resize(n, 0);
                    let ok = self.mem.read(at, &mut buf).is_ok();
                    self.scan.bytes_scanned += n as u64;
                    if ok {
                        for w in buf.chunks_exact(8) {
                            let w = u64::from_le_bytes(w.try_into().expect("8 bytes"));
                            self.word(w, holder);
                        }
                    }
                    self.buf = buf;
                    at += n as u64;
                }
            }
        }
    }
}

/// Scans from `roots` through `blocks` in `mem`, within `deadline` and `max_bytes`,
/// reading blocks only in `resident` runs (sorted) where given.
pub fn scan(
    mem: &impl Memory,
    blocks: &Blocks,
    resident: Option<&[(u64, u64)]>,
    roots: &[Root],
    deadline: Instant,
    max_bytes: u64,
) -> Scan {
    let mut s = Scanner {
        mem,
        blocks,
        resident,
        scan: Scan {
            via: vec![UNREACHED; blocks.len()],
            ..Scan::default()
        },
        stack: Vec::new(),
        buf: Vec::with_capacity(CHUNK),
        deadline,
        max_bytes,
    };
    if blocks.len() > MAX_BLOCKS {
        s.scan.incomplete = Some(format!("the heap holds more than {MAX_BLOCKS} blocks"));
        return s.scan;
    }
    let mut region = vec![0u8; 1 << 20];
    for (r, root) in roots.iter().enumerate() {
        let r = r as u32;
        match &root.source {
            Source::Words(words) => {
                for &w in words {
                    s.root_word(w, r, 0);
                }
            }
            Source::Memory { start, end } => {
                // Only its resident pages: a thread stack's 8 MiB are mostly never
                // touched (reading them would fault in the zero page, page by page),
                // and a page swapped out is not read in (noted: see `swapped`).
                let runs = match mem.residency(start & !0xfff, end.next_multiple_of(0x1000)) {
                    Ok(r) => r.runs().to_vec(),
                    Err(_) => vec![(*start, *end)],
                };
                for (rs, re) in runs {
                    let (start, end) = (&(rs.max(*start)), &(re.min(*end)));
                    let mut at = start.next_multiple_of(8);
                    while at + 8 <= *end {
                        if s.out_of_budget() {
                            return s.scan;
                        }
                        let n = ((end - at) as usize / 8 * 8).min(region.len());
                        let buf = &mut region[..n];
                        s.scan.bytes_scanned += n as u64;
                        if mem.read(at, buf).is_ok() {
                            // The root region is copied before its words are followed: a
                            // block read meanwhile reuses the scanner's own buffer.
                            for (k, w) in buf.chunks_exact(8).enumerate() {
                                let w = u64::from_le_bytes(w.try_into().expect("8 bytes"));
                                s.root_word(w, r, at + 8 * k as u64);
                            }
                        }
                        at += n as u64;
                    }
                }
            }
        }
    }
    s.out_of_budget();
    s.scan
}

/// What holds part of the heap: a root (a global by name where the object has a
/// symbol for it), with the blocks and bytes reached through it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HeldBy {
    /// `request_cache in reach`, `thread 4711's stack`, `anonymous mapping at 0x7f…`.
    pub root: String,
    /// Where the pointer lives.
    pub kind: RootKind,
    /// Blocks reached through it, directly or through other blocks.
    pub blocks: u64,
    /// Their bytes (usable sizes).
    pub bytes: u64,
}

/// How the scans went.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ScanStats {
    /// Bytes read by both passes: roots and blocks.
    pub bytes_scanned: u64,
    /// Time both passes took, ms.
    pub ms: u64,
    /// Passes made (a block is unreferenced only when both found it so).
    pub passes: u32,
    /// How long the target was stopped, ms: never (registers are not read).
    pub stopped_ms: u64,
    /// In-use blocks and roots of the last pass.
    pub blocks: u64,
    /// Roots scanned.
    pub roots: u64,
    /// Why a pass stopped short: then nothing is called unreferenced.
    pub incomplete: Option<String>,
}

/// The reachability of the heap, from two scans.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Reachability {
    /// Blocks unreferenced in both passes, unchanged (start, length), at most
    /// [`MAX_LISTED`] of them.
    pub unreferenced: Vec<(u64, u64)>,
    /// All of them: blocks and bytes.
    pub unreferenced_blocks: u64,
    /// Their bytes.
    pub unreferenced_bytes: u64,
    /// The roots holding the most, largest first.
    pub held_by: Vec<HeldBy>,
    /// Every reached block (start) with the index of its holder's name in
    /// `holder_names`: what holds a given stack's blocks.
    pub reached: Vec<(u64, u32)>,
    /// Holders' names.
    pub holder_names: Vec<String>,
    /// The scans.
    pub scan: ScanStats,
    /// Monotonic time the first pass started, ns (a block allocated since is not
    /// confirmed).
    pub first_pass_ns: u64,
}

/// Unreferenced blocks listed at most (the totals count them all).
pub const MAX_LISTED: usize = 100_000;

/// Blocks unreferenced in both scans, unchanged.
pub fn confirmed(first: (&Blocks, &Scan), second: (&Blocks, &Scan)) -> Vec<(u64, u64)> {
    let before: rustc_hash::FxHashSet<(u64, u64)> =
        first.1.unreferenced().map(|i| first.0.get(i)).collect();
    second
        .1
        .unreferenced()
        .map(|i| second.0.get(i))
        .filter(|b| before.contains(b))
        .collect()
}

/// Holders named at most (the largest first; the rest hold less than they do).
const MAX_NAMED: usize = 10_000;

/// Reached blocks summed by holder: `name(root, word address)` names each holder (a
/// global's symbol, a stack), the `top` largest first; and each reached block with
/// the index of its holder's name in `names`, where it was named.
pub struct Held {
    /// The largest holders.
    pub top: Vec<HeldBy>,
    /// Holders' names.
    pub names: Vec<String>,
    /// (block start, index in `names`) of every reached block whose holder was named.
    pub blocks: Vec<(u64, u32)>,
}

/// See [`Held`].
pub fn held_by(
    blocks: &Blocks,
    scan: &Scan,
    roots: &[Root],
    mut name: impl FnMut(&Root, u64) -> String,
    top: usize,
) -> Held {
    let mut per_holder = vec![(0u64, 0u64); scan.holders.len()];
    for (i, &v) in scan.via.iter().enumerate() {
        if v != UNREACHED {
            let e = &mut per_holder[v as usize];
            e.0 += 1;
            e.1 += blocks.get(i).1;
        }
    }
    let mut named: rustc_hash::FxHashMap<(String, RootKind), (u64, u64)> = Default::default();
    let mut names: Vec<String> = Vec::new();
    let mut index: rustc_hash::FxHashMap<String, u32> = Default::default();
    let mut holder_name = vec![u32::MAX; per_holder.len()];
    // Naming costs a symbol lookup: only holders that hold something, the largest
    // first.
    let mut order: Vec<usize> = (0..per_holder.len())
        .filter(|&h| per_holder[h].0 > 0)
        .collect();
    order.sort_unstable_by_key(|&h| std::cmp::Reverse(per_holder[h].1));
    for h in order.into_iter().take(MAX_NAMED) {
        let (r, at) = scan.holders[h];
        let root = &roots[r as usize];
        let n = name(root, at);
        holder_name[h] = *index.entry(n.clone()).or_insert_with(|| {
            names.push(n.clone());
            (names.len() - 1) as u32
        });
        let e = named.entry((n, root.kind)).or_default();
        e.0 += per_holder[h].0;
        e.1 += per_holder[h].1;
    }
    let reached: Vec<(u64, u32)> = scan
        .via
        .iter()
        .enumerate()
        .filter(|(_, v)| **v != UNREACHED && holder_name[**v as usize] != u32::MAX)
        .map(|(i, v)| (blocks.get(i).0, holder_name[*v as usize]))
        .collect();
    let mut out: Vec<HeldBy> = named
        .into_iter()
        .map(|((root, kind), (blocks, bytes))| HeldBy {
            root,
            kind,
            blocks,
            bytes,
        })
        .collect();
    out.sort_unstable_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.root.cmp(&b.root)));
    out.truncate(top);
    Held {
        top: out,
        names,
        blocks: reached,
    }
}

/// A glibc tcache's chunk size (`tcache_perthread_struct`: 64 counts of 2 bytes, 64
/// entries; glibc 2.30+), header included.
pub const TCACHE_CHUNK: u64 = 0x290;
/// Freed chunks followed per tcache bin at most (glibc's `tcache_count` tunable caps
/// it at 65535; 7 by default).
const TCACHE_MAX_CHAIN: u16 = 1024;

/// The freed chunks glibc's per-thread caches hold: to the heap walk they look in use
/// (a chunk parked in a tcache keeps its in-use bit), but they are free. Each
/// candidate (the user address of an in-use chunk of [`TCACHE_CHUNK`] bytes) is
/// believed to be a thread's `tcache_perthread_struct` only when its counts and
/// entries agree (a bin with entries has a count, and none without); each bin's list
/// is followed through its blocks (`is_block`), its links demangled as glibc 2.32+
/// stores them (`next ^ (address >> 12)`, safe-linking), else taken as they are.
pub fn tcache_cached(
    mem: &impl Memory,
    candidates: &[u64],
    is_block: impl Fn(u64) -> bool,
) -> rustc_hash::FxHashSet<u64> {
    let mut cached = rustc_hash::FxHashSet::default();
    let mut raw = [0u8; 640];
    for &t in candidates {
        if mem.read(t, &mut raw).is_err() {
            continue;
        }
        let count = |i: usize| u16::from_le_bytes([raw[2 * i], raw[2 * i + 1]]);
        let entry = |i: usize| {
            let o = 128 + 8 * i;
            u64::from_le_bytes(raw[o..o + 8].try_into().expect("8 bytes"))
        };
        let agree = (0..64).all(|i| (count(i) == 0) == (entry(i) == 0));
        if !agree || (0..64).all(|i| count(i) == 0) {
            continue;
        }
        for i in 0..64 {
            let mut e = entry(i);
            let mut n = 0;
            while e != 0 && n < count(i).min(TCACHE_MAX_CHAIN) && is_block(e) && cached.insert(e) {
                n += 1;
                let mut w = [0u8; 8];
                if mem.read(e, &mut w).is_err() {
                    break;
                }
                let stored = u64::from_le_bytes(w);
                let demangled = stored ^ (e >> 12);
                e = if demangled == 0 || is_block(demangled) {
                    demangled
                } else {
                    stored
                };
            }
        }
    }
    cached
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::memory::Laid;

    fn far() -> Instant {
        Instant::now() + std::time::Duration::from_secs(60)
    }

    /// A heap of five blocks at 0x2000 + 0x100 i, 0x80 bytes each: a global at 0x1000
    /// points to block 0, which points into the middle of block 1; a stack word points
    /// to block 3; a register holds block 4's address; block 2 is pointed to only by
    /// itself (a cycle nothing reaches) and by dead stack below the stack pointer.
    #[test]
    fn reached_and_unreferenced() {
        let mut m = Laid::new(0, 0x4000);
        let blocks = Blocks::new((0..5).map(|i| (0x2000 + 0x100 * i, 0x80)).collect());
        m.put(0x1008, 0x2000);
        m.put(0x2010, 0x2140);
        m.put(0x2200, 0x2200);
        m.put(0x3008, 0x2300);
        m.put(0x2ff8, 0x2200);
        let roots = vec![
            Root {
                name: "globals".into(),
                kind: RootKind::Data,
                object: None,
                source: Source::Memory {
                    start: 0x1000,
                    end: 0x1100,
                },
            },
            Root {
                name: "stack".into(),
                kind: RootKind::Stack,
                object: None,
                source: Source::Memory {
                    start: 0x3000,
                    end: 0x3100,
                },
            },
            Root {
                name: "registers".into(),
                kind: RootKind::Registers,
                object: None,
                source: Source::Words(vec![7, 0x2400]),
            },
        ];
        let s = scan(&m, &blocks, None, &roots, far(), u64::MAX);
        assert_eq!(s.incomplete, None);
        assert_eq!(s.unreferenced().collect::<Vec<_>>(), vec![2]);
        // Blocks 0 and 1 through the global's word at 0x1008.
        assert_eq!(s.holders[s.via[0] as usize], (0, 0x1008));
        assert_eq!(s.via[1], s.via[0]);
        assert_eq!(s.holders[s.via[3] as usize], (1, 0x3008));
        assert_eq!(s.holders[s.via[4] as usize], (2, 0));
    }

    /// A tcache with two bins: bin 0 holds two chunks linked with safe-linking, bin 3
    /// one; a candidate whose counts and entries disagree is not a tcache.
    #[test]
    fn tcache_chunks_are_free() {
        let mut m = Laid::new(0, 0x10000);
        let t = 0x1000;
        m.bytes[t as usize] = 2;
        m.bytes[t as usize + 6] = 1;
        m.put(t + 128, 0x3010);
        m.put(t + 128 + 24, 0x5010);
        // 0x3010 → 0x4010, stored mangled.
        m.put(0x3010, 0x4010 ^ (0x3010 >> 12));
        m.put(0x4010, 0x4010 >> 12);
        let blocks = |a: u64| [0x3010, 0x4010, 0x5010].contains(&a);
        let c = tcache_cached(&m, &[t], blocks);
        assert_eq!(c.len(), 3, "{c:?}");
        // Counts without entries: not a tcache.
        let mut m2 = Laid::new(0, 0x10000);
        m2.bytes[t as usize] = 2;
        assert!(tcache_cached(&m2, &[t], blocks).is_empty());
    }

    #[test]
    fn bounded() {
        let mut m = Laid::new(0, 0x4000);
        // Every block points to the next and to itself; unreadable blocks are skipped.
        let blocks = Blocks::new(
            (0..16)
                .map(|i| (0x2000 + 0x80 * i, 0x80))
                .chain([(0xdead_0000, 0x1000), (u64::MAX - 4, 64), (0x9000, 0)])
                .collect(),
        );
        for i in 0..16u64 {
            m.put(0x2000 + 0x80 * i, 0x2000 + 0x80 * (i + 1));
            m.put(0x2008 + 0x80 * i, 0x2000 + 0x80 * i);
        }
        m.put(0x1000, 0x2000);
        let roots = vec![Root {
            name: "g".into(),
            kind: RootKind::Data,
            object: None,
            source: Source::Memory {
                start: 0x1000,
                end: 0x1008,
            },
        }];
        let s = scan(&m, &blocks, None, &roots, far(), u64::MAX);
        assert_eq!(blocks.len(), 17);
        assert_eq!(s.unreferenced().count(), 1, "only the unreadable block");
        // Out of bytes: incomplete, and then nothing is called unreferenced.
        let s = scan(&m, &blocks, None, &roots, far(), 0x200);
        assert!(s.incomplete.is_some());
        assert_eq!(s.unreferenced().count(), 0);
        let s = scan(&m, &blocks, None, &roots, Instant::now(), u64::MAX);
        assert!(s.incomplete.is_some());
    }
}
