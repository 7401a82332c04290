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

mod bpf;
pub mod table;
pub use table::fde_ranges;

pub use bpf::{BpfTables, Capacity, TableSink, UnwindError, prefixes};
pub use table::{FileError, Table, TableError, build, build_file};

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::Instant,
};

use leaktrace_common::{UnwindObject, UnwindRow};

/// What the unwinder loaded, for the report.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
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

/// Keeps the kernel's unwind tables in step with the target's executable mappings.
pub struct Unwinder {
    pid: u32,
    capacity: Capacity,
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
    /// An unwinder for `pid`; [`Unwinder::prepare`] sizes its kernel arrays.
    pub fn new(pid: u32) -> Self {
        Self {
            pid,
            capacity: Capacity { rows: 0, pages: 0 },
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
            let ranges = crate::process::procfs::file_identity(path)
                .map(|id| self.alloc_ranges.entry(id).or_default());
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
    /// and sizes the kernel arrays for them (returned, to create the maps with).
    pub fn prepare(&mut self, paths: &[PathBuf]) -> Capacity {
        let t0 = Instant::now();
        let (mut rows, mut pages) = (0, 0);
        for p in paths {
            let Some(id) = crate::process::procfs::file_identity(p) else {
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
        self.capacity = Capacity::for_tables(rows, pages);
        self.capacity
    }

    /// The kernel arrays' capacities.
    pub fn capacity(&self) -> Capacity {
        self.capacity
    }

    /// Marks the end of the attach-time load: later objects are listed as loaded after attach.
    pub fn set_attached(&mut self) {
        self.attached = true;
    }

    /// Registers the target's executable mappings not yet known and forgets those
    /// that are gone; returns how many were added.
    pub fn sync(&mut self, sink: &mut dyn TableSink) -> usize {
        let Ok(entries) = crate::process::procfs::read_maps(self.pid) else {
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

    fn register(&mut self, m: &ExecMapping, sink: &mut dyn TableSink) -> Result<(), UnwindError> {
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
        let host = crate::process::procfs::mapped_file(self.pid, m.start, m.end);
        let data = match map_file(&host) {
            Ok(d) => d,
            Err(e) => {
                self.stats.without_tables.push((name, e.to_string()));
                return self.insert(m, fp_only, sink);
            }
        };
        let Some(id) = crate::process::procfs::file_identity(&host) else {
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
        let Some(bias) = crate::process::elf::load_bias(&data, m.start, m.offset, true) else {
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
    ) -> Result<Option<Placed>, UnwindError> {
        let pages = t.pages();
        let (nr, np) = (t.rows.len() as u32, pages.len() as u32);
        if self.rows_used + nr > self.capacity.rows || self.pages_used + np > self.capacity.pages {
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
    ) -> Result<(), UnwindError> {
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

/// An object file's bytes (objects can be hundreds of MiB: libLLVM is 190 MiB). Read,
/// not mapped: the target can truncate its file under a mapping (SIGBUS); see
/// [`crate::process::procfs::read_object`].
fn map_file(path: &Path) -> std::io::Result<Vec<u8>> {
    crate::process::procfs::read_object(path)
}
