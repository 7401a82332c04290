//! CPython: find the interpreter in the target, tell BPF where its frames are
//! ([`PyConfig`]), and turn recorded `(code object, instruction)` pairs into
//! file, qualified name and line by reading the code objects from the target's
//! memory. Nothing is injected; reads go through `/proc/PID/mem`.
//!
//! Per version (3.9–3.13, x86-64, default GIL builds), see ../shared/docs/python.md:
//! * version: `Py_Version` (3.11+) or the object's name (`python3.N`, `libpython3.N`);
//! * the thread's `PyThreadState`: pthread TSD slot of `_PyRuntime`'s `autoTSSkey`;
//! * code object and (3.9/3.10) frame field offsets: read from the types' own
//!   `tp_members` tables in the target (introspection), the rest from a small table;
//! * line numbers: `co_lnotab` (3.9), the 3.10 line table, the 3.11+ location table.

use std::path::Path;

use leaktrace_common::{
    PY_EDGE_IS_ENTRY, PY_EDGE_NONE, PY_EDGE_SHIM, PY_FRAME_EDGE, PyConfig, PyFrame,
};
use object::{Object as _, ObjectSymbol as _};
use rustc_hash::FxHashMap;

use crate::{
    process::{Memory, procfs::MapEntry},
    symbolize::{Frame, FrameKind},
};

/// glibc x86-64: `offsetof(struct pthread, specific_1stblock)`; a key's slot is
/// 16 bytes (`seq`, `data`), valid for keys below 32.
const GLIBC_SPECIFIC_1STBLOCK: u64 = 0x310;

/// What leaktrace knows about the target's interpreter.
#[derive(Clone, Debug)]
pub struct PyTarget {
    /// (3, minor).
    pub version: (u32, u32),
    /// Object holding the interpreter (executable or libpython).
    pub object: String,
    /// Configuration for BPF.
    pub config: PyConfig,
    /// Code object field offsets.
    code: CodeLayout,
    /// `&PyCode_Type`, to validate code objects.
    code_type: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct CodeLayout {
    basicsize: u64,
    filename: u64,
    name: u64,
    qualname: Option<u64>,
    firstlineno: u64,
    linetable: u64,
}

/// Why Python frames are not available (said in the report).
pub type Unavailable = String;

fn read_u64<M: Memory>(mem: &M, addr: u64) -> Option<u64> {
    let mut b = [0u8; 8];
    mem.read(addr, &mut b).ok()?;
    Some(u64::from_le_bytes(b))
}

fn read_u32<M: Memory>(mem: &M, addr: u64) -> Option<u32> {
    let mut b = [0u8; 4];
    mem.read(addr, &mut b).ok()?;
    Some(u32::from_le_bytes(b))
}

fn read_cstr<M: Memory>(mem: &M, addr: u64) -> Option<String> {
    let mut b = [0u8; 64];
    // A name may sit near the end of a mapping: shrink the read until it succeeds.
    let mut len = b.len();
    while mem.read(addr, &mut b[..len]).is_err() {
        len /= 2;
        if len < 8 {
            return None;
        }
    }
    let end = b[..len].iter().position(|&c| c == 0)?;
    Some(String::from_utf8_lossy(&b[..end]).into_owned())
}

/// `{name: offset}` of a type's `tp_members` (`PyMemberDef` is 40 bytes on 64-bit).
fn members<M: Memory>(mem: &M, type_addr: u64) -> FxHashMap<String, u64> {
    let mut out = FxHashMap::default();
    let Some(table) = read_u64(mem, type_addr + 240).filter(|&t| t != 0) else {
        return out;
    };
    for i in 0..64 {
        let m = table + i * 40;
        let Some(name) = read_u64(mem, m).filter(|&n| n != 0) else {
            break;
        };
        let (Some(name), Some(off)) = (read_cstr(mem, name), read_u64(mem, m + 16)) else {
            break;
        };
        out.insert(name, off);
    }
    out
}

/// Version from an object's file name: `python3.11`, `libpython3.9.so.1.0`.
pub fn version_from_name(path: &str) -> Option<(u32, u32)> {
    let base = path.rsplit('/').next()?;
    let rest = base
        .strip_prefix("libpython")
        .or_else(|| base.strip_prefix("python"))?;
    let (major, rest) = rest.split_once('.')?;
    let minor: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// Finds CPython in the target, if any: `objects` are (path in target, host path).
pub fn detect<M: Memory>(
    mem: &M,
    maps: &[MapEntry],
    objects: &[(String, std::path::PathBuf)],
    fsbase_offset: Option<u64>,
) -> Result<Option<PyTarget>, Unavailable> {
    for (target_path, host) in objects {
        let Some(name_version) = version_from_name(target_path).filter(|v| v.0 == 3) else {
            continue;
        };
        let Ok(data) = std::fs::read(host) else {
            continue;
        };
        let Ok(file) = object::File::parse(&*data) else {
            continue;
        };
        let sym = |n: &str| {
            file.dynamic_symbols()
                .chain(file.symbols())
                .find(|s| s.name() == Ok(n))
                .map(|s| s.address())
        };
        let Some(runtime) = sym("_PyRuntime") else {
            continue;
        };
        // The object's first mapping (the lowest, from offset 0) gives the load bias.
        let Some(bias) = maps
            .iter()
            .find(|m| m.path == *target_path)
            .and_then(|m| crate::process::elf::load_bias(&data, m.start, m.offset, m.is_exec()))
        else {
            continue;
        };
        let at = |a: u64| a.wrapping_add(bias);
        let version = match sym("Py_Version").and_then(|a| read_u32(mem, at(a))) {
            Some(v) if v >> 24 == 3 => (3, (v >> 16) & 0xff),
            _ => name_version,
        };
        return configure(
            mem,
            Path::new(target_path),
            version,
            at(runtime),
            sym("PyCode_Type").map(at),
            sym("PyFrame_Type").map(at),
            sym("_Py_NoneStruct").map(at),
            fsbase_offset,
        )
        .map(Some);
    }
    Ok(None)
}

#[allow(
    clippy::too_many_arguments,
    reason = "one call site, each argument a distinct symbol"
)]
fn configure<M: Memory>(
    mem: &M,
    object: &Path,
    version: (u32, u32),
    runtime: u64,
    code_type: Option<u64>,
    frame_type: Option<u64>,
    none: Option<u64>,
    fsbase_offset: Option<u64>,
) -> Result<PyTarget, Unavailable> {
    let minor = version.1;
    if !(9..=13).contains(&minor) {
        return Err(format!("CPython 3.{minor} is not supported (3.9–3.13 are)"));
    }
    let fsbase_offset =
        fsbase_offset.ok_or("the kernel's BTF does not give task_struct.thread.fsbase")?;
    let code_type = code_type.ok_or("PyCode_Type not found")?;
    // Py_tss_t { int _is_initialized; pthread_key_t _key; } inside _PyRuntime.
    let tss = match minor {
        9 | 10 => 584,
        11 => 592,
        12 => 1544,
        _ => 2160,
    };
    let (init, key) = (
        read_u32(mem, runtime + tss),
        read_u32(mem, runtime + tss + 4),
    );
    let key = match (init, key) {
        (Some(1), Some(k)) if k < 32 => u64::from(k),
        _ => {
            return Err(format!(
                "_PyRuntime.autoTSSkey not found at +{tss} (read {init:?}, {key:?})"
            ));
        }
    };
    let m = members(mem, code_type);
    let get = |n: &str| {
        m.get(n)
            .copied()
            .ok_or_else(|| format!("PyCode_Type has no member {n}"))
    };
    let basicsize = read_u64(mem, code_type + 32).ok_or("PyCode_Type unreadable")?;
    let code = CodeLayout {
        basicsize,
        filename: get("co_filename")?,
        name: get("co_name")?,
        qualname: m.get("co_qualname").copied(),
        firstlineno: get("co_firstlineno")?,
        linetable: if minor == 9 {
            get("co_lnotab")?
        } else {
            get("co_linetable")?
        },
    };
    let mut c = PyConfig {
        enabled: 1,
        fsbase_offset,
        tss_slot_offset: GLIBC_SPECIFIC_1STBLOCK + key * 16 + 8,
        cframe_frame: u32::MAX,
        ..PyConfig::default()
    };
    match minor {
        9 | 10 => {
            let fm = members(mem, frame_type.ok_or("PyFrame_Type not found")?);
            let f = |n: &str| {
                fm.get(n)
                    .map(|&o| o as u32)
                    .ok_or_else(|| format!("PyFrame_Type has no member {n}"))
            };
            c.tstate_frame = 24;
            c.frame_code = f("f_code")?;
            c.frame_previous = f("f_back")?;
            // 3.10 made f_lasti a getter (in bytes); the int field sits at 96.
            c.frame_instr = if minor == 9 {
                f("f_lasti")?
            } else {
                fm.get("f_lasti").map_or(96, |&o| o as u32)
            };
            c.instr_is_int = 1;
            c.edge_kind = PY_EDGE_NONE;
            c.frame_read = c.frame_instr + 4;
        }
        11 => {
            (c.tstate_frame, c.cframe_frame) = (56, 8);
            (c.frame_code, c.frame_previous, c.frame_instr, c.frame_edge) = (32, 48, 56, 68);
            c.edge_kind = PY_EDGE_IS_ENTRY;
            c.frame_read = 72;
        }
        12 => {
            (c.tstate_frame, c.cframe_frame) = (56, 0);
            (c.frame_code, c.frame_previous, c.frame_instr, c.frame_edge) = (0, 8, 56, 70);
            c.edge_kind = PY_EDGE_SHIM;
            c.frame_read = 72;
        }
        _ => {
            c.tstate_frame = 72;
            (c.frame_code, c.frame_previous, c.frame_instr, c.frame_edge) = (0, 8, 56, 70);
            c.edge_kind = PY_EDGE_SHIM;
            c.frame_read = 72;
            c.none_addr = none.unwrap_or(0);
        }
    }
    Ok(PyTarget {
        version,
        object: object.display().to_string(),
        config: c,
        code,
        code_type,
    })
}

/// A code object as read from the target.
#[derive(Clone, Debug)]
struct Code {
    filename: String,
    qualname: String,
    firstlineno: u32,
    linetable: Vec<u8>,
}

/// Resolves Python frames, caching code objects by address.
#[derive(Debug, Default)]
pub struct PySymbols {
    cache: FxHashMap<u64, Option<Code>>,
}

impl PySymbols {
    /// A Python frame as a report frame (`kind: "python"`).
    pub fn frame<M: Memory>(&mut self, mem: &M, t: &PyTarget, f: PyFrame) -> Frame {
        let instr = f.instr & !PY_FRAME_EDGE;
        let code = self
            .cache
            .entry(f.code)
            .or_insert_with(|| read_code(mem, t, f.code))
            .clone();
        match code {
            Some(c) => {
                let line = match t.version.1 {
                    9 => lnotab_line(
                        &c.linetable,
                        c.firstlineno,
                        (instr as u32 as i32).max(0) as u64,
                    ),
                    10 => linetable310_line(
                        &c.linetable,
                        c.firstlineno,
                        2 * (instr as u32 as i32).max(0) as u64,
                    ),
                    _ => {
                        let units = instr.saturating_sub(f.code + t.code.basicsize) / 2;
                        location_line(&c.linetable, c.firstlineno, units)
                    }
                };
                Frame {
                    function: Some(c.qualname),
                    file: Some(c.filename),
                    line,
                    module: None,
                    kind: FrameKind::Python,
                    address: format!("{:#x}", f.code),
                    inlined: false,
                }
            }
            None => Frame {
                function: None,
                file: None,
                line: None,
                module: None,
                kind: FrameKind::Python,
                address: format!("{:#x}", f.code),
                inlined: false,
            },
        }
    }
}

fn read_code<M: Memory>(mem: &M, t: &PyTarget, code: u64) -> Option<Code> {
    // A freed and reused address is not a code object any more.
    if read_u64(mem, code + 8)? != t.code_type {
        return None;
    }
    let l = &t.code;
    let name_ptr = read_u64(mem, code + l.qualname.unwrap_or(l.name))?;
    Some(Code {
        filename: read_str(mem, read_u64(mem, code + l.filename)?, t.version.1)?,
        qualname: read_str(mem, name_ptr, t.version.1)?,
        firstlineno: read_u32(mem, code + l.firstlineno)?,
        linetable: read_bytes(mem, read_u64(mem, code + l.linetable)?)?,
    })
}

/// A `str` object's text (PEP 393 compact forms).
fn read_str<M: Memory>(mem: &M, s: u64, minor: u32) -> Option<String> {
    let len = read_u64(mem, s + 16)? as usize;
    if len > 4096 {
        return None;
    }
    let state = read_u32(mem, s + 32)?;
    let (kind, compact, ascii) = (
        (state >> 2) & 7,
        (state >> 5) & 1 == 1,
        (state >> 6) & 1 == 1,
    );
    if !compact {
        return None;
    }
    let base = if minor >= 12 { 40 } else { 48 };
    let data = if ascii {
        s + base
    } else {
        s + base + if minor >= 12 { 16 } else { 24 }
    };
    let width = match kind {
        1 => 1,
        2 => 2,
        4 => 4,
        _ => return None,
    };
    let mut b = vec![0u8; len * width];
    mem.read(data, &mut b).ok()?;
    Some(match width {
        1 => b.iter().map(|&c| c as char).collect(),
        2 => b
            .chunks_exact(2)
            .filter_map(|c| char::from_u32(u32::from(u16::from_le_bytes([c[0], c[1]]))))
            .collect(),
        _ => b
            .chunks_exact(4)
            .filter_map(|c| char::from_u32(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
    })
}

/// A `bytes` object's contents.
fn read_bytes<M: Memory>(mem: &M, b: u64) -> Option<Vec<u8>> {
    let len = read_u64(mem, b + 16)? as usize;
    if len > 1 << 20 {
        return None;
    }
    let mut v = vec![0u8; len];
    mem.read(b + 32, &mut v).ok()?;
    Some(v)
}

/// Line of bytecode byte offset `off` from a 3.9 `co_lnotab`.
pub fn lnotab_line(t: &[u8], first: u32, off: u64) -> Option<u32> {
    let (mut addr, mut line) = (0u64, i64::from(first));
    for p in t.chunks_exact(2) {
        addr += u64::from(p[0]);
        if addr > off {
            break;
        }
        line += i64::from(p[1] as i8);
    }
    u32::try_from(line).ok()
}

/// Line of bytecode byte offset `off` from a 3.10 `co_linetable` (PEP 626).
pub fn linetable310_line(t: &[u8], first: u32, off: u64) -> Option<u32> {
    let (mut end, mut line) = (0u64, i64::from(first));
    for p in t.chunks_exact(2) {
        let start = end;
        end += u64::from(p[0]);
        let ld = p[1] as i8;
        let here = if ld == -128 {
            None
        } else {
            line += i64::from(ld);
            Some(line)
        };
        if off >= start && off < end {
            return here.and_then(|l| u32::try_from(l).ok());
        }
    }
    None
}

/// Line of code unit `off` from a 3.11+ location table.
pub fn location_line(t: &[u8], first: u32, off: u64) -> Option<u32> {
    let mut i = 0;
    let varint = |i: &mut usize| -> u64 {
        let (mut v, mut shift) = (0u64, 0);
        while let Some(&b) = t.get(*i) {
            *i += 1;
            v |= u64::from(b & 63) << shift;
            shift += 6;
            if b & 64 == 0 {
                break;
            }
        }
        v
    };
    let signed = |v: u64| {
        if v & 1 == 1 {
            -((v >> 1) as i64)
        } else {
            (v >> 1) as i64
        }
    };
    let (mut addr, mut line) = (0u64, i64::from(first));
    while let Some(&b) = t.get(i) {
        i += 1;
        let code = (b >> 3) & 15;
        let len = u64::from(b & 7) + 1;
        let here = match code {
            15 => None,
            14 => {
                line += signed(varint(&mut i));
                varint(&mut i);
                varint(&mut i);
                varint(&mut i);
                Some(line)
            }
            13 => {
                line += signed(varint(&mut i));
                Some(line)
            }
            10..=12 => {
                line += i64::from(code) - 10;
                i += 2;
                Some(line)
            }
            _ => {
                i += 1;
                Some(line)
            }
        };
        if off >= addr && off < addr + len {
            return here.and_then(|l| u32::try_from(l).ok());
        }
        addr += len;
    }
    None
}

/// The eval loop's native frame, which Python frames replace.
fn is_eval_frame(f: &Frame) -> bool {
    f.function
        .as_deref()
        .is_some_and(|n| n == "_PyEval_EvalFrameDefault" || n == "_PyEval_EvalFrame")
}

/// Interleaves Python frames into native ones, innermost first: each native
/// eval-loop frame is replaced by the Python frames of its run (up to a frame
/// marked [`PY_FRAME_EDGE`]; on ≤3.10 every frame is a run). Runs left over when
/// the native stack has no more eval frames (it was cut short, or unwound
/// without frame pointers) follow the native frames.
pub fn interleave(
    native: Vec<Frame>,
    py: Vec<(Frame, bool)>,
    every_frame_a_run: bool,
) -> Vec<Frame> {
    let mut runs: Vec<Vec<Frame>> = Vec::new();
    let mut cur = Vec::new();
    for (f, edge) in py {
        cur.push(f);
        if edge || every_frame_a_run {
            runs.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        runs.push(cur);
    }
    let mut runs = runs.into_iter();
    let mut out = Vec::with_capacity(native.len());
    for f in native {
        if is_eval_frame(&f) {
            match runs.next() {
                Some(run) => out.extend(run),
                None => out.push(f),
            }
        } else {
            out.push(f);
        }
    }
    for run in runs {
        out.extend(run);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Line tables of each format, against lines CPython itself reports (the
    /// tables are from `compile()` of small functions; see the comments).
    #[test]
    fn line_tables() {
        // 3.11 location table: first line 10; 2 units on line 10 (code 0, 1 column byte),
        // 3 units on line 11 (code 11: delta 1), 1 unit with no location (15), 2 units
        // on line 14 (code 13, signed varint +3 = 6), 1 unit on line 12 (code 14: -2 = 5).
        let t = [0x81, 5, 0xda, 1, 2, 0xf8, 0xe9, 6, 0xf0, 5, 0, 0, 0];
        let cases = [
            (0, Some(10)),
            (1, Some(10)),
            (2, Some(11)),
            (4, Some(11)),
            (5, None),
            (6, Some(14)),
            (7, Some(14)),
            (8, Some(12)),
            (9, None),
        ];
        for (off, want) in cases {
            assert_eq!(location_line(&t, 10, off), want, "3.11 offset {off}");
        }
        // 3.10: (bytes, line delta): 4 bytes on line 20, 6 on 21, 2 with no line, 4 on 19.
        let t = [4, 0, 6, 1, 2, 0x80, 4, 0xfe];
        let cases = [
            (0, Some(20)),
            (3, Some(20)),
            (4, Some(21)),
            (9, Some(21)),
            (10, None),
            (12, Some(19)),
            (16, None),
        ];
        for (off, want) in cases {
            assert_eq!(linetable310_line(&t, 20, off), want, "3.10 offset {off}");
        }
        // 3.9 lnotab: (address increment, line increment): line 5 at 0, 6 at 4, 8 at 10.
        let t = [4, 1, 6, 2];
        let cases = [
            (0, Some(5)),
            (3, Some(5)),
            (4, Some(6)),
            (9, Some(6)),
            (10, Some(8)),
            (40, Some(8)),
        ];
        for (off, want) in cases {
            assert_eq!(lnotab_line(&t, 5, off), want, "3.9 offset {off}");
        }
    }

    fn f(name: &str, kind: FrameKind) -> Frame {
        Frame {
            function: Some(name.into()),
            file: None,
            line: None,
            module: None,
            kind,
            address: "0x1".into(),
            inlined: false,
        }
    }

    /// Eval-loop frames are replaced run by run; leftovers follow.
    #[test]
    fn interleaves_runs() {
        let native = [
            "malloc",
            "PyBytes_FromSize",
            "_PyEval_EvalFrameDefault",
            "PyObject_Call",
            "_PyEval_EvalFrameDefault",
            "main",
        ]
        .map(|n| f(n, FrameKind::Native))
        .to_vec();
        let py = vec![
            (f("leaf", FrameKind::Python), false),
            (f("mid", FrameKind::Python), true),
            (f("cb", FrameKind::Python), false),
            (f("<module>", FrameKind::Python), true),
        ];
        let names = |v: Vec<Frame>| {
            v.into_iter()
                .map(|f| f.function.unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(interleave(native.clone(), py.clone(), false)),
            [
                "malloc",
                "PyBytes_FromSize",
                "leaf",
                "mid",
                "PyObject_Call",
                "cb",
                "<module>",
                "main"
            ]
        );
        // No eval frames in a broken native stack: the Python frames follow.
        let short = vec![f("malloc", FrameKind::Native)];
        assert_eq!(
            names(interleave(short, py, false)),
            ["malloc", "leaf", "mid", "cb", "<module>"]
        );
    }

    #[test]
    fn versions_from_names() {
        assert_eq!(version_from_name("/usr/bin/python3.11"), Some((3, 11)));
        assert_eq!(
            version_from_name("/x/lib/libpython3.9.so.1.0"),
            Some((3, 9))
        );
        assert_eq!(version_from_name("/usr/bin/python"), None);
    }
}
