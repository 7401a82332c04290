//! Which mapped object is a CPython interpreter, and which version: read from the
//! object's own symbols and data, not from its file name, which a symlink
//! (`python3` → `python3.11`), a copy in a virtualenv, an embedding program (uwsgi,
//! a game engine) or a launcher script changes.
//!
//! An object is an interpreter when it *defines* `PyCode_Type` and either
//! `_PyRuntime` (3.7+) or `PyInterpreterState_Head` (every version); extension
//! modules only import these. The version comes from, in order: `Py_Version` (3.11+,
//! read-only data), the `_Py_DebugOffsets` table at the start of `_PyRuntime`
//! (3.13+, cookie `xdebugpy`), and only then the object's file name or soname
//! (`python3.9`, `libpython2.7.so.1.0`).

use std::path::{Path, PathBuf};

use object::{Object as _, ObjectSection as _, ObjectSymbol as _};

/// Link-time addresses (before the load bias) of what the walk needs.
#[derive(Clone, Debug, Default)]
pub struct Symbols {
    /// `_PyRuntime` (3.7+).
    pub runtime: Option<u64>,
    /// `_PyRuntime`'s size, from the symbol table (0: unknown).
    pub runtime_size: u64,
    /// `PyCode_Type`.
    pub code_type: u64,
    /// `PyFrame_Type`.
    pub frame_type: Option<u64>,
    /// `_Py_NoneStruct`.
    pub none: Option<u64>,
    /// `PyType_Type`: the type of types, which the heap census checks types against.
    pub type_type: Option<u64>,
    /// 2.x: the `interp_head` variable (static: `.symtab` only).
    pub interp_head: Option<u64>,
    /// `PyInterpreterState_Head()`, which returns `interp_head` (for stripped 2.x).
    pub interp_head_fn: Option<u64>,
    /// `PyGILState_GetThisThreadState()`, which reads the thread's TSS key.
    pub gilstate_fn: Option<u64>,
}

/// A CPython interpreter found among the target's objects.
#[derive(Clone, Debug)]
pub struct Interpreter {
    /// (major, minor).
    pub version: (u32, u32),
    /// The object as the target maps it (its name in `/proc/PID/maps`).
    pub object: String,
    /// Where the object opens from here.
    pub host: PathBuf,
    /// Its symbols.
    pub symbols: Symbols,
    /// How the version was learned (said in the report).
    pub version_from: &'static str,
}

/// Version from an object's file name: `python3.11`, `libpython3.9.so.1.0`,
/// `libpython2.7.so`.
pub fn version_from_name(path: &str) -> Option<(u32, u32)> {
    let base = path.rsplit('/').next()?;
    let rest = base
        .strip_prefix("libpython")
        .or_else(|| base.strip_prefix("python"))?;
    let (major, rest) = rest.split_once('.')?;
    let minor: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let v = (major.parse().ok()?, minor.parse().ok()?);
    (v.0 == 2 || v.0 == 3).then_some(v)
}

/// The interpreter among `objects` (path in the target, host path), if any.
/// Objects that fail to read or parse are passed over.
pub fn find(objects: &[(String, PathBuf)]) -> Option<Interpreter> {
    objects
        .iter()
        .find_map(|(target, host)| identify(target, host))
}

/// Whether the object at `host` (mapped as `target`) is a CPython interpreter.
pub fn identify(target: &str, host: &Path) -> Option<Interpreter> {
    let data = crate::process::procfs::read_object(host).ok()?;
    identify_bytes(target, host, &data)
}

fn identify_bytes(target: &str, host: &Path, data: &[u8]) -> Option<Interpreter> {
    let file = object::File::parse(data).ok()?;
    let defined = |name: &str| {
        file.dynamic_symbols()
            .chain(file.symbols())
            .find(|s| s.is_definition() && s.name() == Ok(name))
    };
    let addr = |name: &str| defined(name).map(|s| s.address());
    let code_type = addr("PyCode_Type")?;
    let runtime_sym = defined("_PyRuntime");
    let interp_head_fn = addr("PyInterpreterState_Head");
    if runtime_sym.is_none() && interp_head_fn.is_none() {
        return None;
    }
    let runtime = runtime_sym.as_ref().map(object::ObjectSymbol::address);
    // The initialized bytes of a symbol, from its section in the file.
    let bytes_at = |a: u64, n: usize| -> Option<Vec<u8>> {
        let s = file
            .sections()
            .find(|s| s.address() <= a && a + n as u64 <= s.address() + s.size())?;
        let d = s.data().ok()?;
        let o = usize::try_from(a - s.address()).ok()?;
        d.get(o..o + n).map(<[u8]>::to_vec)
    };
    let hex_version = |v: u64| -> Option<(u32, u32)> {
        let (major, minor) = ((v >> 24) as u32 & 0xff, (v >> 16) as u32 & 0xff);
        (major == 3 && minor < 100).then_some((major, minor))
    };
    let from_py_version = addr("Py_Version")
        .and_then(|a| bytes_at(a, 4))
        .and_then(|b| hex_version(u64::from(u32::from_le_bytes(b.try_into().ok()?))));
    let from_debug_offsets = runtime
        .and_then(|a| bytes_at(a, 16))
        .filter(|b| &b[..8] == b"xdebugpy")
        .and_then(|b| hex_version(u64::from_le_bytes(b[8..16].try_into().ok()?)));
    let soname = file
        .elf_dynamic_soname()
        .ok()
        .flatten()
        .map(|s| String::from_utf8_lossy(s).into_owned());
    let (version, version_from) = if let Some(v) = from_py_version {
        (v, "Py_Version")
    } else if let Some(v) = from_debug_offsets {
        (v, "_Py_DebugOffsets")
    } else if let Some(v) = version_from_name(target) {
        (v, "the file name")
    } else if let Some(v) = soname.as_deref().and_then(version_from_name) {
        (v, "the soname")
    } else {
        return None;
    };
    Some(Interpreter {
        version,
        object: target.to_owned(),
        host: host.to_owned(),
        symbols: Symbols {
            runtime,
            runtime_size: runtime_sym.map_or(0, |s| s.size()),
            code_type,
            frame_type: addr("PyFrame_Type"),
            none: addr("_Py_NoneStruct"),
            type_type: addr("PyType_Type"),
            interp_head: addr("interp_head"),
            interp_head_fn,
            gilstate_fn: addr("PyGILState_GetThisThreadState"),
        },
        version_from,
    })
}

/// Objects' ELF soname (`DT_SONAME`), as the dynamic section names it.
trait Soname {
    fn elf_dynamic_soname(&self) -> object::Result<Option<&[u8]>>;
}

impl Soname for object::File<'_> {
    fn elf_dynamic_soname(&self) -> object::Result<Option<&[u8]>> {
        use object::read::elf::{Dyn as _, FileHeader as _};
        let object::File::Elf64(elf) = self else {
            return Ok(None);
        };
        let endian = elf.endian();
        let header = elf.elf_header();
        let data = elf.data();
        let sections = header.sections(endian, data)?;
        // The index returned is the dynamic section's linked string table.
        let Some((dynamic, strtab)) = sections.dynamic(endian, data)? else {
            return Ok(None);
        };
        let strings = sections.strings(endian, data, strtab)?;
        for d in dynamic {
            if d.tag32(endian) == Some(object::elf::DT_SONAME) {
                return Ok(d.string(endian, strings).ok());
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names give the version only where they carry one.
    #[test]
    fn versions_from_names() {
        assert_eq!(version_from_name("/usr/bin/python3.11"), Some((3, 11)));
        assert_eq!(
            version_from_name("/x/lib/libpython3.9.so.1.0"),
            Some((3, 9))
        );
        assert_eq!(version_from_name("libpython2.7.so.1.0"), Some((2, 7)));
        assert_eq!(version_from_name("/usr/bin/python"), None);
        assert_eq!(version_from_name("/usr/bin/python3"), None);
        assert_eq!(version_from_name("/opt/python4.1"), None);
    }

    /// Debian's python3.11 (found by `Py_Version`, whatever name it is opened by),
    /// pyenv's 2.7 (by its soname), and a non-interpreter (libc). `cargo xtask setup`
    /// installs Debian's python3.11; pyenv's 2.7.18 is on the development and CI machines.
    #[test]
    fn identifies_interpreters_by_their_symbols() {
        let debian = Path::new("/usr/bin/python3.11");
        let i =
            identify("/usr/bin/renamed", debian).expect("/usr/bin/python3.11 is an interpreter");
        assert_eq!((i.version, i.version_from), ((3, 11), "Py_Version"));
        assert!(i.symbols.runtime.is_some() && i.symbols.gilstate_fn.is_some());
        let home = std::env::var_os("PYENV_ROOT")
            .map_or_else(|| PathBuf::from("/root/.pyenv"), PathBuf::from);
        let lib27 = home.join("versions/2.7.18/lib/libpython2.7.so.1.0");
        let i = identify("/renamed.so", &lib27)
            .unwrap_or_else(|| panic!("{} is an interpreter", lib27.display()));
        assert_eq!((i.version, i.version_from), ((2, 7), "the soname"));
        assert!(i.symbols.interp_head.is_some() && i.symbols.runtime.is_none());
        let libc = Path::new("/lib/x86_64-linux-gnu/libc.so.6");
        assert!(
            identify("libc.so.6", libc).is_none(),
            "libc is no interpreter"
        );
    }
}
