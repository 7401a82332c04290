//! What the live heap holds, by type, read from outside: every live pymalloc block
//! is read for the object header it may start with, and counted under its type when
//! its type pointer leads to a real type object. Allocations made before attach count
//! as much as the others: this answers "1.2 GB in 3.1 M `OrderRecord` objects" without
//! waiting for new growth.
//!
//! Where an object starts in its block depends on the version and on its type:
//!
//! ```text
//!   [pre-header 16: managed dict/values or weakref]  3.11+ (MANAGED_DICT, 3.12+: or MANAGED_WEAKREF)
//!   [PyGC_Head: 16 bytes (3.8+), 32 (2.7–3.7)]  types with Py_TPFLAGS_HAVE_GC
//!   ob_refcnt, ob_type, …
//! ```
//!
//! A block is counted under a type only if the header at the offset that type
//! implies has a plausible reference count and points to that type, and the type
//! checks out: its own type is `type` (or a metaclass whose type is `type`) and its
//! name reads as text. (Not its basic size: a compact `str` is smaller than
//! `tp_basicsize`.) A raw buffer (a list's items, a
//! dict's keys) fails these and is not attributed: the coverage says how much is.
//! The target keeps running: a block changed while read costs that block only.

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::process::Memory;

/// `tp_name`, `tp_flags` and `tp_dictoffset` in `PyTypeObject` (64-bit, 2.7 to 3.14).
const TP_NAME: usize = 24;
const TP_FLAGS: usize = 168;
const TP_DICTOFFSET: usize = 288;
/// `Py_TPFLAGS_HAVE_GC`.
pub(crate) const HAVE_GC: u64 = 1 << 14;
/// `Py_TPFLAGS_TYPE_SUBCLASS`: a subclass of `type` (a metaclass).
const TYPE_SUBCLASS: u64 = 1 << 31;
/// `Py_TPFLAGS_HEAPTYPE`: a class (its type object is a `PyHeapTypeObject`).
pub(crate) const HEAPTYPE: u64 = 1 << 9;
/// `Py_TPFLAGS_MANAGED_DICT` (3.11+).
pub(crate) const MANAGED_DICT: u64 = 1 << 4;
/// Type objects remembered at most (a hostile heap cannot grow the cache past this).
const MAX_TYPES: usize = 200_000;
/// Reference counts above this are not an object's (3.12+ immortal objects have
/// 2^32 − 1 or more, up to 2^32 + 2^31).
const MAX_REFCNT: u64 = 1 << 40;
/// Longest type name read.
const MAX_NAME: usize = 128;
/// Types listed in a report.
pub const TYPES_SHOWN: usize = 40;
/// Time one census may take (it reads every live pymalloc pool).
pub const BUDGET: std::time::Duration = std::time::Duration::from_secs(3);

/// Where objects start in their blocks, for one CPython version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// `&PyType_Type` in the target.
    pub type_type: u64,
    /// `sizeof(PyGC_Head)`.
    pub gc_head: u64,
    /// Type flags that put a 16-byte pre-header before the GC head (0: none).
    pub preheader_flags: u64,
    /// `PyHeapTypeObject.ht_name`'s offset (`ht_qualname` is two words further), and
    /// where a compact ASCII `str` keeps its characters: a class's qualified name
    /// (3.9+; checked against `tp_name` before it is believed).
    pub ht_name: Option<(u64, u64)>,
}

impl Layout {
    /// The layout of CPython `major.minor`, with `PyType_Type` at `type_type`.
    pub fn for_version(major: u32, minor: u32, type_type: u64) -> Option<Self> {
        let (gc_head, preheader_flags) = match (major, minor) {
            // `union { struct {next, prev, refs}; long double dummy; }`: 32 bytes.
            (2, 7) => (32, 0),
            // `long double dummy` (bpo-27987): 32 bytes, as measured on pyenv's 3.6.15
            // and 3.7.16 (early releases padded to 24 with a `double`).
            (3, 0..=7) => (32, 0),
            (3, 8..=10) => (16, 0),
            // Py_TPFLAGS_MANAGED_DICT.
            (3, 11) => (16, 1 << 4),
            // Py_TPFLAGS_PREHEADER: MANAGED_DICT | MANAGED_WEAKREF.
            (3, 12..=14) => (16, (1 << 4) | (1 << 3)),
            _ => return None,
        };
        // sizeof(PyTypeObject) + PyAsyncMethods + PyNumberMethods (288) + mapping (24)
        // + sequence (80) + buffer (16) methods: 408 + 24 + … in 3.9; am_send (3.10)
        // adds 8, tp_watched (3.12) 8 more.
        let ht_name = match (major, minor) {
            (3, 9) => Some((840, 48)),
            (3, 10..=11) => Some((848, 48)),
            (3, 12..=14) => Some((856, 40)),
            _ => None,
        };
        Some(Self {
            type_type,
            gc_head,
            preheader_flags,
            ht_name,
        })
    }

    /// Where an object of a type with `flags` starts in its block.
    fn offset(&self, flags: u64) -> u64 {
        let gc = if flags & HAVE_GC != 0 {
            self.gc_head
        } else {
            0
        };
        let pre = if flags & self.preheader_flags != 0 {
            16
        } else {
            0
        };
        gc + pre
    }

    /// The offsets an object may start at, smallest first.
    fn offsets(&self) -> Vec<u64> {
        let mut v = vec![0, self.gc_head];
        if self.preheader_flags != 0 {
            v.push(self.gc_head + 16);
        }
        v
    }
}

#[derive(Clone, Debug)]
struct TypeInfo {
    name: String,
    offset: u64,
    /// Where its instances keep their `__dict__` pointer (0: none, or not at a fixed
    /// offset from the start).
    dictoffset: u64,
    /// 3.11+: its instances' dict pointer is in the pre-header (three words before the
    /// object; 3.12 tags it with bit 0 when it holds inline values instead).
    managed_dict: bool,
}

/// Objects of one type.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeCount {
    /// `tp_name`: the class name for a class, the module-qualified name for some
    /// built-in types.
    pub name: String,
    /// Objects counted.
    pub count: u64,
    /// Bytes of their blocks, and of their instance dicts (`dict_bytes`).
    pub bytes: u64,
    /// Of `bytes`, the instances' `__dict__` objects (not their keys and values).
    pub dict_bytes: u64,
    /// Count and bytes moved since the census at attach (null in that census, or when
    /// the type was absent from it: then all of it is new).
    pub count_change: Option<i64>,
    /// See `count_change`.
    pub bytes_change: Option<i64>,
}

/// A census of the live heap by type.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Census {
    /// "python" or "c++".
    pub kind: String,
    /// Types, most bytes first ([`TYPES_SHOWN`] of them).
    pub types: Vec<TypeCount>,
    /// Types whose objects grew since the census at attach, most bytes first.
    pub growing: Vec<TypeCount>,
    /// Objects counted (all types).
    pub objects: u64,
    /// Bytes in blocks attributed to a type.
    pub attributed_bytes: u64,
    /// Bytes in the live blocks and chunks read: pymalloc's blocks and malloc's in-use
    /// chunks (Python), or malloc's in-use chunks (C++); not chunks malloc mapped on
    /// their own.
    pub heap_in_use_bytes: u64,
    /// The census's time, reading included.
    pub walk_ms: f64,
    /// Seconds since attach when it was taken.
    pub at_s: f64,
    /// Why it is not complete, if it is not (time budget, pools changed while read).
    pub incomplete: Option<String>,
    /// Whole parts were not read (the time budget, a heap's chain broken): no change
    /// is computed against it.
    #[serde(default, skip_serializing_if = "crate::capture::outside")]
    pub cut_short: bool,
    /// Every type's count and bytes, for comparing censuses (not in the JSON).
    #[serde(default, skip_serializing_if = "crate::capture::outside")]
    pub all: FxHashMap<String, (u64, u64)>,
    /// Per type, the bytes of its instances' dicts included in its bytes.
    #[serde(default, skip_serializing_if = "crate::capture::outside")]
    pub dict_bytes: FxHashMap<String, u64>,
}

impl Census {
    /// The share of the live blocks read that is attributed to a type.
    pub fn coverage(&self) -> f64 {
        self.attributed_bytes as f64 / self.heap_in_use_bytes.max(1) as f64
    }

    /// Fills `types` (largest first) and, against `before`, the changes and `growing`:
    /// only when neither census was cut short and both are of one kind (a census cut
    /// short would make every type it missed look grown).
    pub fn rank(&mut self, before: Option<&Census>) {
        let before = before.filter(|b| b.kind == self.kind && !b.cut_short && !self.cut_short);
        let change = |name: &str, c: u64, b: u64| {
            before.map(|f| {
                let (c0, b0) = f.all.get(name).copied().unwrap_or((0, 0));
                (c as i64 - c0 as i64, b as i64 - b0 as i64)
            })
        };
        let mut all: Vec<TypeCount> = self
            .all
            .iter()
            .map(|(n, &(c, b))| {
                let ch = change(n, c, b);
                TypeCount {
                    name: n.clone(),
                    count: c,
                    bytes: b,
                    dict_bytes: self.dict_bytes.get(n).copied().unwrap_or(0),
                    count_change: ch.map(|x| x.0),
                    bytes_change: ch.map(|x| x.1),
                }
            })
            .collect();
        all.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.name.cmp(&b.name)));
        let mut growing: Vec<TypeCount> = all
            .iter()
            .filter(|t| {
                t.count_change.is_some_and(|c| c > 0) && t.bytes_change.is_some_and(|b| b > 0)
            })
            .cloned()
            .collect();
        growing.sort_by(|a, b| {
            b.bytes_change
                .cmp(&a.bytes_change)
                .then(a.name.cmp(&b.name))
        });
        growing.truncate(TYPES_SHOWN);
        all.truncate(TYPES_SHOWN);
        self.types = all;
        self.growing = growing;
    }
}

/// Counts blocks by type as the pymalloc walk hands them over.
pub struct PyCensus<'m> {
    mem: &'m dyn Memory,
    layout: Layout,
    offsets: Vec<u64>,
    types: FxHashMap<u64, Option<TypeInfo>>,
    /// Metatypes found (their own type is `type`).
    metas: FxHashMap<u64, bool>,
    /// By type object: objects, bytes, and how many have an instance dict.
    counts: FxHashMap<u64, (u64, u64, u64)>,
    in_use: u64,
}

impl<'m> PyCensus<'m> {
    /// A census reading type objects through `mem`.
    pub fn new(mem: &'m dyn Memory, layout: Layout) -> Self {
        Self {
            mem,
            layout,
            offsets: layout.offsets(),
            types: FxHashMap::default(),
            metas: FxHashMap::default(),
            counts: FxHashMap::default(),
            in_use: 0,
        }
    }

    fn word(raw: &[u8], o: usize) -> Option<u64> {
        Some(u64::from_le_bytes(raw.get(o..o + 8)?.try_into().ok()?))
    }

    /// Counts one live block (its address and bytes).
    pub fn block(&mut self, _addr: u64, raw: &[u8]) {
        self.count(raw, raw.len() as u64);
    }

    /// Counts one in-use malloc chunk (its user address, chunk size and first bytes):
    /// an object larger than pymalloc's blocks.
    pub fn chunk(&mut self, _user: u64, size: u64, head: &[u8]) {
        self.count(head, size);
    }

    /// Counts `size` bytes under the type of the object `raw` starts with, if any.
    fn count(&mut self, raw: &[u8], size: u64) {
        self.in_use += size;
        for i in 0..self.offsets.len() {
            let o = self.offsets[i];
            let (Some(refcnt), Some(ty)) =
                (Self::word(raw, o as usize), Self::word(raw, o as usize + 8))
            else {
                break;
            };
            if refcnt == 0 || refcnt > MAX_REFCNT {
                continue;
            }
            match self.type_info(ty) {
                Some(t) if t.offset == o => {
                    let has_dict = Self::has_dict(t, raw, o);
                    let e = self.counts.entry(ty).or_default();
                    e.0 += 1;
                    e.1 += size;
                    e.2 += u64::from(has_dict);
                    return;
                }
                _ => {}
            }
        }
    }

    /// A compact ASCII `str`'s text (`data`: where its characters start), if it is one.
    fn ascii(&self, s: u64, data: u64) -> Option<String> {
        let mut head = [0u8; 40];
        self.mem.read(s, &mut head).ok()?;
        let len = Self::word(&head, 16)?;
        let state = u32::from_le_bytes(head[32..36].try_into().ok()?);
        // compact (bit 5) and ascii (bit 6).
        if state & 0x60 != 0x60 || len == 0 || len > MAX_NAME as u64 {
            return None;
        }
        let mut text = vec![0u8; len as usize];
        self.mem.read(s.checked_add(data)?, &mut text).ok()?;
        String::from_utf8(text)
            .ok()
            .filter(|t| t.chars().all(|c| !c.is_control()))
    }

    /// A class's `__qualname__`, when its `ht_name` reads as its `tp_name`.
    fn qualname(&self, t: u64, at: u64, data: u64, name: &str) -> Option<String> {
        let mut w = [0u8; 24];
        self.mem.read(t.checked_add(at)?, &mut w).ok()?;
        (self.ascii(Self::word(&w, 0)?, data)? == name).then_some(())?;
        self.ascii(Self::word(&w, 16)?, data)
    }

    /// Whether the object at `o` in `raw` has an instance dict of its own.
    fn has_dict(t: &TypeInfo, raw: &[u8], o: u64) -> bool {
        if t.managed_dict {
            return o >= 24
                && Self::word(raw, (o - 24) as usize).is_some_and(|p| p != 0 && p & 1 == 0);
        }
        t.dictoffset > 0 && Self::word(raw, (o + t.dictoffset) as usize).is_some_and(|p| p != 0)
    }

    /// Whether `meta` is `type` or a metaclass (its own type is `type`).
    fn is_metatype(&mut self, meta: u64) -> bool {
        if meta == self.layout.type_type {
            return true;
        }
        if let Some(&m) = self.metas.get(&meta) {
            return m;
        }
        // A metaclass is a class whose type is `type` and which subclasses `type`
        // (Py_TPFLAGS_TYPE_SUBCLASS): any other class's type is `type` too.
        let mut raw = [0u8; TP_FLAGS + 8];
        let ok = meta.is_multiple_of(8)
            && self.mem.read(meta, &mut raw).is_ok()
            && Self::word(&raw, 8) == Some(self.layout.type_type)
            && Self::word(&raw, TP_FLAGS).is_some_and(|f| f & TYPE_SUBCLASS != 0);
        if self.metas.len() < MAX_TYPES {
            self.metas.insert(meta, ok);
        }
        ok
    }

    fn type_info(&mut self, t: u64) -> Option<&TypeInfo> {
        if !self.types.contains_key(&t) {
            // Past the cap, an unknown pointer costs no read: it is no type.
            if self.types.len() >= MAX_TYPES {
                return None;
            }
            let info = self.read_type(t);
            self.types.insert(t, info);
        }
        self.types.get(&t).and_then(Option::as_ref)
    }

    fn read_type(&mut self, t: u64) -> Option<TypeInfo> {
        if t == 0 || !t.is_multiple_of(8) {
            return None;
        }
        let mut raw = [0u8; TP_DICTOFFSET + 8];
        self.mem.read(t, &mut raw).ok()?;
        let meta = Self::word(&raw, 8)?;
        if !self.is_metatype(meta) {
            return None;
        }
        let name_at = Self::word(&raw, TP_NAME)?;
        let mut name = [0u8; MAX_NAME];
        // A name near the end of a mapping: read what there is, 16 bytes at a time.
        let mut got = 0;
        while got < MAX_NAME
            && self
                .mem
                .read(name_at.wrapping_add(got as u64), &mut name[got..got + 16])
                .is_ok()
        {
            if name[got..got + 16].contains(&0) {
                got += 16;
                break;
            }
            got += 16;
        }
        let len = name[..got].iter().position(|&b| b == 0)?;
        let name = std::str::from_utf8(&name[..len]).ok()?;
        if name.is_empty() || name.chars().any(|c| c.is_control()) {
            return None;
        }
        let flags = Self::word(&raw, TP_FLAGS)?;
        let name = match self.layout.ht_name {
            Some((at, data)) if flags & HEAPTYPE != 0 => self
                .qualname(t, at, data, name)
                .unwrap_or_else(|| name.to_owned()),
            _ => name.to_owned(),
        };
        // Negative: from the end of a variable-size object; large: not an offset.
        let dictoffset = Self::word(&raw, TP_DICTOFFSET)?;
        Some(TypeInfo {
            name,
            offset: self.layout.offset(flags),
            dictoffset: if dictoffset < 4096 { dictoffset } else { 0 },
            managed_dict: self.layout.preheader_flags & MANAGED_DICT & flags != 0,
        })
    }

    /// The census: counts merged by type name. Instance dicts (a class's `__dict__`
    /// objects, 2.7 to 3.10 and 3.11+ classes without managed dicts) are counted with
    /// their owners' class, at the size dict objects have here, not as `dict`.
    pub fn finish(self, walk_ms: f64, at_s: f64, incomplete: Option<String>) -> Census {
        let mut all: FxHashMap<String, (u64, u64)> = FxHashMap::default();
        let mut dicts: FxHashMap<String, u64> = FxHashMap::default();
        let (mut objects, mut attributed) = (0, 0);
        for (t, (c, b, d)) in &self.counts {
            if let Some(Some(info)) = self.types.get(t) {
                let e = all.entry(info.name.clone()).or_default();
                e.0 += c;
                e.1 += b;
                *dicts.entry(info.name.clone()).or_default() += d;
                objects += c;
                attributed += b;
            }
        }
        // Every dict object has one size (PyDictObject's): the mean of those counted.
        let owned: u64 = dicts
            .iter()
            .filter(|(n, _)| n.as_str() != "dict")
            .map(|(_, d)| d)
            .sum();
        let mut dict_bytes = FxHashMap::default();
        // More owners than dicts: pointers that were not what they seemed; nothing moves.
        if let Some(&(n, b)) = all.get("dict")
            && owned > 0
            && owned <= n
        {
            let each = b / n;
            for (name, d) in dicts
                .iter()
                .filter(|(n, d)| n.as_str() != "dict" && **d > 0)
            {
                let e = all.get_mut(name).expect("counted");
                e.1 += d * each;
                dict_bytes.insert(name.clone(), d * each);
            }
            let e = all.get_mut("dict").expect("dict");
            e.0 -= owned;
            e.1 = e.1.saturating_sub(owned * each);
        }
        Census {
            dict_bytes,
            kind: "python".into(),
            objects,
            attributed_bytes: attributed,
            heap_in_use_bytes: self.in_use,
            walk_ms,
            at_s,
            incomplete,
            all,
            ..Census::default()
        }
    }
}

/// C++ classes by the address their objects' vtable pointer holds: `vtable for X`
/// (`_ZTV…`) plus 16 (the offset to top and the type info come first), in every
/// loaded object. A polymorphic object's first word is that pointer.
#[derive(Debug, Default)]
pub struct Vtables {
    by_vptr: FxHashMap<u64, u32>,
    names: Vec<String>,
    /// Not every mapped object was read (time budget).
    pub partial: bool,
}

/// Classes remembered at most.
const MAX_CLASSES: usize = 1_000_000;

impl Vtables {
    /// Adds the vtables an object's symbol tables define, at `bias`; how many.
    pub fn add_object(&mut self, data: &[u8], bias: u64) -> usize {
        use object::{Object as _, ObjectSymbol as _};
        let Ok(file) = object::File::parse(data) else {
            return 0;
        };
        let mut n = 0;
        for s in file.symbols().chain(file.dynamic_symbols()) {
            let Ok(name) = s.name() else { continue };
            let Some(mangled) = name.strip_prefix("_ZTV") else {
                continue;
            };
            // A vtable holds at least the offset to top, the type info and one function.
            if !s.is_definition() || s.size() < 24 || self.by_vptr.len() >= MAX_CLASSES {
                continue;
            }
            let vptr = s.address().wrapping_add(bias).wrapping_add(16);
            if self.by_vptr.contains_key(&vptr) {
                continue;
            }
            let class = cpp_demangle::Symbol::new(format!("_Z{mangled}"))
                .ok()
                .and_then(|sym| sym.demangle().ok())
                .unwrap_or_else(|| mangled.to_owned());
            self.by_vptr.insert(vptr, self.names.len() as u32);
            self.names.push(class);
            n += 1;
        }
        n
    }

    /// Classes known.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether no class is known.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// Counts malloc's in-use chunks by the class their vtable pointer names.
pub struct CxxCensus<'v> {
    vtables: &'v Vtables,
    counts: FxHashMap<u32, (u64, u64)>,
    in_use: u64,
}

impl<'v> CxxCensus<'v> {
    /// A census against `vtables`.
    pub fn new(vtables: &'v Vtables) -> Self {
        Self {
            vtables,
            counts: FxHashMap::default(),
            in_use: 0,
        }
    }

    /// Counts one in-use chunk (user address, chunk size, first bytes).
    pub fn chunk(&mut self, _user: u64, size: u64, head: &[u8]) {
        self.in_use += size;
        let Some(vptr) = head
            .get(..8)
            .map(|w| u64::from_le_bytes(w.try_into().expect("8")))
        else {
            return;
        };
        if let Some(&i) = self.vtables.by_vptr.get(&vptr) {
            let e = self.counts.entry(i).or_default();
            e.0 += 1;
            e.1 += size;
        }
    }

    /// The census, by class name.
    pub fn finish(self, walk_ms: f64, at_s: f64, incomplete: Option<String>) -> Census {
        let mut all: FxHashMap<String, (u64, u64)> = FxHashMap::default();
        let (mut objects, mut attributed) = (0, 0);
        for (&i, &(c, b)) in &self.counts {
            let e = all
                .entry(self.vtables.names[i as usize].clone())
                .or_default();
            e.0 += c;
            e.1 += b;
            objects += c;
            attributed += b;
        }
        Census {
            kind: "c++".into(),
            objects,
            attributed_bytes: attributed,
            heap_in_use_bytes: self.in_use,
            walk_ms,
            at_s,
            incomplete,
            all,
            ..Census::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::memory::Laid;

    const TYPE_TYPE: u64 = 0x1000;

    /// A type object at `at` named `name` (its name stored at `at + 0x200`).
    fn lay_type(m: &mut Laid, at: u64, meta: u64, name: &str, basicsize: u64, flags: u64) {
        m.put(at, 1);
        m.put(at + 8, meta);
        m.put(at + TP_NAME as u64, at + 0x200);
        let _ = basicsize;
        m.put(at + TP_FLAGS as u64, flags);
        let mut b = name.as_bytes().to_vec();
        b.resize(b.len().div_ceil(8) * 8 + 8, 0);
        for (i, w) in b.chunks_exact(8).enumerate() {
            m.put(
                at + 0x200 + 8 * i as u64,
                u64::from_le_bytes(w.try_into().unwrap()),
            );
        }
    }

    fn block(words: &[u64], size: usize) -> Vec<u8> {
        let mut v: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        v.resize(size, 0);
        v
    }

    #[test]
    fn objects_are_counted_at_their_types_offsets() {
        let mut m = Laid::new(0, 0x10000);
        lay_type(&mut m, TYPE_TYPE, TYPE_TYPE, "type", 900, 0);
        // A class with a managed dict (GC, pre-header), a GC type, a plain one, and
        // a class whose metaclass is ABCMeta.
        lay_type(&mut m, 0x2000, TYPE_TYPE, "Order", 32, HAVE_GC | (1 << 4));
        lay_type(&mut m, 0x3000, TYPE_TYPE, "list", 40, HAVE_GC);
        lay_type(&mut m, 0x4000, TYPE_TYPE, "int", 24, 0);
        lay_type(&mut m, 0x5000, TYPE_TYPE, "ABCMeta", 900, TYPE_SUBCLASS);
        lay_type(&mut m, 0x6000, 0x5000, "Session", 16, 0);
        // An object whose type's type is an ordinary class (not a metaclass).
        lay_type(&mut m, 0x8000, 0x4000, "Fake", 16, 0);
        let l = Layout::for_version(3, 12, TYPE_TYPE).unwrap();
        let mut c = PyCensus::new(&m, l);
        // Order: pre-header (2 words), GC head (2 words), then the object.
        c.block(0, &block(&[0, 0, 0, 0, 1, 0x2000], 64));
        c.block(0, &block(&[0, 0, 0, 0, 3, 0x2000], 64));
        c.block(0, &block(&[0, 0, 1, 0x3000, 0], 64));
        c.block(0, &block(&[7, 0x4000, 5], 32));
        c.block(0, &block(&[1, 0x6000], 16));
        // A list's items: pointers, and one of them to a type: not an object.
        c.block(0, &block(&[0x7f00_0000_0000, 0x4000], 16));
        // A header pointing to a type at the wrong offset (GC type at 0): not counted.
        c.block(0, &block(&[1, 0x3000, 0, 0], 48));
        // A refcount of 0 and a type that is no type.
        c.block(0, &block(&[0, 0x4000], 32));
        c.block(0, &block(&[1, 0x7000], 32));
        c.block(0, &block(&[1, 0x8000], 32));
        let mut census = c.finish(1.0, 0.0, None);
        census.rank(None);
        let got: Vec<(&str, u64, u64)> = census
            .types
            .iter()
            .map(|t| (t.name.as_str(), t.count, t.bytes))
            .collect();
        assert_eq!(
            got,
            vec![
                ("Order", 2, 128),
                ("list", 1, 64),
                ("int", 1, 32),
                ("Session", 1, 16)
            ]
        );
        assert_eq!(census.objects, 5);
        assert_eq!(census.attributed_bytes, 240);
        assert_eq!(census.heap_in_use_bytes, 240 + 16 + 48 + 32 + 32 + 32);
    }

    /// Instance dicts (2.7–3.10) are counted with their owners.
    #[test]
    fn instance_dicts_go_to_their_owners() {
        let mut m = Laid::new(0, 0x10000);
        lay_type(&mut m, TYPE_TYPE, TYPE_TYPE, "type", 900, 0);
        lay_type(&mut m, 0x2000, TYPE_TYPE, "Order", 32, HAVE_GC);
        m.put(0x2000 + TP_DICTOFFSET as u64, 16);
        lay_type(&mut m, 0x3000, TYPE_TYPE, "dict", 48, HAVE_GC);
        let l = Layout::for_version(3, 9, TYPE_TYPE).unwrap();
        let mut c = PyCensus::new(&m, l);
        // Two Orders with a dict, one without; three dicts of 64 bytes.
        c.block(0, &block(&[0, 0, 1, 0x2000, 0x7f00_0000_1000], 48));
        c.block(0, &block(&[0, 0, 1, 0x2000, 0x7f00_0000_2000], 48));
        c.block(0, &block(&[0, 0, 1, 0x2000, 0], 48));
        for _ in 0..3 {
            c.block(0, &block(&[0, 0, 1, 0x3000], 64));
        }
        let mut census = c.finish(1.0, 0.0, None);
        census.rank(None);
        let got: Vec<(&str, u64, u64, u64)> = census
            .types
            .iter()
            .map(|t| (t.name.as_str(), t.count, t.bytes, t.dict_bytes))
            .collect();
        assert_eq!(got, vec![("Order", 3, 144 + 128, 128), ("dict", 1, 64, 0)]);
        assert_eq!(census.objects, 6);
    }

    #[test]
    fn growth_is_ranked_against_the_first_census() {
        let census = |v: &[(&str, u64, u64)]| Census {
            all: v.iter().map(|&(n, c, b)| (n.to_owned(), (c, b))).collect(),
            ..Census::default()
        };
        let first = census(&[("dict", 100, 10_000), ("Order", 10, 640)]);
        let mut last = census(&[
            ("dict", 90, 9_000),
            ("Order", 1010, 64_640),
            ("Session", 5, 80),
        ]);
        last.rank(Some(&first));
        let g: Vec<(&str, Option<i64>, Option<i64>)> = last
            .growing
            .iter()
            .map(|t| (t.name.as_str(), t.count_change, t.bytes_change))
            .collect();
        assert_eq!(
            g,
            vec![
                ("Order", Some(1000), Some(64_000)),
                ("Session", Some(5), Some(80))
            ]
        );
        assert_eq!(last.types[0].name, "Order");
        assert_eq!(last.types[1].count_change, Some(-10));
    }

    #[test]
    fn versions() {
        let off = |maj, min, flags| Layout::for_version(maj, min, 0).unwrap().offset(flags);
        assert_eq!(off(2, 7, HAVE_GC), 32);
        assert_eq!(off(3, 7, HAVE_GC), 32);
        assert_eq!(off(3, 10, HAVE_GC | (1 << 4)), 16);
        assert_eq!(off(3, 11, HAVE_GC | (1 << 4)), 32);
        assert_eq!(off(3, 11, HAVE_GC | (1 << 3)), 16);
        assert_eq!(off(3, 13, HAVE_GC | (1 << 3)), 32);
        assert_eq!(off(3, 13, 0), 0);
        assert!(Layout::for_version(3, 15, 0).is_none());
    }
}
