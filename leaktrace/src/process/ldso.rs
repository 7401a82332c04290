//! The shared objects the dynamic linker will load for a program, found by reading
//! files only: the program is never run. (`ldd`'s way, `LD_TRACE_LOADED_OBJECTS`,
//! runs the program's own loader, and a loader that ignores the variable, musl's,
//! runs the program itself.)
//!
//! glibc's rules (ld.so(8)): the preloads (`LD_PRELOAD`, `/etc/ld.so.preload`), then
//! each `DT_NEEDED` breadth-first; a name with a slash is a path, others are looked
//! for in the loading object's `DT_RPATH` and its loaders' (only while it has no
//! `DT_RUNPATH`), `LD_LIBRARY_PATH`, its `DT_RUNPATH`, `/etc/ld.so.cache`, then the
//! default directories. `$ORIGIN`, `$LIB` and `$PLATFORM` are expanded. musl's
//! loader (`PT_INTERP` naming `ld-musl`) searches `LD_LIBRARY_PATH`, then
//! `/etc/ld-musl-ARCH.path` or its defaults. A candidate counts only if it is a
//! regular x86-64 ELF file. Everything read is bounded: at most [`MAX_OBJECTS`]
//! objects, each through [`procfs::read_object`].

use std::{
    collections::VecDeque,
    path::{Path, PathBuf},
};

use object::{
    Endianness,
    elf::{DT_NEEDED, DT_RPATH, DT_RUNPATH, DT_STRTAB, EM_X86_64, PT_DYNAMIC, PT_INTERP},
    read::elf::{ElfFile64, FileHeader as _, ProgramHeader as _},
};

use crate::process::procfs;

/// Most objects followed (a real program rarely loads more than a few hundred).
pub const MAX_OBJECTS: usize = 512;

/// glibc's default directories on Debian's x86-64 (multiarch first).
const GLIBC_DEFAULT: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
];

/// musl's built-in path when `/etc/ld-musl-x86_64.path` is absent.
const MUSL_DEFAULT: &[&str] = &["/lib", "/usr/local/lib", "/usr/lib"];

/// What the dynamic section and program headers of one object say.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dynamic {
    /// `PT_INTERP`.
    pub interp: Option<String>,
    /// `DT_NEEDED`, in order.
    pub needed: Vec<String>,
    /// `DT_RPATH`.
    pub rpath: Option<String>,
    /// `DT_RUNPATH`.
    pub runpath: Option<String>,
}

/// Reads `PT_INTERP` and the dynamic section of an x86-64 ELF image; `None` when it
/// is not one.
pub fn dynamic_of(data: &[u8]) -> Option<Dynamic> {
    let elf = ElfFile64::<Endianness>::parse(data).ok()?;
    let (hdr, e) = (elf.elf_header(), elf.endian());
    if hdr.e_machine(e) != EM_X86_64 {
        return None;
    }
    let mut out = Dynamic::default();
    let segments = hdr.program_headers(e, data).ok()?;
    let cstr = |b: &[u8]| {
        let b = b.split(|&c| c == 0).next().unwrap_or(&[]);
        String::from_utf8_lossy(b).into_owned()
    };
    for ph in segments {
        if ph.p_type(e) == PT_INTERP {
            out.interp = ph.data(e, data).ok().map(cstr);
        }
    }
    let Some(dynamic) = segments.iter().find(|p| p.p_type(e) == PT_DYNAMIC) else {
        return Some(out);
    };
    let words: &[u8] = dynamic.data(e, data).ok()?;
    // (tag, value) pairs of 8-byte words.
    let entries: Vec<(u64, u64)> = words
        .chunks_exact(16)
        .map(|c| {
            let w = |i: usize| u64::from_le_bytes(c[i..i + 8].try_into().expect("8 bytes"));
            (w(0), w(8))
        })
        .take_while(|&(t, _)| t != 0)
        .collect();
    // DT_STRTAB is an address: find the file offset through the loadable segments.
    let strtab_addr = entries
        .iter()
        .find(|&&(t, _)| t == u64::from(DT_STRTAB))
        .map(|&(_, v)| v)?;
    let strtab_off = segments.iter().find_map(|p| {
        let (va, sz) = (p.p_vaddr(e), p.p_filesz(e));
        (p.p_type(e) == object::elf::PT_LOAD && strtab_addr >= va && strtab_addr < va + sz)
            .then(|| strtab_addr - va + p.p_offset(e))
    })?;
    let string = |off: u64| -> Option<String> {
        let at = usize::try_from(strtab_off.checked_add(off)?).ok()?;
        let tail = data.get(at..)?;
        let end = tail.iter().take(4096).position(|&c| c == 0)?;
        Some(String::from_utf8_lossy(&tail[..end]).into_owned())
    };
    for &(tag, v) in &entries {
        match tag as u32 {
            t if t == DT_NEEDED && tag <= u64::from(u32::MAX) => {
                if let Some(s) = string(v) {
                    out.needed.push(s);
                }
            }
            t if t == DT_RPATH && tag <= u64::from(u32::MAX) => out.rpath = string(v),
            t if t == DT_RUNPATH && tag <= u64::from(u32::MAX) => out.runpath = string(v),
            _ => {}
        }
    }
    Some(out)
}

/// The library directories `/etc/ld.so.cache` maps names to (glibc 2.32+'s format,
/// also found after an old-format section): name → path, x86-64 libc6 entries only.
pub fn read_cache(data: &[u8]) -> Vec<(String, PathBuf)> {
    const MAGIC: &[u8] = b"glibc-ld.so.cache1.1";
    const HEADER: usize = 48;
    const ENTRY: usize = 24;
    // FLAG_ELF_LIBC6 | FLAG_X8664_LIB64.
    const X86_64_LIBC6: i32 = 0x0303;
    let Some(base) = data.windows(MAGIC.len()).position(|w| w == MAGIC) else {
        return Vec::new();
    };
    let d = &data[base..];
    let u32_at = |o: usize| {
        d.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    };
    let Some(n) = u32_at(20) else {
        return Vec::new();
    };
    let text = |o: u32| -> Option<String> {
        let tail = d.get(o as usize..)?;
        let end = tail.iter().take(4096).position(|&c| c == 0)?;
        Some(String::from_utf8_lossy(&tail[..end]).into_owned())
    };
    let mut out = Vec::new();
    for i in 0..(n as usize).min(1 << 16) {
        let at = HEADER + i * ENTRY;
        let (Some(flags), Some(key), Some(value)) = (u32_at(at), u32_at(at + 4), u32_at(at + 8))
        else {
            break;
        };
        if flags as i32 != X86_64_LIBC6 {
            continue;
        }
        if let (Some(k), Some(v)) = (text(key), text(value)) {
            out.push((k, PathBuf::from(v)));
        }
    }
    out
}

/// Where the objects a program loads are looked for, besides each object's own paths.
#[derive(Debug, Default)]
pub struct Search {
    /// `LD_PRELOAD` entries and `/etc/ld.so.preload`'s (glibc).
    pub preload: Vec<String>,
    /// `LD_LIBRARY_PATH`.
    pub library_path: Vec<String>,
    /// `/etc/ld.so.cache` (glibc).
    pub cache: Vec<(String, PathBuf)>,
}

impl Search {
    /// From leaktrace's own environment (the launched command inherits it) and the
    /// system's files.
    pub fn from_system() -> Self {
        Self::from_env(|k| std::env::var_os(k))
    }

    /// From the environment the program will run with (`var` reads one variable) and
    /// the system's files.
    pub fn from_env(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> Self {
        let split = |v: Option<std::ffi::OsString>, seps: &[char]| -> Vec<String> {
            v.map(|v| {
                v.to_string_lossy()
                    .split(seps)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
        };
        let mut preload = split(var("LD_PRELOAD"), &[' ', ':']);
        if let Ok(text) = procfs::read_regular(Path::new("/etc/ld.so.preload"), 64 << 10) {
            preload.extend(
                String::from_utf8_lossy(&text)
                    .split(|c: char| c.is_whitespace() || c == ':')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned),
            );
        }
        let cache = procfs::read_regular(Path::new("/etc/ld.so.cache"), 64 << 20)
            .map(|d| read_cache(&d))
            .unwrap_or_default();
        Self {
            preload,
            library_path: split(var("LD_LIBRARY_PATH"), &[':', ';']),
            cache,
        }
    }
}

/// One object found: its path and what it needs.
struct Found {
    path: PathBuf,
    dynamic: Dynamic,
    /// Index of the object that loaded it (for inherited `DT_RPATH`).
    loader: Option<usize>,
}

/// Expands `$ORIGIN`, `$LIB` and `$PLATFORM` (with or without braces) in one path
/// entry of an object at `origin`.
fn expand(entry: &str, origin: &Path) -> String {
    let origin = origin.display().to_string();
    let mut s = entry.to_owned();
    for (k, v) in [
        ("ORIGIN", origin.as_str()),
        ("LIB", "lib/x86_64-linux-gnu"),
        ("PLATFORM", "x86_64"),
    ] {
        s = s
            .replace(&format!("${{{k}}}"), v)
            .replace(&format!("${k}"), v);
    }
    s
}

/// The directories of a `DT_RPATH`/`DT_RUNPATH` value, expanded for an object at `origin`.
fn path_list(list: &str, origin: &Path) -> Vec<String> {
    list.split(':')
        .filter(|s| !s.is_empty())
        .map(|d| expand(d, origin))
        .collect()
}

/// Whether `p` is a regular x86-64 ELF file (the loader skips others), and its
/// dynamic section.
fn candidate(p: &Path) -> Option<Dynamic> {
    let data = procfs::read_object(p).ok()?;
    dynamic_of(&data)
}

/// The objects `elf` will have mapped once the dynamic linker is done: the program
/// itself first, its interpreter, the preloads, then the needed objects breadth-first.
/// A static program is its own only object. Never runs anything.
pub fn objects_for(elf: &Path, search: &Search) -> Vec<PathBuf> {
    let Some(top) = candidate(elf) else {
        return vec![elf.to_path_buf()];
    };
    let musl = top.interp.as_deref().is_some_and(|i| i.contains("ld-musl"));
    let mut out: Vec<PathBuf> = vec![elf.to_path_buf()];
    let Some(interp) = top.interp.clone() else {
        return out;
    };
    out.push(PathBuf::from(&interp));
    let musl_path: Vec<String> = if musl {
        let name = Path::new(&interp)
            .file_name()
            .map(|n| n.to_string_lossy().replace(".so.1", ".path"))
            .unwrap_or_default();
        procfs::read_regular(&Path::new("/etc").join(name), 64 << 10)
            .map(|t| {
                String::from_utf8_lossy(&t)
                    .split([':', '\n'])
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_else(|_| MUSL_DEFAULT.iter().map(|s| (*s).to_owned()).collect())
    } else {
        Vec::new()
    };
    let mut found: Vec<Found> = vec![Found {
        path: elf.to_path_buf(),
        dynamic: top,
        loader: None,
    }];
    // (name, index of the loading object)
    let mut queue: VecDeque<(String, usize)> = VecDeque::new();
    if !musl {
        for p in &search.preload {
            queue.push_back((p.clone(), 0));
        }
    }
    for n in &found[0].dynamic.needed {
        queue.push_back((n.clone(), 0));
    }
    let mut seen_names: Vec<String> = Vec::new();
    while let Some((name, by)) = queue.pop_front() {
        if found.len() >= MAX_OBJECTS {
            log::warn!(
                "more than {MAX_OBJECTS} shared objects; the rest are not probed before the program runs"
            );
            break;
        }
        if seen_names.contains(&name) {
            continue;
        }
        seen_names.push(name.clone());
        let origin_of = |i: usize| -> PathBuf {
            let p = &found[i].path;
            std::fs::canonicalize(p)
                .unwrap_or_else(|_| p.clone())
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default()
        };
        let mut dirs: Vec<String> = Vec::new();
        if musl {
            dirs.extend(search.library_path.iter().cloned());
            dirs.extend(musl_path.iter().cloned());
        } else {
            // DT_RPATH of the loader and its loaders, unless the loader has DT_RUNPATH.
            if found[by].dynamic.runpath.is_none() {
                let mut at = Some(by);
                while let Some(i) = at {
                    if let Some(r) = &found[i].dynamic.rpath {
                        dirs.extend(path_list(r, &origin_of(i)));
                    }
                    at = found[i].loader;
                }
            }
            dirs.extend(search.library_path.iter().cloned());
            if let Some(r) = &found[by].dynamic.runpath {
                dirs.extend(path_list(r, &origin_of(by)));
            }
        }
        let hit = if name.contains('/') {
            let p = PathBuf::from(expand(&name, &origin_of(by)));
            candidate(&p).map(|d| (p, d))
        } else {
            dirs.iter()
                .map(|d| Path::new(d).join(&name))
                .chain(
                    (!musl)
                        .then(|| {
                            search
                                .cache
                                .iter()
                                .filter(|(k, _)| *k == name)
                                .map(|(_, v)| v.clone())
                        })
                        .into_iter()
                        .flatten(),
                )
                .chain(
                    (!musl)
                        .then(|| GLIBC_DEFAULT.iter().map(|d| Path::new(d).join(&name)))
                        .into_iter()
                        .flatten(),
                )
                .find_map(|p| candidate(&p).map(|d| (p, d)))
        };
        let Some((path, dynamic)) = hit else {
            log::debug!("{name} (needed by {}) not found", found[by].path.display());
            continue;
        };
        // musl's libc is its loader: a needed "libc.so" is the interpreter already.
        let same = |a: &Path, b: &Path| {
            std::fs::canonicalize(a)
                .ok()
                .is_some_and(|a| std::fs::canonicalize(b).ok() == Some(a))
        };
        if out.iter().any(|o| same(o, &path)) {
            continue;
        }
        let i = found.len();
        for n in &dynamic.needed {
            queue.push_back((n.clone(), i));
        }
        out.push(path.clone());
        found.push(Found {
            path,
            dynamic,
            loader: Some(by),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ldd`'s list for a program: the paths it prints, canonicalized.
    fn ldd(p: &Path) -> Vec<PathBuf> {
        let out = std::process::Command::new("ldd")
            .arg(p)
            .output()
            .expect("ldd");
        let mut v: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let path = l.split_once("=>").map_or(l, |(_, r)| r).trim();
                let path = path.split(" (").next()?.trim();
                path.starts_with('/')
                    .then(|| std::fs::canonicalize(path).ok())?
            })
            .collect();
        v.sort();
        v
    }

    /// On programs of this machine (a Rust test binary, Debian's python3.11, and
    /// whatever of pyenv's Python with its `$ORIGIN` run path and of the servers is
    /// installed), the objects found without running anything are `ldd`'s.
    #[test]
    fn objects_are_ldds() {
        let search = Search::from_system();
        let mut programs = vec![std::env::current_exe().unwrap()];
        for p in [
            "/usr/bin/python3.11",
            "/usr/bin/redis-server",
            "/usr/sbin/nginx",
            "/root/.pyenv/versions/3.11.7/bin/python3.11",
            "/usr/lib/postgresql/15/bin/postgres",
        ] {
            if Path::new(p).exists() {
                programs.push(PathBuf::from(p));
            }
        }
        assert!(programs.len() >= 2, "no system program to compare with");
        for p in programs {
            let mut ours: Vec<PathBuf> = objects_for(&p, &search)
                .into_iter()
                .skip(1)
                .filter_map(|o| std::fs::canonicalize(o).ok())
                .collect();
            ours.sort();
            ours.dedup();
            assert_eq!(ours, ldd(&p), "{}", p.display());
        }
    }

    /// A static program (no interpreter; Debian's busybox-static, which `cargo xtask
    /// setup` installs) is its own only object.
    #[test]
    fn static_program_alone() {
        let p = Path::new("/bin/busybox");
        let d = candidate(p).expect("busybox-static's /bin/busybox (cargo xtask setup)");
        assert_eq!(d.interp, None);
        assert_eq!(objects_for(p, &Search::default()), vec![p.to_path_buf()]);
    }

    /// Garbage is not an ELF: no dynamic section, no panic.
    #[test]
    fn garbage_is_not_elf() {
        assert_eq!(dynamic_of(b"\x7fELF not really"), None);
        assert_eq!(dynamic_of(&[0u8; 4096]), None);
        assert!(read_cache(b"glibc-ld.so.cache1.1\xff\xff\xff\xff").is_empty());
    }
}
