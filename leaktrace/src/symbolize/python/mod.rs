//! CPython: tell BPF where the interpreter's frames are ([`PyConfig`]), and turn
//! recorded `(code object, instruction)` pairs into file, qualified name and line by
//! reading the code objects from the target's memory. Nothing is injected; reads go
//! through `/proc/PID/mem`.
//!
//! Per version (x86-64, default GIL builds; see ../shared/docs/python.md):
//! * which object is the interpreter, and its version: [`identify`], from symbols;
//! * the thread's `PyThreadState`: the pthread TSD slot of `_PyRuntime`'s
//!   `autoTSSkey` (3.9–3.14; the key's address is read from the code of
//!   `PyGILState_GetThisThreadState`, a per-version table as fallback), or 2.7's list
//!   of thread states searched by `pthread_self()` ([`layout`]);
//! * field offsets: the types' own `tp_members` tables in the target (2.7–3.13),
//!   3.14's `_Py_DebugOffsets`, and a small table for what neither gives;
//! * line numbers: [`lines`].

pub mod identify;
mod layout;
pub mod lines;

pub use identify::{Interpreter, version_from_name};
pub use layout::{Loaded, configure, load};
use leaktrace_common::{
    PY_FRAME_EDGE, PY_FRAME_TAG_MASK, PY_FRAME_TAG_SHIFT, PyConfig, PyFrame, py_name_tag,
};
use lines::{linetable310_line, lnotab_line, location_line};
use rustc_hash::FxHashMap;

use crate::{
    process::Memory,
    symbolize::{Frame, FrameKind},
};

/// What leaktrace knows about the target's interpreter, once configured.
#[derive(Clone, Debug)]
pub struct PyTarget {
    /// (major, minor).
    pub version: (u32, u32),
    /// Object holding the interpreter (executable or libpython).
    pub object: String,
    /// Configuration for BPF.
    pub config: PyConfig,
    /// Code object field offsets.
    code: CodeLayout,
    /// `&PyCode_Type`, to validate code objects.
    code_type: u64,
    /// How names and file names are stored.
    text: TextLayout,
    /// Runtime address ranges of the eval loop's native function, where symbols
    /// may not name it (stripped builds, GCC's `.cold` parts).
    eval_ranges: Vec<(u64, u64)>,
}

impl PyTarget {
    /// Whether each Python frame is its own run of the eval loop (≤3.10: one native
    /// eval frame per Python frame).
    pub fn every_frame_a_run(&self) -> bool {
        self.version <= (3, 10)
    }

    /// Interleaves Python frames into native ones, as [`interleave`] does, knowing
    /// this interpreter's eval loop by name and by address.
    pub fn interleave(&self, native: Vec<Frame>, py: Vec<(Frame, bool)>) -> Vec<Frame> {
        let names: &[&str] = if self.version.0 == 2 {
            &["PyEval_EvalFrameEx"]
        } else {
            &["_PyEval_EvalFrameDefault", "_PyEval_EvalFrame"]
        };
        let is_eval = |f: &Frame| {
            f.function.as_deref().is_some_and(|n| names.contains(&n))
                || (f.kind == FrameKind::Native
                    && parse_address(&f.address)
                        .is_some_and(|a| self.eval_ranges.iter().any(|&(s, e)| s <= a && a < e)))
        };
        interleave_with(native, py, self.every_frame_a_run(), is_eval)
    }
}

impl PyTarget {
    /// A target with a code object layout of `version` and `&PyCode_Type` at
    /// `code_type`, for the fuzzer (`fuzz/`): it reads code objects, names and line
    /// tables from memory it controls, as a hostile target would lay them out.
    #[doc(hidden)]
    pub fn for_fuzzing(version: (u32, u32), code_type: u64) -> Self {
        let modern = version >= (3, 11);
        Self {
            version,
            object: String::new(),
            config: PyConfig {
                code_name: 56,
                ..PyConfig::default()
            },
            code: CodeLayout {
                basicsize: if modern { 200 } else { 0 },
                filename: 48,
                name: 56,
                qualname: modern.then_some(64),
                firstlineno: 72,
                linetable: 80,
            },
            code_type,
            text: if version.0 == 2 {
                TextLayout::Bytes27
            } else {
                TextLayout::Unicode {
                    ascii_data: if version.1 >= 12 { 40 } else { 48 },
                    compact_extra: if version.1 >= 12 { 16 } else { 24 },
                }
            },
            eval_ranges: Vec::new(),
        }
    }
}

fn parse_address(s: &str) -> Option<u64> {
    u64::from_str_radix(s.strip_prefix("0x")?, 16).ok()
}

#[derive(Clone, Copy, Debug, Default)]
struct CodeLayout {
    /// Where the bytecode starts in a code object (3.11+: `co_code_adaptive`).
    basicsize: u64,
    filename: u64,
    name: u64,
    qualname: Option<u64>,
    firstlineno: u64,
    linetable: u64,
}

/// How a code object's strings are laid out.
#[derive(Clone, Copy, Debug)]
enum TextLayout {
    /// 2.x `str` (`PyStringObject`): length at 16, bytes at 36.
    Bytes27,
    /// 3.x `str` (PEP 393): compact ASCII data at `ascii_data`, other compact
    /// kinds `compact_extra` bytes further (the UTF-8 cache's fields).
    Unicode { ascii_data: u64, compact_extra: u64 },
}

/// Why Python frames are not available (said in the report).
pub type Unavailable = String;

pub(crate) fn read_u64<M: Memory>(mem: &M, addr: u64) -> Option<u64> {
    let mut b = [0u8; 8];
    mem.read(addr, &mut b).ok()?;
    Some(u64::from_le_bytes(b))
}

pub(crate) fn read_u32<M: Memory>(mem: &M, addr: u64) -> Option<u32> {
    let mut b = [0u8; 4];
    mem.read(addr, &mut b).ok()?;
    Some(u32::from_le_bytes(b))
}

/// A code object as read from the target.
#[derive(Clone, Debug)]
struct Code {
    filename: String,
    qualname: String,
    firstlineno: u32,
    /// Address of its line table's `bytes` object.
    linetable_at: u64,
    /// Tag of its name's hash ([`py_name_tag`]).
    tag: u64,
}

/// Most bytes of line tables kept: past it, a code object's table is read for each
/// frame that needs it and not kept (a target can give thousands of functions one
/// 1 MiB table each; tables shared by several code objects are kept once).
const TABLES_BUDGET: usize = 32 << 20;

/// Resolves Python frames, caching code objects by address and name tag.
#[derive(Debug, Default)]
pub struct PySymbols {
    /// By (address, tag recorded in BPF): a code object freed and another made at
    /// its address has another tag, and is read afresh.
    cache: FxHashMap<(u64, u64), Option<Code>>,
    /// Frames whose code object had been replaced by another (another name's tag)
    /// when userspace read it: left unnamed rather than named after the newcomer.
    pub replaced: u64,
    /// Line tables by the address and length of their `bytes` object (read again
    /// each time: a freed table's address may hold another table since).
    tables: FxHashMap<(u64, u64), std::rc::Rc<[u8]>>,
    /// Bytes in `tables`.
    table_bytes: usize,
    /// Line tables read but not kept (over [`TABLES_BUDGET`]).
    pub tables_not_kept: u64,
}

impl PySymbols {
    /// The line table at `at`: kept, or read and kept while the budget lasts.
    fn table<M: Memory>(&mut self, mem: &M, t: &PyTarget, at: u64) -> Option<std::rc::Rc<[u8]>> {
        let key = (at, read_u64(mem, at.wrapping_add(16))?);
        if let Some(v) = self.tables.get(&key) {
            return Some(v.clone());
        }
        let v: std::rc::Rc<[u8]> = read_bytes(mem, at, t.text)?.into();
        if self.table_bytes + v.len() <= TABLES_BUDGET {
            self.table_bytes += v.len();
            self.tables.insert(key, v.clone());
        } else {
            self.tables_not_kept += 1;
        }
        Some(v)
    }

    /// A Python frame as a report frame (`kind: "python"`).
    pub fn frame<M: Memory>(&mut self, mem: &M, t: &PyTarget, f: PyFrame) -> Frame {
        let raw = f.instr & !PY_FRAME_EDGE;
        let tag = (raw >> PY_FRAME_TAG_SHIFT) & PY_FRAME_TAG_MASK;
        let instr = raw & ((1 << PY_FRAME_TAG_SHIFT) - 1);
        let tagged = t.config.code_name != 0;
        let code = match self.cache.get(&(f.code, tag)) {
            Some(c) => c.clone(),
            None => {
                let c = read_code(mem, t, f.code);
                // The tag BPF recorded must be that of the code object read now.
                let c = match c {
                    Some(c) if tagged && c.tag != tag => {
                        self.replaced += 1;
                        None
                    }
                    c => c,
                };
                self.cache.insert((f.code, tag), c.clone());
                c
            }
        };
        match code {
            Some(c) => {
                let table = self
                    .table(mem, t, c.linetable_at)
                    .unwrap_or_else(|| [].into());
                let line = match t.version {
                    (2, _) | (3, ..=9) => lnotab_line(
                        &table,
                        c.firstlineno,
                        (instr as u32 as i32).max(0) as u64,
                        t.version >= (3, 6),
                    ),
                    (3, 10) => linetable310_line(
                        &table,
                        c.firstlineno,
                        2 * (instr as u32 as i32).max(0) as u64,
                    ),
                    _ => {
                        let units =
                            instr.saturating_sub(f.code.saturating_add(t.code.basicsize)) / 2;
                        location_line(&table, c.firstlineno, units)
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
    if read_u64(mem, code.wrapping_add(8))? != t.code_type {
        return None;
    }
    let l = &t.code;
    let name_ptr = read_u64(mem, code.wrapping_add(l.qualname.unwrap_or(l.name)))?;
    let tag = read_u64(mem, code.wrapping_add(l.name))
        .and_then(|n| read_u64(mem, n.wrapping_add(24)))
        .map_or(py_name_tag(0), py_name_tag);
    Some(Code {
        tag,
        filename: read_text(mem, read_u64(mem, code.wrapping_add(l.filename))?, t.text)?,
        qualname: read_text(mem, name_ptr, t.text)?,
        firstlineno: read_u32(mem, code.wrapping_add(l.firstlineno))?,
        linetable_at: read_u64(mem, code.wrapping_add(l.linetable))?,
    })
}

/// A string object's text: 2.x `str`, or 3.x `str` in its PEP 393 compact forms.
fn read_text<M: Memory>(mem: &M, s: u64, layout: TextLayout) -> Option<String> {
    let len = read_u64(mem, s.wrapping_add(16))? as usize;
    if len > 4096 {
        return None;
    }
    let (ascii_data, compact_extra) = match layout {
        TextLayout::Bytes27 => {
            let mut b = vec![0u8; len];
            mem.read(s.wrapping_add(36), &mut b).ok()?;
            return Some(String::from_utf8_lossy(&b).into_owned());
        }
        TextLayout::Unicode {
            ascii_data,
            compact_extra,
        } => (ascii_data, compact_extra),
    };
    let state = read_u32(mem, s.wrapping_add(32))?;
    let (kind, compact, ascii) = (
        (state >> 2) & 7,
        (state >> 5) & 1 == 1,
        (state >> 6) & 1 == 1,
    );
    if !compact {
        return None;
    }
    let data = if ascii {
        s.wrapping_add(ascii_data)
    } else {
        s.wrapping_add(ascii_data + compact_extra)
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

/// A `bytes` (2.x `str`) object's contents: the line table.
fn read_bytes<M: Memory>(mem: &M, b: u64, layout: TextLayout) -> Option<Vec<u8>> {
    let len = read_u64(mem, b.wrapping_add(16))? as usize;
    if len > 1 << 20 {
        return None;
    }
    let data = match layout {
        TextLayout::Bytes27 => 36,
        TextLayout::Unicode { .. } => 32,
    };
    let mut v = vec![0u8; len];
    mem.read(b.wrapping_add(data), &mut v).ok()?;
    Some(v)
}

/// The eval loop's native frame in CPython 3, which Python frames replace.
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
    interleave_with(native, py, every_frame_a_run, is_eval_frame)
}

fn interleave_with(
    native: Vec<Frame>,
    py: Vec<(Frame, bool)>,
    every_frame_a_run: bool,
    is_eval_frame: impl Fn(&Frame) -> bool,
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
}
