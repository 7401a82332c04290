//! Finding the allocator functions a process actually has mapped.
//!
//! Every ELF object mapped executable into the target is read (through
//! `/proc/PID/root`, so processes in other mount namespaces work), and each
//! definition of a malloc-family symbol becomes a probe site at its file offset.
//! Probing every definer rather than guessing which one the dynamic linker
//! binds is both simpler and right: an interposed allocator (jemalloc,
//! tcmalloc) and the C library's own are each probed, and only the one called
//! fires. Aliases (the same code under two names) are probed once.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use leaktrace_common::AllocFn;
use object::{Object as _, ObjectSection as _, ObjectSegment as _, ObjectSymbol as _, SymbolKind};

use crate::probes::placement::{self, Placement};

/// Functions longer than this are not decoded whole (their probe stays at the entry).
const MAX_FUNCTION_BYTES: u64 = 256 << 10;

/// The argument registers a function's probe reads (System V x86-64: rdi, rsi, rdx).
fn argument_registers(func: AllocFn) -> &'static [iced_x86::Register] {
    use iced_x86::Register::{RDI, RDX, RSI};
    match func {
        AllocFn::Malloc
        | AllocFn::Valloc
        | AllocFn::Pvalloc
        | AllocFn::Free
        | AllocFn::OperatorNew
        | AllocFn::OperatorDelete
        | AllocFn::Mallocx
        | AllocFn::SizedFree => &[RDI],
        AllocFn::Calloc
        | AllocFn::Realloc
        | AllocFn::AlignedAlloc
        | AllocFn::Memalign
        | AllocFn::Rallocx => &[RDI, RSI],
        AllocFn::Reallocarray | AllocFn::PosixMemalign => &[RDI, RSI, RDX],
    }
}

/// One place to attach a probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeSite {
    /// The function and its semantics.
    pub func: AllocFn,
    /// The symbol probed (one of `func`'s [`AllocFn::symbols`]).
    pub name: &'static str,
    /// Path of the object as the target sees it.
    pub object: String,
    /// Path to open from our mount namespace.
    pub host_path: PathBuf,
    /// File offset of the probes (entry, return or session): the function's first
    /// instruction plus `placement.offset`.
    pub offset: u64,
    /// File offset of the function's first instruction.
    pub entry_offset: u64,
    /// The function's address in the object and its size in bytes (0: unknown).
    pub symbol: (u64, u64),
    /// Where in the function the probe goes, and why.
    pub placement: Placement,
}

/// Reasons an object could not be searched.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    /// The file could not be read.
    #[error("failed to read {path}")]
    Read {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not an ELF object we understand.
    #[error("failed to parse {path} as ELF")]
    Parse {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: object::Error,
    },
}

/// Finds allocator definitions in one ELF object.
pub fn find_in_object(object: &str, host_path: &Path) -> Result<Vec<ProbeSite>, ObjectError> {
    let data =
        crate::process::procfs::read_object(host_path).map_err(|source| ObjectError::Read {
            path: host_path.to_owned(),
            source,
        })?;
    let file = object::File::parse(&*data).map_err(|source| ObjectError::Parse {
        path: host_path.to_owned(),
        source,
    })?;
    // Dynamic symbols are what the dynamic linker binds; a static binary has only .symtab.
    let mut syms: Vec<_> = file.dynamic_symbols().collect();
    if syms.is_empty() {
        syms = file.symbols().collect();
    }
    let segments: Vec<(u64, u64, u64)> = file
        .segments()
        .map(|s| (s.address(), s.size(), s.file_range().0))
        .collect();
    let mut sites = Vec::new();
    let mut seen_offsets = BTreeSet::new();
    let defines = |name: &str| {
        syms.iter().any(|s| {
            s.is_definition() && s.kind() == SymbolKind::Text && s.name().is_ok_and(|n| n == name)
        })
    };
    // C++'s operators matter where the allocator defines them (jemalloc, tcmalloc and
    // mimalloc inline their fast path there); libstdc++'s call malloc, whose probe
    // sees those calls already.
    let allocator_here = defines("malloc");
    let wanted = AllocFn::ALL
        .iter()
        .filter(|f| allocator_here || !matches!(f, AllocFn::OperatorNew | AllocFn::OperatorDelete))
        .flat_map(|&f| f.symbols().iter().map(move |&n| (f, n)));
    // Where the probed names' code is: a thunk landing inside one is probed there.
    let wanted_names: Vec<&str> = AllocFn::ALL
        .iter()
        .flat_map(|f| f.symbols().iter().copied())
        .collect();
    let named_ranges: Vec<(u64, u64)> = syms
        .iter()
        .filter(|s| {
            s.is_definition()
                && s.kind() == SymbolKind::Text
                && s.name().is_ok_and(|n| wanted_names.contains(&n))
        })
        .map(|s| (s.address(), s.address() + s.size().max(1)))
        .collect();
    let plt: Vec<(u64, u64)> = file
        .sections()
        .filter(|s| s.name().is_ok_and(|n| n.starts_with(".plt")))
        .map(|s| (s.address(), s.address() + s.size()))
        .collect();
    let file_offset = |addr: u64| {
        segments
            .iter()
            .find(|&&(va, size, _)| addr >= va && addr < va + size)
            .map(|&(vaddr, _, foff)| addr - vaddr + foff)
    };
    for (func, name) in wanted {
        let Some(sym) = syms.iter().find(|s| {
            s.is_definition() && s.kind() == SymbolKind::Text && s.name().is_ok_and(|n| n == name)
        }) else {
            continue;
        };
        let mut addr = sym.address();
        let Some(mut entry_offset) = file_offset(addr) else {
            continue;
        };
        // The whole function when its size is known (the placement checks it for
        // branches back into the prefix it skips), else its first bytes.
        let mut size = sym.size();
        let mut whole = size > 0 && size <= MAX_FUNCTION_BYTES;
        let mut len = if whole { sym.size() } else { 64 };
        let code_at = |off: u64, len: u64| {
            let start = usize::try_from(off).unwrap_or(usize::MAX);
            data.get(start..start.saturating_add(len as usize).min(data.len()))
                .unwrap_or(&[])
        };
        // A thunk that jumps to another function is probed where it lands: not at
        // all when it lands in the PLT (jemalloc's `operator delete` is `jmp
        // free@plt`: free's probe sees the call) or in a function probed under its
        // own name; at the landing site when that code has no name of ours (musl's
        // `malloc` is `jmp __libc_malloc_impl`, a local function).
        if placement::is_thunk(code_at(entry_offset, len)) {
            let landing = placement::thunk_target(code_at(entry_offset, len), addr);
            let Some(landing) = landing.filter(|&t| {
                !plt.iter().any(|&(s, e)| s <= t && t < e)
                    && !named_ranges.iter().any(|&(s, e)| s <= t && t < e)
            }) else {
                continue;
            };
            let Some(off) = file_offset(landing) else {
                continue;
            };
            // The landing function's size is unknown: its first bytes are placed.
            (addr, entry_offset, size, whole, len) = (landing, off, 0, false, 64);
        }
        // An alias of a function already probed (glibc's aligned_alloc is memalign's code).
        if !seen_offsets.insert(entry_offset) {
            continue;
        }
        let code = code_at(entry_offset, len);
        let placement = placement::place(
            code,
            whole,
            placement::Needs {
                args: argument_registers(func),
                null_exit_ok: func.frees(),
            },
        );
        sites.push(ProbeSite {
            func,
            name,
            object: object.to_owned(),
            host_path: host_path.to_owned(),
            offset: entry_offset + placement.offset,
            entry_offset,
            symbol: (addr, size),
            placement,
        });
    }
    Ok(sites)
}

/// Result of searching a process's objects.
#[derive(Debug, Default)]
pub struct Search {
    /// Probe sites found.
    pub sites: Vec<ProbeSite>,
    /// Objects searched, as the target names them.
    pub searched: Vec<String>,
    /// Objects that could not be read, with why.
    pub unreadable: Vec<String>,
}

/// Searches the given objects (target path, host path) for allocator functions.
pub fn search<'a>(objects: impl IntoIterator<Item = (&'a str, PathBuf)>) -> Search {
    let mut out = Search::default();
    let mut done = BTreeSet::new();
    for (object, host) in objects {
        if !done.insert(object.to_owned()) {
            continue;
        }
        out.searched.push(object.to_owned());
        match find_in_object(object, &host) {
            Ok(sites) => out.sites.extend(sites),
            Err(e) => out.unreadable.push(format!("{e:#}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The C library this test runs on defines the whole malloc family; aliases collapse.
    #[test]
    fn finds_libc_allocators() {
        let maps = crate::process::procfs::read_maps(std::process::id()).expect("own maps");
        let libc = maps
            .iter()
            .find(|m| m.is_exec() && m.path.contains("libc.so"))
            .expect("this test binary links libc dynamically");
        let sites = find_in_object(&libc.path, Path::new(&libc.path)).expect("readable libc");
        let names: Vec<_> = sites.iter().map(|s| s.func.symbol()).collect();
        for required in [
            "malloc",
            "calloc",
            "realloc",
            "free",
            "posix_memalign",
            "valloc",
            "pvalloc",
        ] {
            assert!(
                names.contains(&required),
                "{required} missing from {names:?}"
            );
        }
        let offsets: BTreeSet<_> = sites.iter().map(|s| s.offset).collect();
        assert_eq!(offsets.len(), sites.len(), "each offset is probed once");
    }

    /// On this machine's C library, `free` is placed where its prologue says.
    #[test]
    fn places_free_in_this_libc() {
        let maps = crate::process::procfs::read_maps(std::process::id()).expect("own maps");
        let libc = maps
            .iter()
            .find(|m| m.is_exec() && m.path.contains("libc.so"))
            .expect("libc");
        let sites = find_in_object(&libc.path, Path::new(&libc.path)).expect("libc");
        let free = sites
            .iter()
            .find(|s| s.func == leaktrace_common::AllocFn::Free)
            .expect("free");
        // Whatever this libc is, the chosen offset lands on an emulated instruction or stays at 0.
        assert!(
            free.placement.offset == 0
                || free.placement.reason.starts_with("null-check")
                || free.placement.reason.starts_with("straight"),
            "{:?}",
            free.placement
        );
        assert_eq!(free.offset, free.entry_offset + free.placement.offset);
    }
}
