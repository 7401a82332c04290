//! Where RSS goes: every resident byte of the target, classified from its state
//! (`/proc/PID/smaps`, the thread stack pointers and the allocator walks), whether it
//! was allocated before or after attach.
//!
//! Each mapping's resident bytes split into its anonymous pages and the rest. The rest
//! is `file` (per object) or `shmem` (memfd, SysV, `/dev/shm`, shared anonymous
//! mappings). Anonymous pages are glibc's heaps (the `[heap]` mapping and the arena
//! heaps: in use or free by the walk, `heap-unwalked` where the walk did not reach),
//! `thread-stacks` (the mapping holding a thread's stack pointer, and `[stack]`),
//! chunks malloc mapped on their own (`heap-mmapped`), pymalloc's arenas, a Go
//! program's heap arenas (`go-heap`, by address), or `other-anon`. When another
//! allocator serves malloc, the brk heap pages glibc's walk does not reach are named
//! after it (tcmalloc grows its heap with brk). The parts sum to smaps' resident bytes (`rss_bytes`); `vmrss_bytes` is
//! the kernel's batched counter beside it (top's RES).

use serde::{Deserialize, Serialize};

use crate::{heap::glibc::HeapWalk, process::procfs::SmapsEntry, units::bytes};

/// What a part of RSS is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PartKind {
    /// glibc heap pages holding blocks in use (or chunk headers).
    HeapInUse,
    /// glibc heap pages that are free but resident: memory the allocator keeps.
    HeapFree,
    /// Resident pages of glibc's heaps the walk did not classify.
    HeapUnwalked,
    /// Chunks malloc mapped on their own (above the mmap threshold), in use.
    HeapMmapped,
    /// pymalloc arenas' pages holding objects.
    PymallocInUse,
    /// pymalloc arenas' free pages and blocks, resident.
    PymallocFree,
    /// Pages another allocator counts as holding allocations (jemalloc's active
    /// pages), read from its own state.
    AllocatorInUse,
    /// Freed pages another allocator keeps resident (jemalloc's dirty and muzzy
    /// pages), read from its own state.
    AllocatorFree,
    /// A Go program's heap arenas (anonymous mappings where Go's runtime places them).
    GoHeap,
    /// Thread stacks.
    ThreadStacks,
    /// Other anonymous memory (private mappings, written file pages, JIT code…).
    OtherAnon,
    /// Pages of mapped files (code, data, mapped files), per object, and the pages
    /// the kernel maps in ([vdso], [vvar]).
    File,
    /// Shared memory.
    Shmem,
}

impl PartKind {
    /// The kind as named in the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HeapInUse => "heap-in-use",
            Self::HeapFree => "heap-free",
            Self::HeapUnwalked => "heap-unwalked",
            Self::HeapMmapped => "heap-mmapped",
            Self::PymallocInUse => "pymalloc-in-use",
            Self::PymallocFree => "pymalloc-free",
            Self::AllocatorInUse => "allocator-in-use",
            Self::AllocatorFree => "allocator-free",
            Self::GoHeap => "go-heap",
            Self::ThreadStacks => "thread-stacks",
            Self::OtherAnon => "other-anon",
            Self::File => "file",
            Self::Shmem => "shmem",
        }
    }
}

/// One part of RSS.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    /// What it is.
    pub kind: PartKind,
    /// Resident bytes.
    pub bytes: u64,
    /// Which arena, object, thread or mapping.
    pub detail: String,
}

/// Where RSS goes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryMap {
    /// RSS as smaps counts it, page by page, at the moment of the composition.
    pub rss_bytes: u64,
    /// `VmRSS` read at the same moment (top's RES): the kernel batches this counter per
    /// CPU, so it may differ from `rss_bytes` by a few hundred KiB.
    pub vmrss_bytes: u64,
    /// Its parts, by kind, largest first within a kind.
    pub parts: Vec<Part>,
    /// Resident bytes the parts do not account for (or account for twice).
    pub unexplained_bytes: u64,
}

impl MemoryMap {
    /// Total bytes of one kind.
    pub fn total(&self, kind: PartKind) -> u64 {
        self.parts
            .iter()
            .filter(|p| p.kind == kind)
            .map(|p| p.bytes)
            .sum()
    }
}

/// The target's state the composition is read from.
#[derive(Debug, Default)]
pub struct State<'a> {
    /// `/proc/PID/smaps`.
    pub smaps: &'a [SmapsEntry],
    /// `VmRSS`.
    pub vmrss_bytes: u64,
    /// glibc's heaps, walked now.
    pub glibc: Option<&'a HeapWalk>,
    /// The heaps' address ranges: the brk heap and each arena heap's mapping.
    pub heap_ranges: &'a [(u64, u64)],
    /// Chunks malloc mapped on their own: (start, end, resident bytes).
    pub mmapped: &'a [(u64, u64, u64)],
    /// pymalloc arenas: (address, resident bytes in use, resident bytes free).
    pub pymalloc: &'a [(u64, u64, u64)],
    /// Each thread's stack pointer: (tid, sp).
    pub stack_pointers: &'a [(u32, u64)],
    /// The allocator serving malloc, when it is not glibc's.
    pub heap_owner: Option<&'a str>,
    /// The target is a Go program.
    pub go: bool,
    /// jemalloc's own state, where read.
    pub jemalloc: &'a [crate::heap::jemalloc::JemallocState],
    /// mimalloc 3's own state, where read.
    pub mimalloc: &'a [crate::heap::mimalloc::MimallocState],
    /// gperftools' tcmalloc's own state, where read.
    pub tcmalloc: &'a [crate::heap::tcmalloc::TcmallocState],
    /// The Go runtime's heap statistics, where read.
    pub go_heap: Option<&'a crate::heap::go::GoHeap>,
}

/// Whether an address is where Go's runtime places its heap arenas on x86-64: it
/// reserves from the hints `i << 40 | 0xc0 << 32` (i = 0..0x7f) upwards, so arenas
/// sit in the upper quarter of each terabyte below the usual mmap area.
pub fn in_go_arena_space(addr: u64) -> bool {
    addr < 0x7f00_0000_0000 && addr & ((1 << 40) - 1) >= 0xc0 << 32
}

/// Parts listed one by one before the rest of their kind is summed in one line.
const DETAILED: usize = 8;

/// Whether a mapping is shared memory rather than a file.
fn is_shmem(path: &str) -> bool {
    path.starts_with("/memfd:")
        || path.starts_with("/SYSV")
        || path.starts_with("/dev/shm/")
        || path.starts_with("/dev/zero")
        || path.starts_with("[anon_shmem")
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// Pushes the largest items of a kind one by one, then the rest summed.
fn push_kind(parts: &mut Vec<Part>, kind: PartKind, mut items: Vec<(String, u64)>, rest: &str) {
    items.retain(|(_, b)| *b > 0);
    items.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let more: u64 = items.iter().skip(DETAILED).map(|(_, b)| b).sum();
    let n = items.len();
    for (detail, bytes) in items.into_iter().take(DETAILED) {
        parts.push(Part {
            kind,
            bytes,
            detail,
        });
    }
    if more > 0 {
        parts.push(Part {
            kind,
            bytes: more,
            detail: format!("{} more {rest}", n - DETAILED),
        });
    }
}

/// Classifies every resident byte.
pub fn compose(s: &State<'_>) -> MemoryMap {
    // By object: an object's mappings (code, data, relocations) count as one.
    let mut files: std::collections::BTreeMap<String, u64> = Default::default();
    let mut shmem: std::collections::BTreeMap<String, u64> = Default::default();
    let mut stacks: Vec<(String, u64)> = Vec::new();
    let (mut heap_vmas, mut rest_anon, mut written_file, mut go) = (0u64, 0u64, 0u64, 0u64);
    let mut go_mappings = 0usize;
    for e in s.smaps {
        let m = &e.map;
        let shared = e.rss.saturating_sub(e.anonymous);
        if shared > 0 {
            let name = if m.path.is_empty() {
                "[anonymous shared]".to_owned()
            } else if m.path.starts_with('[') {
                // [vdso], [vvar], [uprobes]: pages the kernel maps in, counted with the files.
                "kernel-provided pages ([vdso], [vvar], [uprobes])".to_owned()
            } else {
                m.path.clone()
            };
            if is_shmem(&m.path) || m.perms[3] == b's' && !m.is_file() {
                *shmem.entry(name).or_default() += shared;
            } else {
                *files.entry(name).or_default() += shared;
            }
        }
        if e.anonymous == 0 {
            continue;
        }
        let range = (m.start, m.end);
        if m.path == "[heap]" || s.heap_ranges.iter().any(|&h| overlaps(h, range)) {
            heap_vmas += e.anonymous;
        } else if s.go && m.path.is_empty() && in_go_arena_space(m.start) {
            // Before the stacks: goroutine stacks are allocated in Go's heap, and a
            // thread running one has its stack pointer there.
            go += e.anonymous;
            go_mappings += 1;
        } else if m.path == "[stack]" {
            stacks.push(("main thread ([stack])".into(), e.anonymous));
        } else if let Some(&(tid, _)) = s
            .stack_pointers
            .iter()
            .find(|&&(_, sp)| (m.start..m.end).contains(&sp))
        {
            stacks.push((format!("thread {tid}"), e.anonymous));
        } else if m.is_file() {
            // Private file pages written since (data, relocations): anonymous now.
            written_file += e.anonymous;
        } else {
            rest_anon += e.anonymous;
        }
    }
    let mut parts = Vec::new();
    // glibc's heaps: what the walk saw, and what of their mappings it did not.
    let (mut heap_in_use, mut heap_free_total) = (0u64, 0u64);
    let mut free_by_arena = Vec::new();
    if let Some(w) = s.glibc {
        for a in &w.arenas {
            heap_in_use += a.resident_bytes.saturating_sub(a.free_resident_bytes);
            heap_free_total += a.free_resident_bytes;
            free_by_arena.push((
                format!("{} arena {}", a.kind.as_str(), a.arena),
                a.free_resident_bytes,
            ));
        }
    }
    // pagemap counts pages mapped to the shared zero page (read, never written) as
    // present; smaps does not count them: the walk's figures are capped by the heaps'
    // anonymous pages, free memory first.
    if heap_free_total > heap_vmas {
        for (_, b) in &mut free_by_arena {
            *b = (*b as u128 * heap_vmas as u128 / heap_free_total as u128) as u64;
        }
    }
    let free_assigned: u64 = free_by_arena.iter().map(|(_, b)| b).sum();
    let in_use = heap_in_use.min(heap_vmas - free_assigned);
    push_kind(
        &mut parts,
        PartKind::HeapInUse,
        vec![("glibc heaps, blocks in use".into(), in_use)],
        "",
    );
    push_kind(&mut parts, PartKind::HeapFree, free_by_arena, "arenas");
    let unwalked = heap_vmas - free_assigned - in_use;
    // The allocator serving malloc, its state read, counts its brk heap (tcmalloc's) in
    // its own figures: those pages are left for them to claim.
    let owner_read = match s.heap_owner {
        Some("tcmalloc") => !s.tcmalloc.is_empty(),
        Some("jemalloc") => !s.jemalloc.is_empty(),
        Some("mimalloc") => !s.mimalloc.is_empty(),
        _ => false,
    };
    push_kind(
        &mut parts,
        PartKind::HeapUnwalked,
        vec![(
            if let Some(owner) = s.heap_owner {
                format!(
                    "heap pages glibc's walk did not reach (malloc is {owner}'s: its own, where it uses brk)"
                )
            } else if s.glibc.is_some() {
                "glibc heap pages the walk did not reach".into()
            } else {
                "brk heap and arena pages, not walked".into()
            },
            if owner_read { 0 } else { unwalked },
        )],
        "",
    );
    // Claims on the other anonymous memory, capped by what is there.
    let mut left = rest_anon + if owner_read { unwalked } else { 0 };
    let mut take = |b: u64| {
        let t = b.min(left);
        left -= t;
        t
    };
    let mmapped: u64 = take(s.mmapped.iter().map(|c| c.2).sum());
    push_kind(
        &mut parts,
        PartKind::HeapMmapped,
        vec![(
            format!(
                "{} chunk{} malloc mapped on {}",
                s.mmapped.len(),
                if s.mmapped.len() == 1 { "" } else { "s" },
                if s.mmapped.len() == 1 {
                    "its own"
                } else {
                    "their own"
                }
            ),
            mmapped,
        )],
        "",
    );
    let py_in_use = take(s.pymalloc.iter().map(|a| a.1).sum());
    let py_free = take(s.pymalloc.iter().map(|a| a.2).sum());
    push_kind(
        &mut parts,
        PartKind::PymallocInUse,
        vec![(format!("{} arenas", s.pymalloc.len()), py_in_use)],
        "",
    );
    push_kind(
        &mut parts,
        PartKind::PymallocFree,
        vec![(format!("{} arenas", s.pymalloc.len()), py_free)],
        "",
    );
    // jemalloc's counts are of pages it handed out or freed, not of resident ones:
    // freed pages were touched, so they are claimed first; active pages never touched
    // are not resident, so what is left caps them.
    let mut free_items = Vec::new();
    let mut active_items = Vec::new();
    for j in s.jemalloc {
        let arenas = format!(
            "{} arena{}",
            j.arenas.len(),
            if j.arenas.len() == 1 { "" } else { "s" }
        );
        free_items.push((
            format!(
                "jemalloc ({}): freed pages it keeps, {} dirty, {} muzzy, {arenas}",
                j.object,
                bytes(j.dirty_bytes),
                bytes(j.muzzy_bytes)
            ),
            j.kept_bytes(),
        ));
        active_items.push((
            format!("jemalloc ({}): active pages, {arenas}", j.object),
            j.active_bytes,
        ));
    }
    // mimalloc's: freed blocks inside its pages and free slices not purged (both
    // written, so resident unless swapped), then blocks in use.
    for m in s.mimalloc {
        free_items.push((
            format!(
                "mimalloc ({}): freed blocks in its pages {}, free slices not purged {}",
                m.object,
                bytes(m.page_free_bytes),
                bytes(m.free_resident_bytes)
            ),
            m.kept_bytes(),
        ));
        active_items.push((
            format!(
                "mimalloc ({}): blocks in use in {} page{}",
                m.object,
                m.pages,
                if m.pages == 1 { "" } else { "s" }
            ),
            m.in_use_bytes,
        ));
    }
    // tcmalloc's: free spans and the freed objects its caches hold, then what the
    // application holds. Spans it returned (unmapped) are not resident.
    for t in s.tcmalloc {
        free_items.push((
            format!(
                "tcmalloc ({}): free spans {}, thread caches {}, central and transfer caches {}",
                t.object,
                bytes(t.page_heap_free_bytes),
                bytes(t.thread_cache_bytes),
                bytes(t.central_cache_bytes + t.transfer_cache_bytes)
            ),
            t.kept_bytes(),
        ));
        active_items.push((
            format!("tcmalloc ({}): allocated, as it counts", t.object),
            t.in_use_bytes,
        ));
    }
    for (_, b) in &mut free_items {
        *b = take(*b);
    }
    for (_, b) in &mut active_items {
        *b = take(*b);
    }
    // The Go runtime's own counts split its arena space: spans in use and goroutine
    // stacks, then free spans it has not returned; released spans are not resident.
    let mut go_left = go;
    if let Some(h) = s.go_heap {
        let mut claim = |b: u64| {
            let t = b.min(go_left);
            go_left -= t;
            t
        };
        active_items.push((
            format!(
                "Go runtime: heap spans in use ({} of live and unswept objects) and goroutine stacks ({})",
                bytes(h.alloc_bytes),
                bytes(h.stacks_bytes)
            ),
            claim(h.in_use_bytes + h.stacks_bytes),
        ));
        free_items.push((
            format!(
                "Go runtime: free spans not yet returned to the system ({} more returned, not resident)",
                bytes(h.released_bytes)
            ),
            claim(h.free_bytes),
        ));
    }
    push_kind(
        &mut parts,
        PartKind::AllocatorInUse,
        active_items,
        "allocators",
    );
    push_kind(
        &mut parts,
        PartKind::AllocatorFree,
        free_items,
        "allocators",
    );
    push_kind(
        &mut parts,
        PartKind::GoHeap,
        vec![(
            if s.go_heap.is_some() {
                format!(
                    "the rest of {go_mappings} mapping{} in Go's arena space (the runtime's metadata, pages its counts do not cover)",
                    if go_mappings == 1 { "" } else { "s" }
                )
            } else {
                format!(
                    "{go_mappings} mapping{} in Go's arena space (the Go runtime's heap: its own state is not read)",
                    if go_mappings == 1 { "" } else { "s" }
                )
            },
            go_left,
        )],
        "",
    );
    push_kind(&mut parts, PartKind::ThreadStacks, stacks, "threads");
    push_kind(
        &mut parts,
        PartKind::OtherAnon,
        vec![
            (
                match s.heap_owner {
                    Some("jemalloc") if !s.jemalloc.is_empty() => {
                        "anonymous mappings (jemalloc's metadata among them)".into()
                    }
                    Some("tcmalloc") if !s.tcmalloc.is_empty() => {
                        "anonymous mappings (tcmalloc's metadata among them)".into()
                    }
                    Some("mimalloc") if !s.mimalloc.is_empty() => {
                        "anonymous mappings (mimalloc's metadata and untouched page space among them)".into()
                    }
                    Some(owner) if owner != "other" => {
                        format!(
                            "anonymous mappings ({owner}'s among them: its own state is not read)"
                        )
                    }
                    _ => "anonymous mappings".into(),
                },
                left,
            ),
            ("file pages written since mapped".into(), written_file),
        ],
        "",
    );
    push_kind(
        &mut parts,
        PartKind::File,
        files.into_iter().collect(),
        "objects",
    );
    push_kind(
        &mut parts,
        PartKind::Shmem,
        shmem.into_iter().collect(),
        "mappings",
    );
    let sum: u64 = parts.iter().map(|p| p.bytes).sum();
    let rss: u64 = s.smaps.iter().map(|e| e.rss).sum();
    MemoryMap {
        rss_bytes: rss,
        vmrss_bytes: s.vmrss_bytes,
        unexplained_bytes: rss.abs_diff(sum),
        parts,
    }
}

/// The text table: one line per kind, with its largest part named.
pub fn render(m: &MemoryMap) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    if m.parts.is_empty() {
        return o;
    }
    let _ = writeln!(o, "Where RSS goes ({} resident):", bytes(m.rss_bytes));
    let mut kinds: Vec<PartKind> = m.parts.iter().map(|p| p.kind).collect();
    kinds.dedup();
    for k in kinds {
        let total = m.total(k);
        let share = total as f64 * 100.0 / m.rss_bytes.max(1) as f64;
        let of_kind: Vec<&Part> = m.parts.iter().filter(|p| p.kind == k).collect();
        let detail = match of_kind.as_slice() {
            [one] => one.detail.clone(),
            [first, ..] => format!(
                "largest: {} ({}), {} parts",
                first.detail,
                bytes(first.bytes),
                of_kind.len()
            ),
            [] => String::new(),
        };
        let _ = writeln!(
            o,
            "  {:<16} {:>10} {:>5.1}%  {detail}",
            k.as_str(),
            bytes(total),
            share
        );
    }
    if m.unexplained_bytes > 0 {
        let _ = writeln!(
            o,
            "  {:<16} {:>10} {:>5.1}%  resident bytes the parts do not account for",
            "unexplained",
            bytes(m.unexplained_bytes),
            m.unexplained_bytes as f64 * 100.0 / m.rss_bytes.max(1) as f64
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        heap::glibc::{ArenaKind, ArenaStats},
        process::procfs::MapEntry,
    };

    fn vma(start: u64, end: u64, perms: &str, path: &str, rss: u64, anonymous: u64) -> SmapsEntry {
        SmapsEntry {
            map: MapEntry {
                start,
                end,
                perms: perms.as_bytes().try_into().expect("4 bytes"),
                offset: 0,
                inode: u64::from(path.starts_with('/')),
                path: path.into(),
            },
            rss,
            anonymous,
        }
    }

    /// A walk that counts more resident pages than smaps (zero pages) is capped by the
    /// heap's anonymous pages, free memory first, and the parts still sum to RSS.
    #[test]
    fn walk_figures_are_capped_by_smaps() {
        const K: u64 = 1 << 10;
        let smaps = [vma(
            0x100_0000,
            0x101_0000,
            "rw-p",
            "[heap]",
            40 * K,
            40 * K,
        )];
        let walk = HeapWalk {
            arenas: vec![ArenaStats {
                kind: ArenaKind::Main,
                arena: "brk heap".into(),
                resident_bytes: 64 * K,
                free_resident_bytes: 56 * K,
                ..ArenaStats::default()
            }],
            ..HeapWalk::default()
        };
        let m = compose(&State {
            smaps: &smaps,
            glibc: Some(&walk),
            ..State::default()
        });
        assert_eq!(m.total(PartKind::HeapFree), 40 * K);
        assert_eq!(m.total(PartKind::HeapInUse), 0);
        assert_eq!(m.total(PartKind::HeapUnwalked), 0);
        assert_eq!(m.rss_bytes, 40 * K);
        assert_eq!(m.unexplained_bytes, 0);
    }

    /// A Go program on another allocator: its arenas' pages (at 0xc000000000 and in the
    /// next terabyte's hint) are Go's heap, the ordinary mmap area's are not; the brk
    /// heap is named after the allocator serving malloc.
    #[test]
    fn go_arenas_by_address_and_the_heap_owner() {
        const M: u64 = 1 << 20;
        let smaps = [
            vma(0x5600_0000_0000, 0x5600_0010_0000, "rw-p", "[heap]", M, M),
            vma(0xc0_0000_0000, 0xc0_0400_0000, "rw-p", "", 7 * M, 7 * M),
            vma(0x1c0_0000_0000, 0x1c0_0040_0000, "rw-p", "", 2 * M, 2 * M),
            vma(0x7f20_0000_0000, 0x7f20_0040_0000, "rw-p", "", 3 * M, 3 * M),
        ];
        let m = compose(&State {
            smaps: &smaps,
            heap_owner: Some("jemalloc"),
            go: true,
            ..State::default()
        });
        assert_eq!(m.total(PartKind::GoHeap), 9 * M);
        assert_eq!(m.total(PartKind::OtherAnon), 3 * M);
        assert_eq!(m.total(PartKind::HeapUnwalked), M);
        let unwalked = m
            .parts
            .iter()
            .find(|p| p.kind == PartKind::HeapUnwalked)
            .unwrap();
        assert!(
            unwalked.detail.contains("malloc is jemalloc's"),
            "{}",
            unwalked.detail
        );
        assert_eq!(m.unexplained_bytes, 0);
        // Not a Go program: the same mappings are other anonymous memory.
        let m = compose(&State {
            smaps: &smaps,
            ..State::default()
        });
        assert_eq!(m.total(PartKind::GoHeap), 0);
        assert_eq!(m.total(PartKind::OtherAnon), 12 * M);
        assert!(!in_go_arena_space(0x7f20_0000_0000) && !in_go_arena_space(0x5600_0000_0000));
    }

    /// A process with a fragmented arena, a thread, an mmapped chunk, pymalloc arenas,
    /// code and a memfd: every byte lands in its kind and the parts sum to RSS.
    #[test]
    fn classifies_every_resident_byte() {
        const M: u64 = 1 << 20;
        let smaps = [
            vma(0x40_0000, 0x50_0000, "r-xp", "/usr/bin/app", 3 * M, 0),
            vma(
                0x60_0000,
                0x61_0000,
                "rw-p",
                "/usr/bin/app",
                64 << 10,
                32 << 10,
            ),
            vma(0x100_0000, 0x200_0000, "rw-p", "[heap]", 10 * M, 10 * M),
            vma(
                0x7f00_0000_0000,
                0x7f00_0400_0000,
                "rw-p",
                "",
                30 * M,
                30 * M,
            ),
            vma(0x7f10_0000_0000, 0x7f10_0080_0000, "rw-p", "", 8 * M, 8 * M),
            vma(0x7f20_0000_0000, 0x7f20_0080_0000, "rw-p", "", 6 * M, 6 * M),
            vma(
                0x7f30_0000_0000,
                0x7f30_0001_0000,
                "rw-s",
                "/memfd:ring (deleted)",
                M,
                0,
            ),
            vma(
                0x7ffd_0000_0000,
                0x7ffd_0002_0000,
                "rw-p",
                "[stack]",
                128 << 10,
                128 << 10,
            ),
        ];
        let walk = HeapWalk {
            arenas: vec![
                ArenaStats {
                    kind: ArenaKind::Main,
                    arena: "brk heap".into(),
                    resident_bytes: 10 * M,
                    free_resident_bytes: 2 * M,
                    ..ArenaStats::default()
                },
                ArenaStats {
                    kind: ArenaKind::Thread,
                    arena: "0x7f0000000030".into(),
                    resident_bytes: 29 * M,
                    free_resident_bytes: 25 * M,
                    ..ArenaStats::default()
                },
            ],
            ..HeapWalk::default()
        };
        // The second anonymous mapping holds a thread's stack pointer; the third holds a
        // 2 MiB mmapped chunk and two pymalloc arenas.
        let m = compose(&State {
            smaps: &smaps,
            vmrss_bytes: 58 * M,
            glibc: Some(&walk),
            heap_ranges: &[(0x7f00_0000_0000, 0x7f00_0400_0000)],
            mmapped: &[(0x7f20_0000_0000, 0x7f20_0020_0000, 2 * M)],
            pymalloc: &[(0x7f20_0020_0000, M, 0), (0x7f20_0030_0000, M / 2, M / 2)],
            stack_pointers: &[(4242, 0x7f10_0070_0000)],
            ..State::default()
        });
        let total = |k| m.total(k);
        assert_eq!(total(PartKind::HeapInUse), 12 * M);
        assert_eq!(total(PartKind::HeapFree), 27 * M);
        assert_eq!(total(PartKind::HeapUnwalked), M);
        assert_eq!(total(PartKind::HeapMmapped), 2 * M);
        assert_eq!(total(PartKind::PymallocInUse), 3 * M / 2);
        assert_eq!(total(PartKind::PymallocFree), M / 2);
        assert_eq!(total(PartKind::ThreadStacks), 8 * M + (128 << 10));
        assert_eq!(total(PartKind::OtherAnon), 2 * M + (32 << 10));
        assert_eq!(total(PartKind::File), 3 * M + (32 << 10));
        assert_eq!(total(PartKind::Shmem), M);
        assert_eq!(m.unexplained_bytes, 0);
        assert_eq!(m.rss_bytes, 58 * M + (64 << 10) + (128 << 10));
        assert_eq!(m.vmrss_bytes, 58 * M);
        let free: Vec<&str> = m
            .parts
            .iter()
            .filter(|p| p.kind == PartKind::HeapFree)
            .map(|p| p.detail.as_str())
            .collect();
        assert_eq!(free, ["thread arena 0x7f0000000030", "main arena brk heap"]);
        let text = render(&m);
        assert!(text.contains("heap-free"), "{text}");
        assert!(text.contains("thread-stacks"), "{text}");
    }
}
