//! CPython's cyclic garbage collector, read from outside: its state (enabled,
//! thresholds, counts, collections so far), the cyclic garbage waiting for a
//! collection, `gc.garbage`, and the paths from module globals that hold the
//! program's objects.
//!
//! Every object the collector tracks is on one of its generations' lists, linked
//! through the `PyGC_Head` before the object:
//!
//! ```text
//!   2.7–3.7   {gc_next, gc_prev, gc_refs}  32 bytes (a `long double` pads it)
//!   3.8+      {_gc_next, _gc_prev}         16 bytes, flags in the low bits
//!   3.11+     a 16-byte pre-header before it, for types with a managed dict
//! ```
//!
//! The unreachable set is computed the way `gc_collect_main` does: each tracked
//! object starts at its reference count, every reference from another tracked
//! object is subtracted, and what remains above zero is referenced from outside
//! the set; everything reachable from those survives, the rest is cyclic garbage.
//! References are decoded for the core containers only — instances (their dict,
//! split values or inline values), dict, list, tuple, set, frozenset, cell, module,
//! type (its `__dict__`), 2.7's classic instances and classes. An object of any
//! other type is taken as referenced from outside and its own references are not
//! followed, which can only make more objects look reachable: the figure is a lower
//! bound. A reference never decoded is never subtracted.
//!
//! The target keeps running: a list that changes while walked ends the pass, and
//! objects count as garbage only when two passes agree (same address, same type).

use std::{
    cell::RefCell,
    collections::VecDeque,
    time::{Duration, Instant},
};

use rustc_hash::{FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};

use super::census::{HAVE_GC, HEAPTYPE, MANAGED_DICT};
use crate::process::Memory;

/// `PyTypeObject` fields (64-bit, 2.7 to 3.14).
const TP_NAME: u64 = 24;
const TP_BASICSIZE: u64 = 32;
const TP_ITEMSIZE: u64 = 40;
const TP_FLAGS: u64 = 168;
const TP_TRAVERSE: u64 = 184;
const TP_BASE: u64 = 256;
const TP_DICT: u64 = 264;
const TP_DICTOFFSET: u64 = 288;
/// `Py_TPFLAGS_INLINE_VALUES` (3.13+), `Py_TPFLAGS_TYPE_SUBCLASS`.
const INLINE_VALUES: u64 = 1 << 2;
const TYPE_SUBCLASS: u64 = 1 << 31;

/// Tracked objects read at most in one pass.
pub const MAX_TRACKED: usize = 1 << 24;
/// References kept at most in one pass.
const MAX_EDGES: usize = 1 << 26;
/// Items read at most from one container.
const MAX_ITEMS: u64 = 1 << 22;
/// Words one pass reads at most in arrays (512 MiB): past it, containers are not
/// decoded (taken as referenced from outside).
const WORDS_PER_PASS: u64 = 1 << 26;
/// A shared-keys table holds at most 30 keys (`SHARED_KEYS_MAX_SIZE`).
const MAX_SHARED: u64 = 64;
/// Time one pass may take.
pub const BUDGET: Duration = Duration::from_secs(4);
/// Types listed per group.
const TYPES_SHOWN: usize = 20;
/// Classes whose holders are named, and holders named per class.
const HELD_TYPES: usize = 8;
const HELD_PATHS: usize = 3;
/// Objects a class needs for its holders to be named (a handful of module-level
/// singletons is not what holds memory).
const HELD_MIN_OBJECTS: u64 = 16;
/// Bytes of the target cached while a pass reads it (64 KiB chunks).
const CACHE_BYTES: usize = 256 << 20;
const CHUNK: u64 = 64 << 10;

/// How a version lays out its dicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DictLayout {
    /// 2.7: `ma_mask`, `ma_table` of `{hash, key, value}`.
    V27,
    /// 3.6–3.10: `ma_keys` (`dk_size`, `dk_nentries`, indices at 40), `ma_values`.
    V36,
    /// 3.11–3.12: `dk_log2_size`, `dk_log2_index_bytes`, `dk_kind`; split values are
    /// a bare array.
    V311,
    /// 3.13+: split values have a header (`capacity`, `size`, `embedded`, `valid`).
    V313,
}

/// Where an instance of a class keeps its attributes when not in a plain dict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Managed {
    /// ≤3.10: `tp_dictoffset` only.
    No,
    /// 3.11: values pointer four words before the object, dict pointer three.
    V311,
    /// 3.12: one tagged word three before the object (bit 0: values − 1).
    V312,
    /// 3.13+: inline values after `tp_basicsize`, dict pointer three words before.
    V313,
}

/// Where the collector's state lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateAt {
    /// Static variables of `gcmodule.c` (2.7, 3.6): `generations`, `enabled`,
    /// `garbage`, `collecting`, `generation_stats`, found by symbol.
    Statics,
    /// `_PyRuntime.gc` (3.7–3.8), at this offset.
    /// `_PyRuntime.gc` (3.7–3.8).
    Runtime {
        /// `offsetof(_PyRuntimeState, gc)`.
        gc: u64,
    },
    /// `_PyRuntime.interpreters.main->gc` (3.9+).
    Interp {
        /// `offsetof(_PyRuntimeState, interpreters.main)`.
        main: u64,
        /// `offsetof(PyInterpreterState, gc)`.
        gc: u64,
    },
}

/// Offsets inside `struct _gc_runtime_state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Inner {
    enabled: u64,
    generations: u64,
    stride: u64,
    permanent: Option<u64>,
    stats: Option<u64>,
    collecting: u64,
    garbage: u64,
}

/// How CPython `major.minor` lays out what the collector reads (64-bit; measured on
/// pyenv's builds' DWARF, 2.7.18 and 3.6.15–3.13.0, and Debian's 3.14.10 read live).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// (major, minor).
    pub version: (u32, u32),
    gc_head: u64,
    preheader_flags: u64,
    refcnt32: bool,
    dict: DictLayout,
    managed: Managed,
    /// Where a set entry keeps its key (2.7: `{hash, key}`; 3.x `{key, hash}`).
    set_key: u64,
    /// `PyTupleObject.ob_item`.
    tuple_items: u64,
    /// `PyHeapTypeObject.ht_slots` and `ht_cached_keys` (0: none).
    ht_slots: u64,
    ht_cached_keys: u64,
    /// Where a compact ASCII `str` keeps its characters (0: 2.x `str`, at 36).
    ascii_data: u64,
    /// Where the collector's state lives.
    pub state: StateAt,
    inner: Inner,
}

impl Layout {
    /// The layout of CPython `major.minor`, if known.
    pub fn for_version(major: u32, minor: u32) -> Option<Self> {
        let modern = Inner {
            enabled: 12,
            generations: 24,
            stride: 24,
            permanent: Some(104),
            stats: Some(128),
            collecting: 200,
            garbage: 208,
        };
        let (state, inner) = match (major, minor) {
            // Static variables: only their addresses matter.
            // 2.7's 32-byte head is 8-aligned (`generations` is 120 bytes); 3.6's is
            // 16-aligned (144).
            (2, 7) => (
                StateAt::Statics,
                Inner {
                    stride: 40,
                    ..modern
                },
            ),
            (3, 6) => (
                StateAt::Statics,
                Inner {
                    stride: 48,
                    ..modern
                },
            ),
            (3, 7) => (
                StateAt::Runtime { gc: 32 },
                Inner {
                    enabled: 12,
                    generations: 32,
                    stride: 48,
                    permanent: Some(192),
                    stats: Some(240),
                    collecting: 312,
                    garbage: 320,
                },
            ),
            (3, 8) => (StateAt::Runtime { gc: 40 }, modern),
            (3, 9 | 10) => (StateAt::Interp { main: 40, gc: 616 }, modern),
            (3, 11) => (StateAt::Interp { main: 48, gc: 648 }, modern),
            (3, 12) => (StateAt::Interp { main: 48, gc: 112 }, modern),
            (3, 13) => (
                StateAt::Interp {
                    main: 640,
                    gc: 7400,
                },
                modern,
            ),
            // `generation0` left the middle of the struct (3.14.0–3.14.4 name the
            // generations `young`, `old[2]`: the same three heads at the same places).
            (3, 14) => (
                StateAt::Interp {
                    main: 816,
                    gc: 7408,
                },
                Inner {
                    permanent: Some(96),
                    stats: Some(120),
                    collecting: 192,
                    garbage: 200,
                    ..modern
                },
            ),
            _ => return None,
        };
        let (dict, managed) = match minor {
            _ if major == 2 => (DictLayout::V27, Managed::No),
            6..=10 => (DictLayout::V36, Managed::No),
            11 => (DictLayout::V311, Managed::V311),
            12 => (DictLayout::V311, Managed::V312),
            _ => (DictLayout::V313, Managed::V313),
        };
        let (ht_slots, ht_cached_keys) = match (major, minor) {
            (2, _) => (864, 0),
            (3, 6 | 7) => (840, 856),
            (3, 8) => (856, 872),
            (3, 9) => (848, 864),
            (3, 10 | 11) => (856, 872),
            _ => (864, 880),
        };
        Some(Self {
            version: (major, minor),
            gc_head: if (major, minor) >= (3, 8) { 16 } else { 32 },
            preheader_flags: match minor {
                11 => MANAGED_DICT,
                12.. if major == 3 => MANAGED_DICT | (1 << 3),
                _ => 0,
            },
            refcnt32: (major, minor) >= (3, 12),
            dict,
            managed,
            set_key: if major == 2 { 8 } else { 0 },
            // 3.14 caches a tuple's hash before its items.
            tuple_items: if (major, minor) >= (3, 14) { 32 } else { 24 },
            ht_slots,
            ht_cached_keys,
            ascii_data: match (major, minor) {
                (2, _) => 0,
                (3, ..=11) => 48,
                _ => 40,
            },
            state,
            inner,
        })
    }

    /// Where the state is, from `_PyRuntime`'s address (3.7+) or the static
    /// variables' (2.7, 3.6).
    pub fn place<M: Memory>(
        &self,
        mem: &M,
        runtime: Option<u64>,
        statics: &Statics,
    ) -> Result<Place, String> {
        let i = &self.inner;
        let base = match self.state {
            StateAt::Statics => {
                let need = |a: Option<u64>, n: &str| {
                    a.ok_or_else(|| format!("the interpreter has no symbol `{n}` (stripped)"))
                };
                return Ok(Place {
                    generations: need(statics.generations, "generations")?,
                    stride: i.stride,
                    enabled: need(statics.enabled, "enabled")?,
                    permanent: None,
                    stats: statics.stats,
                    collecting: statics.collecting,
                    garbage: statics.garbage,
                });
            }
            StateAt::Runtime { gc } => runtime.ok_or("no `_PyRuntime`")?.wrapping_add(gc),
            StateAt::Interp { main, gc } => {
                let r = runtime.ok_or("no `_PyRuntime`")?;
                let interp = word(mem, r.wrapping_add(main))
                    .filter(|&p| p != 0 && p % 8 == 0)
                    .ok_or("no main interpreter yet")?;
                interp.wrapping_add(gc)
            }
        };
        Ok(Place {
            generations: base.wrapping_add(i.generations),
            stride: i.stride,
            enabled: base.wrapping_add(i.enabled),
            permanent: i.permanent.map(|p| base.wrapping_add(p)),
            stats: i.stats.map(|s| base.wrapping_add(s)),
            collecting: Some(base.wrapping_add(i.collecting)),
            garbage: Some(base.wrapping_add(i.garbage)),
        })
    }

    /// Bytes before an object of a type with `flags`: its GC head and pre-header.
    fn header(&self, flags: u64) -> u64 {
        let pre = if flags & self.preheader_flags != 0 {
            16
        } else {
            0
        };
        (if flags & HAVE_GC != 0 {
            self.gc_head
        } else {
            0
        }) + pre
    }
}

/// Addresses of `gcmodule.c`'s static variables (2.7, 3.6), from `.symtab`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Statics {
    /// `generations[0]`.
    pub generations: Option<u64>,
    /// `enabled`.
    pub enabled: Option<u64>,
    /// `garbage` (the `gc.garbage` list's pointer).
    pub garbage: Option<u64>,
    /// `collecting`.
    pub collecting: Option<u64>,
    /// `generation_stats` (3.6).
    pub stats: Option<u64>,
}

impl Place {
    /// The state laid out as 3.8–3.13 keep it, at `base` (for tests and fuzzing).
    pub fn modern_at(base: u64) -> Self {
        let at = |o: u64| base.wrapping_add(o);
        Self {
            generations: at(24),
            stride: 24,
            enabled: at(12),
            permanent: Some(at(104)),
            stats: Some(at(128)),
            collecting: Some(at(200)),
            garbage: Some(at(208)),
        }
    }
}

/// Where the collector's state is in the target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Place {
    /// The first generation (its list head first).
    pub generations: u64,
    stride: u64,
    enabled: u64,
    permanent: Option<u64>,
    stats: Option<u64>,
    collecting: Option<u64>,
    garbage: Option<u64>,
}

/// The builtin types whose objects' references are decoded, by address in the target
/// (0: absent).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Types {
    /// `PyType_Type`.
    pub type_type: u64,
    /// `PyBaseObject_Type` (`object`).
    pub object: u64,
    /// `PyList_Type`.
    pub list: u64,
    /// `PyTuple_Type`.
    pub tuple: u64,
    /// `PyDict_Type`.
    pub dict: u64,
    /// `PySet_Type`.
    pub set: u64,
    /// `PyFrozenSet_Type`.
    pub frozenset: u64,
    /// `PyCell_Type`.
    pub cell: u64,
    /// `PyModule_Type`.
    pub module: u64,
    /// 2.7's classic instances and classes.
    pub instance: u64,
    /// 2.7's `PyClass_Type`.
    pub class: u64,
}

impl Types {
    /// The symbols naming each type, in field order.
    pub const SYMBOLS: [&'static str; 11] = [
        "PyType_Type",
        "PyBaseObject_Type",
        "PyList_Type",
        "PyTuple_Type",
        "PyDict_Type",
        "PySet_Type",
        "PyFrozenSet_Type",
        "PyCell_Type",
        "PyModule_Type",
        "PyInstance_Type",
        "PyClass_Type",
    ];

    /// From addresses in [`Self::SYMBOLS`]' order.
    pub fn from_addresses(a: &[u64; 11]) -> Self {
        Self {
            type_type: a[0],
            object: a[1],
            list: a[2],
            tuple: a[3],
            dict: a[4],
            set: a[5],
            frozenset: a[6],
            cell: a[7],
            module: a[8],
            instance: a[9],
            class: a[10],
        }
    }
}

/// The collector, read from outside.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PyGc {
    /// `gc.isenabled()`.
    pub enabled: bool,
    /// `gc.get_threshold()`.
    pub thresholds: Vec<i64>,
    /// `gc.get_count()`.
    pub counts: Vec<i64>,
    /// Collections of each generation so far (3.4+).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collections: Option<Vec<u64>>,
    /// Objects `gc.freeze()` moved out of the collector's reach (3.7+).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen: Option<u64>,
    /// A collection was running while read.
    pub collecting: bool,
    /// Objects the collector tracks, per generation.
    pub tracked: Vec<u64>,
    /// Garbage in reference cycles, waiting for a collection.
    pub cyclic_unreachable: Group,
    /// `gc.garbage`: what a collection found but could not free (2.7: cycles with
    /// `__del__`), and what its objects hold.
    pub garbage: Garbage,
    /// Paths from module globals that hold the program's objects, for the classes with
    /// the most bytes.
    pub held_by: Vec<HeldBy>,
    /// What reading it cost.
    pub scan: GcScan,
}

/// Objects by type.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    /// Objects.
    pub objects: u64,
    /// Their bytes (object, GC header, and the tables it owns, as `sys.getsizeof` counts).
    pub bytes: u64,
    /// Per generation (the oldest one holding any is where a collection must reach).
    pub by_generation: Vec<u64>,
    /// The types with the most bytes.
    pub types: Vec<TypeCount>,
}

/// `gc.garbage`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Garbage {
    /// Objects in the list.
    pub objects: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Their types, most bytes first.
    pub types: Vec<TypeCount>,
    /// Tracked objects reachable from them (themselves included): what they keep.
    pub holds_objects: u64,
    /// Their bytes.
    pub holds_bytes: u64,
}

/// One type's objects.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeCount {
    /// `tp_name`.
    pub name: String,
    /// Objects.
    pub count: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// The path from a root that holds a class's objects.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldBy {
    #[serde(rename = "type")]
    /// The class's name.
    pub type_name: String,
    /// `registry.SESSIONS[…]`: a module global, its attributes and items.
    pub path: String,
    /// Objects it holds.
    pub objects: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// What reading the collector's objects cost.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GcScan {
    /// Both passes, milliseconds.
    pub ms: f64,
    /// Passes completed (2 when the figures are confirmed).
    pub passes: u32,
    /// References decoded between tracked objects (the last pass).
    pub references: u64,
    /// Tracked objects of types whose references are not decoded: taken as referenced
    /// from outside.
    pub undecoded: u64,
    /// Tracked objects whose references were subtracted below zero (changed while
    /// read): taken as referenced from outside.
    pub inconsistent: u64,
    /// Why the figures may be short.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incomplete: Option<String>,
}

/// The target's memory, read in 64 KiB chunks kept for one pass: objects sit close
/// together in pymalloc's arenas, so most reads come from a chunk already read.
struct Cached<'m, M: Memory> {
    mem: &'m M,
    chunks: RefCell<FxHashMap<u64, Option<Box<[u8]>>>>,
    /// Words the pass may still read in arrays (a container's items, a table).
    words_left: std::cell::Cell<u64>,
}

impl<M: Memory> Memory for Cached<'_, M> {
    fn read(&self, addr: u64, buf: &mut [u8]) -> std::io::Result<()> {
        Cached::read(self, addr, buf)
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))
    }

    fn resident(&self, start: u64, end: u64) -> std::io::Result<Vec<bool>> {
        self.mem.resident(start, end)
    }
}

impl<'m, M: Memory> Cached<'m, M> {
    fn new(mem: &'m M) -> Self {
        Self {
            mem,
            chunks: RefCell::default(),
            words_left: std::cell::Cell::new(WORDS_PER_PASS),
        }
    }

    fn read(&self, addr: u64, buf: &mut [u8]) -> Option<()> {
        let c = addr & !(CHUNK - 1);
        let end = addr.checked_add(buf.len() as u64)?;
        if end - c > CHUNK {
            return self.mem.read(addr, buf).ok();
        }
        let mut chunks = self.chunks.borrow_mut();
        if !chunks.contains_key(&c) {
            if chunks.len() * CHUNK as usize >= CACHE_BYTES {
                drop(chunks);
                return self.mem.read(addr, buf).ok();
            }
            let mut b = vec![0u8; CHUNK as usize].into_boxed_slice();
            let got = self.mem.read(c, &mut b).is_ok();
            chunks.insert(c, got.then_some(b));
        }
        match &chunks[&c] {
            Some(b) => {
                let o = (addr - c) as usize;
                buf.copy_from_slice(&b[o..o + buf.len()]);
                Some(())
            }
            None => {
                drop(chunks);
                self.mem.read(addr, buf).ok()
            }
        }
    }

    fn word(&self, addr: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Some(u64::from_le_bytes(b))
    }

    fn words(&self, addr: u64, n: u64) -> Option<Vec<u64>> {
        let n = n.min(MAX_ITEMS);
        self.words_left.set(self.words_left.get().checked_sub(n)?);
        let n = usize::try_from(n).ok()?;
        let mut b = vec![0u8; n * 8];
        self.read(addr, &mut b)?;
        Some(
            b.chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
                .collect(),
        )
    }

    fn byte(&self, addr: u64) -> Option<u8> {
        let mut b = [0u8; 1];
        self.read(addr, &mut b)?;
        Some(b[0])
    }
}

use crate::symbolize::python::read_u64 as word;

/// A C `int` of the collector's state.
fn int32<M: Memory>(mem: &M, addr: u64) -> Option<i64> {
    crate::symbolize::python::read_u32(mem, addr).map(|v| i64::from(v as i32))
}

/// What a type's objects are, for decoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    List,
    Tuple,
    Dict,
    Set,
    Cell,
    Module,
    Type,
    Instance27,
    Class27,
    /// An instance of a class whose bases are all classes without `__slots__`, down
    /// to `object`: its attributes are its only references (beside its class).
    Plain,
    /// Anything else: taken as referenced from outside.
    Other,
}

#[derive(Clone, Debug)]
struct TypeInfo {
    name: String,
    kind: Kind,
    flags: u64,
    basicsize: u64,
    itemsize: u64,
    dictoffset: u64,
    /// 3.11+: the class's shared keys (its instances' values follow their entries).
    cached_keys: u64,
}

/// How an object refers to another: what a path shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Label {
    /// A dict's value under this key (a `str` object; 0 when not one).
    Key(u64),
    /// A dict's key, a list's or tuple's item, a set's member.
    Item,
    /// An instance's attribute held in values, named by this key.
    Attr(u64),
    /// An instance's, a module's or a class's `__dict__`.
    Dict,
    /// A cell's contents.
    Cell,
    /// A classic instance's class.
    Class,
}

#[derive(Clone, Copy, Debug)]
struct Obj {
    addr: u64,
    ty: u64,
    refcnt: u64,
    generation: u8,
    kind: Kind,
    size: u64,
    edges: (u32, u32),
}

/// One pass: the tracked objects and the references between them.
struct Graph {
    objs: Vec<Obj>,
    index: FxHashMap<u64, u32>,
    edges: Vec<(u32, Label)>,
    undecoded: u64,
    inconsistent: u64,
    unreachable: Vec<u32>,
    reachable: Vec<bool>,
}

struct Reader<'a, 'm, M: Memory> {
    mem: Cached<'m, M>,
    l: &'a Layout,
    t: &'a Types,
    types: &'a RefCell<FxHashMap<u64, Option<TypeInfo>>>,
    /// `subtype_traverse`: the `tp_traverse` of every class a `class` statement made
    /// (learnt as the most common one among the tracked objects' heap types; C
    /// extensions' heap types have their own, and references this reader cannot see).
    subtype_traverse: &'a RefCell<Option<u64>>,
    deadline: Instant,
}

impl<M: Memory> Reader<'_, '_, M> {
    /// A tracked object's reference count; immortal ones (3.12+) read as huge.
    fn refcnt(&self, raw: u64) -> u64 {
        if self.l.refcnt32 {
            let low = raw & 0xffff_ffff;
            if low >= 1 << 31 { u64::MAX >> 1 } else { low }
        } else {
            raw
        }
    }

    /// A type's name and how to decode its objects (cached; `None`: not a type).
    fn type_info(&self, t: u64) -> Option<TypeInfo> {
        if let Some(i) = self.types.borrow().get(&t) {
            return i.clone();
        }
        let info = self.read_type(t);
        let mut types = self.types.borrow_mut();
        if types.len() < 200_000 {
            types.insert(t, info.clone());
        }
        info
    }

    fn is_type(&self, t: u64) -> bool {
        let tt = self.t.type_type;
        if t == 0 || !t.is_multiple_of(8) {
            return false;
        }
        let Some(meta) = self.mem.word(t.wrapping_add(8)) else {
            return false;
        };
        meta == tt || (meta != 0 && self.mem.word(meta.wrapping_add(8)) == Some(tt))
    }

    fn read_type(&self, t: u64) -> Option<TypeInfo> {
        if !self.is_type(t) {
            return None;
        }
        let m = &self.mem;
        let name = crate::process::memory::read_cstr(m, m.word(t.wrapping_add(TP_NAME))?, 96)?;
        let flags = m.word(t.wrapping_add(TP_FLAGS))?;
        let basicsize = m.word(t.wrapping_add(TP_BASICSIZE))?;
        let itemsize = m.word(t.wrapping_add(TP_ITEMSIZE))?;
        let dictoffset = m.word(t.wrapping_add(TP_DICTOFFSET))?;
        let x = self.t;
        let kind = match t {
            _ if t == x.list => Kind::List,
            _ if t == x.tuple => Kind::Tuple,
            _ if t == x.dict => Kind::Dict,
            _ if t == x.set || t == x.frozenset => Kind::Set,
            _ if t == x.cell => Kind::Cell,
            _ if t == x.module => Kind::Module,
            _ if t == x.instance && t != 0 => Kind::Instance27,
            _ if t == x.class && t != 0 => Kind::Class27,
            // `type` itself, or a metaclass (`Py_TPFLAGS_TYPE_SUBCLASS`, as `EnumType`):
            // its objects are classes, whose attributes are in `tp_dict`.
            _ if t == x.type_type || flags & TYPE_SUBCLASS != 0 => Kind::Type,
            _ if self.plain(t) => Kind::Plain,
            _ => Kind::Other,
        };
        let cached_keys = if self.l.ht_cached_keys != 0 && flags & HEAPTYPE != 0 {
            m.word(t.wrapping_add(self.l.ht_cached_keys)).unwrap_or(0)
        } else {
            0
        };
        Some(TypeInfo {
            name,
            kind,
            flags,
            basicsize: basicsize.min(1 << 20),
            itemsize: itemsize.min(1 << 10),
            dictoffset,
            cached_keys,
        })
    }

    /// A class whose every base down to `object` is a class without `__slots__`.
    fn plain(&self, mut t: u64) -> bool {
        let m = &self.mem;
        for _ in 0..64 {
            if t == self.t.object {
                return true;
            }
            let Some(flags) = m.word(t.wrapping_add(TP_FLAGS)) else {
                return false;
            };
            if flags & HEAPTYPE == 0
                || *self.subtype_traverse.borrow() != m.word(t.wrapping_add(TP_TRAVERSE))
            {
                return false;
            }
            let slots = m.word(t.wrapping_add(self.l.ht_slots)).unwrap_or(1);
            if slots != 0 {
                // A tuple of slot names: plain only when empty.
                if m.word(slots.wrapping_add(8)) != Some(self.t.tuple)
                    || m.word(slots.wrapping_add(16)) != Some(0)
                {
                    return false;
                }
            }
            match m.word(t.wrapping_add(TP_BASE)) {
                Some(b) if b != 0 && self.is_type(b) => t = b,
                _ => return false,
            }
        }
        false
    }

    /// A `str`'s text (names in paths), if it is a short compact ASCII string.
    fn text(&self, s: u64) -> Option<String> {
        let m = &self.mem;
        let len = m.word(s.wrapping_add(16))?;
        if len == 0 || len > 80 {
            return None;
        }
        let at = if self.l.ascii_data == 0 {
            s.wrapping_add(36)
        } else {
            let state = m.byte(s.wrapping_add(32))?;
            // compact (bit 5) and ascii (bit 6), 1-byte kind (bits 2–4).
            if state & 0x60 != 0x60 || (state >> 2) & 7 != 1 {
                return None;
            }
            s.wrapping_add(self.l.ascii_data)
        };
        let mut b = vec![0u8; len as usize];
        m.read(at, &mut b)?;
        b.iter()
            .all(|&c| c.is_ascii_graphic() || c == b' ')
            .then(|| String::from_utf8_lossy(&b).into_owned())
    }

    /// A dict's `(key, value)` pairs (value 0 where only the key is held), the bytes
    /// its tables take beyond the object, and whether its values are embedded in
    /// their owner (3.13+: the owner holds them).
    fn dict_items(&self, d: u64, out: &mut Vec<(u64, u64)>) -> Option<u64> {
        let m = &self.mem;
        match self.l.dict {
            DictLayout::V27 => {
                let (table, mask, e) = self.hash_table(d, 3)?;
                for c in e.chunks_exact(3) {
                    if c[1] != 0 && c[2] != 0 {
                        out.push((c[1], c[2]));
                    }
                }
                Some(if table == d.wrapping_add(56) {
                    0
                } else {
                    (mask + 1) * 24
                })
            }
            DictLayout::V36 => {
                let keys = m.word(d.wrapping_add(32))?;
                let values = m.word(d.wrapping_add(40))?;
                let size = m.word(keys.wrapping_add(8))?;
                let n = m.word(keys.wrapping_add(32))?;
                if !size.is_power_of_two() || size > MAX_ITEMS || n > size {
                    return None;
                }
                let ix = if size <= 0xff {
                    1
                } else if size <= 0xffff {
                    2
                } else if size <= 0xffff_ffff {
                    4
                } else {
                    8
                };
                let entries = keys.wrapping_add(40 + size * ix);
                let e = m.words(entries, n * 3)?;
                let table = 40 + size * ix + size * 2 / 3 * 24;
                if values != 0 {
                    let v = m.words(values, n)?;
                    for (c, &v) in e.chunks_exact(3).zip(&v) {
                        if v != 0 {
                            out.push((c[1], v));
                        }
                    }
                    Some(n * 8)
                } else {
                    for c in e.chunks_exact(3) {
                        if c[1] != 0 && c[2] != 0 {
                            out.push((c[1], c[2]));
                        }
                    }
                    Some(if m.word(keys)? == 1 { table } else { 0 })
                }
            }
            DictLayout::V311 | DictLayout::V313 => {
                let keys = m.word(d.wrapping_add(32))?;
                let values = m.word(d.wrapping_add(40))?;
                let (entries, n, general, table) = self.keys(keys)?;
                let stride = if general { 3 } else { 2 };
                let e = m.words(entries, n * stride)?;
                let key = |c: &[u64]| if general { c[1] } else { c[0] };
                if values != 0 {
                    let (at, owned) = if self.l.dict == DictLayout::V313 {
                        // Embedded in their owner, which holds them.
                        if m.byte(values.wrapping_add(2))? != 0 {
                            return Some(0);
                        }
                        (values.wrapping_add(8), 8 + n * 9)
                    } else {
                        (values, n * 9)
                    };
                    let v = m.words(at, n)?;
                    for (c, &v) in e.chunks_exact(stride as usize).zip(&v) {
                        if v != 0 {
                            out.push((key(c), v));
                        }
                    }
                    Some(owned)
                } else {
                    for c in e.chunks_exact(stride as usize) {
                        let (k, v) = if general { (c[1], c[2]) } else { (c[0], c[1]) };
                        if k != 0 && v != 0 {
                            out.push((k, v));
                        }
                    }
                    Some(if m.word(keys)? == 1 { table } else { 0 })
                }
            }
        }
    }

    /// An open-addressing table as 2.7's dict and every set keep it: `mask` at 32, the
    /// table's address at 40, entries of `words` words. (table, mask, entries).
    fn hash_table(&self, o: u64, words: u64) -> Option<(u64, u64, Vec<u64>)> {
        let m = &self.mem;
        let mask = m.word(o.wrapping_add(32))?;
        let table = m.word(o.wrapping_add(40))?;
        if mask >= MAX_ITEMS || !(mask + 1).is_power_of_two() {
            return None;
        }
        Some((table, mask, m.words(table, (mask + 1) * words)?))
    }

    /// A 3.11+ keys object: where its entries start, how many are used, whether they
    /// are general (`{hash, key, value}`) and the bytes it takes.
    fn keys(&self, keys: u64) -> Option<(u64, u64, bool, u64)> {
        let m = &self.mem;
        let log2 = m.byte(keys.wrapping_add(8))?;
        let log2_ix = m.byte(keys.wrapping_add(9))?;
        let kind = m.byte(keys.wrapping_add(10))?;
        let n = m.word(keys.wrapping_add(24))?;
        if log2 > 26 || log2_ix > 29 || kind > 2 || n > 1 << log2 {
            return None;
        }
        let general = kind == 0;
        let entries = keys.wrapping_add(32 + (1 << log2_ix));
        let usable = (2u64 << log2) / 3;
        let table = 32 + (1 << log2_ix) + usable * if general { 24 } else { 16 };
        Some((entries, n, general, table))
    }

    /// A class's shared keys: their names, in entry order (3.11+).
    fn shared_names(&self, keys: u64) -> Option<Vec<u64>> {
        let (entries, n, general, _) = self.keys(keys)?;
        if general || n > MAX_SHARED {
            return None;
        }
        let e = self.mem.words(entries, n * 2)?;
        Some(e.chunks_exact(2).map(|c| c[0]).collect())
    }

    /// The references of the object at `o` of type `info`, and its size.
    fn decode(&self, o: u64, info: &TypeInfo, out: &mut Vec<(u64, Label)>) -> Option<u64> {
        let m = &self.mem;
        let l = self.l;
        let mut size = l.header(info.flags) + info.basicsize;
        if info.itemsize > 0 {
            let n = m.word(o.wrapping_add(16))? as i64;
            size += info.itemsize * n.unsigned_abs().min(MAX_ITEMS);
        }
        let mut items = Vec::new();
        match info.kind {
            Kind::List => {
                let n = m.word(o.wrapping_add(16))?;
                let items_at = m.word(o.wrapping_add(24))?;
                let allocated = m.word(o.wrapping_add(32))?;
                if n > allocated || allocated > MAX_ITEMS {
                    return None;
                }
                if n > 0 {
                    out.extend(m.words(items_at, n)?.into_iter().map(|p| (p, Label::Item)));
                }
                size += allocated * 8;
            }
            Kind::Tuple => {
                let n = m.word(o.wrapping_add(16))?;
                if n > MAX_ITEMS {
                    return None;
                }
                out.extend(
                    m.words(o.wrapping_add(l.tuple_items), n)?
                        .into_iter()
                        .map(|p| (p, Label::Item)),
                );
            }
            Kind::Dict => {
                size += self.dict_items(o, &mut items)?;
                for (k, v) in items {
                    out.push((k, Label::Item));
                    if v != 0 {
                        out.push((v, Label::Key(k)));
                    }
                }
            }
            Kind::Set => {
                let (_, mask, e) = self.hash_table(o, 2)?;
                out.extend(
                    e.chunks_exact(2)
                        .map(|c| (c[(l.set_key / 8) as usize], Label::Item)),
                );
                if mask > 7 {
                    size += (mask + 1) * 16;
                }
            }
            Kind::Cell => out.push((m.word(o.wrapping_add(16))?, Label::Cell)),
            Kind::Module => out.push((m.word(o.wrapping_add(16))?, Label::Dict)),
            Kind::Type => out.push((m.word(o.wrapping_add(TP_DICT))?, Label::Dict)),
            Kind::Instance27 => {
                out.push((m.word(o.wrapping_add(16))?, Label::Class));
                out.push((m.word(o.wrapping_add(24))?, Label::Dict));
            }
            Kind::Class27 => out.push((m.word(o.wrapping_add(24))?, Label::Dict)),
            Kind::Plain => size += self.attributes(o, info, out)?,
            Kind::Other => {}
        }
        Some(size)
    }

    /// An instance's attributes: its dict, or its values (3.11+), and their bytes.
    fn attributes(&self, o: u64, info: &TypeInfo, out: &mut Vec<(u64, Label)>) -> Option<u64> {
        let m = &self.mem;
        // 3.11–3.12 values: an array as long as the shared keys can grow, after a
        // prefix of insertion-order bytes rounded to words.
        let split_bytes = || -> u64 {
            let k = info.cached_keys;
            let n = m
                .word(k.wrapping_add(16))
                .unwrap_or(0)
                .saturating_add(m.word(k.wrapping_add(24)).unwrap_or(0))
                .min(MAX_SHARED);
            (n + 2).div_ceil(8) * 8 + n * 8
        };
        // (Bit 4 meant other things before 3.11.)
        let managed = self.l.managed != Managed::No && info.flags & MANAGED_DICT != 0;
        let values = |at: u64, n: u64, out: &mut Vec<(u64, Label)>| -> Option<()> {
            let names = self.shared_names(info.cached_keys)?;
            let n = n.min(names.len() as u64);
            for (v, &k) in m.words(at, n)?.into_iter().zip(&names) {
                out.push((v, Label::Attr(k)));
            }
            Some(())
        };
        match self.l.managed {
            _ if !managed => {
                if info.dictoffset > 0 && info.dictoffset < info.basicsize {
                    out.push((m.word(o.wrapping_add(info.dictoffset))?, Label::Dict));
                }
                Some(0)
            }
            Managed::No => Some(0),
            Managed::V311 => {
                let v = m.word(o.checked_sub(32)?)?;
                let d = m.word(o - 24)?;
                if v != 0 {
                    values(v, MAX_SHARED, out)?;
                }
                out.push((d, Label::Dict));
                Some(if v != 0 { split_bytes() } else { 0 })
            }
            Managed::V312 => {
                let dv = m.word(o.checked_sub(24)?)?;
                if dv & 1 == 1 {
                    values(dv.wrapping_add(1), MAX_SHARED, out)?;
                    Some(split_bytes())
                } else {
                    out.push((dv, Label::Dict));
                    Some(0)
                }
            }
            Managed::V313 => {
                let d = m.word(o.checked_sub(24)?)?;
                out.push((d, Label::Dict));
                if info.flags & INLINE_VALUES == 0 {
                    return Some(0);
                }
                let at = o.wrapping_add(info.basicsize);
                let capacity = u64::from(m.byte(at)?);
                if m.byte(at.wrapping_add(3))? != 0 {
                    values(at.wrapping_add(8), capacity, out)?;
                }
                // Part of the object's block: its header, values and order bytes.
                Some(8 + capacity * 8 + capacity.div_ceil(8) * 8)
            }
        }
    }

    /// Walks the generations' lists: every tracked object's address and generation.
    fn walk(&self, place: &Place, gens: usize) -> Result<Vec<(u64, u8)>, String> {
        let m = &self.mem;
        let mut out = Vec::new();
        for g in 0..gens {
            let head = place.generations.wrapping_add(g as u64 * place.stride);
            let mut prev = head;
            let mut at = m
                .word(head)
                .ok_or("the collector's state is not readable")?
                & !7;
            while at != head {
                if out.len() >= MAX_TRACKED {
                    return Err(format!("more than {MAX_TRACKED} tracked objects"));
                }
                if Instant::now() > self.deadline {
                    return Err("the collector's lists took over the time budget".into());
                }
                let (Some(next), Some(back)) = (m.word(at), m.word(at.wrapping_add(8))) else {
                    return Err("a tracked object could not be read".into());
                };
                if back & !7 != prev || !at.is_multiple_of(8) {
                    return Err("the collector's lists changed while read".into());
                }
                out.push((at.wrapping_add(self.l.gc_head), g as u8));
                prev = at;
                at = next & !7;
            }
        }
        Ok(out)
    }

    /// Learns `subtype_traverse` from the classes of `tracked` objects, once.
    fn learn_traverse(&self, tracked: &[(u64, u8)]) {
        if self.subtype_traverse.borrow().is_some() {
            return;
        }
        let m = &self.mem;
        let mut classes = FxHashSet::default();
        for &(a, _) in tracked.iter().take(1 << 20) {
            if let Some(t) = m.word(a.wrapping_add(8))
                && classes.len() < 100_000
            {
                classes.insert(t);
            }
        }
        let mut votes: FxHashMap<u64, u32> = FxHashMap::default();
        for t in classes {
            if m.word(t.wrapping_add(TP_FLAGS))
                .is_some_and(|f| f & HEAPTYPE != 0)
                && self.is_type(t)
                && let Some(tr) = m.word(t.wrapping_add(TP_TRAVERSE)).filter(|&tr| tr != 0)
            {
                *votes.entry(tr).or_default() += 1;
            }
        }
        let best = votes
            .into_iter()
            .max_by_key(|&(tr, n)| (n, std::cmp::Reverse(tr)));
        *self.subtype_traverse.borrow_mut() = best.map(|b| b.0);
    }

    /// One pass: tracked objects, their references, and what is unreachable.
    fn pass(&self, place: &Place, gens: usize) -> Result<Graph, String> {
        let tracked = self.walk(place, gens)?;
        self.learn_traverse(&tracked);
        let mut index = FxHashMap::default();
        index.reserve(tracked.len());
        for (i, &(a, _)) in tracked.iter().enumerate() {
            index.insert(a, i as u32);
        }
        let mut g = Graph {
            objs: Vec::with_capacity(tracked.len()),
            index,
            edges: Vec::new(),
            undecoded: 0,
            inconsistent: 0,
            unreachable: Vec::new(),
            reachable: Vec::new(),
        };
        let mut refs = Vec::new();
        for &(a, generation) in &tracked {
            if Instant::now() > self.deadline {
                return Err("reading tracked objects took over the time budget".into());
            }
            let (rc, ty) = (self.mem.word(a), self.mem.word(a.wrapping_add(8)));
            let info = ty.and_then(|t| self.type_info(t));
            refs.clear();
            let (kind, size) = match (&info, rc) {
                (Some(info), Some(_)) => match self.decode(a, info, &mut refs) {
                    Some(s) => (info.kind, s),
                    None => (Kind::Other, self.l.header(info.flags) + info.basicsize),
                },
                _ => (Kind::Other, self.l.gc_head),
            };
            if kind == Kind::Other {
                g.undecoded += 1;
                refs.clear();
            }
            let start = g.edges.len() as u32;
            for &(p, label) in &refs {
                if let Some(&j) = g.index.get(&p) {
                    g.edges.push((j, label));
                }
            }
            if g.edges.len() > MAX_EDGES {
                return Err(format!("more than {MAX_EDGES} references"));
            }
            g.objs.push(Obj {
                addr: a,
                ty: ty.unwrap_or(0),
                refcnt: self.refcnt(rc.unwrap_or(u64::MAX >> 1)),
                generation,
                kind,
                size,
                edges: (start, g.edges.len() as u32),
            });
        }
        // gc_refs = refcount − references from tracked objects.
        let mut gc_refs: Vec<i64> = g
            .objs
            .iter()
            .map(|o| i64::try_from(o.refcnt).unwrap_or(i64::MAX))
            .collect();
        for &(j, _) in &g.edges {
            gc_refs[j as usize] = gc_refs[j as usize].saturating_sub(1);
        }
        let mut reachable = vec![false; g.objs.len()];
        let mut queue = VecDeque::new();
        for (i, o) in g.objs.iter().enumerate() {
            if gc_refs[i] < 0 {
                g.inconsistent += 1;
            }
            if gc_refs[i] != 0 || o.kind == Kind::Other {
                reachable[i] = true;
                queue.push_back(i as u32);
            }
        }
        while let Some(i) = queue.pop_front() {
            let (s, e) = g.objs[i as usize].edges;
            for &(j, _) in &g.edges[s as usize..e as usize] {
                if !reachable[j as usize] {
                    reachable[j as usize] = true;
                    queue.push_back(j);
                }
            }
        }
        g.unreachable = (0..g.objs.len() as u32)
            .filter(|&i| !reachable[i as usize])
            .collect();
        g.reachable = reachable;
        Ok(g)
    }

    fn name(&self, ty: u64) -> String {
        self.type_info(ty)
            .map_or_else(|| "?".to_owned(), |i| i.name)
    }
}

/// Counts by type name, largest first.
fn by_type(items: impl Iterator<Item = (String, u64)>) -> Vec<TypeCount> {
    let mut m: FxHashMap<String, (u64, u64)> = FxHashMap::default();
    for (name, bytes) in items {
        let e = m.entry(name).or_default();
        e.0 += 1;
        e.1 += bytes;
    }
    let mut v: Vec<TypeCount> = m
        .into_iter()
        .map(|(name, (count, bytes))| TypeCount { name, count, bytes })
        .collect();
    v.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.name.cmp(&b.name)));
    v.truncate(TYPES_SHOWN);
    v
}

/// Reads the collector's state and objects: two passes, within [`BUDGET`] each.
pub fn read<M: Memory>(mem: &M, l: &Layout, place: &Place, t: &Types) -> Result<PyGc, String> {
    read_within(mem, l, place, t, BUDGET)
}

/// [`read`] with `budget` per pass.
pub fn read_within<M: Memory>(
    mem: &M,
    l: &Layout,
    place: &Place,
    t: &Types,
    budget: Duration,
) -> Result<PyGc, String> {
    let started = Instant::now();
    let types = RefCell::new(FxHashMap::default());
    let subtype_traverse = RefCell::new(None);
    let state_mem = Cached::new(mem);
    let head_ok = |h: u64| -> bool {
        // An empty list points at itself both ways; a full one's first object points
        // back at the head.
        let (Some(n), Some(p)) = (state_mem.word(h), state_mem.word(h.wrapping_add(8))) else {
            return false;
        };
        let (n, p) = (n & !7, p & !7);
        (n == h && p == h)
            || (n != 0
                && state_mem
                    .word(n.wrapping_add(8))
                    .is_some_and(|b| b & !7 == h))
    };
    if !(0..3).all(|g| head_ok(place.generations.wrapping_add(g * place.stride))) {
        return Err("the collector's generations are not where this version keeps them".to_owned());
    }
    let enabled = int32(mem, place.enabled).ok_or("gc state unreadable")?;
    let mut gc = PyGc {
        enabled: enabled != 0,
        tracked: vec![0; 3],
        cyclic_unreachable: Group {
            by_generation: vec![0; 3],
            ..Group::default()
        },
        ..PyGc::default()
    };
    for g in 0..3 {
        let at = place.generations.wrapping_add(g * place.stride + l.gc_head);
        gc.thresholds
            .push(int32(mem, at).ok_or("gc state unreadable")?);
        gc.counts
            .push(int32(mem, at.wrapping_add(4)).ok_or("gc state unreadable")?);
    }
    gc.collections = place.stats.and_then(|s| {
        (0..3)
            .map(|g| word(mem, s.wrapping_add(g * 24)).filter(|&c| c < 1 << 48))
            .collect()
    });
    gc.collecting = place
        .collecting
        .and_then(|c| int32(mem, c))
        .is_some_and(|c| c != 0);

    let reader = || Reader {
        mem: Cached::new(mem),
        l,
        t,
        types: &types,
        subtype_traverse: &subtype_traverse,
        deadline: Instant::now() + budget,
    };
    // The first pass is kept as its unreachable set only; each pass's cache goes
    // before the next pass reads.
    let mut first: Option<FxHashSet<(u64, u64)>> = None;
    let mut last: Option<Graph> = None;
    let mut incomplete = None;
    for pass in 0..2 {
        last = None;
        let r = reader();
        match r.pass(place, 3) {
            Ok(g) => {
                gc.scan.passes += 1;
                let mut tracked = vec![0u64; 3];
                for o in &g.objs {
                    tracked[o.generation as usize] += 1;
                }
                gc.tracked = tracked;
                gc.scan.references = g.edges.len() as u64;
                gc.scan.undecoded = g.undecoded;
                gc.scan.inconsistent = g.inconsistent;
                if pass == 0 {
                    first = Some(
                        g.unreachable
                            .iter()
                            .map(|&i| (g.objs[i as usize].addr, g.objs[i as usize].ty))
                            .collect(),
                    );
                } else {
                    last = Some(g);
                }
            }
            Err(why) => {
                incomplete = Some(why);
                break;
            }
        }
    }
    // What follows reads little: a fresh budget.
    let r = reader();
    if let Some(p) = place.permanent {
        gc.frozen = r
            .walk(
                &Place {
                    generations: p,
                    ..*place
                },
                1,
            )
            .ok()
            .map(|v| v.len() as u64);
    }
    if let (Some(first), Some(b)) = (&first, &last) {
        let confirmed: Vec<&Obj> = b
            .unreachable
            .iter()
            .map(|&i| &b.objs[i as usize])
            .filter(|o| first.contains(&(o.addr, o.ty)))
            .collect();
        let mut by_gen = vec![0u64; 3];
        for o in &confirmed {
            by_gen[o.generation as usize] += 1;
        }
        gc.cyclic_unreachable = Group {
            objects: confirmed.len() as u64,
            bytes: confirmed.iter().map(|o| o.size).sum(),
            by_generation: by_gen,
            types: by_type(confirmed.iter().map(|o| (r.name(o.ty), o.size))),
        };
        gc.held_by = held_by(&r, b);
    } else if incomplete.is_none() {
        incomplete = Some("only one pass completed".into());
    }
    gc.garbage = garbage(&r, place, last.as_ref());
    gc.scan.incomplete = incomplete;
    gc.scan.ms = started.elapsed().as_secs_f64() * 1e3;
    Ok(gc)
}

/// `gc.garbage`'s objects by type, and what they keep reachable.
fn garbage<M: Memory>(r: &Reader<'_, '_, M>, place: &Place, g: Option<&Graph>) -> Garbage {
    let m = &r.mem;
    let Some(list) = place.garbage.and_then(|a| m.word(a)).filter(|&p| p != 0) else {
        return Garbage::default();
    };
    if m.word(list.wrapping_add(8)) != Some(r.t.list) {
        return Garbage::default();
    }
    let (Some(n), Some(items)) = (m.word(list.wrapping_add(16)), m.word(list.wrapping_add(24)))
    else {
        return Garbage::default();
    };
    let Some(items) = m.words(items, n.min(MAX_ITEMS)) else {
        return Garbage::default();
    };
    let mut out = Garbage::default();
    let mut sized = Vec::new();
    for &p in &items {
        if Instant::now() > r.deadline {
            break;
        }
        let ty = m.word(p.wrapping_add(8)).unwrap_or(0);
        // Its size from the pass; an object the pass did not see (untracked) counts
        // its header and basic size only.
        let size = g
            .and_then(|g| g.index.get(&p).map(|&i| g.objs[i as usize].size))
            .or_else(|| {
                let info = r.type_info(ty)?;
                Some(r.l.header(info.flags) + info.basicsize)
            })
            .unwrap_or(0);
        sized.push((r.name(ty), size));
    }
    out.objects = items.len() as u64;
    out.bytes = sized.iter().map(|s| s.1).sum();
    out.types = by_type(sized.into_iter());
    if let Some(g) = g {
        let mut seen = vec![false; g.objs.len()];
        let mut queue: VecDeque<u32> = items
            .iter()
            .filter_map(|p| g.index.get(p).copied())
            .collect();
        for &i in &queue {
            seen[i as usize] = true;
        }
        while let Some(i) = queue.pop_front() {
            out.holds_objects += 1;
            out.holds_bytes += g.objs[i as usize].size;
            let (s, e) = g.objs[i as usize].edges;
            for &(j, _) in &g.edges[s as usize..e as usize] {
                if !seen[j as usize] {
                    seen[j as usize] = true;
                    queue.push_back(j);
                }
            }
        }
    }
    out
}

/// For the classes with the most bytes among reachable objects: the paths from module
/// globals that hold them, found breadth first from every module (so each is named
/// by its shortest path), grouped by the container that holds each object.
fn held_by<M: Memory>(r: &Reader<'_, '_, M>, g: &Graph) -> Vec<HeldBy> {
    // Classes first: the program's own objects.
    let mut classes: FxHashMap<u64, (u64, u64)> = FxHashMap::default();
    for (i, o) in g.objs.iter().enumerate() {
        if g.reachable[i] && matches!(o.kind, Kind::Plain | Kind::Instance27) {
            let ty = if o.kind == Kind::Instance27 {
                r.mem.word(o.addr.wrapping_add(16)).unwrap_or(0)
            } else {
                o.ty
            };
            let e = classes.entry(ty).or_default();
            e.0 += 1;
            e.1 += o.size;
        }
    }
    let mut top: Vec<(u64, (u64, u64))> = classes.into_iter().collect();
    top.retain(|t| t.1.0 >= HELD_MIN_OBJECTS);
    top.sort_by(|a, b| b.1.1.cmp(&a.1.1).then(a.0.cmp(&b.0)));
    top.truncate(HELD_TYPES);
    if top.is_empty() {
        return Vec::new();
    }
    // Modules by name, breadth first.
    let mut seeds: Vec<(String, u32)> = g
        .objs
        .iter()
        .enumerate()
        .filter(|(_, o)| o.kind == Kind::Module)
        .filter_map(|(i, o)| Some((module_name(r, o.addr)?, i as u32)))
        .collect();
    seeds.sort();
    let mut parent: Vec<Option<(u32, Label)>> = vec![None; g.objs.len()];
    let mut seed_name: FxHashMap<u32, String> = FxHashMap::default();
    let mut seen = vec![false; g.objs.len()];
    let mut queue = VecDeque::new();
    for (name, i) in seeds {
        if !seen[i as usize] {
            seen[i as usize] = true;
            seed_name.insert(i, name);
            queue.push_back(i);
        }
    }
    while let Some(i) = queue.pop_front() {
        let (s, e) = g.objs[i as usize].edges;
        for &(j, label) in &g.edges[s as usize..e as usize] {
            if !seen[j as usize] {
                seen[j as usize] = true;
                parent[j as usize] = Some((i, label));
                queue.push_back(j);
            }
        }
    }
    let mut paths: FxHashMap<u32, String> = FxHashMap::default();
    let mut out = Vec::new();
    for (ty, _) in top {
        // (container's path, last step) → (objects, bytes).
        let mut groups: FxHashMap<(String, String), (u64, u64)> = FxHashMap::default();
        for (i, o) in g.objs.iter().enumerate() {
            let oty = if o.kind == Kind::Instance27 {
                r.mem.word(o.addr.wrapping_add(16)).unwrap_or(0)
            } else {
                o.ty
            };
            if oty != ty || !g.reachable[i] || !matches!(o.kind, Kind::Plain | Kind::Instance27) {
                continue;
            }
            let holder = match parent[i] {
                Some((p, label)) => {
                    let base = paths
                        .entry(p)
                        .or_insert_with(|| path(r, &parent, &seed_name, p))
                        .clone();
                    (base, step(r, &parent, p, label))
                }
                None if seed_name.contains_key(&(i as u32)) => continue,
                None => (
                    "(not reached from a module: a frame, C code or an undecoded object)"
                        .to_owned(),
                    String::new(),
                ),
            };
            let e = groups.entry(holder).or_default();
            e.0 += 1;
            e.1 += o.size;
        }
        // Several attributes of one namespace holding this class (a class's or a
        // module's constants) are one holder: `HTTPStatus.*`.
        let mut attrs: FxHashMap<&str, u32> = FxHashMap::default();
        for (base, step) in groups.keys() {
            if step.starts_with('.') {
                *attrs.entry(base.as_str()).or_default() += 1;
            }
        }
        let mut merged: FxHashMap<String, (u64, u64)> = FxHashMap::default();
        for ((base, step), (n, b)) in &groups {
            let path = if step.starts_with('.') && attrs.get(base.as_str()).is_some_and(|&k| k > 1)
            {
                format!("{base}.*")
            } else {
                format!("{base}{step}")
            };
            let e = merged.entry(path).or_default();
            e.0 += n;
            e.1 += b;
        }
        let name = r.type_info(ty).map_or_else(|| "?".to_owned(), |i| i.name);
        let mut v: Vec<(String, (u64, u64))> = merged.into_iter().collect();
        v.sort_by(|a, b| b.1.1.cmp(&a.1.1).then_with(|| a.0.cmp(&b.0)));
        for (path, (objects, bytes)) in v.into_iter().take(HELD_PATHS) {
            out.push(HeldBy {
                type_name: name.clone(),
                path,
                objects,
                bytes,
            });
        }
    }
    out
}

/// A module's `__name__`.
fn module_name<M: Memory>(r: &Reader<'_, '_, M>, module: u64) -> Option<String> {
    let d = r.mem.word(module.wrapping_add(16))?;
    let mut items = Vec::new();
    r.dict_items(d, &mut items)?;
    items
        .iter()
        .find(|(k, _)| r.text(*k).as_deref() == Some("__name__"))
        .and_then(|&(_, v)| r.text(v))
}

/// The path of object `i` from its module, as names.
fn path<M: Memory>(
    r: &Reader<'_, '_, M>,
    parent: &[Option<(u32, Label)>],
    seeds: &FxHashMap<u32, String>,
    i: u32,
) -> String {
    let mut steps = Vec::new();
    let mut at = i;
    for _ in 0..32 {
        match parent[at as usize] {
            Some((p, label)) => {
                steps.push(step(r, parent, p, label));
                at = p;
            }
            None => {
                steps.push(seeds.get(&at).cloned().unwrap_or_else(|| "?".into()));
                break;
            }
        }
    }
    steps.reverse();
    steps.concat()
}

/// How a path shows the reference `label` from object `p`: attribute names where a
/// dict is a module's, class's or instance's `__dict__`, `[…]` for items.
fn step<M: Memory>(
    r: &Reader<'_, '_, M>,
    parent: &[Option<(u32, Label)>],
    p: u32,
    label: Label,
) -> String {
    let attr = |k: u64| {
        r.text(k)
            .map_or_else(|| "[…]".to_owned(), |t| format!(".{t}"))
    };
    match label {
        Label::Dict | Label::Class => String::new(),
        Label::Cell => ".cell_contents".into(),
        Label::Attr(k) => attr(k),
        Label::Key(k) if matches!(parent[p as usize], Some((_, Label::Dict))) => attr(k),
        Label::Key(_) | Label::Item => "[…]".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::memory::Laid;

    const TT: u64 = 0x1000;
    const OBJECT: u64 = 0x1400;
    const LIST: u64 = 0x1800;
    const DICT: u64 = 0x1c00;
    const MODULE: u64 = 0x2000;
    const NODE: u64 = 0x2400;
    const OPAQUE: u64 = 0x2800;
    const STRS: u64 = 0x3000;
    const STATE: u64 = 0x4000;
    const HEAP: u64 = 0x10000;

    /// A 3.10 target: a module `app` whose dict holds `SESSIONS` (a list of two
    /// `Node`s), a two-`Node` cycle nothing holds, and a `Node` only an opaque object
    /// refers to.
    struct World {
        m: Laid,
        l: Layout,
        at: u64,
        list: Vec<u64>,
    }

    impl World {
        fn new() -> Self {
            let mut w = Self {
                m: Laid::new(0, 0x40000),
                l: Layout::for_version(3, 10).expect("3.10"),
                at: HEAP,
                list: Vec::new(),
            };
            for (t, name, flags, basic, dictoff) in [
                (TT, "type", 0, 880, 0),
                (OBJECT, "object", 0, 16, 0),
                (LIST, "list", HAVE_GC, 40, 0),
                (DICT, "dict", HAVE_GC, 48, 0),
                (MODULE, "module", HAVE_GC, 80, 0),
                (NODE, "Node", HAVE_GC | HEAPTYPE, 32, 16),
                (OPAQUE, "Opaque", HAVE_GC, 24, 0),
            ] {
                w.m.put(t + 8, TT);
                let n = STRS + (t - TT) / 4;
                w.m.bytes[n as usize..n as usize + name.len()].copy_from_slice(name.as_bytes());
                w.m.put(t + TP_NAME, n);
                w.m.put(t + TP_FLAGS, flags);
                w.m.put(t + TP_BASICSIZE, basic);
                w.m.put(t + TP_DICTOFFSET, dictoff);
                w.m.put(t + TP_BASE, OBJECT);
                w.m.put(
                    t + TP_TRAVERSE,
                    if flags & HEAPTYPE != 0 { 0x77 } else { t },
                );
            }
            // Generation heads: three empty lists.
            for g in 0..3 {
                let h = STATE + 24 + g * 24;
                w.m.put(h, h);
                w.m.put(h + 8, h);
                w.m.put32(h + 16, [700, 10, 10][g as usize]);
            }
            w
        }

        /// A tracked object of `ty` with `refcnt`, linked into generation 2.
        fn obj(&mut self, ty: u64, refcnt: u64, size: u64) -> u64 {
            let g = self.at;
            self.at += size.div_ceil(16) * 16 + 16;
            let head = STATE + 24 + 48;
            let last = self.m_word(head + 8);
            self.m.put(last, g);
            self.m.put(g + 8, last);
            self.m.put(g, head);
            self.m.put(head + 8, g);
            let o = g + 16;
            self.m.put(o, refcnt);
            self.m.put(o + 8, ty);
            self.list.push(o);
            o
        }

        fn m_word(&self, a: u64) -> u64 {
            u64::from_le_bytes(self.m.bytes[a as usize..a as usize + 8].try_into().unwrap())
        }

        fn ascii(&mut self, s: &str) -> u64 {
            let a = self.at;
            self.at += 64 + s.len() as u64;
            self.at = self.at.div_ceil(16) * 16;
            self.m.put(a, 1);
            self.m.put(a + 16, s.len() as u64);
            self.m.bytes[a as usize + 32] = 0x60 | (1 << 2);
            let d = (a + 48) as usize;
            self.m.bytes[d..d + s.len()].copy_from_slice(s.as_bytes());
            a
        }

        /// A 3.10 combined dict of `items`.
        fn dict(&mut self, refcnt: u64, items: &[(u64, u64)]) -> u64 {
            let d = self.obj(DICT, refcnt, 48);
            let keys = self.at;
            self.at += 40 + 8 + 8 * 24;
            self.m.put(keys, 1);
            self.m.put(keys + 8, 8);
            self.m.put(keys + 32, items.len() as u64);
            for (i, &(k, v)) in items.iter().enumerate() {
                let e = keys + 48 + i as u64 * 24;
                self.m.put(e + 8, k);
                self.m.put(e + 16, v);
            }
            self.m.put(d + 32, keys);
            d
        }
    }

    fn types() -> Types {
        Types {
            type_type: TT,
            object: OBJECT,
            list: LIST,
            dict: DICT,
            module: MODULE,
            tuple: 0x100,
            ..Types::default()
        }
    }

    fn place() -> Place {
        Place {
            generations: STATE + 24,
            stride: 24,
            enabled: STATE + 12,
            permanent: None,
            stats: None,
            collecting: None,
            garbage: None,
        }
    }

    #[test]
    fn cycles_are_unreachable_and_globals_are_named() {
        let mut w = World::new();
        // Sixteen Nodes in SESSIONS, each with an empty attribute dict.
        let mut held = Vec::new();
        for _ in 0..16 {
            let n = w.obj(NODE, 1, 32);
            let d = w.dict(1, &[]);
            w.m.put(n + 16, d);
            held.push(n);
        }
        let list = w.obj(LIST, 1, 40);
        let items = w.at;
        w.at += 8 * held.len() as u64;
        for (i, &n) in held.iter().enumerate() {
            w.m.put(items + 8 * i as u64, n);
        }
        w.m.put(list + 16, held.len() as u64);
        w.m.put(list + 24, items);
        w.m.put(list + 32, held.len() as u64);
        let k_sessions = w.ascii("SESSIONS");
        let k_name = w.ascii("__name__");
        let v_app = w.ascii("app");
        let globals = w.dict(1, &[(k_sessions, list), (k_name, v_app)]);
        let module = w.obj(MODULE, 1, 80);
        w.m.put(module + 16, globals);
        // A cycle: a.peer = b, b.peer = a, and nothing else.
        let k_peer = w.ascii("peer");
        let a = w.obj(NODE, 1, 32);
        let b = w.obj(NODE, 1, 32);
        let da = w.dict(1, &[(k_peer, b)]);
        let db = w.dict(1, &[(k_peer, a)]);
        w.m.put(a + 16, da);
        w.m.put(b + 16, db);
        // An opaque object's Node: kept (its reference is not decoded, not subtracted).
        let op = w.obj(OPAQUE, 1, 24);
        let kept = w.obj(NODE, 1, 32);
        w.m.put(op + 16, kept);
        w.m.put32(STATE + 12, 0);
        let gc = read(&w.m, &w.l, &place(), &types()).expect("read");
        assert!(!gc.enabled);
        assert_eq!(gc.thresholds, vec![700, 10, 10]);
        assert_eq!(gc.tracked, vec![0, 0, w.list.len() as u64]);
        assert_eq!(gc.scan.passes, 2);
        assert_eq!(gc.cyclic_unreachable.objects, 4, "{gc:#?}");
        assert_eq!(gc.cyclic_unreachable.by_generation, vec![0, 0, 4]);
        let names: Vec<(&str, u64)> = gc
            .cyclic_unreachable
            .types
            .iter()
            .map(|t| (t.name.as_str(), t.count))
            .collect();
        assert_eq!(names, vec![("dict", 2), ("Node", 2)]);
        assert_eq!(gc.scan.undecoded, 1);
        let held: Vec<(&str, &str, u64)> = gc
            .held_by
            .iter()
            .map(|h| (h.type_name.as_str(), h.path.as_str(), h.objects))
            .collect();
        assert_eq!(
            held,
            vec![
                ("Node", "app.SESSIONS[…]", 16),
                (
                    "Node",
                    "(not reached from a module: a frame, C code or an undecoded object)",
                    1
                )
            ]
        );
    }

    #[test]
    fn a_list_changed_while_read_ends_the_pass() {
        let mut w = World::new();
        let a = w.obj(NODE, 1, 32);
        let _b = w.obj(NODE, 1, 32);
        // b's back link no longer names a.
        w.m.put(a - 16 + 32 + 16 + 8, 0x8888);
        let gc = read(&w.m, &w.l, &place(), &types()).expect("read");
        assert_eq!(gc.scan.passes, 0);
        assert!(gc.scan.incomplete.is_some());
        assert_eq!(gc.cyclic_unreachable.objects, 0);
    }

    #[test]
    fn pointers_near_the_top_of_the_address_space_do_not_panic() {
        let mut w = World::new();
        let bad = w.obj(0xffff_ffff_ffff_fff8, 1, 32);
        let list = w.obj(LIST, 1, 40);
        w.m.put(list + 16, 3);
        w.m.put(list + 24, u64::MAX - 7);
        w.m.put(list + 32, 3);
        let node = w.obj(NODE, 1, 32);
        w.m.put(node + 16, u64::MAX);
        let gc = read(&w.m, &w.l, &place(), &types()).expect("read");
        assert_eq!(gc.scan.passes, 2);
        assert_eq!(gc.scan.undecoded, 2, "{gc:#?}");
        let _ = bad;
        // The state itself at the very top: refused, not a panic.
        let top = Place::modern_at(u64::MAX - 100);
        assert!(read(&w.m, &w.l, &top, &types()).is_err());
    }

    #[test]
    fn versions() {
        for (maj, min) in [
            (2, 7),
            (3, 6),
            (3, 7),
            (3, 8),
            (3, 9),
            (3, 10),
            (3, 11),
            (3, 12),
            (3, 13),
            (3, 14),
        ] {
            assert!(Layout::for_version(maj, min).is_some(), "{maj}.{min}");
        }
        assert_eq!(Layout::for_version(3, 5), None);
        assert_eq!(Layout::for_version(3, 15), None);
    }
}
