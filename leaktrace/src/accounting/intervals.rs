//! The traced process's address space as non-overlapping intervals that can
//! shrink, split and move, each remembering who created it.

use std::collections::BTreeMap;

/// What kind of memory a region is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RegionKind {
    /// Anonymous mapping (`MAP_ANONYMOUS`) not made by an allocator as below.
    Anon,
    /// An address-space reservation made inaccessible (`PROT_NONE`) by an allocator:
    /// a glibc per-thread arena heap (64 MiB), committed piecewise with mprotect.
    ArenaReserve,
    /// An accessible anonymous mapping made by an allocator: a chunk above the mmap
    /// threshold (glibc), an allocator's own arena or span.
    AllocatorChunk,
    /// An inaccessible (`PROT_NONE`) anonymous reservation made outside the
    /// allocator (thread stack guards, runtimes reserving address space): not
    /// memory until parts of it are made accessible with mprotect.
    Reserved,
    /// A pymalloc arena: an anonymous read-write mapping of exactly the arena size
    /// (1 MiB on CPython 3.10+, 256 KiB before) in a CPython process.
    PyArena,
    /// File-backed mapping.
    File,
    /// Part of the brk heap.
    Brk,
}

/// One interval `[start, end)` and its origin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// One past the last byte.
    pub end: u64,
    /// Kind of memory.
    pub kind: RegionKind,
    /// Stack id of the call that created it.
    pub stack_id: i64,
    /// Monotonic time of creation, ns.
    pub ts_ns: u64,
    /// Thread that created it.
    pub tid: u32,
    /// Made by a probed allocator call (brk growth or a chunk of malloc's): memory the
    /// heap's blocks stand for, counted with them rather than as a mapping of its own.
    pub by_allocator: bool,
}

/// Non-overlapping intervals keyed by start address.
#[derive(Debug, Default)]
pub struct RegionMap {
    regions: BTreeMap<u64, Region>,
}

impl RegionMap {
    /// Changes the kind of every region of kind `from` spanning exactly `len` bytes.
    pub fn reclassify(&mut self, from: RegionKind, len: u64, to: RegionKind) {
        for (&start, r) in &mut self.regions {
            if r.kind == from && r.end - start == len {
                r.kind = to;
            }
        }
    }

    /// Inserts `[start, start+len)`, first removing whatever overlapped it
    /// (as `MAP_FIXED` does). Returns the removed pieces.
    pub fn insert(&mut self, start: u64, len: u64, region: Region) -> Vec<(u64, Region)> {
        let removed = self.remove(start, len);
        if len > 0 {
            self.regions.insert(
                start,
                Region {
                    end: start.saturating_add(len),
                    ..region
                },
            );
        }
        removed
    }

    /// Removes `[start, start+len)`, trimming or splitting regions that straddle
    /// its edges. Returns the removed pieces, each clipped to the range.
    pub fn remove(&mut self, start: u64, len: u64) -> Vec<(u64, Region)> {
        let end = start.saturating_add(len);
        let mut removed = Vec::new();
        if len == 0 {
            return removed;
        }
        // The region starting before `start` may reach into the range.
        if let Some((&s, &r)) = self.regions.range(..start).next_back()
            && r.end > start
        {
            // Keep its head [s, start).
            self.regions.insert(s, Region { end: start, ..r });
            if r.end > end {
                // The range sits inside it: split, keeping the tail too.
                self.regions.insert(end, r);
                removed.push((start, Region { end, ..r }));
                return removed;
            }
            removed.push((start, r));
        }
        let inside: Vec<u64> = self.regions.range(start..end).map(|(&s, _)| s).collect();
        for s in inside {
            let r = self.regions.remove(&s).expect("key just listed");
            if r.end > end {
                // Keep its tail [end, r.end).
                self.regions.insert(end, r);
                removed.push((s, Region { end, ..r }));
            } else {
                removed.push((s, r));
            }
        }
        removed
    }

    /// Regions overlapping `[start, start+len)`, clipped to it, in address order.
    pub fn overlapping(&self, start: u64, len: u64) -> Vec<(u64, Region)> {
        let end = start.saturating_add(len);
        let mut out = Vec::new();
        if let Some((&s, &r)) = self.regions.range(..start).next_back()
            && r.end > start
        {
            out.push((
                s.max(start),
                Region {
                    end: r.end.min(end),
                    ..r
                },
            ));
        }
        for (&s, &r) in self.regions.range(start..end) {
            out.push((
                s,
                Region {
                    end: r.end.min(end),
                    ..r
                },
            ));
        }
        out
    }

    /// Iterates over `(start, region)` in address order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &Region)> {
        self.regions.iter().map(|(&s, r)| (s, r))
    }

    /// Total bytes of regions of `kind`.
    pub fn bytes_of(&self, kind: RegionKind) -> u64 {
        self.regions
            .iter()
            .filter(|(_, r)| r.kind == kind)
            .map(|(&s, r)| r.end - s)
            .sum()
    }

    /// Number of regions.
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// Whether there are no regions.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anon(stack: i64) -> Region {
        Region {
            end: 0,
            kind: RegionKind::Anon,
            stack_id: stack,
            ts_ns: 0,
            tid: 0,
            by_allocator: false,
        }
    }

    fn spans(m: &RegionMap) -> Vec<(u64, u64, i64)> {
        m.iter().map(|(s, r)| (s, r.end, r.stack_id)).collect()
    }

    /// Interval cases, each as (operations, expected regions afterwards).
    #[test]
    fn shrink_split_replace_and_remove() {
        // (start, len, stack) inserts, then (start, len) removals, then expected spans.
        type Case = (
            &'static [(u64, u64, i64)],
            &'static [(u64, u64)],
            &'static [(u64, u64, i64)],
        );
        let cases: &[Case] = &[
            // Unmap the head.
            (
                &[(0x1000, 0x4000, 1)],
                &[(0x1000, 0x1000)],
                &[(0x2000, 0x5000, 1)],
            ),
            // Unmap the tail.
            (
                &[(0x1000, 0x4000, 1)],
                &[(0x4000, 0x1000)],
                &[(0x1000, 0x4000, 1)],
            ),
            // Unmap the middle: split in two.
            (
                &[(0x1000, 0x4000, 1)],
                &[(0x2000, 0x1000)],
                &[(0x1000, 0x2000, 1), (0x3000, 0x5000, 1)],
            ),
            // Unmap across two regions and a hole.
            (
                &[(0x1000, 0x2000, 1), (0x5000, 0x2000, 2)],
                &[(0x2000, 0x4000)],
                &[(0x1000, 0x2000, 1), (0x6000, 0x7000, 2)],
            ),
            // Unmap exactly one region of several.
            (
                &[
                    (0x1000, 0x1000, 1),
                    (0x2000, 0x1000, 2),
                    (0x3000, 0x1000, 3),
                ],
                &[(0x2000, 0x1000)],
                &[(0x1000, 0x2000, 1), (0x3000, 0x4000, 3)],
            ),
            // Unmap untracked space: nothing changes.
            (
                &[(0x1000, 0x1000, 1)],
                &[(0x8000, 0x1000)],
                &[(0x1000, 0x2000, 1)],
            ),
            // MAP_FIXED over the middle of an older mapping replaces that part.
            (
                &[(0x1000, 0x4000, 1), (0x2000, 0x1000, 2)],
                &[],
                &[
                    (0x1000, 0x2000, 1),
                    (0x2000, 0x3000, 2),
                    (0x3000, 0x5000, 1),
                ],
            ),
        ];
        for (i, (inserts, removes, expected)) in cases.iter().enumerate() {
            let mut m = RegionMap::default();
            for &(s, l, st) in *inserts {
                m.insert(s, l, anon(st));
            }
            for &(s, l) in *removes {
                m.remove(s, l);
            }
            assert_eq!(spans(&m), expected.to_vec(), "case {i}");
        }
    }

    /// Removal reports the clipped pieces it took out, so callers can subtract them per stack.
    #[test]
    fn remove_reports_clipped_pieces() {
        let mut m = RegionMap::default();
        m.insert(0x1000, 0x3000, anon(7));
        m.insert(0x6000, 0x2000, anon(8));
        let got: Vec<_> = m
            .remove(0x3000, 0x4000)
            .into_iter()
            .map(|(s, r)| (s, r.end, r.stack_id))
            .collect();
        assert_eq!(got, vec![(0x3000, 0x4000, 7), (0x6000, 0x7000, 8)]);
        assert_eq!(m.bytes_of(RegionKind::Anon), 0x2000 + 0x1000);
        let inner: Vec<_> = m
            .overlapping(0x1800, 0x6000)
            .into_iter()
            .map(|(s, r)| (s, r.end))
            .collect();
        assert_eq!(inner, vec![(0x1800, 0x3000), (0x7000, 0x7800)]);
    }
}
