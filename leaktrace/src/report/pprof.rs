//! The final report as a pprof heap profile, following Go's convention: sample types
//! `alloc_objects/count`, `alloc_space/bytes`, `inuse_objects/count`,
//! `inuse_space/bytes` in that order, `period_type space/bytes` with the sampling
//! interval as `period` (values are already estimates when sampling, as Go's are
//! after its scaling), gzipped. Native frames become locations at their addresses
//! (inlined functions as extra lines of one location), in a mapping per object;
//! Python frames become functions with their file and line, in no mapping.
//!
//! The messages are `profile.proto`'s (github.com/google/pprof), declared here with
//! prost's derive, which does the encoding.

use std::io::Write as _;

use rustc_hash::FxHashMap;

use serde::Deserialize;

use super::Report;
use crate::symbolize::stacks::{Frame, FrameKind};

/// What the formats need of a report: read from a live report, or from a JSON one.
#[derive(Clone, Debug, Deserialize)]
pub struct Heaps {
    /// Traced process.
    pub pid: u32,
    /// Seconds traced.
    pub duration_s: f64,
    /// The heap section.
    pub heap: HeapPart,
    /// Build ids (hex) of the objects the frames name, where read (live reports).
    #[serde(skip)]
    pub build_ids: FxHashMap<String, String>,
    /// The live heap by type (the census), where taken.
    #[serde(default)]
    pub census: Option<CensusPart>,
}

/// The census's types, for comparing reports by type.
#[derive(Clone, Debug, Deserialize)]
pub struct CensusPart {
    /// "python" or "c++".
    pub kind: String,
    /// Types listed, most bytes first.
    pub types: Vec<TypePart>,
    /// Every type is listed (a live report's census, or a capture's: its whole
    /// table), not only the largest a JSON report keeps.
    #[serde(skip)]
    pub whole: bool,
}

/// One type in a census.
#[derive(Clone, Debug, Deserialize)]
pub struct TypePart {
    /// The type's name.
    pub name: String,
    /// Objects counted.
    pub count: u64,
    /// Their bytes.
    pub bytes: u64,
}

impl Heaps {
    /// Reads the build id of each object the frames name, as process `pid` sees it
    /// (through `/proc/PID/root`), for the profile's mappings.
    pub fn read_build_ids(&mut self, pid: u32) {
        self.build_ids = read_build_ids(
            pid,
            self.heap
                .stacks
                .iter()
                .flat_map(|s| &s.frames)
                .filter_map(|f| f.module.as_deref()),
        );
    }
}

/// The build ids of objects (paths in the target's mount namespace), read through
/// `/proc/PID/root`: only their notes, of 1024 objects at most.
pub fn read_build_ids<'a>(
    pid: u32,
    modules: impl Iterator<Item = &'a str>,
) -> FxHashMap<String, String> {
    let mut modules: Vec<&str> = modules.collect();
    modules.sort_unstable();
    modules.dedup();
    let mut ids = FxHashMap::default();
    for m in modules.into_iter().take(1024) {
        let path = std::path::PathBuf::from(format!("/proc/{pid}/root{m}"));
        if let Some(hex) = crate::symbolize::native::build_id(&path) {
            ids.insert(m.to_owned(), hex);
        }
    }
    ids
}

/// The heap section's stacks.
#[derive(Clone, Debug, Deserialize)]
pub struct HeapPart {
    /// Mean sampling interval in bytes; 0 when exact.
    pub sample_rate_bytes: u64,
    /// Stacks.
    pub stacks: Vec<StackPart>,
    /// Stacks with live blocks, listed or not (absent in reports before it): more
    /// than `stacks` holds when the report kept only `--top`.
    #[serde(default)]
    pub stacks_total: Option<u64>,
}

/// One heap stack.
#[derive(Clone, Debug, Deserialize)]
pub struct StackPart {
    /// Outstanding bytes.
    pub live_bytes: u64,
    /// Outstanding blocks.
    pub live_allocations: u64,
    /// Blocks allocated since attach (absent in reports before these formats).
    #[serde(default)]
    pub allocations: u64,
    /// Bytes allocated since attach.
    #[serde(default)]
    pub allocated_bytes: u64,
    /// Kernel stack id.
    pub stack_id: i64,
    /// Frames, innermost first.
    pub frames: Vec<Frame>,
}

impl From<&Report> for Heaps {
    fn from(r: &Report) -> Self {
        Self {
            pid: r.pid,
            duration_s: r.duration_s,
            heap: HeapPart {
                sample_rate_bytes: r.heap.sample_rate_bytes,
                stacks: r
                    .heap
                    .stacks
                    .iter()
                    .map(|s| StackPart {
                        live_bytes: s.live_bytes,
                        live_allocations: s.live_allocations,
                        allocations: s.allocations,
                        allocated_bytes: s.allocated_bytes,
                        stack_id: s.stack_id,
                        frames: s.frames.clone(),
                    })
                    .collect(),
                stacks_total: Some(r.heap.stacks_total),
            },
            build_ids: FxHashMap::default(),
            census: r.census.as_ref().map(|c| {
                let whole = !c.all.is_empty();
                let types = if whole {
                    c.all
                        .iter()
                        .map(|(name, &(count, bytes))| TypePart {
                            name: name.clone(),
                            count,
                            bytes,
                        })
                        .collect()
                } else {
                    c.types
                        .iter()
                        .map(|t| TypePart {
                            name: t.name.clone(),
                            count: t.count,
                            bytes: t.bytes,
                        })
                        .collect()
                };
                CensusPart {
                    kind: c.kind.clone(),
                    types,
                    whole,
                }
            }),
        }
    }
}

/// `perftools.profiles.Profile`.
#[derive(Clone, PartialEq, prost::Message)]
struct Profile {
    #[prost(message, repeated, tag = "1")]
    pub sample_type: Vec<ValueType>,
    #[prost(message, repeated, tag = "2")]
    pub sample: Vec<Sample>,
    #[prost(message, repeated, tag = "3")]
    pub mapping: Vec<Mapping>,
    #[prost(message, repeated, tag = "4")]
    pub location: Vec<Location>,
    #[prost(message, repeated, tag = "5")]
    pub function: Vec<Function>,
    #[prost(string, repeated, tag = "6")]
    pub string_table: Vec<String>,
    #[prost(int64, tag = "9")]
    pub time_nanos: i64,
    #[prost(int64, tag = "10")]
    pub duration_nanos: i64,
    #[prost(message, optional, tag = "11")]
    pub period_type: Option<ValueType>,
    #[prost(int64, tag = "12")]
    pub period: i64,
    #[prost(int64, repeated, tag = "13")]
    pub comment: Vec<i64>,
    #[prost(int64, tag = "14")]
    pub default_sample_type: i64,
}

/// `perftools.profiles.ValueType`.
#[derive(Clone, PartialEq, prost::Message)]
struct ValueType {
    #[prost(int64, tag = "1")]
    pub r#type: i64,
    #[prost(int64, tag = "2")]
    pub unit: i64,
}

/// `perftools.profiles.Sample`.
#[derive(Clone, PartialEq, prost::Message)]
struct Sample {
    #[prost(uint64, repeated, tag = "1")]
    pub location_id: Vec<u64>,
    #[prost(int64, repeated, tag = "2")]
    pub value: Vec<i64>,
    #[prost(message, repeated, tag = "3")]
    pub label: Vec<Label>,
}

/// `perftools.profiles.Label`.
#[derive(Clone, PartialEq, prost::Message)]
struct Label {
    #[prost(int64, tag = "1")]
    pub key: i64,
    #[prost(int64, tag = "2")]
    pub str: i64,
    #[prost(int64, tag = "3")]
    pub num: i64,
    #[prost(int64, tag = "4")]
    pub num_unit: i64,
}

/// `perftools.profiles.Mapping`.
#[derive(Clone, PartialEq, prost::Message)]
struct Mapping {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(uint64, tag = "2")]
    pub memory_start: u64,
    #[prost(uint64, tag = "3")]
    pub memory_limit: u64,
    #[prost(uint64, tag = "4")]
    pub file_offset: u64,
    #[prost(int64, tag = "5")]
    pub filename: i64,
    #[prost(int64, tag = "6")]
    pub build_id: i64,
    #[prost(bool, tag = "7")]
    pub has_functions: bool,
    #[prost(bool, tag = "8")]
    pub has_filenames: bool,
    #[prost(bool, tag = "9")]
    pub has_line_numbers: bool,
    #[prost(bool, tag = "10")]
    pub has_inline_frames: bool,
}

/// `perftools.profiles.Location`.
#[derive(Clone, PartialEq, prost::Message)]
struct Location {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(uint64, tag = "2")]
    pub mapping_id: u64,
    #[prost(uint64, tag = "3")]
    pub address: u64,
    #[prost(message, repeated, tag = "4")]
    pub line: Vec<Line>,
}

/// `perftools.profiles.Line`.
#[derive(Clone, PartialEq, prost::Message)]
struct Line {
    #[prost(uint64, tag = "1")]
    pub function_id: u64,
    #[prost(int64, tag = "2")]
    pub line: i64,
}

/// `perftools.profiles.Function`.
#[derive(Clone, PartialEq, prost::Message)]
struct Function {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(int64, tag = "2")]
    pub name: i64,
    #[prost(int64, tag = "3")]
    pub system_name: i64,
    #[prost(int64, tag = "4")]
    pub filename: i64,
    #[prost(int64, tag = "5")]
    pub start_line: i64,
}

/// Builds a profile: strings, functions, locations and mappings interned.
#[derive(Default)]
struct Builder {
    p: Profile,
    strings: FxHashMap<String, i64>,
    functions: FxHashMap<(i64, i64), u64>,
    locations: FxHashMap<(u64, Vec<(u64, i64)>), u64>,
    mappings: FxHashMap<String, usize>,
}

impl Builder {
    fn string(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.strings.get(s) {
            return i;
        }
        let i = self.p.string_table.len() as i64;
        self.p.string_table.push(s.to_owned());
        self.strings.insert(s.to_owned(), i);
        i
    }

    fn function(&mut self, name: &str, file: &str) -> u64 {
        let key = (self.string(name), self.string(file));
        if let Some(&id) = self.functions.get(&key) {
            return id;
        }
        let id = self.p.function.len() as u64 + 1;
        self.p.function.push(Function {
            id,
            name: key.0,
            system_name: key.0,
            filename: key.1,
            start_line: 0,
        });
        self.functions.insert(key, id);
        id
    }

    fn mapping(&mut self, module: &str, address: u64, build_id: Option<&str>) -> u64 {
        if let Some(&i) = self.mappings.get(module) {
            let m = &mut self.p.mapping[i];
            m.memory_start = m.memory_start.min(address);
            m.memory_limit = m.memory_limit.max(address.saturating_add(1));
            return m.id;
        }
        let id = self.p.mapping.len() as u64 + 1;
        let filename = self.string(module);
        let build_id = build_id.map_or(0, |b| self.string(b));
        self.p.mapping.push(Mapping {
            id,
            memory_start: address,
            memory_limit: address.saturating_add(1),
            file_offset: 0,
            filename,
            build_id,
            has_functions: true,
            has_filenames: true,
            has_line_numbers: true,
            has_inline_frames: true,
        });
        self.mappings
            .insert(module.to_owned(), self.p.mapping.len() - 1);
        id
    }

    /// Locations for `frames` (innermost first): an inlined frame joins the next
    /// frame's location as an extra line.
    fn locations(&mut self, frames: &[Frame], build_ids: &FxHashMap<String, String>) -> Vec<u64> {
        let mut out = Vec::new();
        let mut lines: Vec<(u64, i64)> = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            let mut name = frame_name(f);
            if f.kind == FrameKind::Python {
                // pprof strips `<…>` from names as C++ template arguments: `<module>`
                // would show as nothing.
                name = name.replace('<', "‹").replace('>', "›");
            }
            let file = f.file.as_deref().unwrap_or("");
            let func = self.function(&name, file);
            lines.push((func, i64::from(f.line.unwrap_or(0))));
            // An inlined frame joins its caller's location, unless the walk stopped
            // there (the last frame ends a location whatever it is).
            if f.inlined && f.kind == FrameKind::Native && i + 1 < frames.len() {
                continue;
            }
            let address = if f.kind == FrameKind::Native {
                u64::from_str_radix(f.address.trim_start_matches("0x"), 16).unwrap_or(0)
            } else {
                0
            };
            let mapping_id = match (&f.module, f.kind) {
                (Some(m), FrameKind::Native) if address != 0 => {
                    self.mapping(m, address, build_ids.get(m).map(String::as_str))
                }
                _ => 0,
            };
            let key = (address, std::mem::take(&mut lines));
            let id = if let Some(&id) = self.locations.get(&key) {
                id
            } else {
                let id = self.p.location.len() as u64 + 1;
                self.p.location.push(Location {
                    id,
                    mapping_id,
                    address,
                    line: key
                        .1
                        .iter()
                        .map(|&(function_id, line)| Line { function_id, line })
                        .collect(),
                });
                self.locations.insert(key, id);
                id
            };
            out.push(id);
        }
        out
    }
}

/// What a frame is called in a profile or a folded line.
pub fn frame_name(f: &Frame) -> String {
    match &f.function {
        Some(n) => n.clone(),
        None => match &f.module {
            Some(m) => format!("{} ({})", f.address, m.rsplit('/').next().unwrap_or(m)),
            None => f.address.clone(),
        },
    }
}

/// The report's heap stacks as a gzipped pprof profile.
pub fn encode(r: &Heaps) -> Vec<u8> {
    let mut b = Builder::default();
    b.string("");
    let types = [
        ("alloc_objects", "count"),
        ("alloc_space", "bytes"),
        ("inuse_objects", "count"),
        ("inuse_space", "bytes"),
    ];
    for (t, u) in types {
        let vt = ValueType {
            r#type: b.string(t),
            unit: b.string(u),
        };
        b.p.sample_type.push(vt);
    }
    b.p.period_type = Some(ValueType {
        r#type: b.string("space"),
        unit: b.string("bytes"),
    });
    b.p.period = i64::try_from(r.heap.sample_rate_bytes).unwrap_or(i64::MAX);
    b.p.default_sample_type = b.string("inuse_space");
    b.p.duration_nanos = (r.duration_s * 1e9) as i64;
    b.p.time_nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(0))
        - b.p.duration_nanos;
    let comment = format!(
        "leaktrace: pid {}, heap allocations since attach{}",
        r.pid,
        if r.heap.sample_rate_bytes > 0 {
            format!(
                " (sampled every {} bytes on average: estimates)",
                r.heap.sample_rate_bytes
            )
        } else {
            String::new()
        }
    );
    let c = b.string(&comment);
    b.p.comment.push(c);
    let sat = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    for s in &r.heap.stacks {
        let location_id = b.locations(&s.frames, &r.build_ids);
        b.p.sample.push(Sample {
            location_id,
            value: vec![
                sat(s.allocations),
                sat(s.allocated_bytes),
                sat(s.live_allocations),
                sat(s.live_bytes),
            ],
            label: Vec::new(),
        });
    }
    let raw = prost::Message::encode_to_vec(&b.p);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    // Writing to a Vec cannot fail.
    let _ = gz.write_all(&raw);
    gz.finish().unwrap_or_default()
}

/// The report's heap stacks as folded lines (`outermost;…;innermost bytes`), the
/// grammar flamegraph tools read: live bytes, or bytes allocated since attach.
pub fn folded(r: &Heaps, allocated: bool) -> String {
    let mut out = String::new();
    for s in &r.heap.stacks {
        let v = if allocated {
            s.allocated_bytes
        } else {
            s.live_bytes
        };
        if v == 0 {
            continue;
        }
        let names: Vec<String> = s
            .frames
            .iter()
            .rev()
            .map(|f| {
                let n = frame_name(f);
                let n = if f.kind == FrameKind::Python {
                    let file = f.file.as_deref().unwrap_or("?");
                    format!("{n} ({})", file.rsplit('/').next().unwrap_or(file))
                } else {
                    n
                };
                // `;` separates frames: it may not appear in a name, nor a line
                // break (the last space separates the count, so spaces may).
                n.replace([';', '\n', '\r'], "_")
            })
            .collect();
        let stack = if names.is_empty() {
            format!("[stack #{}]", s.stack_id)
        } else {
            names.join(";")
        };
        out.push_str(&format!("{stack} {v}\n"));
    }
    out
}

/// A flamegraph (SVG) of folded lines.
pub fn flamegraph(folded: &str, title: &str) -> Result<Vec<u8>, String> {
    let mut opts = inferno::flamegraph::Options::default();
    opts.title = title.to_owned();
    opts.count_name = "bytes".to_owned();
    opts.name_type = "Function:".to_owned();
    let mut svg = Vec::new();
    if folded.is_empty() {
        return Err("no heap stacks to draw".into());
    }
    inferno::flamegraph::from_lines(&mut opts, folded.lines(), &mut svg)
        .map_err(|e| format!("drawing the flamegraph: {e}"))?;
    Ok(svg)
}
