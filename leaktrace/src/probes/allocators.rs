//! Finding the allocator functions a process actually has mapped, and naming the
//! allocators they belong to.
//!
//! Every ELF object mapped executable into the target is read (through
//! `/proc/PID/root`, so processes in other mount namespaces work), and each
//! definition of a malloc-family symbol becomes a probe site at its file offset.
//! Probing every definer rather than guessing which one the dynamic linker
//! binds is both simpler and right: an interposed allocator (jemalloc,
//! tcmalloc) and the C library's own are each probed, and only the one called
//! fires. Aliases (the same code under two names) are probed once.
//!
//! Besides the standard names, each allocator family's own API is probed where an
//! object defines it ([`FAMILY_FUNCTIONS`]): a Rust program statically linked with
//! jemalloc calls `_rjem_mallocx` and `_rjem_sdallocx`, one with mimalloc
//! `mi_malloc_aligned` and `mi_free`, never `malloc`. The executable's full symbol
//! table is read for them, as such programs export nothing.

use std::{
    collections::{BTreeSet, HashMap},
    path::{Path, PathBuf},
};

use leaktrace_common::AllocFn;
use object::{Object as _, ObjectSection as _, ObjectSegment as _, ObjectSymbol as _, SymbolKind};
use serde::{Deserialize, Serialize};

use crate::probes::placement::{self, Placement};

/// Functions longer than this are not decoded whole (their probe stays at the entry).
const MAX_FUNCTION_BYTES: u64 = 256 << 10;

/// jemalloc's API under a prefix (`je_` for builds such as redis's bundled one,
/// `_rjem_` for the Rust crates'); unprefixed, its names are the standard ones.
macro_rules! jemalloc_api {
    ($p:literal) => {
        [
            (AllocFn::Malloc, concat!($p, "malloc")),
            (AllocFn::Calloc, concat!($p, "calloc")),
            (AllocFn::Realloc, concat!($p, "realloc")),
            (AllocFn::Free, concat!($p, "free")),
            (AllocFn::PosixMemalign, concat!($p, "posix_memalign")),
            (AllocFn::AlignedAlloc, concat!($p, "aligned_alloc")),
            (AllocFn::Memalign, concat!($p, "memalign")),
            (AllocFn::Valloc, concat!($p, "valloc")),
            (AllocFn::Mallocx, concat!($p, "mallocx")),
            (AllocFn::Rallocx, concat!($p, "rallocx")),
            (AllocFn::SizedFree, concat!($p, "sdallocx")),
            (AllocFn::SizedFree, concat!($p, "dallocx")),
        ]
    };
}

const JE: [(AllocFn, &str); 12] = jemalloc_api!("je_");
const RJEM: [(AllocFn, &str); 12] = jemalloc_api!("_rjem_");

/// tcmalloc's own names (gperftools and Google's tcmalloc): the standard names are
/// aliases of these in its shared library, but a program linking it statically may
/// call them directly.
const TCMALLOC: [(AllocFn, &str); 27] = [
    (AllocFn::Malloc, "tc_malloc"),
    (AllocFn::Malloc, "tc_malloc_skip_new_handler"),
    (AllocFn::Calloc, "tc_calloc"),
    (AllocFn::Realloc, "tc_realloc"),
    (AllocFn::Free, "tc_free"),
    (AllocFn::Free, "tc_cfree"),
    (AllocFn::SizedFree, "tc_free_sized"),
    (AllocFn::Memalign, "tc_memalign"),
    (AllocFn::PosixMemalign, "tc_posix_memalign"),
    (AllocFn::Valloc, "tc_valloc"),
    (AllocFn::Pvalloc, "tc_pvalloc"),
    (AllocFn::OperatorNew, "tc_new"),
    (AllocFn::OperatorNew, "tc_newarray"),
    (AllocFn::OperatorNew, "tc_new_nothrow"),
    (AllocFn::OperatorNew, "tc_newarray_nothrow"),
    (AllocFn::OperatorNew, "tc_new_aligned"),
    (AllocFn::OperatorNew, "tc_newarray_aligned"),
    (AllocFn::OperatorNew, "tc_new_aligned_nothrow"),
    (AllocFn::OperatorNew, "tc_newarray_aligned_nothrow"),
    (AllocFn::OperatorDelete, "tc_delete"),
    (AllocFn::OperatorDelete, "tc_deletearray"),
    (AllocFn::OperatorDelete, "tc_delete_nothrow"),
    (AllocFn::OperatorDelete, "tc_deletearray_nothrow"),
    (AllocFn::OperatorDelete, "tc_delete_sized"),
    (AllocFn::OperatorDelete, "tc_deletearray_sized"),
    (AllocFn::OperatorDelete, "tc_delete_aligned"),
    (AllocFn::OperatorDelete, "tc_deletearray_aligned"),
];

/// mimalloc's API. Its shared library's standard names are aliases of these or jump
/// to them through its own PLT; Rust's `mimalloc` crate calls `mi_malloc_aligned`,
/// `mi_zalloc_aligned`, `mi_realloc_aligned` and `mi_free`. The aligned forms take the
/// size first (probed as [`AllocFn::Mallocx`] and [`AllocFn::Rallocx`]: size in the
/// first or second argument, the alignment after it).
const MIMALLOC: [(AllocFn, &str); 27] = [
    (AllocFn::Malloc, "mi_malloc"),
    (AllocFn::Malloc, "mi_zalloc"),
    (AllocFn::Calloc, "mi_calloc"),
    (AllocFn::Calloc, "mi_mallocn"),
    (AllocFn::Realloc, "mi_realloc"),
    (AllocFn::Reallocarray, "mi_reallocn"),
    (AllocFn::Reallocarray, "mi_reallocarray"),
    (AllocFn::Free, "mi_free"),
    (AllocFn::SizedFree, "mi_free_size"),
    (AllocFn::SizedFree, "mi_free_aligned"),
    (AllocFn::SizedFree, "mi_free_size_aligned"),
    (AllocFn::PosixMemalign, "mi_posix_memalign"),
    (AllocFn::AlignedAlloc, "mi_aligned_alloc"),
    (AllocFn::Memalign, "mi_memalign"),
    (AllocFn::Valloc, "mi_valloc"),
    (AllocFn::Pvalloc, "mi_pvalloc"),
    (AllocFn::Mallocx, "mi_malloc_aligned"),
    (AllocFn::Mallocx, "mi_zalloc_aligned"),
    (AllocFn::Rallocx, "mi_realloc_aligned"),
    (AllocFn::OperatorNew, "mi_new"),
    (AllocFn::OperatorNew, "mi_new_aligned"),
    (AllocFn::OperatorNew, "mi_new_nothrow"),
    (AllocFn::OperatorNew, "mi_new_aligned_nothrow"),
    (AllocFn::Calloc, "mi_new_n"),
    (AllocFn::Realloc, "mi_new_realloc"),
    (AllocFn::Reallocarray, "mi_new_reallocn"),
    (AllocFn::Rallocx, "mi_rezalloc"),
];

/// Every allocator family's own functions, beyond the standard names.
pub const FAMILY_FUNCTIONS: [&[(AllocFn, &str)]; 4] = [&JE, &RJEM, &TCMALLOC, &MIMALLOC];

/// The allocators leaktrace tells apart by their symbols.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Allocator {
    /// glibc's ptmalloc.
    Glibc,
    /// musl's mallocng (or oldmalloc).
    Musl,
    /// jemalloc.
    Jemalloc,
    /// gperftools' or Google's tcmalloc.
    Tcmalloc,
    /// Microsoft's mimalloc.
    Mimalloc,
    /// Go's runtime: its heap is its own, with no malloc to probe.
    Go,
    /// Some other object defining `malloc` (a custom or debugging allocator).
    Other,
}

impl Allocator {
    /// Its name, as in the report.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Glibc => "glibc",
            Self::Musl => "musl",
            Self::Jemalloc => "jemalloc",
            Self::Tcmalloc => "tcmalloc",
            Self::Mimalloc => "mimalloc",
            Self::Go => "go",
            Self::Other => "other",
        }
    }
}

/// An allocator found in one object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Found {
    /// Which allocator.
    pub allocator: Allocator,
    /// Its version, where the object says (jemalloc's and glibc's version strings,
    /// gperftools', mimalloc's `mi_version`, Go's build info).
    pub version: Option<String>,
    /// The object, as the target names it.
    pub object: String,
    /// The prefix of its API (`_rjem_`, `je_`, `mi_`, `tc_`), empty for the standard names.
    pub prefix: String,
    /// Whether this object exports `malloc` itself (so it can serve the program's
    /// `malloc` calls: an interposer, the C library, or a static executable's).
    pub defines_malloc: bool,
    /// Whether it serves the program's `malloc` (set by [`Search::resolve_serving`]).
    pub serves_malloc: bool,
    /// Probe sites placed in this object.
    pub probes: usize,
}

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

/// What one object holds: its probe sites and the allocator it is, if any.
#[derive(Debug, Default)]
pub struct InObject {
    /// Probe sites.
    pub sites: Vec<ProbeSite>,
    /// The allocator (or Go runtime) the object is, if it is one.
    pub found: Option<Found>,
}

/// Finds allocator definitions in one ELF object.
pub fn find_in_object(object: &str, host_path: &Path) -> Result<InObject, ObjectError> {
    let data =
        crate::process::procfs::read_object(host_path).map_err(|source| ObjectError::Read {
            path: host_path.to_owned(),
            source,
        })?;
    find_in_bytes(object, host_path, &data).map_err(|source| ObjectError::Parse {
        path: host_path.to_owned(),
        source,
    })
}

/// [`find_in_object`] on the object's bytes, read already (the target's files are
/// hostile input: this is fuzzed).
pub fn find_in_bytes(
    object: &str,
    host_path: &Path,
    data: &[u8],
) -> Result<InObject, object::Error> {
    let file = object::File::parse(data)?;
    // Dynamic symbols are what the dynamic linker binds; a static binary has only
    // .symtab. The families' own names are looked for in both: an executable linking
    // an allocator statically calls it without exporting it.
    //
    // One pass over each table: the functions each defines, by name, in table order
    // (about 90 names are looked up; a C++ binary has hundreds of thousands of symbols).
    fn functions<'d>(
        syms: impl Iterator<Item = object::Symbol<'d, 'd>>,
    ) -> HashMap<&'d str, Vec<(u64, u64)>> {
        let mut by_name: HashMap<&str, Vec<(u64, u64)>> = HashMap::new();
        for s in syms {
            if s.is_definition()
                && s.kind() == SymbolKind::Text
                && let Ok(n) = s.name()
            {
                by_name.entry(n).or_default().push((s.address(), s.size()));
            }
        }
        by_name
    }
    let dynamic = functions(file.dynamic_symbols());
    let table = functions(file.symbols());
    let exported = if file.dynamic_symbols().next().is_none() {
        &table
    } else {
        &dynamic
    };
    // Definitions under a name anywhere, the dynamic table's first.
    let every = |name: &str| {
        dynamic
            .get(name)
            .into_iter()
            .chain(table.get(name))
            .flatten()
            .copied()
    };
    let segments: Vec<(u64, u64, u64)> = file
        .segments()
        .map(|s| (s.address(), s.size(), s.file_range().0))
        .collect();
    let mut sites = Vec::new();
    let mut seen_offsets = BTreeSet::new();
    let defines = |name: &str| exported.contains_key(name);
    // C++'s operators matter where the allocator defines them (jemalloc, tcmalloc and
    // mimalloc inline their fast path there); libstdc++'s call malloc, whose probe
    // sees those calls already.
    let allocator_here = defines("malloc");
    let standard = AllocFn::ALL
        .iter()
        .filter(|f| allocator_here || !matches!(f, AllocFn::OperatorNew | AllocFn::OperatorDelete))
        .flat_map(|&f| f.symbols().iter().map(move |&n| (f, n, false)));
    // CPython 3.13+ bundles mimalloc (local `mi_malloc`, `mi_free`… in libpython) as
    // its object allocator for free-threaded builds and PYTHONMALLOC=mimalloc: that is
    // pymalloc's role, which leaktrace does not probe (one trap per object), and it is
    // not the process's malloc.
    let cpython = every("Py_Initialize").next().is_some() || every("Py_BytesMain").next().is_some();
    let family = FAMILY_FUNCTIONS
        .iter()
        .filter(|_| !cpython)
        .flat_map(|f| f.iter().map(|&(f, n)| (f, n, true)));
    let wanted = standard.chain(family);
    // Where the probed names' code is: a thunk landing inside one is probed there.
    let wanted_names: Vec<&str> = AllocFn::ALL
        .iter()
        .flat_map(|f| f.symbols().iter().copied())
        .chain(
            FAMILY_FUNCTIONS
                .iter()
                .flat_map(|f| f.iter().map(|&(_, n)| n)),
        )
        .collect();
    let named_ranges: Vec<(u64, u64)> = wanted_names
        .iter()
        .flat_map(|&n| every(n))
        .map(|(a, size)| (a, a.saturating_add(size.max(1))))
        .collect();
    let plt: Vec<(u64, u64)> = file
        .sections()
        .filter(|s| s.name().is_ok_and(|n| n.starts_with(".plt")))
        .map(|s| (s.address(), s.address().saturating_add(s.size())))
        .collect();
    let file_offset = |addr: u64| file_offset(&segments, addr);
    for (func, name, in_family) in wanted {
        let found = if in_family {
            every(name).next()
        } else {
            exported.get(name).and_then(|v| v.first().copied())
        };
        let Some((mut addr, sym_size)) = found else {
            continue;
        };
        let Some(mut entry_offset) = file_offset(addr) else {
            continue;
        };
        // The whole function when its size is known (the placement checks it for
        // branches back into the prefix it skips), else its first bytes.
        let mut size = sym_size;
        let mut whole = size > 0 && size <= MAX_FUNCTION_BYTES;
        let mut len = if whole { sym_size } else { 64 };
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
            offset: entry_offset.saturating_add(placement.offset),
            entry_offset,
            symbol: (addr, size),
            placement,
        });
    }
    let found = identify(
        object,
        &file,
        data,
        |name| every(name).next().is_some() && (!cpython || name == "malloc"),
        |addr, len| {
            let start = usize::try_from(file_offset(addr)?).ok()?;
            data.get(start..start.checked_add(len)?)
        },
    )
    .map(|(allocator, prefix, version)| Found {
        allocator,
        version,
        object: object.to_owned(),
        prefix: prefix.to_owned(),
        defines_malloc: allocator_here,
        serves_malloc: false,
        probes: sites.len(),
    });
    Ok(InObject { sites, found })
}

/// Which allocator an object is, by the symbols only it defines (any of its family's
/// entry points: a statically linked allocator keeps only those its program calls);
/// with its API's prefix and its version where the object says.
fn identify<'d>(
    object: &str,
    file: &object::File<'_>,
    data: &[u8],
    defines: impl Fn(&str) -> bool,
    bytes_at: impl Fn(u64, usize) -> Option<&'d [u8]>,
) -> Option<(Allocator, &'static str, Option<String>)> {
    if let Some(info) = file.section_by_name(".go.buildinfo") {
        let version = info.data().ok().and_then(go_version);
        return Some((Allocator::Go, "", version));
    }
    let any = |names: &[&str]| names.iter().any(|n| defines(n));
    if any(&[
        "mi_malloc",
        "mi_free",
        "mi_malloc_aligned",
        "mi_zalloc_aligned",
    ]) {
        let version = file
            .symbols()
            .chain(file.dynamic_symbols())
            .find(|s| s.name().is_ok_and(|n| n == "mi_version"))
            .and_then(|s| bytes_at(s.address(), 5))
            .and_then(|code| {
                (code[0] == 0xb8).then(|| u32::from_le_bytes([code[1], code[2], code[3], code[4]]))
            })
            .filter(|&v| (100..10_000).contains(&v))
            .map(|v| format!("{}.{}.{}", v / 100, v / 10 % 10, v % 10));
        return Some((Allocator::Mimalloc, "mi_", version));
    }
    if any(&["tc_malloc", "tc_free", "tc_new", "tc_delete"]) {
        let version = find_after(data, b"gperftools ", 16).map(|v| format!("gperftools {v}"));
        return Some((Allocator::Tcmalloc, "tc_", version));
    }
    // Unprefixed, only jemalloc's extensions tell it; prefixed, any entry point does.
    if any(&["mallocx", "sdallocx", "malloc_stats_print"]) {
        return Some((Allocator::Jemalloc, "", jemalloc_version(data)));
    }
    for prefix in ["je_", "_rjem_"] {
        if ["malloc", "mallocx", "sdallocx", "free", "calloc"]
            .iter()
            .any(|n| defines(&format!("{prefix}{n}")))
        {
            return Some((Allocator::Jemalloc, prefix, jemalloc_version(data)));
        }
    }
    let name = object.rsplit('/').next().unwrap_or(object);
    if name.contains("musl") || defines("__libc_malloc_impl") {
        return Some((Allocator::Musl, "", None));
    }
    if defines("__libc_malloc") && defines("malloc_trim") {
        let version = find_after(data, b"stable release version ", 16)
            .map(|v| v.trim_end_matches('.').to_owned());
        return Some((Allocator::Glibc, "", version));
    }
    defines("malloc").then_some((Allocator::Other, "", None))
}

/// The file offset of a virtual address, from the object's segments (address, size,
/// file offset).
fn file_offset(segments: &[(u64, u64, u64)], addr: u64) -> Option<u64> {
    segments
        .iter()
        .find(|&&(va, size, _)| addr >= va && addr < va.saturating_add(size))
        .and_then(|&(vaddr, _, foff)| (addr - vaddr).checked_add(foff))
}

/// The printable word (digits, dots, letters, `-`, `+`, `~`) after `marker`, at most `max` bytes.
fn find_after(data: &[u8], marker: &[u8], max: usize) -> Option<String> {
    let at = memchr::memmem::find(data, marker)? + marker.len();
    let word: Vec<u8> = data[at..]
        .iter()
        .take(max)
        .take_while(|b| b.is_ascii_alphanumeric() || b"._-+~".contains(b))
        .copied()
        .collect();
    (!word.is_empty()).then(|| String::from_utf8_lossy(&word).into_owned())
}

/// jemalloc's version string, `MAJOR.MINOR.PATCH-N-gHASH`, found by its 40-digit hash.
fn jemalloc_version(data: &[u8]) -> Option<String> {
    let finder = memchr::memmem::Finder::new(b"-g");
    for at in finder.find_iter(data) {
        let hash = data.get(at + 2..at + 42)?;
        if !hash.iter().all(u8::is_ascii_hexdigit) || data.get(at + 42) != Some(&0) {
            continue;
        }
        // Back over `N`, `-` and the dotted version.
        let start = data[..at]
            .iter()
            .rposition(|b| !(b.is_ascii_digit() || *b == b'.' || *b == b'-'))
            .map_or(0, |p| p + 1);
        let text = String::from_utf8_lossy(&data[start..at]).into_owned();
        if text.matches('.').count() == 2 {
            return Some(
                text.rsplit_once('-')
                    .map_or(text.clone(), |(v, _)| v.to_owned()),
            );
        }
    }
    None
}

/// The Go version in a `.go.buildinfo` section (Go 1.18's format: a 32-byte header
/// whose flags say the strings follow inline, each after its varint length).
fn go_version(info: &[u8]) -> Option<String> {
    if !info.starts_with(b"\xff Go buildinf:") || info.len() < 33 {
        return None;
    }
    if info[15] & 2 == 0 {
        // Older binaries point at the string instead: not read.
        return None;
    }
    let rest = &info[32..];
    let (len, used) = varint(rest)?;
    let s = rest.get(used..used.checked_add(usize::try_from(len).ok()?)?)?;
    let s = std::str::from_utf8(s).ok()?;
    (s.starts_with("go") && s.len() < 64).then(|| s.to_owned())
}

/// An unsigned LEB128 varint: its value and its length in bytes.
fn varint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, &byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
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
    /// The allocators found, in the order of the objects searched.
    pub allocators: Vec<Found>,
}

impl Search {
    /// Marks the allocator that serves the program's `malloc`: the executable's own
    /// when it defines one, else an interposer (a preloaded or linked allocator other
    /// than the C library), else the C library. A family called by its own prefix
    /// (`_rjem_mallocx`) serves its callers beside it, and is listed without this mark.
    pub fn resolve_serving(&mut self) {
        let libc = |f: &Found| matches!(f.allocator, Allocator::Glibc | Allocator::Musl);
        let pick = self
            .allocators
            .iter()
            .position(|f| f.defines_malloc && f.prefix.is_empty() && !libc(f))
            .or_else(|| {
                self.allocators
                    .iter()
                    .position(|f| f.defines_malloc && !libc(f))
            })
            .or_else(|| self.allocators.iter().position(|f| f.defines_malloc));
        if let Some(i) = pick {
            self.allocators[i].serves_malloc = true;
        }
    }

    /// The allocator serving `malloc`, if one was found.
    pub fn serving(&self) -> Option<&Found> {
        self.allocators.iter().find(|f| f.serves_malloc)
    }
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
            Ok(found) => {
                out.sites.extend(found.sites);
                out.allocators.extend(found.found);
            }
            Err(e) => out.unreadable.push(format!("{e:#}")),
        }
    }
    out.resolve_serving();
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
        let found = find_in_object(&libc.path, Path::new(&libc.path)).expect("readable libc");
        let sites = found.sites;
        let libc_found = found.found.expect("libc is an allocator");
        assert_eq!(libc_found.allocator, Allocator::Glibc);
        assert!(libc_found.defines_malloc);
        let version = libc_found.version.expect("glibc's version string");
        assert!(version.starts_with("2."), "{version}");
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
        let sites = find_in_object(&libc.path, Path::new(&libc.path))
            .expect("libc")
            .sites;
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

    /// CPython 3.13's libpython bundles mimalloc as its object allocator (local
    /// `mi_malloc`, `mi_free`…): not probed, and libpython is not an allocator.
    #[test]
    fn cpython_bundled_mimalloc_is_not_the_process_allocator() {
        // pyenv's 3.13 is part of the machine's setup (field-2026.md).
        let lib = std::fs::read_dir("/root/.pyenv/versions")
            .expect("pyenv's versions")
            .filter_map(Result::ok)
            .map(|e| e.path().join("lib/libpython3.13.so.1.0"))
            .find(|p| p.exists())
            .expect("pyenv's 3.13 is required");
        let lib = lib.as_path();
        let data = std::fs::read(lib).unwrap();
        let file = object::File::parse(&*data).unwrap();
        assert!(
            file.symbols().any(|s| s.name() == Ok("mi_malloc")),
            "this libpython bundles mimalloc"
        );
        let found = find_in_bytes("libpython3.13.so.1.0", lib, &data).unwrap();
        assert!(found.sites.is_empty(), "{:?}", found.sites);
        assert_eq!(found.found, None);
    }
}
