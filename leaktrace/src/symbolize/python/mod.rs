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
use leaktrace_common::{PY_FRAME_EDGE, PyConfig, PyFrame};
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
                let line = match t.version {
                    (2, _) | (3, ..=9) => lnotab_line(
                        &c.linetable,
                        c.firstlineno,
                        (instr as u32 as i32).max(0) as u64,
                        t.version >= (3, 6),
                    ),
                    (3, 10) => linetable310_line(
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
        filename: read_text(mem, read_u64(mem, code + l.filename)?, t.text)?,
        qualname: read_text(mem, name_ptr, t.text)?,
        firstlineno: read_u32(mem, code + l.firstlineno)?,
        linetable: read_bytes(mem, read_u64(mem, code + l.linetable)?, t.text)?,
    })
}

/// A string object's text: 2.x `str`, or 3.x `str` in its PEP 393 compact forms.
fn read_text<M: Memory>(mem: &M, s: u64, layout: TextLayout) -> Option<String> {
    let len = read_u64(mem, s + 16)? as usize;
    if len > 4096 {
        return None;
    }
    let (ascii_data, compact_extra) = match layout {
        TextLayout::Bytes27 => {
            let mut b = vec![0u8; len];
            mem.read(s + 36, &mut b).ok()?;
            return Some(String::from_utf8_lossy(&b).into_owned());
        }
        TextLayout::Unicode {
            ascii_data,
            compact_extra,
        } => (ascii_data, compact_extra),
    };
    let state = read_u32(mem, s + 32)?;
    let (kind, compact, ascii) = (
        (state >> 2) & 7,
        (state >> 5) & 1 == 1,
        (state >> 6) & 1 == 1,
    );
    if !compact {
        return None;
    }
    let data = if ascii {
        s + ascii_data
    } else {
        s + ascii_data + compact_extra
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
    let len = read_u64(mem, b + 16)? as usize;
    if len > 1 << 20 {
        return None;
    }
    let data = match layout {
        TextLayout::Bytes27 => 36,
        TextLayout::Unicode { .. } => 32,
    };
    let mut v = vec![0u8; len];
    mem.read(b + data, &mut v).ok()?;
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
