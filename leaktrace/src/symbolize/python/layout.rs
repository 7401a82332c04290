//! Where each CPython version keeps what the BPF walk reads, found in the live
//! target: [`configure`] turns an [`Interpreter`] into a [`PyTarget`].
//!
//! * **2.7**: thread states hang off `interp_head`'s `tstate_head` list and carry the
//!   `pthread_self()` of their thread; BPF searches the list (`PY_TSTATE_LIST`).
//!   Frames are `PyFrameObject`s (`f_back`, `f_code`, `f_lasti` in bytes), strings are
//!   2.x `str`, lines come from an unsigned `co_lnotab`.
//! * **3.9–3.13**: the thread state is in the pthread TSD slot of `autoTSSkey`;
//!   frame and code offsets from the types' `tp_members` and a per-version table.
//! * **3.14**: the same TSD slot; every offset from `_Py_DebugOffsets` at the start of
//!   `_PyRuntime`, whose own layout is specific to the minor version and is
//!   checked for sanity before use; frames owned by the interpreter or the C stack
//!   (`owner` ≥ 3) mark where C entered the eval loop, and `f_executable` is a tagged
//!   `_PyStackRef` (BPF masks the tag).
//!
//! Unsupported versions and builds (free-threaded ones) are refused with the reason.

use leaktrace_common::{
    PY_EDGE_IS_ENTRY, PY_EDGE_NONE, PY_EDGE_SHIM, PY_TSTATE_LIST, PY_TSTATE_TSS, PyConfig,
};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
use rustc_hash::FxHashMap;

use super::{CodeLayout, Interpreter, PyTarget, TextLayout, Unavailable, read_u32, read_u64};
use crate::process::{Memory, procfs::MapEntry};

/// glibc x86-64: `offsetof(struct pthread, specific_1stblock)`; a key's slot is
/// 16 bytes (`seq`, `data`), valid for keys below 32.
const GLIBC_SPECIFIC_1STBLOCK: u64 = 0x310;

/// The versions whose frames are read, for messages.
const SUPPORTED: &str = "2.7 and 3.9–3.14";

fn read_cstr<M: Memory>(mem: &M, addr: u64) -> Option<String> {
    crate::process::memory::read_cstr(mem, addr, 64)
}

/// `{name: offset}` of a type's `tp_members` (`PyMemberDef` is 40 bytes on 64-bit,
/// `tp_members` at 240 in 2.7 and 3.x alike).
fn members<M: Memory>(mem: &M, type_addr: u64) -> FxHashMap<String, u64> {
    let mut out = FxHashMap::default();
    let Some(table) = read_u64(mem, type_addr + 240).filter(|&t| t != 0) else {
        return out;
    };
    for i in 0..64 {
        let m = table.wrapping_add(i * 40);
        let Some(name) = read_u64(mem, m).filter(|&n| n != 0) else {
            break;
        };
        let (Some(name), Some(off)) = (read_cstr(mem, name), read_u64(mem, m.wrapping_add(16)))
        else {
            break;
        };
        out.insert(name, off);
    }
    out
}

/// What the interpreter's file says, read once per interpreter (its file is read
/// whole, megabytes): the load bias, the eval loop's ranges and the addresses the
/// code that finds the thread state refers to. [`configure`] is then only reads of
/// the target's memory, cheap to retry while the runtime initializes.
#[derive(Clone, Debug)]
pub struct Loaded {
    bias: u64,
    /// Runtime ranges of the eval loop's native function.
    eval_ranges: Vec<(u64, u64)>,
    /// Link-time addresses `PyGILState_GetThisThreadState` refers to.
    gilstate_refs: Vec<u64>,
    /// Link-time addresses `PyInterpreterState_Head` refers to (2.x).
    interp_head_refs: Vec<u64>,
}

impl Loaded {
    fn at(&self, link: u64) -> u64 {
        link.wrapping_add(self.bias)
    }
}

/// The file's bytes, while [`load`] reads them.
struct FileBytes {
    data: Vec<u8>,
    bias: u64,
}

impl FileBytes {
    fn at(&self, link: u64) -> u64 {
        link.wrapping_add(self.bias)
    }

    /// Link-time addresses a function's first instructions refer to (RIP-relative
    /// or absolute memory operands, and immediates that look like addresses), up to
    /// its first jump or return.
    fn referenced(&self, func: u64) -> Vec<u64> {
        use iced_x86::{Decoder, DecoderOptions, FlowControl, OpKind, Register};
        let Ok(file) = object::File::parse(&*self.data) else {
            return Vec::new();
        };
        let Some(code) = file.sections().find_map(|s| {
            let d = s.data().ok()?;
            let o = usize::try_from(func.checked_sub(s.address())?).ok()?;
            d.get(o..(o + 96).min(d.len()))
        }) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut decoder = Decoder::with_ip(64, code, func, DecoderOptions::NONE);
        for i in decoder.iter().take(24) {
            for n in 0..i.op_count() {
                match i.op_kind(n) {
                    OpKind::Memory if i.memory_base() == Register::RIP => {
                        out.push(i.ip_rel_memory_address());
                    }
                    OpKind::Memory
                        if i.memory_base() == Register::None
                            && i.memory_index() == Register::None =>
                    {
                        out.push(i.memory_displacement64());
                    }
                    OpKind::Immediate32 | OpKind::Immediate32to64 => {
                        out.push(i.immediate(n));
                    }
                    _ => {}
                }
            }
            if matches!(
                i.flow_control(),
                FlowControl::Return
                    | FlowControl::UnconditionalBranch
                    | FlowControl::IndirectBranch
            ) {
                break;
            }
        }
        out
    }
}

/// Reads what [`configure`] needs from the interpreter's file (once per interpreter).
pub fn load(interp: &Interpreter, maps: &[MapEntry]) -> Result<Loaded, Unavailable> {
    let data = crate::process::procfs::read_object(&interp.host)
        .map_err(|e| format!("failed to read {}: {e}", interp.host.display()))?;
    let bias = maps
        .iter()
        .find(|m| m.path == interp.object)
        .and_then(|m| crate::process::elf::load_bias(&data, m.start, m.offset, m.is_exec()))
        .ok_or_else(|| format!("{} is not mapped where its ELF says", interp.object))?;
    let f = FileBytes { data, bias };
    let s = &interp.symbols;
    Ok(Loaded {
        bias,
        eval_ranges: eval_ranges(&f, interp),
        gilstate_refs: s.gilstate_fn.map(|a| f.referenced(a)).unwrap_or_default(),
        interp_head_refs: s
            .interp_head_fn
            .map(|a| f.referenced(a))
            .unwrap_or_default(),
    })
}

/// Configures the Python walk for `interp` in the live target, from what [`load`]
/// read of its file.
pub fn configure<M: Memory>(
    mem: &M,
    interp: &Interpreter,
    loaded: &Loaded,
    maps: &[MapEntry],
    fsbase_offset: Option<u64>,
) -> Result<PyTarget, Unavailable> {
    let (major, minor) = interp.version;
    if !matches!((major, minor), (2, 7) | (3, 9..=14)) {
        return Err(format!(
            "CPython {major}.{minor} is not supported ({SUPPORTED} are)"
        ));
    }
    let fsbase_offset =
        fsbase_offset.ok_or("the kernel's BTF does not give task_struct.thread.fsbase")?;
    let loaded = loaded.clone();
    let s = &interp.symbols;
    let code_type = loaded.at(s.code_type);
    let mut c = PyConfig {
        enabled: 1,
        fsbase_offset,
        cframe_frame: u32::MAX,
        ..PyConfig::default()
    };
    let mut t = PyTarget {
        version: interp.version,
        object: interp.object.clone(),
        config: c,
        code: CodeLayout::default(),
        code_type,
        text: TextLayout::Unicode {
            ascii_data: if minor >= 12 { 40 } else { 48 },
            compact_extra: if minor >= 12 { 16 } else { 24 },
        },
        eval_ranges: loaded.eval_ranges.clone(),
    };
    if major == 2 {
        configure_27(mem, interp, &loaded, maps, &mut c, &mut t)?;
    } else {
        c.tstate_lookup = PY_TSTATE_TSS;
        c.tss_slot_offset = GLIBC_SPECIFIC_1STBLOCK + tss_key(mem, interp, &loaded)? * 16 + 8;
        if minor >= 14 {
            configure_314(mem, interp, &loaded, &mut c, &mut t)?;
        } else {
            configure_3x(mem, interp, &loaded, minor, &mut c, &mut t)?;
        }
    }
    // Frames are tagged with their code object's name (see PY_FRAME_TAG_SHIFT).
    c.code_name = u32::try_from(t.code.name).unwrap_or(0);
    t.config = c;
    Ok(t)
}

/// Code-object offsets from `PyCode_Type`'s members (2.7–3.13).
fn code_from_members<M: Memory>(
    mem: &M,
    code_type: u64,
    linetable: &str,
) -> Result<CodeLayout, Unavailable> {
    let m = members(mem, code_type);
    let get = |n: &str| {
        m.get(n)
            .copied()
            .ok_or_else(|| format!("PyCode_Type has no member {n}"))
    };
    Ok(CodeLayout {
        basicsize: read_u64(mem, code_type + 32).ok_or("PyCode_Type unreadable")?,
        filename: get("co_filename")?,
        name: get("co_name")?,
        qualname: m.get("co_qualname").copied(),
        firstlineno: get("co_firstlineno")?,
        linetable: get(linetable)?,
    })
}

/// Frame offsets from `PyFrame_Type`'s members (2.7–3.10 frame objects).
fn frame_members<M: Memory>(
    mem: &M,
    frame_type: Option<u64>,
) -> Result<FxHashMap<String, u64>, Unavailable> {
    let fm = members(mem, frame_type.ok_or("PyFrame_Type not found")?);
    if fm.is_empty() {
        return Err("PyFrame_Type's members are unreadable".into());
    }
    Ok(fm)
}

fn member(fm: &FxHashMap<String, u64>, n: &str) -> Result<u32, Unavailable> {
    fm.get(n)
        .and_then(|&o| u32::try_from(o).ok())
        .filter(|&o| o < 128)
        .ok_or_else(|| format!("PyFrame_Type has no member {n} in its first 128 bytes"))
}

/// 2.7: the list search, frame objects, 2.x strings.
fn configure_27<M: Memory>(
    mem: &M,
    interp: &Interpreter,
    loaded: &Loaded,
    maps: &[MapEntry],
    c: &mut PyConfig,
    t: &mut PyTarget,
) -> Result<(), Unavailable> {
    // PyThreadState {next, interp, frame, …, thread_id at 144}; PyInterpreterState
    // {next, tstate_head}: Include/pystate.h of 2.7, stable across its releases.
    const TSTATE_NEXT: u32 = 0;
    const TSTATE_INTERP: u64 = 8;
    const TSTATE_FRAME: u32 = 16;
    const TSTATE_THREAD_ID: u32 = 144;
    const INTERP_TSTATE_HEAD: u32 = 8;
    let s = &interp.symbols;
    // `interp_head` is static: in .symtab when not stripped, else read from the code of
    // PyInterpreterState_Head() (`mov interp_head(%rip), %rax; ret`).
    let candidates: Vec<u64> = match s.interp_head {
        Some(a) => vec![a],
        None => loaded.interp_head_refs.clone(),
    };
    let mut found = None;
    for link in candidates {
        let var = loaded.at(link);
        let Some(head) = read_u64(mem, var).filter(|&h| h != 0) else {
            continue;
        };
        let Some(first) = read_u64(mem, head.wrapping_add(u64::from(INTERP_TSTATE_HEAD))) else {
            continue;
        };
        // Every thread state points back to its interpreter.
        if first != 0 && read_u64(mem, first.wrapping_add(TSTATE_INTERP)) == Some(head) {
            found = Some((var, head, first));
            break;
        }
    }
    let Some((var, _, first)) = found else {
        return Err("interp_head not found (or the interpreter has no thread yet)".into());
    };
    // Each listed thread's id is its pthread_self(): an address inside the process.
    let mapped = |a: u64| maps.iter().any(|m| m.start <= a && a < m.end);
    let mut ts = first;
    for _ in 0..leaktrace_common::MAX_PY_THREADS {
        if ts == 0 {
            break;
        }
        let id = read_u64(mem, ts.wrapping_add(u64::from(TSTATE_THREAD_ID))).unwrap_or(0);
        if !mapped(id) {
            return Err(format!(
                "PyThreadState.thread_id at +{TSTATE_THREAD_ID} holds {id:#x}, not a pthread_t: unknown 2.7 layout"
            ));
        }
        ts = read_u64(mem, ts.wrapping_add(u64::from(TSTATE_NEXT))).unwrap_or(0);
    }
    c.tstate_lookup = PY_TSTATE_LIST;
    c.interp_head = var;
    c.interp_tstate_head = INTERP_TSTATE_HEAD;
    c.tstate_next = TSTATE_NEXT;
    c.tstate_thread_id = TSTATE_THREAD_ID;
    c.tstate_frame = TSTATE_FRAME;
    let fm = frame_members(mem, s.frame_type.map(|a| loaded.at(a)))?;
    c.frame_code = member(&fm, "f_code")?;
    c.frame_previous = member(&fm, "f_back")?;
    c.frame_instr = member(&fm, "f_lasti")?;
    c.instr_is_int = 1;
    c.edge_kind = PY_EDGE_NONE;
    c.frame_read = c.frame_instr + 4;
    t.code = code_from_members(mem, t.code_type, "co_lnotab")?;
    t.text = TextLayout::Bytes27;
    Ok(())
}

/// 3.9–3.13: frames and code from members and a small table.
fn configure_3x<M: Memory>(
    mem: &M,
    interp: &Interpreter,
    loaded: &Loaded,
    minor: u32,
    c: &mut PyConfig,
    t: &mut PyTarget,
) -> Result<(), Unavailable> {
    t.code = code_from_members(
        mem,
        t.code_type,
        if minor == 9 {
            "co_lnotab"
        } else {
            "co_linetable"
        },
    )?;
    match minor {
        9 | 10 => {
            let fm = frame_members(mem, interp.symbols.frame_type.map(|a| loaded.at(a)))?;
            c.tstate_frame = 24;
            c.frame_code = member(&fm, "f_code")?;
            c.frame_previous = member(&fm, "f_back")?;
            // 3.10 made f_lasti a getter (in bytes); the int field sits at 96.
            c.frame_instr = if minor == 9 {
                member(&fm, "f_lasti")?
            } else {
                member(&fm, "f_lasti").unwrap_or(96)
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
            c.none_addr = interp.symbols.none.map_or(0, |a| loaded.at(a));
        }
    }
    Ok(())
}

/// 3.14's `_Py_DebugOffsets`, as u64 words after the 8-byte cookie; the indices
/// follow the table's layout in 3.14 (`Include/internal/pycore_debug_offsets.h`),
/// which differs from 3.13's (it gained `threads_main`, `code_object_generation`,
/// `tlbc_generation`, frame `stackpointer`/`tlbc_index`, `co_tlbc` and the set
/// object).
mod debug314 {
    pub const VERSION: usize = 0;
    pub const FREE_THREADED: usize = 1;
    pub const TSTATE_SIZE: usize = 21;
    pub const TSTATE_CURRENT_FRAME: usize = 25;
    pub const FRAME_SIZE: usize = 30;
    pub const FRAME_PREVIOUS: usize = 31;
    pub const FRAME_EXECUTABLE: usize = 32;
    pub const FRAME_INSTR_PTR: usize = 33;
    pub const FRAME_OWNER: usize = 35;
    pub const CODE_SIZE: usize = 38;
    pub const CODE_FILENAME: usize = 39;
    pub const CODE_NAME: usize = 40;
    pub const CODE_QUALNAME: usize = 41;
    pub const CODE_LINETABLE: usize = 42;
    pub const CODE_FIRSTLINENO: usize = 43;
    pub const CODE_ADAPTIVE: usize = 47;
    pub const PYOBJECT_OB_TYPE: usize = 50;
    pub const UNICODE_ASCII_SIZE: usize = 79;
    /// Words read.
    pub const WORDS: usize = 80;
}

/// 3.14: every offset from the debug offsets, checked for sanity.
fn configure_314<M: Memory>(
    mem: &M,
    interp: &Interpreter,
    loaded: &Loaded,
    c: &mut PyConfig,
    t: &mut PyTarget,
) -> Result<(), Unavailable> {
    use debug314 as d;
    let runtime = loaded.at(interp.symbols.runtime.ok_or("_PyRuntime not found")?);
    let mut raw = vec![0u8; 8 + 8 * d::WORDS];
    mem.read(runtime, &mut raw)
        .map_err(|e| format!("_PyRuntime unreadable: {e}"))?;
    if &raw[..8] != b"xdebugpy" {
        return Err("_PyRuntime does not start with _Py_DebugOffsets (cookie xdebugpy)".into());
    }
    let w: Vec<u64> = raw[8..]
        .chunks_exact(8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
        .collect();
    let version = w[d::VERSION];
    if version >> 16 != 0x030e {
        return Err(format!(
            "_Py_DebugOffsets says version {version:#x}, not 3.14"
        ));
    }
    if w[d::FREE_THREADED] != 0 {
        return Err("free-threaded CPython builds are not supported".into());
    }
    let (frame_size, code_size) = (w[d::FRAME_SIZE], w[d::CODE_SIZE]);
    let within = |i: usize, size: u64| w[i] < size;
    let sane = (48..=256).contains(&frame_size)
        && [
            d::FRAME_PREVIOUS,
            d::FRAME_EXECUTABLE,
            d::FRAME_INSTR_PTR,
            d::FRAME_OWNER,
        ]
        .iter()
        .all(|&i| within(i, frame_size.min(128)))
        && (64..=1024).contains(&code_size)
        && [
            d::CODE_FILENAME,
            d::CODE_NAME,
            d::CODE_QUALNAME,
            d::CODE_LINETABLE,
            d::CODE_FIRSTLINENO,
            d::CODE_ADAPTIVE,
        ]
        .iter()
        .all(|&i| within(i, code_size))
        && within(d::TSTATE_CURRENT_FRAME, w[d::TSTATE_SIZE])
        && w[d::PYOBJECT_OB_TYPE] == 8
        && (32..=64).contains(&w[d::UNICODE_ASCII_SIZE]);
    if !sane {
        return Err(format!(
            "_Py_DebugOffsets of {version:#x} does not have the 3.14 layout leaktrace knows"
        ));
    }
    let u = |i: usize| w[i] as u32;
    c.tstate_frame = u(d::TSTATE_CURRENT_FRAME);
    c.frame_code = u(d::FRAME_EXECUTABLE);
    c.frame_previous = u(d::FRAME_PREVIOUS);
    c.frame_instr = u(d::FRAME_INSTR_PTR);
    c.frame_edge = u(d::FRAME_OWNER);
    c.edge_kind = PY_EDGE_SHIM;
    c.frame_read = [c.frame_code, c.frame_previous, c.frame_instr, c.frame_edge]
        .into_iter()
        .max()
        .unwrap_or(0)
        + 8;
    c.none_addr = interp.symbols.none.map_or(0, |a| loaded.at(a));
    t.code = CodeLayout {
        basicsize: w[d::CODE_ADAPTIVE],
        filename: w[d::CODE_FILENAME],
        name: w[d::CODE_NAME],
        qualname: Some(w[d::CODE_QUALNAME]),
        firstlineno: w[d::CODE_FIRSTLINENO],
        linetable: w[d::CODE_LINETABLE],
    };
    t.text = TextLayout::Unicode {
        ascii_data: w[d::UNICODE_ASCII_SIZE],
        compact_extra: 16,
    };
    Ok(())
}

/// The pthread key of `_PyRuntime`'s `autoTSSkey` (`Py_tss_t {int
/// _is_initialized; pthread_key_t _key;}`): its address is what
/// `PyGILState_GetThisThreadState` passes to `PyThread_tss_get`; a per-version
/// offset into `_PyRuntime` is the fallback. Accepted only when initialized with a
/// key below 32 (the slots in `struct pthread` itself).
fn tss_key<M: Memory>(mem: &M, interp: &Interpreter, loaded: &Loaded) -> Result<u64, Unavailable> {
    let s = &interp.symbols;
    let runtime = s.runtime.ok_or("_PyRuntime not found")?;
    let span = s.runtime_size.max(4096);
    let mut candidates: Vec<u64> = loaded
        .gilstate_refs
        .iter()
        .copied()
        .filter(|&a| a >= runtime && a < runtime + span)
        .collect();
    let table = match interp.version.1 {
        9 | 10 => Some(584),
        11 => Some(592),
        12 => Some(1544),
        13 => Some(2160),
        14 => Some(2336),
        _ => None,
    };
    candidates.extend(table.map(|o| runtime + o));
    let mut seen = Vec::new();
    // The code refers to the Py_tss_t, or (PyThread_tss_get inlined) to its key.
    for link in candidates.iter().flat_map(|&a| [a, a.saturating_sub(4)]) {
        let a = loaded.at(link);
        let (init, key) = (read_u32(mem, a), read_u32(mem, a + 4));
        if let (Some(1), Some(k)) = (init, key)
            && k < 32
        {
            return Ok(u64::from(k));
        }
        seen.push(format!(
            "+{} ({init:?}, {key:?})",
            link.wrapping_sub(runtime)
        ));
    }
    Err(format!(
        "_PyRuntime.autoTSSkey not found (looked at {})",
        seen.join(", ")
    ))
}

/// The eval loop's runtime address ranges: its symbol's extent, and the blocks GCC
/// split off into `.cold` parts. Those are named in `.symtab`; in a stripped build
/// (Debian's python3.14, where most of the loop is in its cold part) they are the
/// `.eh_frame` ranges the function's own jumps land in.
fn eval_ranges(loaded: &FileBytes, interp: &Interpreter) -> Vec<(u64, u64)> {
    use iced_x86::{Decoder, DecoderOptions, FlowControl};
    let Ok(file) = object::File::parse(&*loaded.data) else {
        return Vec::new();
    };
    let name = if interp.version.0 == 2 {
        "PyEval_EvalFrameEx"
    } else {
        "_PyEval_EvalFrameDefault"
    };
    let cold = format!("{name}.cold");
    let mut ranges: Vec<(u64, u64)> = file
        .symbols()
        .chain(file.dynamic_symbols())
        .filter(|s| s.is_definition() && s.size() > 0)
        .filter(|s| s.name().is_ok_and(|n| n == name || n == cold))
        .map(|s| (s.address(), s.address() + s.size()))
        .collect();
    ranges.sort_unstable();
    ranges.dedup();
    let has_cold = file.symbols().any(|s| s.name().is_ok_and(|n| n == cold));
    if let (false, Some(&(start, end))) = (has_cold, ranges.first()) {
        let code = file.sections().find_map(|s| {
            let d = s.data().ok()?;
            let o = usize::try_from(start.checked_sub(s.address())?).ok()?;
            let n = usize::try_from(end - start).ok()?;
            d.get(o..o.checked_add(n)?)
        });
        let targets: Vec<u64> = code
            .map(|code| {
                Decoder::with_ip(64, code, start, DecoderOptions::NONE)
                    .into_iter()
                    .filter(|i| {
                        matches!(
                            i.flow_control(),
                            FlowControl::ConditionalBranch | FlowControl::UnconditionalBranch
                        )
                    })
                    .map(|i| i.near_branch_target())
                    .filter(|&t| t != 0 && !(start..end).contains(&t))
                    .collect()
            })
            .unwrap_or_default();
        if !targets.is_empty()
            && let Ok(fdes) = crate::unwind::fde_ranges(&loaded.data)
        {
            for (s, e) in fdes {
                if targets.iter().any(|&t| s <= t && t < e) {
                    ranges.push((s, e));
                }
            }
        }
    }
    ranges
        .into_iter()
        .map(|(s, e)| (loaded.at(s), loaded.at(e)))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// The thread-state key's address is read from `PyGILState_GetThisThreadState`
    /// in Debian's python3.11 (which `cargo xtask setup` installs): its code inlines
    /// `PyThread_tss_get` and reads the key (596) of the `Py_tss_t` at 592, where the
    /// 3.11 table says.
    #[test]
    fn tss_key_address_from_code() {
        let host = Path::new("/usr/bin/python3.11");
        let interp = super::super::identify::identify("/usr/bin/python3.11", host)
            .expect("python3.11 is an interpreter");
        let loaded = FileBytes {
            data: std::fs::read(host).expect("readable"),
            bias: 0,
        };
        let runtime = interp.symbols.runtime.expect("_PyRuntime");
        let refs: Vec<u64> = loaded
            .referenced(
                interp
                    .symbols
                    .gilstate_fn
                    .expect("PyGILState_GetThisThreadState"),
            )
            .into_iter()
            .filter(|&a| a >= runtime && a < runtime + interp.symbols.runtime_size)
            .map(|a| a - runtime)
            .collect();
        assert!(refs.contains(&596), "{refs:?}");
    }
}
