//! The text rendering of a report.

use std::fmt::Write as _;

use crate::{
    analysis::verdict::{Section, Verdict},
    heap::glibc::ArenaKind,
    report::*,
    symbolize::{Frame, FrameKind},
    units::{bytes, printable, rate},
};

/// Renders a dry run: call rates and the projected cost of tracing them.
pub fn render_dry_run(pid: u32, duration_s: f64, o: &Overhead, reason: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "=== leaktrace dry run: pid {pid}, {duration_s:.1} s counting allocator calls ({reason}) ==="
    );
    let _ = writeln!(
        s,
        "{:<16} {:>12} {:>16} {:>14}",
        "function", "calls/s", "cost/call (µs)", "CPU-s/s"
    );
    for (f, r) in &o.calls_per_s {
        let c = o.cost_per_call_us.get(f).copied().unwrap_or(0.0);
        let _ = writeln!(s, "{f:<16} {r:>12.0} {c:>16.1} {:>14.4}", r * c / 1e6);
    }
    let _ = writeln!(
        s,
        "Target CPU: {:.3} CPU-s/s (including the counting probes' own traps).",
        o.target_cpu_per_s
    );
    let _ = writeln!(
        s,
        "Projected cost of full tracing: {:.3} CPU-s/s, {:.1}% of the target's own CPU time (a CPU-bound target would keep about {:.2} of its speed).",
        o.projected_cpu_per_s,
        o.projected_pct,
        crate::probes::cost::throughput_share(o.projected_pct)
    );
    match o.traps {
        Some(t) if t.measured => {
            let _ = writeln!(
                s,
                "(Trap costs measured on this machine at startup: {:.2} µs on an emulated instruction, {:.2} µs single-stepped, {:.2} µs more for a return probe; the BPF programs' own work comes on top.)",
                t.emulated_us, t.single_stepped_us, t.return_us
            );
        }
        _ => s.push_str(
            "(Trap costs could not be measured here: those of the development VM are used; see docs/bench.md.)\n",
        ),
    }
    s
}

/// A frame as one line. Names, files and modules come from the target (its memory,
/// its files' symbols, its paths): control characters are printed as '?', so no
/// escape sequence or line break of theirs reaches the terminal.
fn frame_line(f: &Frame) -> String {
    let func = f.function.as_deref().unwrap_or("??");
    let mut s = printable(func);
    if let (Some(file), Some(line)) = (&f.file, f.line) {
        let short = file.rsplit('/').next().unwrap_or(file);
        let _ = write!(s, " ({}:{line})", printable(short));
    }
    if f.inlined {
        s.push_str(" [inlined]");
    }
    if f.kind == FrameKind::Python {
        s.push_str("  [python]");
        if f.function.is_none() {
            let _ = write!(s, " code object @ {} (freed or unreadable)", f.address);
        }
        return s;
    }
    let module = f
        .module
        .as_deref()
        .map_or("?", |m| m.rsplit('/').next().unwrap_or(m));
    let _ = write!(s, "  in {}", printable(module));
    if f.function.is_none() {
        let _ = write!(s, " @ {}", f.address);
    }
    s
}

fn render_heap_stacks(o: &mut String, heap: &Heap, shown: Frames) {
    if heap.not_traced.is_some() {
        o.push_str("No heap stacks: the heap was not traced.\n");
    } else if heap.stacks.is_empty() {
        o.push_str("No outstanding heap allocations since attach.\n");
    } else {
        let _ = writeln!(
            o,
            "Top {} stacks by outstanding heap bytes:",
            heap.stacks.len()
        );
        for (n, s) in heap.stacks.iter().enumerate() {
            let growth = s.growth.map_or(String::new(), |g| {
                let rate = rate(g.bytes_per_s);
                let down = (1.0 - g.steadiness) * 100.0;
                if down < 0.5 {
                    format!(", {rate} over {} samples, never shrank", g.points)
                } else {
                    format!(
                        ", {rate} over {} samples, shrank in {down:.0}% of steps",
                        g.points
                    )
                }
            });
            if heap.sample_rate_bytes == 0 {
                let _ = writeln!(
                    o,
                    "  #{} {} in {} blocks, oldest {:.1} s{growth}",
                    n + 1,
                    bytes(s.live_bytes),
                    s.live_allocations,
                    s.oldest_age_s
                );
            } else {
                let _ = writeln!(
                    o,
                    "  #{} ~{} ± {} in ~{} blocks ({} sampled), oldest {:.1} s{growth}",
                    n + 1,
                    bytes(s.live_bytes),
                    bytes(s.live_bytes_error95),
                    s.live_allocations,
                    s.samples,
                    s.oldest_age_s
                );
            }
            write_frames(o, s.stack_id, &s.frames, s.truncated, shown);
        }
    }
}

/// The objects behind `??` frames, once each, and how to get their symbols.
fn render_unnamed(o: &mut String, unnamed: &[crate::symbolize::native::Unnamed]) {
    if unnamed.is_empty() {
        return;
    }
    let _ = writeln!(
        o,
        "\nFrames shown as ?? lie in objects without symbols for them:"
    );
    for u in unnamed {
        let all = u.unnamed_addresses + u.named_addresses;
        let what = if u.named_addresses == 0 {
            format!("no symbols (all {all} addresses)")
        } else {
            format!("{} of {all} addresses unnamed", u.unnamed_addresses)
        };
        let id = u
            .build_id
            .as_deref()
            .map_or(String::from("no build id"), |b| format!("build id {b}"));
        let pkg = u.package.as_deref().map_or(String::new(), |p| {
            format!("; from Debian's {p}, debug symbols in {p}-dbgsym")
        });
        let run_as = u
            .run_as
            .as_deref()
            .map_or(String::new(), |r| format!(" (run as {r})"));
        let _ = writeln!(o, "  {}{run_as}: {what}; {id}{pkg}", printable(&u.object));
    }
    let _ = writeln!(
        o,
        "  Debug files are read from /usr/lib/debug (by build id, or .gnu_debuglink), the target's own /usr/lib/debug and --debug-dir DIR: install the -dbgsym packages (Debian's debian-debug archive), or fetch by build id with `debuginfod-find debuginfo BUILD_ID`."
    );
}

/// How stacks are printed in text reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frames {
    /// Frames shown per stack (Python frames, where a stack has them and is folded).
    pub max: usize,
    /// Python stacks with the interpreter's own frames folded between Python frames.
    pub fold_python: bool,
}

/// A line of a printed stack.
enum Line<'a> {
    Frame(&'a Frame),
    /// A run of the interpreter's (and the C library's) own frames, folded.
    Folded(usize),
}

/// Whether a native frame is the interpreter's own or the C library's: the machinery
/// between two Python frames (the eval loop, calls, vectorcall), folded in a Python
/// stack. Frames of extension modules and other libraries are kept: they are code
/// the user's program chose to run.
fn interpreter_frame(f: &Frame) -> bool {
    let Some(m) = f.module.as_deref() else {
        return true;
    };
    let base = m.rsplit('/').next().unwrap_or(m);
    base.starts_with("python")
        || base.starts_with("libpython")
        || base.starts_with("libc.so")
        || base.starts_with("ld-linux")
}

/// A Python stack folded: the allocating native frame (with the frames inlined into
/// it), then each Python frame, with the native frames between them folded but for
/// those of extension modules and other libraries.
fn fold_python(frames: &[Frame]) -> Vec<Line<'_>> {
    let mut lines = Vec::new();
    let first = frames
        .iter()
        .position(|f| !f.inlined)
        .map_or(frames.len(), |i| i + 1);
    lines.extend(frames[..first].iter().map(Line::Frame));
    let mut folded = 0;
    for f in &frames[first..] {
        if f.kind == FrameKind::Native && interpreter_frame(f) {
            folded += 1;
            continue;
        }
        if folded > 0 {
            lines.push(Line::Folded(folded));
            folded = 0;
        }
        lines.push(Line::Frame(f));
    }
    if folded > 0 {
        lines.push(Line::Folded(folded));
    }
    lines
}

fn write_frames(out: &mut String, stack_id: i64, frames: &[Frame], truncated: bool, shown: Frames) {
    if frames.is_empty() {
        let why = match stack_id {
            leaktrace_common::STACK_NONE => "stacks are off".to_owned(),
            id if id < 0 => format!("capture failed with errno {}, counted under losses", -id),
            _ => "not symbolized".to_owned(),
        };
        let _ = writeln!(out, "      (no stack: {why})");
        return;
    }
    let max = shown.max;
    if shown.fold_python && frames.iter().any(|f| f.kind == FrameKind::Python) {
        // The limit counts frames printed; a folded run is one line, not counted, and
        // a recursion's repeated frame is one line with its count.
        let lines = fold_python(frames);
        let (mut printed, mut rest, mut rest_python) = (0, 0, 0);
        let mut i = 0;
        while i < lines.len() {
            match lines[i] {
                Line::Frame(f) => {
                    let same = |l: &Line<'_>| matches!(l, Line::Frame(g) if g.kind == FrameKind::Python && g.function == f.function && g.file == f.file && g.line == f.line);
                    // A recursion: the same Python frame again and again, with the
                    // interpreter's frames between (folded, they go with the count).
                    let (mut repeats, mut end) = (1, i + 1);
                    if f.kind == FrameKind::Python {
                        let mut j = i + 1;
                        while j < lines.len() {
                            if same(&lines[j]) {
                                repeats += 1;
                                end = j + 1;
                            } else if !matches!(lines[j], Line::Folded(_)) {
                                break;
                            }
                            j += 1;
                        }
                    }
                    let skipped: usize = lines[i + 1..end]
                        .iter()
                        .map(|l| match l {
                            Line::Folded(n) => *n,
                            Line::Frame(_) => 1,
                        })
                        .sum();
                    if printed < max {
                        printed += 1;
                        let times = if repeats > 1 {
                            format!("  ×{repeats}")
                        } else {
                            String::new()
                        };
                        let _ = writeln!(out, "      {}{times}", frame_line(f));
                    } else {
                        rest += 1 + skipped;
                        if f.kind == FrameKind::Python {
                            rest_python += repeats;
                        }
                    }
                    i = end;
                }
                Line::Folded(n) => {
                    if printed < max {
                        let what = match (i + 1 == lines.len() && !truncated, n) {
                            (true, 1) => "1 native frame to the stack's start".to_owned(),
                            (true, _) => format!("{n} native frames to the stack's start"),
                            (false, 1) => "1 interpreter frame".to_owned(),
                            (false, _) => format!("{n} interpreter frames"),
                        };
                        let _ = writeln!(out, "        ⋮ {what}");
                    } else {
                        rest += n;
                    }
                    i += 1;
                }
            }
        }
        if rest > 0 {
            let _ = writeln!(
                out,
                "      … {rest} more frames, {rest_python} of them Python (--max-frames shows more)"
            );
        } else if truncated {
            out.push_str("      … (stack truncated)\n");
        }
        return;
    }
    for f in frames.iter().take(max) {
        let _ = writeln!(out, "      {}", frame_line(f));
    }
    if frames.len() > max {
        let _ = writeln!(out, "      … {} more frames", frames.len() - max);
    } else if truncated {
        out.push_str("      … (stack truncated)\n");
    }
}

/// Wraps `text` at about 100 columns: the first line starts with `first`, the
/// others with `rest` (a hanging indent).
fn wrap_hanging(out: &mut String, text: &str, first: &str, rest: &str) {
    let mut line = String::new();
    let mut prefix = first;
    for word in text.split_whitespace() {
        if !line.is_empty() && prefix.len() + line.len() + 1 + word.len() > 100 {
            let _ = writeln!(out, "{prefix}{line}");
            line.clear();
            prefix = rest;
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        let _ = writeln!(out, "{prefix}{line}");
    }
}

fn wrap(out: &mut String, text: &str, indent: &str) {
    wrap_hanging(out, text, indent, indent);
}

fn render_verdict(o: &mut String, v: &Verdict, shown: Frames) {
    let also: Vec<String> = v
        .secondary
        .iter()
        .map(|f| f.kind.as_str().to_uppercase())
        .collect();
    let _ = writeln!(
        o,
        "VERDICT: {}{}",
        v.kind.as_str().to_uppercase(),
        if also.is_empty() {
            String::new()
        } else {
            format!(" (also {})", also.join(", "))
        }
    );
    wrap(o, &v.summary, "  ");
    if let Some(t) = &v.trend {
        let _ = writeln!(
            o,
            "  Trend: {} — anonymous RSS {} over {:.1} s ({} in the second half), live heap {} ({}).",
            t.kind.as_str(),
            crate::units::signed_bytes(t.rss_anon_net_bytes),
            t.span_s,
            rate(t.rss_anon_bytes_per_s),
            crate::units::signed_bytes(t.live_heap_net_bytes),
            rate(t.live_heap_bytes_per_s)
        );
    }
    if !v.evidence.is_empty() {
        o.push_str("  Evidence:\n");
        for e in &v.evidence {
            wrap_hanging(o, &e.text, "    - ", "      ");
        }
    }
    if !v.suspects.is_empty() {
        o.push_str("  Suspects, fastest-growing first:\n");
        for (n, s) in v.suspects.iter().enumerate() {
            let freed = if s.section == Section::Heap && s.allocs > 0 {
                format!(", {} of its {} blocks freed", s.frees, s.allocs)
            } else {
                String::new()
            };
            let kind = if s.section == Section::Heap {
                "heap"
            } else {
                "mapped"
            };
            let _ = writeln!(
                o,
                "    #{} +{}/s {kind}, {} outstanding, oldest {:.1} s, {:.0}% of steps grew or held{freed}",
                n + 1,
                bytes(s.growth_bytes_per_s.max(0.0).round() as u64),
                bytes(s.bytes),
                s.oldest_age_s,
                s.steadiness * 100.0
            );
            write_frames(o, s.stack_id, &s.frames, s.truncated, shown);
        }
    }
    if !v.remedies.is_empty() {
        o.push_str("  Remedies, by expected effect:\n");
        for (n, r) in v.remedies.iter().enumerate() {
            let effect = if r.expected_bytes > 0 {
                format!(" — about {}", bytes(r.expected_bytes))
            } else {
                String::new()
            };
            wrap_hanging(
                o,
                &format!("{}. {}{effect}", n + 1, r.action),
                "    ",
                "       ",
            );
            wrap(o, &r.why, "       ");
        }
    }
}

/// One line naming the allocators found, then what is traced and what is not.
fn render_allocators(o: &mut String, a: &Allocator) {
    if a.found.is_empty() {
        return;
    }
    // The one serving malloc first.
    let mut found: Vec<_> = a.found.iter().collect();
    found.sort_by_key(|f| !f.serves_malloc);
    let items: Vec<String> = found
        .iter()
        .map(|f| {
            let object = printable(f.object.rsplit('/').next().unwrap_or(&f.object));
            let mut x = if f.allocator == crate::probes::allocators::Allocator::Go {
                "Go runtime".to_owned()
            } else {
                f.allocator.as_str().to_owned()
            };
            if let Some(v) = &f.version {
                x.push(' ');
                x.push_str(&printable(v));
            }
            x.push_str(&format!(" ({object}"));
            if !f.prefix.is_empty() && f.allocator != crate::probes::allocators::Allocator::Go {
                x.push_str(&format!(", {}* API", f.prefix));
            }
            x.push(')');
            if f.serves_malloc {
                x.push_str(" serves malloc");
            }
            if f.allocator != crate::probes::allocators::Allocator::Go {
                x.push_str(&format!(
                    ", {} probe{}",
                    f.probes,
                    if f.probes == 1 { "" } else { "s" }
                ));
            }
            x
        })
        .collect();
    let _ = writeln!(o, "Allocators: {}.", items.join("; "));
    for n in &a.notes {
        wrap(o, &printable(n), "  ");
    }
}

/// Types shown in the text table.
const CENSUS_ROWS: usize = 12;

/// Python's part of "Who keeps it alive": the collector's state, cyclic garbage
/// waiting for it, `gc.garbage`, and the paths holding the program's objects.
fn render_python_gc(o: &mut String, p: &super::PythonInfo) {
    if let Some(why) = &p.gc_not_read {
        let _ = writeln!(o, "\nPython's collector: not read ({why})");
        return;
    }
    let Some(g) = &p.gc else { return };
    let list = |t: &[crate::heap::pygc::TypeCount]| {
        t.iter()
            .take(4)
            .map(|t| format!("{} {} ({})", t.count, t.name, bytes(t.bytes)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(
        o,
        "\nPython's collector ({}; thresholds {:?}, counts {:?}{}; {} tracked objects read twice in {:.0} ms, the target not stopped):",
        if g.enabled { "enabled" } else { "DISABLED" },
        g.thresholds,
        g.counts,
        g.collections
            .as_ref()
            .map_or(String::new(), |c| format!(", collections {c:?}")),
        g.tracked.iter().sum::<u64>(),
        g.scan.ms
    );
    let c = &g.cyclic_unreachable;
    if let Some(why) = &g.scan.incomplete {
        let _ = writeln!(o, "  cyclic garbage not computed: {why}");
    } else if c.objects == 0 {
        let _ = writeln!(o, "  no cyclic garbage waits for a collection");
    } else {
        let _ = writeln!(
            o,
            "  in reference cycles, waiting for a collection: {} in {} objects: {}",
            bytes(c.bytes),
            c.objects,
            list(&c.types)
        );
    }
    if g.garbage.objects > 0 {
        let _ = writeln!(
            o,
            "  gc.garbage (found, not freeable): {} objects: {}; they keep {} alive",
            g.garbage.objects,
            list(&g.garbage.types),
            bytes(g.garbage.holds_bytes)
        );
    }
    for h in g.held_by.iter().take(6) {
        let _ = writeln!(
            o,
            "  {} {} ({}) held by {}",
            h.objects,
            h.type_name,
            bytes(h.bytes),
            h.path
        );
    }
}

/// "Who keeps it alive": what nothing points to, by allocating stack or size, and the
/// roots holding the most of the rest.
fn render_reachability(o: &mut String, a: &super::Reachability) {
    let s = &a.scan;
    let _ = writeln!(
        o,
        "\nWho keeps it alive ({} conservative scan{} from the roots through {} in-use blocks, {} read in {} ms; \
         the target was not stopped):",
        s.passes,
        if s.passes == 1 { "" } else { "s" },
        s.blocks,
        bytes(s.bytes_scanned),
        s.ms
    );
    if let Some(why) = &s.incomplete {
        let _ = writeln!(
            o,
            "  the scan {why}: no block is called unreferenced (one may be referenced from what was not read)"
        );
    } else if a.unreferenced.blocks == 0 {
        let _ = writeln!(o, "  every in-use block is referenced from somewhere");
    } else {
        let _ = writeln!(
            o,
            "  nothing points to {} in {} block{}: lost (no pointer to them is left in the process)",
            bytes(a.unreferenced.bytes),
            a.unreferenced.blocks,
            if a.unreferenced.blocks == 1 { "" } else { "s" }
        );
        if a.unreferenced.listed < a.unreferenced.blocks {
            let _ = writeln!(
                o,
                "    (grouped: the first {} by address)",
                a.unreferenced.listed
            );
        }
        for g in &a.unreferenced.groups {
            let what = if let Some(size) = g.size {
                format!("of {} each, not seen allocated while traced", bytes(size))
            } else if g.frames.is_empty() {
                format!("from stack #{}", g.stack_id.unwrap_or(0))
            } else {
                format!(
                    "from {}",
                    g.frames
                        .iter()
                        .take(2)
                        .map(frame_line)
                        .collect::<Vec<_>>()
                        .join(" ← ")
                )
            };
            let _ = writeln!(
                o,
                "    {:>8} in {:>6} block{} {what}",
                bytes(g.bytes),
                g.blocks,
                if g.blocks == 1 { " " } else { "s" }
            );
        }
    }
    if !a.held_by.is_empty() {
        let _ = writeln!(o, "  held by:");
        for h in &a.held_by {
            let _ = writeln!(
                o,
                "    {:>8} in {:>6} block{} by {}",
                bytes(h.bytes),
                h.blocks,
                if h.blocks == 1 { " " } else { "s" },
                printable(&h.root)
            );
        }
    }
}

fn render_census(o: &mut String, c: &crate::heap::census::Census) {
    let _ = writeln!(
        o,
        "\nLive heap by type ({}, read from outside at {:.1} s): {} objects, {} — {:.0}% of {} in live blocks \
         (the rest: buffers that are not objects, like lists' items and dicts' keys); {:.0} ms{}",
        if c.kind == "c++" {
            "C++ objects in malloc's chunks, by vtable"
        } else {
            "Python objects in pymalloc's blocks and malloc's chunks"
        },
        c.at_s,
        c.objects,
        bytes(c.attributed_bytes),
        c.coverage() * 100.0,
        bytes(c.heap_in_use_bytes),
        c.walk_ms,
        c.incomplete
            .as_ref()
            .map_or(String::new(), |w| format!("; incomplete: {w}"))
    );
    if c.types.is_empty() {
        return;
    }
    let changes = c.types.iter().any(|t| t.count_change.is_some());
    let _ = writeln!(
        o,
        "  {:<32} {:>10} {:>10}{}",
        "type",
        "objects",
        "bytes",
        if changes { "   since attach" } else { "" }
    );
    for t in c.types.iter().take(CENSUS_ROWS) {
        let change = match (t.count_change, t.bytes_change) {
            (Some(n), Some(b)) => format!(
                "   {n:+} ({}){}",
                crate::units::signed_bytes(b as f64),
                if n > 0 && b > 0 && c.growing.iter().take(3).any(|g| g.name == t.name) {
                    "  ← growing"
                } else {
                    ""
                }
            ),
            _ => String::new(),
        };
        let name = if t.dict_bytes > 0 {
            format!("{} (+ __dict__)", printable(&t.name))
        } else {
            printable(&t.name)
        };
        let _ = writeln!(
            o,
            "  {:<32} {:>10} {:>10}{change}",
            name,
            t.count,
            bytes(t.bytes)
        );
    }
    if let Some(g) = c
        .growing
        .first()
        .filter(|g| !c.types.iter().take(CENSUS_ROWS).any(|t| t.name == g.name))
    {
        let _ = writeln!(
            o,
            "  growing most: {} ({:+} objects, {})",
            printable(&g.name),
            g.count_change.unwrap_or(0),
            crate::units::signed_bytes(g.bytes_change.unwrap_or(0) as f64)
        );
    }
}

fn render_allocator(o: &mut String, a: &Allocator) {
    if let Some(h) = &a.state.go {
        let _ = writeln!(
            o,
            "\nGo runtime ({}), its heap statistics read from outside: {} in spans in use ({} of live and unswept objects, \
             {} of free slots in them), {} of free spans resident, {} returned to the system; goroutine stacks {}",
            h.object,
            bytes(h.in_use_bytes),
            bytes(h.alloc_bytes),
            bytes(h.in_use_bytes.saturating_sub(h.alloc_bytes)),
            bytes(h.free_bytes),
            bytes(h.released_bytes),
            bytes(h.stacks_bytes)
        );
    }
    for j in &a.state.jemalloc {
        let _ = writeln!(
            o,
            "\njemalloc ({}), read from its arenas: {} arena{}; {} active, {} dirty and {} muzzy (freed, resident), \
             {} retained (address space kept for reuse, not resident){}",
            j.object,
            j.arenas.len(),
            if j.arenas.len() == 1 { "" } else { "s" },
            bytes(j.active_bytes),
            bytes(j.dirty_bytes),
            bytes(j.muzzy_bytes),
            bytes(j.retained_bytes),
            if j.unreadable_arenas > 0 {
                format!("; {} arena(s) did not read back", j.unreadable_arenas)
            } else {
                String::new()
            }
        );
    }
    for t in &a.state.tcmalloc {
        let _ = writeln!(
            o,
            "\ntcmalloc ({}), read from its page heap and caches: heap {}, of it {} allocated, {} in free spans, {} in \
             {} thread cache{}, {} in its central and transfer caches; {} returned to the system (not resident)",
            t.object,
            bytes(t.system_bytes),
            bytes(t.in_use_bytes),
            bytes(t.page_heap_free_bytes),
            bytes(t.thread_cache_bytes),
            t.thread_caches,
            if t.thread_caches == 1 { "" } else { "s" },
            bytes(t.central_cache_bytes + t.transfer_cache_bytes),
            bytes(t.unmapped_bytes)
        );
    }
    for m in &a.state.mimalloc {
        let _ = writeln!(
            o,
            "\nmimalloc ({}), read from its arenas and pages: {} arena{} reserving {} (mimalloc counts {} committed); \
             {} page{}: {} in use, {} of freed blocks in them; {} of free slices not purged{}",
            m.object,
            m.arenas.len(),
            if m.arenas.len() == 1 { "" } else { "s" },
            bytes(m.reserved_bytes),
            bytes(m.stat_committed_bytes),
            m.pages,
            if m.pages == 1 { "" } else { "s" },
            bytes(m.in_use_bytes),
            bytes(m.page_free_bytes),
            bytes(m.free_resident_bytes),
            match (m.unreadable_arenas, m.unreadable_pages, &m.incomplete) {
                (_, _, Some(why)) => format!("; the walk {why}"),
                (0, 0, None) => String::new(),
                (a, p, None) => format!("; {a} arena(s) and {p} page(s) did not read back"),
            }
        );
    }
    if let Some(p) = a.pymalloc.as_ref().filter(|p| p.arena_count > 0) {
        let _ = writeln!(
            o,
            "\npymalloc, read from /proc/PID/mem: {}; {} of free blocks resident{}",
            p.summary(),
            bytes(p.free_resident_bytes),
            p.incomplete
                .as_ref()
                .map_or(String::new(), |w| format!(" (walk {w})"))
        );
        let _ = writeln!(
            o,
            "  live blocks by size: {}",
            crate::analysis::verdict::size_classes_text(&p.size_classes)
        );
        if p.pinned.arenas > 0 {
            let _ = writeln!(
                o,
                "  {} mostly-empty arena{} ({} resident, {} free) are kept from being returned by {} live block{}: {}",
                p.pinned.arenas,
                if p.pinned.arenas == 1 { "" } else { "s" },
                bytes(p.pinned.resident_bytes),
                bytes(p.pinned.free_resident_bytes),
                p.pinned.blocks_in_use,
                if p.pinned.blocks_in_use == 1 { "" } else { "s" },
                crate::analysis::verdict::size_classes_text(&p.pinned.size_classes)
            );
        }
    }
    let Some(g) = &a.glibc_heaps else { return };
    let _ = writeln!(
        o,
        "\nglibc heaps, read from /proc/PID/mem: {} arena{}{}; {} in use, {} free ({} resident); malloc_trim(0) would return {}",
        g.arenas.len(),
        if g.arenas.len() == 1 { "" } else { "s" },
        a.arena_limit.as_ref().map_or(String::new(), |l| format!(
            " (limit {}: {})",
            l.limit, l.source
        )),
        bytes(g.in_use_bytes),
        bytes(g.free_bytes),
        bytes(g.free_resident_bytes),
        bytes(g.trimmable_bytes)
    );
    let _ = writeln!(
        o,
        "  {:<16} {:>5} {:>11} {:>11} {:>11} {:>13} {:>11}  created by",
        "arena", "heaps", "extent", "resident", "in use", "free resident", "trimmable"
    );
    for w in &g.arenas {
        let s = &w.stats;
        let by = match (w.created_by_thread, &w.created_by_thread_name) {
            (Some(t), Some(n)) => format!(
                "thread {t} ({n}) in {}",
                crate::analysis::verdict::suspect_name(&w.frames)
            ),
            (Some(t), None) => format!(
                "thread {t} in {}",
                crate::analysis::verdict::suspect_name(&w.frames)
            ),
            _ if s.kind == ArenaKind::Main => "the main heap".into(),
            _ => "before attach".into(),
        };
        let _ = writeln!(
            o,
            "  {:<16} {:>5} {:>11} {:>11} {:>11} {:>13} {:>11}  {by}",
            s.arena,
            s.heaps.len(),
            bytes(s.extent_bytes),
            bytes(s.resident_bytes),
            bytes(s.in_use_bytes),
            bytes(s.free_resident_bytes),
            bytes(s.trimmable_bytes)
        );
    }
    // What keeps the free memory: the largest pins, three per arena at most.
    for w in &g.arenas {
        for p in w.pinned_by.iter().take(3) {
            let from = if p.since_attach {
                format!("from {}", crate::analysis::verdict::suspect_name(&p.frames))
            } else {
                "allocated before attach".to_owned()
            };
            let _ = writeln!(
                o,
                "  a {} block {from} at {} in arena {} keeps {} free below it from being returned",
                bytes(p.block_bytes),
                p.address,
                w.stats.arena,
                bytes(p.bytes_held)
            );
        }
    }
    for u in &g.unwalkable {
        let _ = writeln!(o, "  heap at {} not walked: {}", u.heap, u.reason);
    }
    if !a.environment.is_empty() {
        let _ = writeln!(
            o,
            "  malloc settings in the environment: {}",
            printable(&a.environment.join(" "))
        );
    }
}

/// Renders a report as text.
pub fn render_text(r: &Report, shown: Frames) -> String {
    let mut o = String::new();
    let title = if r.final_report {
        "final report"
    } else {
        "report"
    };
    let _ = writeln!(
        o,
        "=== leaktrace {title}: pid {}, {:.1} s traced{} ===",
        r.pid,
        r.duration_s,
        r.end_reason
            .as_deref()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        o,
        "RSS {} (anon {}, file {}, shmem {}){}",
        bytes(r.rss.rss_bytes),
        bytes(r.rss.anon_bytes),
        bytes(r.rss.file_bytes),
        bytes(r.rss.shmem_bytes),
        if r.target_exited {
            " — last reading; the target has exited"
        } else {
            ""
        }
    );
    if let Some(why) = &r.heap.not_traced {
        let _ = writeln!(
            o,
            "Heap not traced: {why}. Mappings, brk and RSS are traced; the verdict rests on them alone."
        );
    } else if r.heap.sample_rate_bytes == 0 {
        let _ = writeln!(
            o,
            "Live heap allocated since attach: {} in {} blocks",
            bytes(r.heap.live_bytes),
            r.heap.live_allocations
        );
    } else {
        let _ = writeln!(
            o,
            "Live heap allocated since attach (estimated, sampling every {} on average): {} ± {} (95%) in ~{} blocks",
            bytes(r.heap.sample_rate_bytes),
            bytes(r.heap.live_bytes),
            bytes(r.heap.live_bytes_error95),
            r.heap.live_allocations
        );
    }
    if let Some(d) = &r.heap.duty_cycle {
        let cost = d.cost_when_attached_pct.map_or(String::new(), |c| {
            format!(", costing {c:.0}% of the target's CPU time while attached")
        });
        let frees = if d.frees_always_attached {
            "The frees' probes stayed attached, so a recorded block counts until it is freed."
        } else {
            "The frees' probes, too costly to keep, came and went with the windows: a block freed between windows counts until its address is handed out again in a window or its memory is unmapped, so the estimates lean high."
        };
        let _ = writeln!(
            o,
            "Sampled mode: the allocation probes were attached {:.1}% of the time ({} windows at random moments{cost}; budget {:.0}%), so no allocation outside a window trapped; each recorded block stands for those of the time they were not. {frees}",
            d.attached_share * 100.0,
            d.windows,
            d.budget_pct
        );
    }
    let _ = writeln!(
        o,
        "Anonymous mappings since attach: {}    brk heap: {} ({} grown since attach)",
        bytes(r.mappings.anon_mapped_bytes),
        bytes(r.mappings.brk_bytes),
        bytes(r.mappings.brk_grown_bytes)
    );
    let sp = &r.mappings.split;
    if sp.arenas > 0 || sp.allocator_chunk_bytes > 0 {
        let _ = writeln!(
            o,
            "  of which by the allocator: {} arena heaps ({} committed of {} reserved), {} in directly mapped chunks; other anonymous: {}",
            sp.arenas,
            bytes(sp.arena_committed_bytes),
            bytes(sp.arena_reserved_bytes),
            bytes(sp.allocator_chunk_bytes),
            bytes(sp.other_anon_bytes)
        );
    }
    let a = &r.activity;
    let sampled = if r.heap.sample_rate_bytes == 0 {
        ""
    } else {
        "sampled "
    };
    let _ = writeln!(
        o,
        "Activity: {} {sampled}allocations ({}), {} {sampled}frees, {} mmap, {} munmap, {} mremap, {} brk",
        a.allocs,
        bytes(a.alloc_bytes),
        a.frees,
        a.mmaps,
        a.munmaps,
        a.mremaps,
        a.brks
    );
    render_allocators(&mut o, &r.allocator);
    for e in &r.execs {
        let _ = writeln!(
            o,
            "Exec'd {} at {:.1} s: the books restart there (the old program's blocks and mappings went with it); what follows is the new program's.",
            e.program, e.at_s
        );
    }
    {
        let st = &r.stacks;
        let tables = st.tables.as_ref().map_or(String::new(), |t| {
            let mut x = format!(
                " from the unwind tables of {} objects ({} rows, {} KiB, built in {:.0} ms)",
                t.objects,
                t.rows,
                t.table_bytes / 1024,
                t.build_ms
            );
            if !t.without_tables.is_empty() {
                x.push_str(&format!(
                    "; frame pointers in {} mappings without tables",
                    t.without_tables.len()
                ));
            }
            if !t.loaded_after_attach.is_empty() {
                x.push_str(&format!(
                    "; loaded after attach: {}",
                    t.loaded_after_attach.join(", ")
                ));
            }
            x
        });
        if st.unwinder != Unwinder::Off {
            let how = if st.unwinder == Unwinder::Cfi {
                "CFI"
            } else {
                "frame pointers"
            };
            // A share of nothing is no figure.
            if st.complete_stacks + st.truncated_stacks == 0 {
                let _ = writeln!(
                    o,
                    "Stacks: unwound with {how}{tables}. No live heap block allocated since attach has a stack yet."
                );
            } else {
                let _ = writeln!(
                    o,
                    "Stacks: unwound with {how}{tables}. {:.1}% of live heap bytes sit on stacks that reach their outermost frame ({} complete, {} truncated).",
                    st.complete_pct, st.complete_stacks, st.truncated_stacks
                );
            }
        }
    }
    if let Some(p) = &r.python {
        match &p.unavailable {
            None => {
                let _ = writeln!(
                    o,
                    "CPython {} ({}): Python frames on. {}",
                    p.version,
                    printable(&p.object),
                    p.note
                );
                if p.frames_replaced > 0 {
                    let _ = writeln!(
                        o,
                        "{} Python frames are unnamed: their code object was freed, and another made at its address, before leaktrace read it.",
                        p.frames_replaced
                    );
                }
            }
            Some(why) => {
                let _ = writeln!(
                    o,
                    "CPython {} ({}): no Python frames: {why}. {}",
                    p.version,
                    printable(&p.object),
                    p.note
                );
            }
        }
    }
    o.push('\n');
    render_verdict(&mut o, &r.verdict, shown);
    o.push('\n');
    let memory = crate::analysis::memory::render(&r.memory);
    if !memory.is_empty() {
        o.push_str(&memory);
        o.push('\n');
    }
    render_heap_stacks(&mut o, &r.heap, shown);
    if !r.mappings.stacks.is_empty() {
        o.push('\n');
        let _ = writeln!(
            o,
            "Top {} stacks by mapped bytes (anonymous mmap, brk):",
            r.mappings.stacks.len()
        );
        for (n, s) in r.mappings.stacks.iter().enumerate() {
            let _ = writeln!(
                o,
                "  #{} {} mapped, oldest {:.1} s",
                n + 1,
                bytes(s.mapped_bytes),
                s.oldest_age_s
            );
            write_frames(&mut o, s.stack_id, &s.frames, s.truncated, shown);
        }
    }
    render_unnamed(&mut o, &r.stacks.unnamed_objects);
    render_allocator(&mut o, &r.allocator);
    if let Some(c) = &r.census {
        render_census(&mut o, c);
    }
    if let Some(a) = &r.reachability {
        render_reachability(&mut o, a);
    }
    if let Some(p) = &r.python {
        render_python_gc(&mut o, p);
    }
    if let Some(d) = &r.heap_detached {
        let _ = writeln!(
            o,
            "\nHEAP PROBES DETACHED after {:.1} s: {}. Heap figures are as of then; mappings are still traced.",
            d.after_s, d.reason
        );
    }
    if let Some(ov) = &r.overhead {
        let calls: f64 = ov.calls_per_s.values().sum();
        let traps = ov.traps.map_or(String::new(), |t| {
            format!(
                "; a trap costs {:.2} µs here on an emulated instruction, {:.2} µs single-stepped, {:.2} µs more for a return probe{}",
                t.emulated_us,
                t.single_stepped_us,
                t.return_us,
                if t.measured {
                    " (measured at startup)"
                } else {
                    " (not measured here: the development VM's figures)"
                }
            )
        });
        let bpf = ov.bpf_us_per_call.map_or(String::new(), |u| {
            format!(", plus {u:.2} µs of BPF work per call (the kernel's statistics)")
        });
        if r.heap.not_traced.is_some() {
            let _ = writeln!(
                o,
                "\nProbe cost: no allocator probes (the heap was not traced); the brk and mapping tracepoints cost little{traps}."
            );
        } else if calls < 0.5 {
            let _ = writeln!(
                o,
                "\nProbe cost: none to speak of — the target made no allocator calls while traced{traps}."
            );
        } else {
            let _ = writeln!(
                o,
                "\nProbe cost: {:.1}% of the target's own CPU time at {:.0} allocator calls/s (a CPU-bound target keeps about {:.2} of its untraced speed){traps}{bpf}.",
                ov.projected_pct,
                calls,
                crate::probes::cost::throughput_share(ov.projected_pct)
            );
        }
    }
    o.push('\n');
    let nonzero: Vec<String> = r
        .lost
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if nonzero.is_empty() {
        o.push_str("Losses: none — every event was accounted.\n");
    } else {
        let _ = writeln!(
            o,
            "LOSSES: {} — this report is built on incomplete data ({} events or stacks lost).",
            nonzero.join(", "),
            r.lost_total
        );
    }
    let c = &r.counters;
    let _ = writeln!(
        o,
        "Not losses: {} frees of blocks not allocated since attach, {} reallocs of such blocks, {} returns of calls begun before the probes were attached, {} failed allocations, {} nested allocator calls, {} truncated stacks.",
        c.get("free_unknown").unwrap_or(&0),
        c.get("realloc_unknown").unwrap_or(&0),
        c.get("return_without_entry").unwrap_or(&0),
        c.get("failed_allocs").unwrap_or(&0),
        c.get("nested_call").unwrap_or(&0),
        c.get("stack_truncated").unwrap_or(&0)
    );
    if let Some(f) = &r.follow {
        render_followed(&mut o, r.pid, f, shown);
    }
    o
}

/// `--follow-forks`: a section per followed descendant, then the family's totals.
fn render_followed(o: &mut String, root: u32, f: &Followed, shown: Frames) {
    // Processes that did nothing worth a section (no heap or address-space activity
    // and no growth) get one line each, after the others.
    let quiet = |p: &FollowedProcess| {
        let a = &p.activity;
        a.allocs + a.frees + a.mmaps + a.munmaps + a.mremaps + a.brks == 0
            && matches!(
                p.verdict.kind,
                crate::analysis::verdict::VerdictKind::NoGrowth
                    | crate::analysis::verdict::VerdictKind::Inconclusive
            )
    };
    for p in f.processes.iter().filter(|p| !quiet(p)) {
        let how = if p.forked_while_traced {
            format!("forked by {} at {:.1} s", p.parent, p.since_s)
        } else {
            format!("child of {}, found at attach", p.parent)
        };
        let _ = writeln!(
            o,
            "\n=== pid {} ({how}): {} — followed {:.1} s{} ===",
            p.pid,
            p.command,
            p.followed_s,
            p.ended
                .as_deref()
                .map_or(String::new(), |e| format!(", then {e}"))
        );
        let _ = writeln!(
            o,
            "RSS {} (anon {}){}",
            bytes(p.rss.rss_bytes),
            bytes(p.rss.anon_bytes),
            if p.ended.is_some() {
                ", as last read"
            } else {
                ""
            }
        );
        if let Some(e) = &p.attach_error {
            let _ = writeln!(o, "Heap not traced: {e}.");
        } else {
            let _ = writeln!(
                o,
                "Live heap allocated since followed: {} in {} blocks",
                bytes(p.heap.live_bytes),
                p.heap.live_allocations
            );
        }
        let a = &p.activity;
        let _ = writeln!(
            o,
            "Activity: {} allocations ({}), {} frees, {} mmap, {} munmap, {} brk",
            a.allocs,
            bytes(a.alloc_bytes),
            a.frees,
            a.mmaps,
            a.munmaps,
            a.brks
        );
        if !p.lost.is_empty() {
            let what: Vec<String> = p.lost.iter().map(|(k, v)| format!("{v} {k}")).collect();
            let _ = writeln!(
                o,
                "Losses in its books: {} (counted in the report's losses)",
                what.join(", ")
            );
        }
        render_verdict(o, &p.verdict, shown);
        o.push('\n');
        render_heap_stacks(o, &p.heap, shown);
    }
    let quiet: Vec<&FollowedProcess> = f.processes.iter().filter(|p| quiet(p)).collect();
    if !quiet.is_empty() {
        let _ = writeln!(o, "\nFollowed, without heap or mapping activity:");
        for p in quiet {
            let state = match (&p.ended, &p.attach_error) {
                (Some(e), Some(why)) => format!("{e}; {why}"),
                (Some(e), None) => e.clone(),
                (None, _) => format!(
                    "RSS {} (anon {}), {}",
                    bytes(p.rss.rss_bytes),
                    bytes(p.rss.anon_bytes),
                    p.verdict.kind.as_str().to_uppercase()
                ),
            };
            let _ = writeln!(
                o,
                "  pid {} ({} {}): {} — {state}",
                p.pid,
                if p.forked_while_traced {
                    "forked by"
                } else {
                    "child of"
                },
                p.parent,
                if p.command.is_empty() {
                    "?"
                } else {
                    &p.command
                }
            );
        }
    }
    for n in &f.not_followed {
        let _ = writeln!(
            o,
            "\nNot followed: pid {}, a descendant running another program ({}).",
            n.pid, n.program
        );
    }
    let t = &f.totals;
    let _ = writeln!(
        o,
        "\nFamily of pid {root}: {} processes ({} alive); live heap allocated while traced {} in {} blocks; RSS {} (anon {}) summed over the live ones, pages shared between a parent and its forked children counted in each.",
        t.processes,
        t.alive,
        bytes(t.live_bytes),
        t.live_allocations,
        bytes(t.rss_bytes),
        bytes(t.anon_rss_bytes)
    );
}
