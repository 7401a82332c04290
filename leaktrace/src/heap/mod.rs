//! Allocator state read from the target's memory, from outside: the heap as the
//! allocator itself sees it (in use, free, free but resident, trimmable).
//! [`glibc`] walks glibc's arenas, [`pymalloc`] CPython's small-object arenas;
//! [`jemalloc`] reads jemalloc's arena counters where its layout is known.

use std::{io::Read as _, path::PathBuf};

use crate::process::{
    elf,
    procfs::{self, MapEntry},
};

pub mod census;
pub mod glibc;
pub mod go;
pub mod jemalloc;
pub mod mimalloc;
pub mod pygc;
pub mod pymalloc;
pub mod reach;
pub mod tcmalloc;

/// Other allocators' own state, read from outside where their layout is known.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OtherState {
    /// jemalloc's arenas, per object that holds a jemalloc.
    pub jemalloc: Vec<jemalloc::JemallocState>,
    /// mimalloc 3's arenas, per object that holds a mimalloc.
    pub mimalloc: Vec<mimalloc::MimallocState>,
    /// gperftools' page heap and caches, per object that holds a tcmalloc.
    pub tcmalloc: Vec<tcmalloc::TcmallocState>,
    /// The Go runtime's heap statistics, in a Go program.
    pub go: Option<go::GoHeap>,
    /// Allocators found whose state is not read, and why.
    pub not_read: Vec<NotRead>,
}

/// An allocator whose own state is not read.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NotRead {
    /// Which allocator (`jemalloc`, `tcmalloc`, `mimalloc`).
    pub allocator: String,
    /// The object holding it, as the target names it.
    pub object: String,
    /// Why not.
    pub why: String,
}

impl OtherState {
    /// Freed memory these allocators keep resident, as they count it.
    pub fn kept_bytes(&self) -> u64 {
        self.jemalloc
            .iter()
            .map(jemalloc::JemallocState::kept_bytes)
            .chain(
                self.mimalloc
                    .iter()
                    .map(mimalloc::MimallocState::kept_bytes),
            )
            .chain(
                self.tcmalloc
                    .iter()
                    .map(tcmalloc::TcmallocState::kept_bytes),
            )
            .sum()
    }
}

/// Finds an allocator's layout in `object` as the target maps it, with `find` run on
/// the object (its symbols and DWARF), else on the debug file installed for its build
/// id; and the object's load bias.
pub fn locate<L>(
    pid: u32,
    maps: &[MapEntry],
    object: &str,
    debug_dirs: &[PathBuf],
    find: impl Fn(&[u8]) -> Result<L, String>,
) -> Result<(L, u64), String> {
    let first = maps
        .iter()
        .filter(|m| m.path == object)
        .min_by_key(|m| m.start)
        .ok_or_else(|| format!("{object} is no longer mapped"))?;
    let host = PathBuf::from(format!(
        "/proc/{pid}/map_files/{:x}-{:x}",
        first.start, first.end
    ));
    let data = procfs::read_object(&host).map_err(|e| format!("reading {object}: {e}"))?;
    let bias = elf::load_bias(&data, first.start, first.offset, first.is_exec())
        .ok_or_else(|| format!("{object}: no loadable segment maps its first mapping"))?;
    let why = match find(&data) {
        Ok(l) => return Ok((l, bias)),
        Err(why) => why,
    };
    drop(data);
    let dirs = crate::symbolize::native::build_id_dirs(pid, debug_dirs);
    let Some(f) = crate::symbolize::native::debug_file_by_build_id(&host, &dirs) else {
        return Err(format!(
            "{why}, and no debug file for its build id is installed{}",
            crate::symbolize::native::dpkg_package(pid, object)
                .map_or(String::new(), |p| format!(" ({p}-dbgsym on Debian)"))
        ));
    };
    let mut debug = Vec::new();
    f.take(procfs::MAX_OBJECT_BYTES)
        .read_to_end(&mut debug)
        .map_err(|e| format!("reading its debug file: {e}"))?;
    find(&debug)
        .map(|l| (l, bias))
        .map_err(|e| format!("its debug file: {e}"))
}
