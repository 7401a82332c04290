//! Where a member lies in a C struct, from an object's DWARF: how leaktrace reads an
//! allocator's own state from outside without guessing a version's layout. Only the
//! compile units written in C are read, and each is read into a small table of its
//! types, so a Rust program's debug information (mostly Rust units) costs little.

use std::borrow::Cow;

use gimli::{AttributeValue, DwTag, EndianSlice, RunTimeEndian, UnitOffset, constants};
use object::Object as _;
use rustc_hash::FxHashMap;

/// A member found: its offset from the start of the outer struct, and its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    /// Bytes from the start of the struct the path starts at.
    pub offset: u64,
    /// The member's size in bytes.
    pub size: u64,
}

/// Chained types followed at most (typedef of const of volatile …): a hostile or
/// broken file's cycle ends here.
const MAX_CHAIN: usize = 16;
/// A compressed debug section is decompressed up to this size.
const MAX_SECTION_BYTES: u64 = 512 << 20;
/// Entries read per unit at most.
const MAX_UNIT_ENTRIES: usize = 2_000_000;

#[derive(Debug)]
struct Node {
    tag: DwTag,
    name: Option<String>,
    ty: Option<usize>,
    location: Option<u64>,
    size: Option<u64>,
    /// A constant's value (`DW_AT_const_value`).
    value: Option<u64>,
    declaration: bool,
    children: Vec<usize>,
}

/// The language of the units a struct is looked for in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Language {
    /// C (jemalloc, mimalloc…).
    C,
    /// Go (the Go runtime's own types, named `runtime.mstats`…).
    Go,
    /// C++ (gperftools' tcmalloc): classes by their unqualified name (`PageHeap`).
    Cpp,
}

/// Resolves each `(struct, "member.member…")` in the first unit of `language` that
/// defines all the structs named, or says why not. An empty path is the struct itself.
/// `("const", NAME)` is the value of the constant NAME (a variable the compiler gave a
/// value, such as C++'s `static const size_t kPageShift = 13`), as the offset.
pub fn resolve(
    data: &[u8],
    queries: &[(&str, &str)],
    language: Language,
) -> Result<Vec<Member>, String> {
    let file = object::File::parse(data).map_err(|e| format!("not an object file: {e}"))?;
    let endian = if file.is_little_endian() {
        RunTimeEndian::Little
    } else {
        RunTimeEndian::Big
    };
    // Only what types and their names need; compressed sections up to a bound (a
    // target's file can declare anything).
    let load = |id: gimli::SectionId| -> Result<Cow<'_, [u8]>, gimli::Error> {
        use gimli::SectionId::{
            DebugAbbrev, DebugAddr, DebugInfo, DebugLine, DebugLineStr, DebugStr, DebugStrOffsets,
        };
        // (A unit's line program header is read with the unit.)
        if !matches!(
            id,
            DebugInfo
                | DebugAbbrev
                | DebugStr
                | DebugStrOffsets
                | DebugLine
                | DebugLineStr
                | DebugAddr
        ) {
            return Ok(Cow::Borrowed(&[]));
        }
        Ok(file
            .section_by_name(id.name())
            .and_then(|s| crate::process::elf::section_bytes(&s, MAX_SECTION_BYTES))
            .unwrap_or(Cow::Borrowed(&[])))
    };
    if file.section_by_name(".debug_info").is_none() {
        return Err("no debug information".into());
    }
    let sections = gimli::DwarfSections::load(load).map_err(|e| e.to_string())?;
    let dwarf = sections.borrow(|s| EndianSlice::new(s, endian));
    let mut units = dwarf.units();
    let mut defined_somewhere = false;
    while let Some(header) = units.next().map_err(|e| e.to_string())? {
        let Ok(unit) = dwarf.unit(header) else {
            continue;
        };
        let Ok(nodes) = read_unit(&dwarf, &unit, language) else {
            continue;
        };
        if nodes.is_empty() {
            continue;
        }
        let found: Option<Vec<Member>> = queries
            .iter()
            .map(|(ty, path)| resolve_in(&nodes, ty, path))
            .collect();
        if let Some(found) = found {
            return Ok(found);
        }
        defined_somewhere |= queries
            .iter()
            .all(|(ty, _)| *ty == "const" || struct_named(&nodes, ty).is_some());
    }
    Err(if defined_somewhere {
        "its structs lack the members this version is read by".into()
    } else {
        "its debug information does not define the allocator's structs".into()
    })
}

/// A unit's entries, by offset; empty for a unit in another language.
fn read_unit(
    dwarf: &gimli::Dwarf<EndianSlice<'_, RunTimeEndian>>,
    unit: &gimli::Unit<EndianSlice<'_, RunTimeEndian>>,
    language: Language,
) -> gimli::Result<FxHashMap<usize, Node>> {
    let mut nodes = FxHashMap::default();
    let mut cursor = unit.entries();
    let mut parents: Vec<usize> = Vec::new();
    let mut first = true;
    while let Some(e) = cursor.next_dfs()? {
        if first {
            first = false;
            let wanted = matches!(
                (e.attr_value(constants::DW_AT_language), language),
                (
                    Some(AttributeValue::Language(
                        constants::DW_LANG_C
                            | constants::DW_LANG_C89
                            | constants::DW_LANG_C99
                            | constants::DW_LANG_C11
                            | constants::DW_LANG_C17,
                    )),
                    Language::C,
                ) | (
                    Some(AttributeValue::Language(constants::DW_LANG_Go)),
                    Language::Go
                ) | (
                    Some(AttributeValue::Language(
                        constants::DW_LANG_C_plus_plus
                            | constants::DW_LANG_C_plus_plus_03
                            | constants::DW_LANG_C_plus_plus_11
                            | constants::DW_LANG_C_plus_plus_14,
                    )),
                    Language::Cpp,
                )
            );
            if !wanted {
                return Ok(nodes);
            }
        }
        if nodes.len() >= MAX_UNIT_ENTRIES {
            break;
        }
        let depth = usize::try_from(e.depth).unwrap_or(0);
        parents.truncate(depth);
        let offset = e.offset.0;
        if let Some(&p) = parents.last()
            && let Some(parent) = nodes.get_mut(&p)
        {
            parent.children.push(offset);
        }
        let name = e
            .attr_value(constants::DW_AT_name)
            .and_then(|v| dwarf.attr_string(unit, v).ok())
            .map(|s| String::from_utf8_lossy(s.slice()).into_owned());
        // Go's linker refers to types by their offset in .debug_info.
        let ty = match e.attr_value(constants::DW_AT_type) {
            Some(AttributeValue::UnitRef(UnitOffset(o))) => Some(o),
            Some(AttributeValue::DebugInfoRef(o)) => o.to_unit_offset(&unit.header).map(|u| u.0),
            _ => None,
        };
        let location = match e.attr_value(constants::DW_AT_data_member_location) {
            Some(AttributeValue::Udata(v)) => Some(v),
            Some(AttributeValue::Sdata(v)) => u64::try_from(v).ok(),
            Some(AttributeValue::Data1(v)) => Some(v.into()),
            Some(AttributeValue::Data2(v)) => Some(v.into()),
            Some(AttributeValue::Data4(v)) => Some(v.into()),
            Some(AttributeValue::Data8(v)) => Some(v),
            // DWARF 2's form: an expression adding the offset to the struct's address.
            Some(AttributeValue::Exprloc(gimli::Expression(mut r))) => {
                use gimli::Reader as _;
                match r.read_u8() {
                    Ok(op) if op == constants::DW_OP_plus_uconst.0 => r.read_uleb128().ok(),
                    _ => None,
                }
            }
            _ => None,
        };
        let size = if e.tag == constants::DW_TAG_subrange_type {
            // An array dimension: its element count, kept as the node's size.
            e.attr_value(constants::DW_AT_count)
                .and_then(|v| v.udata_value())
                .or_else(|| {
                    e.attr_value(constants::DW_AT_upper_bound)
                        .and_then(|v| v.udata_value())
                        .and_then(|u| u.checked_add(1))
                })
        } else {
            e.attr_value(constants::DW_AT_byte_size)
                .and_then(|v| v.udata_value())
        };
        let value = e
            .attr_value(constants::DW_AT_const_value)
            .and_then(|v| v.udata_value());
        let declaration = matches!(
            e.attr_value(constants::DW_AT_declaration),
            Some(AttributeValue::Flag(true))
        );
        nodes.insert(
            offset,
            Node {
                tag: e.tag,
                name,
                ty,
                location,
                size,
                value,
                declaration,
                children: Vec::new(),
            },
        );
        parents.push(offset);
    }
    Ok(nodes)
}

/// The defined struct of that name (`struct arena_s`), or a typedef's (`arena_t`).
fn struct_named(nodes: &FxHashMap<usize, Node>, name: &str) -> Option<usize> {
    let mut typedef = None;
    for (&o, n) in nodes {
        if n.name.as_deref() != Some(name) {
            continue;
        }
        if is_struct(n.tag) && !n.declaration && n.size.is_some() {
            return Some(o);
        }
        if n.tag == constants::DW_TAG_typedef {
            typedef = n.ty.and_then(|t| strip(nodes, t));
        }
    }
    typedef.filter(|&o| is_struct(nodes[&o].tag))
}

/// A struct, or a C++ class.
fn is_struct(tag: gimli::DwTag) -> bool {
    tag == constants::DW_TAG_structure_type || tag == constants::DW_TAG_class_type
}

/// The type behind typedefs and qualifiers.
fn strip(nodes: &FxHashMap<usize, Node>, mut o: usize) -> Option<usize> {
    for _ in 0..MAX_CHAIN {
        let n = nodes.get(&o)?;
        match n.tag {
            constants::DW_TAG_typedef
            | constants::DW_TAG_const_type
            | constants::DW_TAG_volatile_type
            | constants::DW_TAG_atomic_type
            | constants::DW_TAG_restrict_type => o = n.ty?,
            _ => return Some(o),
        }
    }
    None
}

/// The member at `path` (dot-separated) of struct `ty`, in one unit's table.
fn resolve_in(nodes: &FxHashMap<usize, Node>, ty: &str, path: &str) -> Option<Member> {
    if ty == "const" {
        return nodes
            .values()
            .find_map(|n| {
                (n.tag == constants::DW_TAG_variable && n.name.as_deref() == Some(path))
                    .then_some(n.value)
                    .flatten()
            })
            .map(|offset| Member { offset, size: 0 });
    }
    let mut at = struct_named(nodes, ty)?;
    let mut offset = 0u64;
    let mut size = nodes[&at].size?;
    for name in path.split('.').filter(|n| !n.is_empty()) {
        let outer = &nodes[&at];
        if !is_struct(outer.tag) && outer.tag != constants::DW_TAG_union_type {
            return None;
        }
        let m = outer
            .children
            .iter()
            .map(|c| &nodes[c])
            .find(|c| c.tag == constants::DW_TAG_member && c.name.as_deref() == Some(name))?;
        // A union's members have no location: they start where it does. A struct's
        // member without one (or with one leaktrace cannot evaluate) is not found.
        let at_member = if outer.tag == constants::DW_TAG_union_type {
            m.location.unwrap_or(0)
        } else {
            m.location?
        };
        offset = offset.checked_add(at_member)?;
        at = strip(nodes, m.ty?)?;
        size = type_size(nodes, at)?;
    }
    Some(Member { offset, size })
}

/// A type's size: its own (`DW_AT_byte_size`), a pointer's, or an array's (its
/// element's times each dimension's count).
fn type_size(nodes: &FxHashMap<usize, Node>, o: usize) -> Option<u64> {
    let n = nodes.get(&o)?;
    if n.tag == constants::DW_TAG_array_type {
        if let Some(s) = n.size {
            return Some(s);
        }
        let element = strip(nodes, n.ty?)?;
        // An array of arrays is one array type with several dimensions: the element
        // is never itself an array without a size, so this does not recurse further.
        if nodes.get(&element)?.tag == constants::DW_TAG_array_type {
            return None;
        }
        let mut size = type_size(nodes, element)?;
        for c in &n.children {
            let d = &nodes[c];
            // A flexible array member (`chunks[]`) has no count: size 0, its offset
            // still found.
            if d.tag == constants::DW_TAG_subrange_type {
                size = size.checked_mul(d.size.unwrap_or(0))?;
            }
        }
        return Some(size);
    }
    if let Some(s) = n.size {
        return Some(s);
    }
    if n.tag == constants::DW_TAG_pointer_type {
        return Some(8);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This test binary's own debug information has no C units (Rust only).
    #[test]
    fn a_rust_object_has_no_c_structs() {
        let exe = std::fs::read("/proc/self/exe").expect("own binary");
        let r = resolve(&exe, &[("arena_s", "ind")], Language::C);
        assert!(r.is_err(), "{r:?}");
    }

    #[test]
    fn garbage_is_refused() {
        assert!(resolve(b"\x7fELF nonsense", &[("a", "b")], Language::C).is_err());
        assert!(resolve(&[], &[("a", "b")], Language::Go).is_err());
    }
}
