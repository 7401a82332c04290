//! Native frames: stack addresses turned into functions, files and lines with blazesym.
//!
//! Addresses are normalized against our own snapshot of the target's
//! executable mappings and symbolized per object file by file offset, so a
//! stack can still be named after the target exited (the snapshot and the
//! files outlive it). Results are cached per address; new stacks are resolved
//! in batches as they appear, while the target is alive.

use std::path::{Path, PathBuf};

use blazesym::symbolize::{
    CodeInfo, Input, Symbolized, Symbolizer,
    source::{Elf, Source},
};
use leaktrace_common::{STACK_CFI, STACK_SYSCALL, STACK_TRUNCATED, StackTrace};
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::{
    process::procfs::{self, MapEntry},
    symbolize::{Frame, FrameKind, Stack},
};

/// An address to symbolize and whether it is a return address (looked up at `addr - 1`).
type Key = (u64, bool);

/// Stack symbolizer for one target process.
pub struct Symbols {
    pid: u32,
    exec_maps: Vec<MapEntry>,
    symbolizer: Symbolizer,
    cache: FxHashMap<Key, Vec<Frame>>,
    /// The executable's file as mapped, and the name frames in it are shown with
    /// (the path the program was started as), when the two differ.
    program: Option<(String, String)>,
    /// Per object (as mapped): addresses looked up with and without a symbol.
    names: FxHashMap<String, ObjectNames>,
    package_lookups: usize,
    debug_dirs: Vec<PathBuf>,
    /// Per object (as mapped): its debug file found by build id, if any (a path
    /// through one of `open_debug_files`).
    debug_files: FxHashMap<String, Option<PathBuf>>,
    /// Files opened for blazesym (debug files found, objects of a target that is
    /// gone, copies in memory), held open: blazesym opens them again by descriptor.
    open_debug_files: Vec<std::fs::File>,
    /// Objects the target could truncate, copied into memory, by (device, inode).
    copies: FxHashMap<(u64, u64), Option<PathBuf>>,
    /// Bytes copied so far.
    copied_bytes: u64,
}

/// Most bytes of objects copied into memory (see [`Symbols::untruncatable`]); past it,
/// a writable object is not symbolized.
const MAX_COPIED_BYTES: u64 = 1 << 30;

/// Objects whose package is looked up in the dpkg database (one scan each).
const MAX_PACKAGE_LOOKUPS: usize = 8;

#[derive(Debug, Default)]
struct ObjectNames {
    named: u64,
    unnamed: u64,
    /// Read at the first unnamed address, while the file is surely reachable.
    build_id: Option<String>,
    package: Option<String>,
}

/// An object in which addresses of the target's stacks had no symbol (a stripped
/// file, or static functions missing from its symbol table), with what finds its
/// debug information.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unnamed {
    /// The file, as the target maps it.
    pub object: String,
    /// The path the program was started as, when this is its executable under
    /// another name (frames in it are shown with that name).
    pub run_as: Option<String>,
    /// Its GNU build id, hex: the key of debuginfod and of `/usr/lib/debug/.build-id`.
    pub build_id: Option<String>,
    /// The Debian package that installed it, from the target's own dpkg database.
    pub package: Option<String>,
    /// Addresses looked up in it without a symbol.
    pub unnamed_addresses: u64,
    /// Addresses looked up in it with one.
    pub named_addresses: u64,
}

impl std::fmt::Debug for Symbols {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Symbols")
            .field("pid", &self.pid)
            .field("cached_addresses", &self.cache.len())
            .finish_non_exhaustive()
    }
}

impl Symbols {
    /// A symbolizer for `pid`, with an initial snapshot of its mappings. Debug
    /// information is looked for beside each object, in `debug_dirs`, in the target's
    /// own `/usr/lib/debug` (a container's), then in ours (by build id and by
    /// `.gnu_debuglink`).
    pub fn new(pid: u32, debug_dirs: &[PathBuf]) -> Self {
        // blazesym opens what it finds in these itself: ours and the user's only.
        let mut dirs: Vec<PathBuf> = debug_dirs.to_vec();
        dirs.extend(["/usr/lib/debug", "/lib/debug"].map(PathBuf::from));
        // The target's own (a container's) is searched by build id, by us (see
        // `debug_file_by_build_id`): its files are opened as regular files only.
        let by_id = build_id_dirs(pid, debug_dirs);
        let mut s = Self {
            pid,
            exec_maps: Vec::new(),
            symbolizer: Symbolizer::builder()
                .enable_code_info(true)
                .enable_inlined_fns(true)
                .enable_demangling(true)
                .set_debug_dirs(Some(&dirs))
                .build(),
            debug_dirs: by_id,
            debug_files: FxHashMap::default(),
            open_debug_files: Vec::new(),
            copies: FxHashMap::default(),
            copied_bytes: 0,
            cache: FxHashMap::default(),
            program: None,
            names: FxHashMap::default(),
            package_lookups: 0,
        };
        s.refresh_maps();
        s
    }

    /// The objects in which some addresses had no symbol, most unnamed first.
    pub fn unnamed(&self) -> Vec<Unnamed> {
        let mut v: Vec<Unnamed> = self
            .names
            .iter()
            .filter(|(_, n)| n.unnamed > 0)
            .map(|(object, n)| Unnamed {
                object: object.clone(),
                run_as: self
                    .program
                    .as_ref()
                    .filter(|(file, _)| file == object)
                    .map(|(_, name)| name.clone()),
                build_id: n.build_id.clone(),
                package: n.package.clone(),
                unnamed_addresses: n.unnamed,
                named_addresses: n.named,
            })
            .collect();
        v.sort_by(|a, b| {
            b.unnamed_addresses
                .cmp(&a.unnamed_addresses)
                .then_with(|| a.object.cmp(&b.object))
        });
        v
    }

    /// The name frames in `object` are shown with.
    fn shown(&self, object: &str) -> String {
        match &self.program {
            Some((file, name)) if file == object => name.clone(),
            _ => object.to_owned(),
        }
    }

    /// Re-reads the target's mappings; keeps the old snapshot if it is gone.
    pub fn refresh_maps(&mut self) -> bool {
        match procfs::read_maps(self.pid) {
            Ok(m) => {
                let fresh: Vec<MapEntry> = m
                    .into_iter()
                    .filter(|m| m.is_exec() && m.is_file())
                    .collect();
                // Keep mappings that went away (dlclose) for stacks recorded earlier.
                // One that other code replaced (a library loaded where another was)
                // goes, and so do the names looked up in it: the same addresses name
                // the new code now (BPF gives its stacks new ids).
                for old in std::mem::take(&mut self.exec_maps) {
                    let same = |f: &MapEntry| {
                        f.start == old.start
                            && f.end == old.end
                            && f.offset == old.offset
                            && f.path == old.path
                            && f.inode == old.inode
                    };
                    if !fresh.iter().any(|f| f.start < old.end && old.start < f.end) {
                        self.exec_maps.push(old);
                    } else if !fresh.iter().any(same) {
                        log::debug!("code at {:#x} replaced: {} is gone", old.start, old.path);
                        self.cache.retain(|k, _| k.0 < old.start || k.0 >= old.end);
                    }
                }
                self.exec_maps.extend(fresh);
                self.exec_maps.sort_by_key(|m| m.start);
                self.program = program_name(self.pid);
                log::debug!(
                    "mappings snapshot of pid {}: {} executable mappings",
                    self.pid,
                    self.exec_maps.len()
                );
                true
            }
            Err(e) => {
                log::debug!("mappings of pid {} unreadable: {e}", self.pid);
                false
            }
        }
    }

    fn mapping(&self, addr: u64) -> Option<&MapEntry> {
        let i = self.exec_maps.partition_point(|m| m.start <= addr);
        let m = self.exec_maps.get(i.checked_sub(1)?)?;
        (addr < m.end).then_some(m)
    }

    /// Whether every frame of a raw stack (but a syscall stack's guessed second
    /// frame) lies in a known executable mapping.
    pub fn covers(&self, st: &StackTrace) -> bool {
        let n = (st.len as usize).min(st.frames.len());
        let syscall = st.flags & STACK_SYSCALL != 0 && st.flags & STACK_CFI == 0;
        st.frames[..n]
            .iter()
            .enumerate()
            .all(|(i, &a)| (syscall && i == 1) || self.mapping(a).is_some())
    }

    /// Resolves raw stacks (id, trace) in one batch.
    pub fn resolve(&mut self, raw: &[(i64, StackTrace)]) -> Vec<(i64, Stack)> {
        // Addresses to look up: (address, is_return_address).
        let mut wanted: Vec<Key> = Vec::new();
        // (stack id, its addresses, truncated, span)
        let mut plans: Vec<(i64, Vec<Key>, bool, u64)> = Vec::new();
        let mut refreshed = false;
        for (id, st) in raw {
            let n = (st.len as usize).min(st.frames.len());
            let mut addrs: Vec<Key> = Vec::with_capacity(n);
            for (i, &a) in st.frames[..n].iter().enumerate() {
                let syscall = st.flags & STACK_SYSCALL != 0;
                let is_ret = !(syscall && i == 0);
                // A frame-pointer walk guesses a syscall stack's second frame; CFI does not.
                let guessed = syscall && i == 1 && st.flags & STACK_CFI == 0;
                if self.mapping(a).is_none() && !refreshed {
                    refreshed = true;
                    self.refresh_maps();
                }
                // The syscall stack's second frame is a guess from [sp]: keep it only if it is code.
                if guessed && self.mapping(a).is_none() {
                    continue;
                }
                addrs.push((a, is_ret));
            }
            for &k in &addrs {
                if !self.cache.contains_key(&k) {
                    wanted.push(k);
                }
            }
            plans.push((*id, addrs, st.flags & STACK_TRUNCATED != 0, st.span));
        }
        wanted.sort_unstable();
        wanted.dedup();
        self.symbolize(&wanted);
        plans
            .into_iter()
            .map(|(id, addrs, truncated, span)| {
                let frames = addrs
                    .iter()
                    .flat_map(|k| self.cache.get(k).cloned().unwrap_or_default())
                    .collect();
                (
                    id,
                    Stack {
                        frames,
                        truncated,
                        span,
                    },
                )
            })
            .collect()
    }

    fn symbolize(&mut self, wanted: &[Key]) {
        // Group by object: (host path, module name) → [(key, file offset)].
        // (host path, module name, inode as mapped) → [(key, file offset)].
        let mut by_obj: FxHashMap<(PathBuf, String, u64), Vec<(Key, u64)>> = FxHashMap::default();
        for &(addr, is_ret) in wanted {
            let Some(m) = self.mapping(addr) else {
                self.cache.insert((addr, is_ret), vec![unknown(addr, None)]);
                continue;
            };
            // A return address points after the call; look up the call itself.
            let lookup = if is_ret { addr.saturating_sub(1) } else { addr };
            let off = lookup - m.start + m.offset;
            let host = procfs::mapped_file(self.pid, m.start, m.end);
            by_obj
                .entry((host, m.path.clone(), m.inode))
                .or_default()
                .push(((addr, is_ret), off));
        }
        for ((host, module, inode), items) in by_obj {
            let offsets: Vec<u64> = items.iter().map(|(_, o)| *o).collect();
            // After the target exits (or unmaps the object) its map_files entry is gone;
            // the file is usually still at the same path in our namespace.
            // Opened by us as a regular file (a FIFO planted at that path would block
            // blazesym's open forever) and handed over by descriptor.
            // The range may hold other code now (a library loaded where this one was):
            // then the path is used only if it is still the file that was mapped.
            // (When the range is gone, the path is taken as it is: an overlayfs path's
            // inode is not the one the mapping shows.)
            let host_inode = procfs::file_identity(&host).map(|(_, i)| i);
            let path = if host_inode == Some(inode) {
                host
            } else {
                let replaced = host_inode.is_some();
                match procfs::open_regular(Path::new(&module)).ok().filter(|f| {
                    use std::os::unix::fs::MetadataExt as _;
                    !replaced || f.metadata().is_ok_and(|m| m.ino() == inode)
                }) {
                    Some(f) => {
                        use std::os::fd::AsRawFd as _;
                        let p = PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()));
                        self.open_debug_files.push(f);
                        p
                    }
                    None => {
                        // Nothing to read it from: its frames stay unnamed.
                        self.leave_unnamed(&module, &items);
                        continue;
                    }
                }
            };
            let Some(path) = self.untruncatable(&path) else {
                self.leave_unnamed(&module, &items);
                continue;
            };
            // A debug file found by build id is symbolized in place of the object
            // (blazesym looks in the debug directories only for a .gnu_debuglink).
            let debug = match self.debug_files.get(&module) {
                Some(d) => d.clone(),
                None => {
                    let found = debug_file_by_build_id(&path, &self.debug_dirs).map(|f| {
                        use std::os::fd::AsRawFd as _;
                        let p = PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()));
                        self.open_debug_files.push(f);
                        p
                    });
                    self.debug_files.insert(module.clone(), found.clone());
                    found
                }
            };
            let results = match &debug {
                Some(d) => {
                    // Its code segments have no file contents: addresses, not offsets.
                    let addrs: Vec<u64> =
                        crate::process::elf::file_offsets_to_addresses(&path, &offsets)
                            .unwrap_or_default()
                            .into_iter()
                            .chain(std::iter::repeat(None))
                            .take(offsets.len())
                            .map(|a| a.unwrap_or(u64::MAX))
                            .collect();
                    self.symbolizer
                        .symbolize(&Source::Elf(Elf::new(d)), Input::VirtOffset(&addrs))
                }
                None => self
                    .symbolizer
                    .symbolize(&Source::Elf(Elf::new(&path)), Input::FileOffset(&offsets)),
            };
            let shown = self.shown(&module);
            let names = self.names.entry(module.clone()).or_default();
            for (i, (key, _)) in items.iter().enumerate() {
                let frames = match results.as_ref().ok().and_then(|r| r.get(i)) {
                    Some(Symbolized::Sym(sym)) => {
                        let mut frames = Vec::with_capacity(1 + sym.inlined.len());
                        // blazesym lists inlined calls outermost first; we want innermost first.
                        let named =
                            |name: &str, code: Option<&CodeInfo<'_>>, inlined: bool| Frame {
                                function: Some(name.to_owned()),
                                file: code.map(|c| c.to_path().display().to_string()),
                                line: code.and_then(|c| c.line),
                                module: Some(shown.clone()),
                                kind: FrameKind::Native,
                                address: format!("{:#x}", key.0),
                                inlined,
                            };
                        for f in sym.inlined.iter().rev() {
                            frames.push(named(&f.name, f.code_info.as_ref(), true));
                        }
                        frames.push(named(&sym.name, sym.code_info.as_deref(), false));
                        names.named += 1;
                        frames
                    }
                    _ => {
                        if names.unnamed == 0 {
                            names.build_id = build_id(&path);
                            // A scan of the dpkg database each: for a few objects only.
                            if self.package_lookups < MAX_PACKAGE_LOOKUPS {
                                self.package_lookups += 1;
                                names.package = dpkg_package(self.pid, &module);
                            }
                        }
                        names.unnamed += 1;
                        vec![unknown(key.0, Some(shown.clone()))]
                    }
                };
                self.cache.insert(*key, frames);
            }
        }
    }
}

impl Symbols {
    /// Frames of `module` that stay unnamed: nothing to read its symbols from.
    fn leave_unnamed(&mut self, module: &str, items: &[(Key, u64)]) {
        let names = self.names.entry(module.to_owned()).or_default();
        for (key, _) in items {
            names.unnamed += 1;
            self.cache
                .insert(*key, vec![unknown(key.0, Some(module.to_owned()))]);
        }
    }

    /// A path to `path`'s contents that nobody but root can truncate: blazesym maps
    /// the file it reads, and a mapped file cut short under it kills the reader with
    /// SIGBUS. A file owned by root and writable by no one else is used in place;
    /// any other (the target's own build, a copy it made) is copied once into
    /// memory (a memfd, at most [`MAX_COPIED_BYTES`] in all). `None`: unreadable, or
    /// over the budget.
    fn untruncatable(&mut self, path: &Path) -> Option<PathBuf> {
        use std::os::{fd::AsRawFd as _, unix::fs::MetadataExt as _};
        let f = procfs::open_regular(path).ok()?;
        let meta = f.metadata().ok()?;
        if meta.uid() == 0 && meta.mode() & 0o022 == 0 {
            return Some(path.to_path_buf());
        }
        let key = (meta.dev(), meta.ino());
        if let Some(p) = self.copies.get(&key) {
            return p.clone();
        }
        let copy = (self.copied_bytes + meta.len() <= MAX_COPIED_BYTES)
            .then(|| copy_to_memory(f, meta.len()))
            .flatten();
        let p = copy.map(|c| {
            self.copied_bytes += meta.len();
            let p = PathBuf::from(format!("/proc/self/fd/{}", c.as_raw_fd()));
            self.open_debug_files.push(c);
            p
        });
        if p.is_none() {
            log::warn!(
                "{} is writable by a user other than root and could not be copied (over {} MiB of copies?): its frames stay unnamed",
                path.display(),
                MAX_COPIED_BYTES >> 20
            );
        }
        self.copies.insert(key, p.clone());
        p
    }
}

/// `len` bytes of `f` (at most [`procfs::MAX_OBJECT_BYTES`]) in a memfd of ours.
fn copy_to_memory(f: std::fs::File, len: u64) -> Option<std::fs::File> {
    use std::os::fd::FromRawFd as _;
    if len > procfs::MAX_OBJECT_BYTES {
        return None;
    }
    // SAFETY: a NUL-terminated name and flags; the descriptor returned is ours.
    let fd = unsafe { libc::memfd_create(c"leaktrace-object".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a descriptor just created and owned by nothing else.
    let mut out = unsafe { std::fs::File::from_raw_fd(fd) };
    use std::io::Read as _;
    std::io::copy(&mut f.take(len), &mut out).ok()?;
    Some(out)
}

/// The executable's file as mapped and the path it was started as, when they name
/// different files by name but the same by inode (a link: /usr/bin/redis-server to
/// redis-check-rdb). A script started by name (`./app.py`) is a different file from
/// its interpreter, and keeps the interpreter's name.
fn program_name(pid: u32) -> Option<(String, String)> {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let exe = exe.to_string_lossy().into_owned();
    let execfn = procfs::read_execfn(pid)?;
    let base = |p: &str| p.rsplit('/').next().unwrap_or(p).to_owned();
    if base(&exe) == base(&execfn) {
        return None;
    }
    // Resolved as the target resolved it: from its root, or its working directory
    // (which may have changed since: then no rename).
    let as_run = if execfn.starts_with('/') {
        PathBuf::from(format!("/proc/{pid}/root{execfn}"))
    } else {
        PathBuf::from(format!("/proc/{pid}/cwd/{execfn}"))
    };
    let same = procfs::file_identity(&as_run).is_some_and(|id| {
        procfs::file_identity(Path::new(&format!("/proc/{pid}/exe"))) == Some(id)
    });
    if !same {
        return None;
    }
    Some((
        exe,
        if execfn.starts_with('/') {
            execfn
        } else {
            base(&execfn)
        },
    ))
}

/// Where debug files are looked for by build id: the user's directories, the
/// target's own `/usr/lib/debug` (a container's), then ours.
pub(crate) fn build_id_dirs(pid: u32, debug_dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut by_id = debug_dirs.to_vec();
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    if std::fs::read_link(&root).is_ok_and(|r| r != Path::new("/")) {
        by_id.push(root.join("usr/lib/debug"));
    }
    by_id.extend(["/usr/lib/debug", "/lib/debug"].map(PathBuf::from));
    by_id
}

/// `DIR/.build-id/xx/rest.debug` for the object's build id, in the first debug
/// directory that has it as a regular file, opened: where distributions install
/// debug files, and where `debuginfod-find` output can be put.
pub(crate) fn debug_file_by_build_id(object: &Path, dirs: &[PathBuf]) -> Option<std::fs::File> {
    let id = build_id(object)?;
    // Shorter ids are bogus (and the path needs two characters for the directory).
    if id.len() < 16 {
        return None;
    }
    dirs.iter()
        .map(|d| {
            d.join(".build-id")
                .join(&id[..2])
                .join(format!("{}.debug", &id[2..]))
        })
        .find_map(|p| procfs::open_regular(&p).ok())
}

/// The GNU build id of an ELF file, hex.
pub(crate) fn build_id(path: &Path) -> Option<String> {
    let id = blazesym::helper::read_elf_build_id(path).ok()??;
    Some(id.iter().map(|b| format!("{b:02x}")).collect())
}

/// The Debian package that installed `object`, from the dpkg database in the target's
/// root (a container's own). Bounded: at most 20 000 lists of at most 8 MiB each.
pub(crate) fn dpkg_package(pid: u32, object: &str) -> Option<String> {
    const MAX_LISTS: usize = 20_000;
    const MAX_LIST_BYTES: u64 = 8 << 20;
    // Debian's merged /usr: dpkg may list the file under /lib or /bin.
    let unmerged = object.strip_prefix("/usr").filter(|p| {
        ["/lib", "/bin", "/sbin"]
            .iter()
            .any(|d| p.starts_with(&format!("{d}/")))
    });
    // A chrooted target's files are named from our root in its maps.
    let root = std::fs::read_link(format!("/proc/{pid}/root")).ok()?;
    let object = match root.to_str() {
        Some(r) if r != "/" => object.strip_prefix(r).unwrap_or(object),
        _ => object,
    };
    let info = PathBuf::from(format!("/proc/{pid}/root/var/lib/dpkg/info"));
    for entry in std::fs::read_dir(info).ok()?.take(MAX_LISTS).flatten() {
        let name = entry.file_name();
        let Some(pkg) = name.to_str().and_then(|n| n.strip_suffix(".list")) else {
            continue;
        };
        // The target's root is hostile: regular files only, bounded.
        let Ok(list) = procfs::read_regular(&entry.path(), MAX_LIST_BYTES) else {
            continue;
        };
        let list = String::from_utf8_lossy(&list);
        if list.lines().any(|l| l == object || Some(l) == unmerged) {
            // `libc6:amd64` → `libc6`.
            return Some(pkg.split(':').next().unwrap_or(pkg).to_owned());
        }
    }
    None
}

fn unknown(addr: u64, module: Option<String>) -> Frame {
    Frame {
        function: None,
        file: None,
        line: None,
        module,
        kind: FrameKind::Native,
        address: format!("{addr:#x}"),
        inlined: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// blazesym maps the files it reads: one the target can truncate is copied into
    /// memory first, and the copy keeps its contents when the original is cut to
    /// nothing (a mapped file cut short kills its reader with SIGBUS). A file only
    /// root can write is read in place.
    #[test]
    fn writable_objects_are_read_from_a_copy() {
        use std::os::unix::fs::PermissionsExt as _;
        let mut s = Symbols::new(std::process::id(), &[]);
        let p = std::env::temp_dir().join(format!("leaktrace-copy-{}", std::process::id()));
        std::fs::write(&p, vec![7u8; 10000]).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
        let copy = s.untruncatable(&p).expect("a copy");
        assert_ne!(copy, p);
        // The same file again: the same copy, not a second one.
        assert_eq!(s.untruncatable(&p).as_ref(), Some(&copy));
        std::fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(0)
            .unwrap();
        let read = std::fs::read(&copy).unwrap();
        std::fs::remove_file(&p).unwrap();
        assert_eq!((read.len(), read[9999]), (10000, 7));
        assert_eq!(s.copied_bytes, 10000);
        let root_only = Path::new("/usr/lib/x86_64-linux-gnu/libc.so.6");
        assert_eq!(s.untruncatable(root_only).as_deref(), Some(root_only));
    }
}
