//! Compact unwind tables for the BPF stack walker, derived from `.eh_frame`.
//!
//! Most production binaries are built without frame pointers, so the BPF walker
//! (`leaktrace-ebpf/src/stack.rs`) unwinds with each object's call-frame
//! information instead. BPF cannot interpret DWARF, so here every FDE's rows are
//! evaluated ahead of time and reduced to what x86-64 code needs in practice:
//! the CFA as rsp or rbp plus an offset (or the PLT stubs' fixed expression), where
//! the caller's rbp was saved, and whether the return address is undefined (the
//! outermost frame). Consecutive rows with the same rules are merged, addresses no
//! FDE covers get explicit gap rows (walked through frame pointers), and a page
//! index lets BPF narrow its binary search to the rows of one 1 KiB page.
//!
//! [`Unwinder`] keeps the kernel maps in step with the target's executable
//! mappings: tables are built once per object file, and objects mapped after
//! attach (dlopen) are added when the ledger sees an executable mapping appear.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use gimli::{
    BaseAddresses, CfaRule, CieOrFde, EhFrame, LittleEndian, RegisterRule, UnwindContext,
    UnwindSection, X86_64,
};
use leaktrace_common::{
    UNWIND_CFA_RBP, UNWIND_CFA_RSP, UNWIND_END, UNWIND_GAP, UNWIND_INVALID, UNWIND_PAGE_SHIFT,
    UNWIND_PLT, UNWIND_SEARCH_STEPS, UnwindObject, UnwindRow,
};
use object::{Object, ObjectSection, ObjectSegment};

/// An object's compact unwind table.
#[derive(Debug, Default, Clone)]
pub struct Table {
    /// Rows sorted by `pc`, with no two consecutive rows alike.
    pub rows: Vec<UnwindRow>,
    /// FDEs read.
    pub fdes: usize,
    /// Rows whose rules BPF cannot evaluate (kept as [`UNWIND_INVALID`]).
    pub unsupported: usize,
    /// FDEs whose instructions gimli could not evaluate: left out, their range a gap.
    pub bad_fdes: usize,
}

impl Table {
    /// Object-relative address of the first indexed page.
    pub fn base(&self) -> u64 {
        self.rows
            .first()
            .map_or(0, |r| u64::from(r.pc) & !((1u64 << UNWIND_PAGE_SHIFT) - 1))
    }

    /// Page index: for each page from [`Table::base`], the index of the row in effect
    /// at the page's start (0 before the first row), plus one closing entry.
    pub fn pages(&self) -> Vec<u32> {
        let Some(last) = self.rows.last() else {
            return Vec::new();
        };
        let base = self.base();
        let n = ((u64::from(last.pc) - base) >> UNWIND_PAGE_SHIFT) as usize + 2;
        let mut pages = Vec::with_capacity(n);
        let mut i = 0usize;
        for p in 0..n {
            let start = base + ((p as u64) << UNWIND_PAGE_SHIFT);
            while i + 1 < self.rows.len() && u64::from(self.rows[i + 1].pc) <= start {
                i += 1;
            }
            pages.push(i as u32);
        }
        pages
    }

    /// The row in effect at object-relative address `pc`, searched as BPF does.
    pub fn lookup(&self, pc: u64) -> Option<UnwindRow> {
        self.lookup_in(&self.pages(), pc)
    }

    /// [`Table::lookup`] with the page index computed once.
    pub fn lookup_in(&self, pages: &[u32], pc: u64) -> Option<UnwindRow> {
        let base = self.base();
        if self.rows.is_empty() || pc < base {
            return None;
        }
        let p = ((pc - base) >> UNWIND_PAGE_SHIFT) as usize;
        let (mut lo, mut hi) = if p + 1 < pages.len() {
            (pages[p] as usize, pages[p + 1] as usize)
        } else {
            (self.rows.len() - 1, self.rows.len() - 1)
        };
        for _ in 0..UNWIND_SEARCH_STEPS {
            if lo >= hi {
                break;
            }
            let mid = (lo + hi).div_ceil(2);
            if u64::from(self.rows[mid].pc) <= pc {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        let row = self.rows[lo];
        (u64::from(row.pc) <= pc).then_some(row)
    }
}

/// Why an object has no table.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// Not an ELF file we can parse.
    #[error("not a readable ELF object: {0}")]
    Elf(#[from] object::Error),
    /// No `.eh_frame` section.
    #[error("no .eh_frame section")]
    NoEhFrame,
    /// Malformed CFI.
    #[error("malformed .eh_frame: {0}")]
    Dwarf(#[from] gimli::Error),
    /// Addresses beyond what a row's 32-bit `pc` holds.
    #[error("code above 4 GiB")]
    TooHigh,
}

/// The PLT stubs' CFA expression, `rsp + 8 + ((rip & 15) >= N) << 3`, with N at byte 6.
const PLT_EXPR: [u8; 11] = [
    0x77, 0x08, // DW_OP_breg7 (rsp) 8
    0x80, 0x00, // DW_OP_breg16 (rip) 0
    0x3f, // DW_OP_lit15
    0x1a, // DW_OP_and
    0x00, // DW_OP_lit10 or DW_OP_lit11 (checked apart)
    0x2a, // DW_OP_ge
    0x33, // DW_OP_lit3
    0x24, // DW_OP_shl
    0x22, // DW_OP_plus
];

fn plt_threshold(expr: &[u8]) -> Option<i16> {
    if expr.len() != PLT_EXPR.len() {
        return None;
    }
    let same = expr
        .iter()
        .zip(PLT_EXPR)
        .enumerate()
        .all(|(i, (&a, b))| i == 6 || a == b);
    // DW_OP_lit0 is 0x30.
    (same && (0x30..=0x4f).contains(&expr[6])).then(|| i16::from(expr[6] - 0x30))
}

/// Builds the compact table of an ELF object's `.eh_frame`.
pub fn build(data: &[u8]) -> Result<Table, TableError> {
    let file = object::File::parse(data)?;
    let section = file
        .section_by_name(".eh_frame")
        .ok_or(TableError::NoEhFrame)?;
    let eh_data = section.uncompressed_data()?;
    let eh = EhFrame::new(&eh_data, LittleEndian);
    let mut bases = BaseAddresses::default().set_eh_frame(section.address());
    if let Some(text) = file.section_by_name(".text") {
        bases = bases.set_text(text.address());
    }
    if let Some(got) = file.section_by_name(".got") {
        bases = bases.set_got(got.address());
    }
    let mut ctx = Box::new(UnwindContext::new());
    // (start, end, rows of the FDE)
    let mut spans: Vec<(u64, u64, Vec<(u64, UnwindRow)>)> = Vec::new();
    let mut table = Table::default();
    let mut entries = eh.entries(&bases);
    while let Some(entry) = entries.next()? {
        let CieOrFde::Fde(partial) = entry else {
            continue;
        };
        let Ok(fde) = partial.parse(EhFrame::cie_from_offset) else {
            continue;
        };
        if fde.len() == 0 {
            continue;
        }
        table.fdes += 1;
        let mut rows = Vec::new();
        let mut unsupported = 0;
        let read = (|| -> gimli::Result<()> {
            let mut it = fde.rows(&eh, &bases, &mut ctx)?;
            while let Some(row) = it.next_row()? {
                let compact = compact(row, &eh, &mut unsupported);
                rows.push((row.start_address(), compact));
            }
            Ok(())
        })();
        if read.is_err() {
            // One malformed FDE costs its own function's stacks, not the object's.
            table.bad_fdes += 1;
            continue;
        }
        table.unsupported += unsupported;
        spans.push((fde.initial_address(), fde.end_address(), rows));
    }
    spans.sort_by_key(|s| s.0);
    let mut out: Vec<UnwindRow> = Vec::new();
    let mut push = |pc: u64, row: UnwindRow| -> Result<(), TableError> {
        let pc = u32::try_from(pc).map_err(|_| TableError::TooHigh)?;
        let row = UnwindRow { pc, ..row };
        match out.last_mut() {
            // Overlapping FDEs (seen in hand-written assembly): the earlier-starting
            // one was clipped at the later one's start; keep the rows sorted.
            Some(last) if pc < last.pc => {}
            // A later FDE starting where an earlier one's rows ended replaces its gap.
            Some(last) if last.pc == pc => *last = row,
            Some(last)
                if (last.cfa_off, last.kind, last.rbp) == (row.cfa_off, row.kind, row.rbp) => {}
            _ => out.push(row),
        }
        Ok(())
    };
    let gap = UnwindRow {
        kind: UNWIND_GAP,
        ..UnwindRow::default()
    };
    for (i, (_, end, rows)) in spans.iter().enumerate() {
        let next = spans.get(i + 1).map(|s| s.0);
        for &(pc, row) in rows {
            if next.is_some_and(|n| pc >= n) {
                break;
            }
            push(pc, row)?;
        }
        if next.is_none_or(|n| n > *end) {
            push(*end, gap)?;
        }
    }
    table.rows = out;
    Ok(table)
}

fn compact<R: gimli::Reader<Offset = usize>>(
    row: &gimli::UnwindTableRow<usize>,
    eh: &EhFrame<R>,
    unsupported: &mut usize,
) -> UnwindRow {
    let invalid = |unsupported: &mut usize| {
        *unsupported += 1;
        UnwindRow {
            kind: UNWIND_INVALID,
            ..UnwindRow::default()
        }
    };
    match row.register(X86_64::RA) {
        Some(RegisterRule::Undefined) => {
            return UnwindRow {
                kind: UNWIND_END,
                ..UnwindRow::default()
            };
        }
        Some(RegisterRule::Offset(-8)) | None => {}
        Some(_) => return invalid(unsupported),
    }
    let (kind, cfa_off) = match row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } => {
            let Ok(off) = i16::try_from(*offset) else {
                return invalid(unsupported);
            };
            match *register {
                X86_64::RSP => (UNWIND_CFA_RSP, off),
                X86_64::RBP => (UNWIND_CFA_RBP, off),
                _ => return invalid(unsupported),
            }
        }
        CfaRule::Expression(e) => {
            let bytes = e
                .get(eh)
                .ok()
                .and_then(|x| x.0.to_slice().ok().map(|c| c.to_vec()));
            match bytes.as_deref().and_then(plt_threshold) {
                Some(t) => (UNWIND_PLT, t),
                None => return invalid(unsupported),
            }
        }
    };
    let rbp = match row.register(X86_64::RBP) {
        None | Some(RegisterRule::SameValue | RegisterRule::Undefined) => 0,
        Some(RegisterRule::Offset(o)) if o % 8 == 0 && (-1016..0).contains(&o) => (o / 8) as i8,
        Some(_) => return invalid(unsupported),
    };
    UnwindRow {
        pc: 0,
        cfa_off,
        kind,
        rbp,
    }
}

/// The load bias of an executable mapping of `data` at `start` with file offset
/// `offset`: runtime address minus link-time address.
pub fn bias(data: &[u8], start: u64, offset: u64) -> Option<u64> {
    let file = object::File::parse(data).ok()?;
    // The mapping's offset is the segment's rounded down to a page: lld does not align
    // p_offset, so the segment can start after `offset`. Of two segments sharing the
    // page, the executable one is the mapping of code.
    let maps = |s: &object::Segment<'_, '_>| {
        let (o, n) = s.file_range();
        (o & !0xfff) <= offset && offset < o + n.max(1)
    };
    let executable = |s: &object::Segment<'_, '_>| matches!(s.flags(), object::SegmentFlags::Elf { p_flags } if p_flags & object::elf::PF_X != 0);
    let seg = file
        .segments()
        .find(|s| maps(s) && executable(s))
        .or_else(|| file.segments().find(|s| maps(s)))?;
    let (seg_off, _) = seg.file_range();
    // address(v) = start + (v − (vaddr − seg_off)) − offset
    Some(
        start
            .wrapping_sub(offset)
            .wrapping_sub(seg.address().wrapping_sub(seg_off)),
    )
}

/// LPM-trie prefixes `(address, prefix length)` covering `[start, end)` exactly.
pub fn prefixes(mut start: u64, end: u64) -> Vec<(u64, u32)> {
    let mut out = Vec::new();
    while start < end {
        let mut size_log = if start == 0 {
            63
        } else {
            start.trailing_zeros().min(63)
        };
        while size_log > 0 && (1u64 << size_log) > end - start {
            size_log -= 1;
        }
        out.push((start, 64 - size_log));
        start += 1u64 << size_log;
    }
    out
}

/// What the unwinder loaded, for the report.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct UnwindStats {
    /// Objects with a table in the kernel.
    pub objects: usize,
    /// Executable mappings walked through frame pointers (no usable table), with why.
    pub without_tables: Vec<(String, String)>,
    /// Rows loaded.
    pub rows: usize,
    /// Kernel memory the tables take, in bytes.
    pub table_bytes: usize,
    /// Time spent building and loading tables, in milliseconds.
    pub build_ms: f64,
    /// Objects loaded after attach (mapped later, e.g. dlopen).
    pub loaded_after_attach: Vec<String>,
    /// Objects that did not fit in the row or page capacity.
    pub out_of_room: Vec<String>,
}

/// An executable mapping, as the unwinder needs it.
#[derive(Debug, Clone)]
pub struct ExecMapping {
    /// Start address.
    pub start: u64,
    /// End address.
    pub end: u64,
    /// File offset.
    pub offset: u64,
    /// Path in the target's mount namespace (empty: anonymous).
    pub path: String,
}

/// Where an object's table sits in the kernel arrays.
#[derive(Debug, Clone, Copy)]
struct Placed {
    rows_start: u32,
    rows_count: u32,
    pages_start: u32,
    pages_count: u32,
    base: u64,
}

/// The kernel-side writer the unwinder feeds (the BPF maps, or a test double in memory).
pub trait TableSink {
    /// Writes `rows` at index `at` of the row array.
    fn write_rows(&mut self, at: u32, rows: &[UnwindRow]) -> anyhow::Result<()>;
    /// Writes `pages` at index `at` of the page array.
    fn write_pages(&mut self, at: u32, pages: &[u32]) -> anyhow::Result<()>;
    /// Maps the address prefix to the object.
    fn insert_prefix(&mut self, addr: u64, len: u32, obj: UnwindObject) -> anyhow::Result<()>;
    /// Forgets the address prefix.
    fn remove_prefix(&mut self, addr: u64, len: u32) -> anyhow::Result<()>;
}

/// An array map of `T` mapped into our memory (`BPF_F_MMAPABLE`): rows are
/// written with a copy instead of one syscall each (1.4 M rows for libLLVM).
struct Mapped<T> {
    ptr: *mut T,
    len: usize,
    bytes: usize,
    _map: aya::maps::MapData,
}

impl<T: Copy> Mapped<T> {
    fn new(map: aya::maps::Map, len: usize, name: &str) -> anyhow::Result<Self> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let aya::maps::Map::Array(data) = map else {
            anyhow::bail!("map {name} is not an array");
        };
        let bytes = (len * size_of::<T>()).div_ceil(4096) * 4096;
        // SAFETY: maps an mmapable BPF array of `bytes` bytes, shared with the kernel.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            anyhow::bail!("mmap of map {name}: {}", std::io::Error::last_os_error());
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
            bytes,
            _map: data,
        })
    }

    fn write(&mut self, at: u32, items: &[T]) -> anyhow::Result<()> {
        let at = at as usize;
        anyhow::ensure!(at + items.len() <= self.len, "array write past its end");
        // SAFETY: the range is inside the mapping, which lives as long as `self`; BPF
        // reads these slots only once the object's trie entry points at them.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(at), items.len()) }
            .copy_from_slice(items);
        Ok(())
    }
}

impl<T> Drop for Mapped<T> {
    fn drop(&mut self) {
        // SAFETY: unmapping what `new` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.bytes) };
    }
}

/// The unwinder's BPF maps.
pub struct BpfTables {
    rows: Mapped<UnwindRow>,
    /// u64 slots: array maps stride elements by 8 bytes, which the mapping exposes.
    pages: Mapped<u64>,
    objects: aya::maps::lpm_trie::LpmTrie<aya::maps::MapData, [u8; 8], UnwindObject>,
    /// Bumped after every change to `objects`: the walk's object cache follows it.
    generation: aya::maps::Array<aya::maps::MapData, u64>,
    bumps: u64,
}

impl BpfTables {
    fn bump(&mut self) -> anyhow::Result<()> {
        self.bumps += 1;
        self.generation.set(0, self.bumps, 0)?;
        Ok(())
    }
}

impl BpfTables {
    /// Takes the unwind maps out of the loaded programs (created with these capacities).
    pub fn take(ebpf: &mut aya::Ebpf, rows: u32, pages: u32) -> anyhow::Result<Self> {
        use leaktrace_common::maps;
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow::anyhow!("map {name} missing"))
        };
        Ok(Self {
            rows: Mapped::new(take(maps::UNWIND_ROWS)?, rows as usize, maps::UNWIND_ROWS)?,
            pages: Mapped::new(
                take(maps::UNWIND_PAGES)?,
                pages as usize,
                maps::UNWIND_PAGES,
            )?,
            objects: aya::maps::lpm_trie::LpmTrie::try_from(take(maps::UNWIND_OBJECTS)?)?,
            generation: aya::maps::Array::try_from(take(maps::UNWIND_GEN)?)?,
            bumps: 0,
        })
    }
}

impl TableSink for BpfTables {
    fn write_rows(&mut self, at: u32, rows: &[UnwindRow]) -> anyhow::Result<()> {
        self.rows.write(at, rows)
    }

    fn write_pages(&mut self, at: u32, pages: &[u32]) -> anyhow::Result<()> {
        let wide: Vec<u64> = pages.iter().map(|&p| u64::from(p)).collect();
        self.pages.write(at, &wide)
    }

    fn insert_prefix(&mut self, addr: u64, len: u32, obj: UnwindObject) -> anyhow::Result<()> {
        let key = aya::maps::lpm_trie::Key::new(len, addr.to_be_bytes());
        self.objects.insert(&key, obj, 0)?;
        self.bump()
    }

    fn remove_prefix(&mut self, addr: u64, len: u32) -> anyhow::Result<()> {
        let key = aya::maps::lpm_trie::Key::new(len, addr.to_be_bytes());
        self.objects.remove(&key)?;
        self.bump()
    }
}

/// Keeps the kernel's unwind tables in step with the target's executable mappings.
pub struct Unwinder {
    pid: u32,
    rows_capacity: u32,
    pages_capacity: u32,
    rows_used: u32,
    pages_used: u32,
    /// Tables placed in the kernel, by file identity (device, inode), so an object
    /// mapped twice, or named by two paths, is loaded once.
    placed: HashMap<(u64, u64), Option<Placed>>,
    /// Tables built ahead of placing (by [`Unwinder::prepare`]), by file identity.
    built: HashMap<(u64, u64), Result<Table, String>>,
    /// Mappings registered, by start address: (end, path).
    mapped: HashMap<u64, (u64, String)>,
    /// Report figures.
    pub stats: UnwindStats,
    attached: bool,
    /// Object-relative ranges of the allocator functions (free, malloc, calloc) in each
    /// object that defines them, by file identity.
    alloc_ranges: HashMap<(u64, u64), Vec<[u32; 2]>>,
}

impl Unwinder {
    /// An unwinder for `pid` with kernel arrays of the given capacities.
    pub fn new(pid: u32, rows_capacity: u32, pages_capacity: u32) -> Self {
        Self {
            pid,
            rows_capacity,
            pages_capacity,
            rows_used: 0,
            pages_used: 0,
            placed: HashMap::new(),
            built: HashMap::new(),
            mapped: HashMap::new(),
            stats: UnwindStats::default(),
            attached: false,
            alloc_ranges: HashMap::new(),
        }
    }

    /// Tells the walk where allocator functions lie in the objects that define them
    /// (host path, object-relative address, size; at most
    /// [`leaktrace_common::ALLOC_RANGES`] per object, in the order given), so a
    /// syscall's stack shows whether it runs inside one
    /// ([`leaktrace_common::STACK_IN_ALLOCATOR`]). Returns whether every function got
    /// its range (a zero size or a full object does not). Set before `sync`.
    pub fn set_allocator_functions<'a>(
        &mut self,
        funcs: impl IntoIterator<Item = (&'a Path, u64, u64)>,
    ) -> bool {
        let mut all = true;
        for (path, addr, size) in funcs {
            let ranges = file_id(path).map(|id| self.alloc_ranges.entry(id).or_default());
            match (ranges, u32::try_from(addr), u32::try_from(addr + size)) {
                (Some(r), Ok(lo), Ok(hi))
                    if size > 0 && r.len() < leaktrace_common::ALLOC_RANGES =>
                {
                    r.push([lo, hi]);
                }
                _ => all = false,
            }
        }
        all
    }

    /// Builds the tables of these objects (host paths) ahead of loading the programs,
    /// and returns the rows and page entries they need, to size the kernel arrays.
    pub fn prepare(&mut self, paths: &[PathBuf]) -> (usize, usize) {
        let t0 = Instant::now();
        let (mut rows, mut pages) = (0, 0);
        for p in paths {
            let Some(id) = file_id(p) else {
                continue;
            };
            let t = self.built.entry(id).or_insert_with(|| {
                map_file(p)
                    .map_err(|e| e.to_string())
                    .and_then(|d| build(&d).map_err(|e| e.to_string()))
            });
            if let Ok(t) = t {
                rows += t.rows.len();
                pages += t.pages().len();
            }
        }
        self.stats.build_ms += t0.elapsed().as_secs_f64() * 1e3;
        (rows, pages)
    }

    /// The kernel arrays' capacities: (rows, page entries).
    pub fn capacity(&self) -> (u32, u32) {
        (self.rows_capacity, self.pages_capacity)
    }

    /// Sets the kernel arrays' capacities (as created).
    pub fn set_capacity(&mut self, rows: u32, pages: u32) {
        self.rows_capacity = rows;
        self.pages_capacity = pages;
    }

    /// Marks the end of the attach-time load: later objects are listed as loaded after attach.
    pub fn set_attached(&mut self) {
        self.attached = true;
    }

    /// Registers the target's executable mappings not yet known and forgets those
    /// that are gone; returns how many were added.
    pub fn sync(&mut self, sink: &mut dyn TableSink) -> usize {
        let Ok(entries) = crate::procfs::read_maps(self.pid) else {
            return 0;
        };
        let maps: Vec<ExecMapping> = entries
            .iter()
            .filter(|e| e.is_exec())
            .map(|e| ExecMapping {
                start: e.start,
                end: e.end,
                offset: e.offset,
                path: e.path.clone(),
            })
            .collect();
        self.sync_with(&maps, sink)
    }

    /// [`Unwinder::sync`] against a given list of executable mappings.
    pub fn sync_with(&mut self, maps: &[ExecMapping], sink: &mut dyn TableSink) -> usize {
        let t0 = Instant::now();
        let gone: Vec<u64> = self
            .mapped
            .iter()
            .filter(|(start, (end, path))| {
                !maps
                    .iter()
                    .any(|m| m.start == **start && m.end == *end && m.path == *path)
            })
            .map(|(s, _)| *s)
            .collect();
        for start in gone {
            if let Some((end, _)) = self.mapped.remove(&start) {
                for (addr, len) in prefixes(start, end) {
                    let _ = sink.remove_prefix(addr, len);
                }
            }
        }
        let mut added = 0;
        for m in maps {
            if self.mapped.contains_key(&m.start) {
                continue;
            }
            self.mapped.insert(m.start, (m.end, m.path.clone()));
            added += 1;
            if let Err(e) = self.register(m, sink) {
                log::warn!("unwind table for {} not loaded: {e:#}", m.path);
            }
        }
        self.stats.build_ms += t0.elapsed().as_secs_f64() * 1e3;
        added
    }

    fn register(&mut self, m: &ExecMapping, sink: &mut dyn TableSink) -> anyhow::Result<()> {
        let fp_only = UnwindObject::default();
        let name = if m.path.is_empty() {
            "[anonymous]".to_owned()
        } else {
            m.path.clone()
        };
        if m.path.is_empty() || m.path.starts_with('[') {
            // JIT code, the vdso, vsyscall: frame pointers only.
            return self.insert(m, fp_only, sink);
        }
        let host = crate::procfs::path_in_target(self.pid, m.path.trim_end_matches(" (deleted)"));
        let data = match map_file(&host) {
            Ok(d) => d,
            Err(e) => {
                self.stats.without_tables.push((name, e.to_string()));
                return self.insert(m, fp_only, sink);
            }
        };
        let Some(id) = file_id(&host) else {
            self.stats
                .without_tables
                .push((name, "no file identity".into()));
            return self.insert(m, fp_only, sink);
        };
        let placed = match self.placed.get(&id) {
            Some(p) => *p,
            None => {
                let built = match self.built.remove(&id) {
                    Some(b) => b,
                    None => build(&data).map_err(|e| e.to_string()),
                };
                let p = match built {
                    Ok(t) if !t.rows.is_empty() => self.place(&name, &t, sink)?,
                    Ok(_) => {
                        self.stats
                            .without_tables
                            .push((name.clone(), "empty .eh_frame".into()));
                        None
                    }
                    Err(e) => {
                        self.stats.without_tables.push((name.clone(), e));
                        None
                    }
                };
                self.placed.insert(id, p);
                if p.is_some() {
                    self.stats.objects += 1;
                    if self.attached {
                        self.stats.loaded_after_attach.push(name.clone());
                    }
                }
                p
            }
        };
        let Some(p) = placed else {
            return self.insert(m, fp_only, sink);
        };
        let Some(bias) = bias(&data, m.start, m.offset) else {
            self.stats
                .without_tables
                .push((name, "no segment for the mapping's offset".into()));
            return self.insert(m, fp_only, sink);
        };
        let mut alloc_ranges = [[0u32; 2]; leaktrace_common::ALLOC_RANGES];
        for (slot, r) in alloc_ranges
            .iter_mut()
            .zip(self.alloc_ranges.get(&id).into_iter().flatten())
        {
            *slot = *r;
        }
        let obj = UnwindObject {
            bias,
            alloc_ranges,
            base: p.base,
            rows_start: p.rows_start,
            rows_count: p.rows_count,
            pages_start: p.pages_start,
            pages_count: p.pages_count,
            ..UnwindObject::default()
        };
        self.insert(m, obj, sink)
    }

    fn place(
        &mut self,
        name: &str,
        t: &Table,
        sink: &mut dyn TableSink,
    ) -> anyhow::Result<Option<Placed>> {
        let pages = t.pages();
        let (nr, np) = (t.rows.len() as u32, pages.len() as u32);
        if self.rows_used + nr > self.rows_capacity || self.pages_used + np > self.pages_capacity {
            self.stats.out_of_room.push(name.to_owned());
            return Ok(None);
        }
        let (rs, ps) = (self.rows_used, self.pages_used);
        sink.write_rows(rs, &t.rows)?;
        let abs: Vec<u32> = pages.iter().map(|&i| i + rs).collect();
        sink.write_pages(ps, &abs)?;
        self.rows_used += nr;
        self.pages_used += np;
        self.stats.rows += nr as usize;
        self.stats.table_bytes += nr as usize * size_of::<UnwindRow>() + np as usize * 8;
        Ok(Some(Placed {
            rows_start: rs,
            rows_count: nr,
            pages_start: ps,
            pages_count: np,
            base: t.base(),
        }))
    }

    fn insert(
        &mut self,
        m: &ExecMapping,
        obj: UnwindObject,
        sink: &mut dyn TableSink,
    ) -> anyhow::Result<()> {
        let obj = UnwindObject {
            start: m.start,
            end: m.end,
            ..obj
        };
        for (addr, len) in prefixes(m.start, m.end) {
            sink.insert_prefix(addr, len, obj)?;
        }
        Ok(())
    }
}

/// A read-only view of a file (objects can be hundreds of MiB: libLLVM is 190 MiB).
fn map_file(path: &Path) -> std::io::Result<memmap2::Mmap> {
    let f = std::fs::File::open(path)?;
    // SAFETY: a private read-only mapping; the target's object files are not written
    // while it runs (a replaced file gets a new inode, the old one stays intact).
    unsafe { memmap2::Mmap::map(&f) }
}

/// A file's identity: (device, inode).
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino()))
}

/// Kernel array capacities for tables needing `rows` and `pages`: room for a quarter
/// more (libraries loaded later), never below the defaults.
pub fn capacities(rows: usize, pages: usize) -> (u32, u32) {
    let grow = |need: usize, floor: u32| -> u32 {
        u32::try_from(need + need / 4)
            .unwrap_or(u32::MAX)
            .max(floor)
    };
    (
        grow(rows, leaktrace_common::DEFAULT_UNWIND_ROWS),
        grow(pages, leaktrace_common::DEFAULT_UNWIND_PAGES),
    )
}

/// Reads one object and returns its table and how long building took.
pub fn build_file(path: &Path) -> anyhow::Result<(Table, Duration)> {
    let data = std::fs::read(path)?;
    let t0 = Instant::now();
    let t = build(&data)?;
    Ok((t, t0.elapsed()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[inline(never)]
    fn probe_target() -> u64 {
        std::hint::black_box(42)
    }

    /// The load bias of this test binary's code mapping puts a function's symbol at
    /// its runtime address. Rust links with lld (rustc 1.90+), which does not
    /// page-align segment file offsets, so the mapping's offset lies before the
    /// code segment's: the segment covering it must still be the code's.
    #[test]
    fn bias_of_own_code_mapping() {
        use object::{Object as _, ObjectSymbol as _};
        let exe = std::fs::canonicalize("/proc/self/exe").expect("own executable");
        let data = std::fs::read(&exe).expect("readable");
        let file = object::File::parse(&*data).expect("ELF");
        let runtime = probe_target as fn() -> u64 as usize as u64;
        let sym = file
            .symbols()
            .find(|s| s.name().is_ok_and(|n| n.contains("probe_target")))
            .expect("symbol of probe_target in the test binary");
        let maps = std::fs::read_to_string("/proc/self/maps").expect("own maps");
        let (start, offset) = maps
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let (lo, hi) = f[0].split_once('-')?;
                let (lo, hi) = (
                    u64::from_str_radix(lo, 16).ok()?,
                    u64::from_str_radix(hi, 16).ok()?,
                );
                (f[1].contains('x') && (lo..hi).contains(&runtime))
                    .then(|| Some((lo, u64::from_str_radix(f[2], 16).ok()?)))
                    .flatten()
            })
            .expect("the code mapping holding probe_target");
        let b = bias(&data, start, offset).expect("a segment for the mapping");
        assert_eq!(
            b.wrapping_add(sym.address()),
            runtime,
            "mapping at {start:#x} offset {offset:#x}, symbol {:#x}",
            sym.address()
        );
    }

    #[test]
    fn prefixes_cover_ranges_exactly() {
        for (s, e) in [
            (0x1000u64, 0x2000u64),
            (0x7f00_1234_5000, 0x7f00_1239_a000),
            (0x55_5555_4000, 0x55_5555_5000),
        ] {
            let ps = prefixes(s, e);
            let mut at = s;
            for &(a, len) in &ps {
                assert_eq!(a, at);
                let size = 1u64 << (64 - len);
                assert_eq!(a % size, 0, "aligned");
                at += size;
            }
            assert_eq!(at, e);
        }
    }

    /// Every FDE row of the system's libc, looked up through the compact table the
    /// way BPF searches it, gives the rules gimli evaluates for that address.
    #[test]
    fn compact_table_agrees_with_gimli_on_libc() {
        let path = "/lib/x86_64-linux-gnu/libc.so.6";
        let data = std::fs::read(path).expect("libc");
        let table = build(&data).expect("table");
        let pages = table.pages();
        let file = object::File::parse(&*data).unwrap();
        let section = file.section_by_name(".eh_frame").unwrap();
        let eh_data = section.uncompressed_data().unwrap();
        let eh = EhFrame::new(&eh_data, LittleEndian);
        let bases = BaseAddresses::default()
            .set_eh_frame(section.address())
            .set_text(file.section_by_name(".text").unwrap().address());
        let mut ctx = Box::new(UnwindContext::new());
        let mut entries = eh.entries(&bases);
        let (mut checked, mut unsupported) = (0, 0);
        while let Some(entry) = entries.next().unwrap() {
            let CieOrFde::Fde(partial) = entry else {
                continue;
            };
            let fde = partial.parse(EhFrame::cie_from_offset).unwrap();
            let mut rows = fde.rows(&eh, &bases, &mut ctx).unwrap();
            while let Some(row) = rows.next_row().unwrap() {
                let want = compact(row, &eh, &mut unsupported);
                for pc in [row.start_address(), row.end_address() - 1] {
                    let got = table.lookup_in(&pages, pc).expect("a row");
                    assert_eq!(
                        (got.kind, got.cfa_off, got.rbp),
                        (want.kind, want.cfa_off, want.rbp),
                        "{path} at {pc:#x}"
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked > 50_000, "checked {checked} addresses");
        // Past the end of an FDE not followed by another: a gap, walked with rbp.
        let last = table.rows.last().unwrap();
        assert_eq!(last.kind, UNWIND_GAP);
    }

    #[test]
    fn plt_expression_is_recognised() {
        let mut e = PLT_EXPR;
        e[6] = 0x3b;
        assert_eq!(plt_threshold(&e), Some(11));
        e[6] = 0x3a;
        assert_eq!(plt_threshold(&e), Some(10));
        e[0] = 0x78;
        assert_eq!(plt_threshold(&e), None);
    }
}
