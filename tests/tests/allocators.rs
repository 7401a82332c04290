//! Allocators other than glibc's: Rust programs linking jemalloc or mimalloc
//! statically, and a Go program (Debian's prometheus). (Preloaded jemalloc, tcmalloc
//! and mimalloc run the C scenarios in heap.rs.)

use std::io::{BufRead as _, BufReader};

use leaktrace_tests::{
    Fixture, Tracer, check_shape, functions, require_root, temp_path, trace_fixture,
};

/// What the Rust fixtures leave outstanding, per function (see
/// tests/src/alloc_fixtures/scenarios.rs): (function, bytes, blocks).
const RUST_LEAKS: &[(&str, u64, u64)] = &[
    ("leak_small", 500, 5),
    ("leak_aligned", 1000, 1),
    ("leak_zeroed", 900, 3),
    // Grown 80 → 8000 and shrunk 4000 → 40: two stacks.
    ("leak_reallocated", 8040, 2),
    ("leak_page_aligned", 3 * 4096, 1),
];

/// Live bytes and blocks of the heap stacks through a Rust function (named with its
/// module path, `alloc_rjem::scenarios::leak_small`).
fn through(r: &serde_json::Value, function: &str) -> (u64, u64) {
    let suffix = format!("::{function}");
    r["heap"]["stacks"]
        .as_array()
        .expect("stacks")
        .iter()
        .filter(|s| functions(s).iter().any(|f| f.ends_with(&suffix)))
        .fold((0, 0), |(b, n), s| {
            (
                b + s["live_bytes"].as_u64().unwrap(),
                n + s["live_allocations"].as_u64().unwrap(),
            )
        })
}

/// Rust programs with jemalloc (tikv-jemallocator: `_rjem_malloc`, `_rjem_mallocx`,
/// `_rjem_sdallocx`…) or mimalloc (`mi_malloc_aligned`, `mi_free`…) linked into the
/// executable, which exports none of them: the family's functions are found in its
/// symbol table and probed, the bytes per function are exact, churn with sized frees
/// leaves nothing, and the report names the allocator beside glibc's malloc.
#[test]
fn root_rust_static_allocators_exact() {
    require_root();
    for (bin, name, prefix, probes) in [
        (
            env!("CARGO_BIN_EXE_alloc_rjem"),
            "jemalloc",
            "_rjem_",
            &[
                "_rjem_malloc",
                "_rjem_mallocx",
                "_rjem_sdallocx",
                "_rjem_calloc",
                "_rjem_realloc",
            ][..],
        ),
        (
            env!("CARGO_BIN_EXE_alloc_mimalloc"),
            "mimalloc",
            "mi_",
            &[
                "mi_malloc_aligned",
                "mi_zalloc_aligned",
                "mi_realloc_aligned",
                "mi_free",
            ][..],
        ),
    ] {
        let mut fx = Fixture::spawn_program(std::path::Path::new(bin), &[], &[]);
        let r = trace_fixture(&mut fx, &[]);
        let placed: Vec<&str> = r["probes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["object"] == bin)
            .map(|p| p["function"].as_str().unwrap())
            .collect();
        for p in probes {
            assert!(placed.contains(p), "{name}: no probe on {p}: {placed:?}");
        }
        for &(function, bytes, blocks) in RUST_LEAKS {
            assert_eq!(through(&r, function), (bytes, blocks), "{name}: {function}");
        }
        assert_eq!(
            through(&r, "churn"),
            (0, 0),
            "{name}: churn frees everything"
        );
        let total: u64 = RUST_LEAKS.iter().map(|l| l.1).sum();
        assert_eq!(
            r["heap"]["live_bytes"], total,
            "{name}: nothing else outstanding"
        );
        assert_eq!(r["lost_total"], 0, "{name}: {}", r["lost"]);
        let found = r["allocator"]["found"].as_array().unwrap();
        let it = found
            .iter()
            .find(|f| f["allocator"] == name)
            .unwrap_or_else(|| panic!("{name} not named: {found:#?}"));
        assert_eq!(it["object"], bin);
        assert_eq!(it["prefix"], prefix);
        assert_eq!(
            it["serves_malloc"], false,
            "the C library still serves malloc"
        );
        assert!(
            found
                .iter()
                .any(|f| f["allocator"] == "glibc" && f["serves_malloc"] == true),
            "{found:#?}"
        );
        // glibc serves the C code's malloc: its heap is still walked.
        assert!(!r["allocator"]["glibc_heaps"].is_null());
        assert!(fx.alive());
    }
}

/// A process's RssAnon, MiB.
fn rss_anon(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().strip_suffix(" kB"))
        .and_then(|v| v.trim().parse().ok())
        .expect("RssAnon");
    kb / 1024.0
}

/// Resident anonymous bytes of the mappings in Go's arena space, from smaps.
fn go_arena_resident(pid: u32) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("smaps");
    let (mut total, mut in_arena) = (0, false);
    for line in smaps.lines() {
        if let Some((range, rest)) = line.split_once(' ')
            && let Some((start, _)) = range.split_once('-')
            && let Ok(start) = u64::from_str_radix(start, 16)
            && rest.split_whitespace().count() >= 4
        {
            in_arena = leaktrace::analysis::memory::in_go_arena_space(start)
                && rest.split_whitespace().nth(4).is_none();
        } else if in_arena && let Some(kb) = line.strip_prefix("Anonymous:") {
            total += kb
                .trim()
                .trim_end_matches(" kB")
                .trim()
                .parse::<u64>()
                .unwrap()
                << 10;
        }
    }
    total
}

/// Debian's prometheus, a Go program: the report says Go's heap is not traced and
/// what is, names the Go version, and counts Go's arenas under where RSS goes, as
/// smaps counts them beside it.
#[test]
fn root_go_program_says_what_is_traced() {
    require_root();
    let prometheus = std::path::Path::new("/usr/bin/prometheus");
    assert!(
        prometheus.exists(),
        "prometheus is missing (cargo xtask setup installs it)"
    );
    let dir = temp_path("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(&config, "global:\n  scrape_interval: 1h\n").unwrap();
    /// Kills the server however the test ends.
    struct Server(std::process::Child);
    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = std::process::Command::new(prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg("--web.listen-address=127.0.0.1:0")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map(Server)
        .expect("start prometheus");
    let mut log = BufReader::new(child.0.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("Server is ready to receive web requests") {
        line.clear();
        assert!(
            log.read_line(&mut line).unwrap() > 0,
            "prometheus exited before ready"
        );
    }
    // Keep draining its log so it never blocks on a full pipe.
    std::thread::spawn(move || std::io::copy(&mut log, &mut std::io::sink()));
    let pid = child.0.id();
    let mut t = Tracer::start(&["--pid", &pid.to_string(), "-d", "2"]);
    t.wait_stderr("leaktrace: tracing pid");
    let r = t.finish();
    let resident = go_arena_resident(pid);
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
    check_shape(&r);
    let found = r["allocator"]["found"].as_array().unwrap();
    let go = found
        .iter()
        .find(|f| f["allocator"] == "go")
        .unwrap_or_else(|| panic!("Go not detected: {found:#?}"));
    let version = go["version"]
        .as_str()
        .expect("Go version from .go.buildinfo");
    assert!(version.starts_with("go1."), "{version}");
    assert_eq!(go["object"], "/usr/bin/prometheus");
    let notes = r["allocator"]["notes"].to_string();
    assert!(
        notes.contains("Go runtime's heap is its own") && notes.contains("not traced"),
        "{notes}"
    );
    let go_heap: u64 = r["memory"]["parts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["kind"] == "go-heap")
        .map(|p| p["bytes"].as_u64().unwrap())
        .sum();
    assert!(go_heap > 1 << 20, "Go's heap is counted: {:#}", r["memory"]);
    assert!(
        go_heap.abs_diff(resident) <= 512 << 10,
        "go-heap {go_heap} B vs smaps {resident} B"
    );
    // No glibc heap is made of Go's arenas.
    for a in r["allocator"]["glibc_heaps"]["arenas"].as_array().unwrap() {
        for h in a["heaps"].as_array().unwrap() {
            let h = u64::from_str_radix(h.as_str().unwrap().trim_start_matches("0x"), 16).unwrap();
            assert!(!leaktrace::analysis::memory::in_go_arena_space(h), "{a:#}");
        }
    }
}

/// The Rust fixtures' fragmenting variant: four threads fill 24 MiB each and free all
/// but every 256th block. The C library still serves malloc, but the Rust heap is the
/// linked allocator's: the verdict is fragmentation, named after it, with the remedy
/// its build reads (tikv-jemallocator's `_RJEM_MALLOC_CONF`).
#[test]
fn root_rust_static_allocators_fragmenting() {
    require_root();
    for (bin, name, remedy) in [
        (
            env!("CARGO_BIN_EXE_alloc_rjem"),
            "jemalloc",
            "_RJEM_MALLOC_CONF=background_thread:true",
        ),
        // Its `mi_version` is not linked in, so its version is unknown: both settings named.
        (
            env!("CARGO_BIN_EXE_alloc_mimalloc"),
            "mimalloc",
            "MIMALLOC_PURGE_DELAY=0",
        ),
    ] {
        let mut fx = Fixture::spawn_program(std::path::Path::new(bin), &["fragment"], &[]);
        let before = rss_anon(fx.pid);
        let r = trace_fixture(&mut fx, &[]);
        let grew = rss_anon(fx.pid) - before;
        let v = &r["verdict"];
        eprintln!("{name}: {} — {}", v["kind"], v["summary"]);
        assert_eq!(v["kind"], "fragmentation", "{name}: {v:#}");
        let summary = v["summary"].as_str().unwrap();
        assert!(summary.contains(&format!("{name} ")), "{summary}");
        let top = &v["remedies"][0];
        let action = top["action"].as_str().unwrap();
        assert!(action.contains(remedy), "{name}: {top:#}");
        // Four threads freed 4 × 23.9 MiB, which the allocator keeps (mimalloc commits
        // it in the 1 GiB arena it reserved before attach, with no mapping to see): what
        // is said to be kept, read from the allocator's own state, is the fixture's
        // RssAnon growth, read beside the trace, less the live blocks and the threads'
        // stacks.
        // mimalloc's own pages are read: it keeps freed blocks inside pages and free
        // slices, of which purging (the remedy) returns the slices.
        let m = &r["allocator"]["state"]["mimalloc"][0];
        let held = if m.is_null() {
            top["expected_bytes"].as_f64().unwrap()
        } else {
            assert_eq!(top["expected_bytes"], m["purgeable_bytes"], "{m:#}");
            (m["page_free_bytes"].as_u64().unwrap() + m["free_resident_bytes"].as_u64().unwrap())
                as f64
        } / (1 << 20) as f64;
        eprintln!("{name}: said to keep {held:.1} MiB; RssAnon grew {grew:.1} MiB");
        assert!(
            held >= 50.0 && held <= grew + 1.0 && held >= 0.9 * grew - 2.0,
            "{name}: {held:.1} MiB kept, RssAnon grew {grew:.1} MiB: {top:#}"
        );
    }
}

/// jemalloc's own state, read from its arenas through the layout in the fixture's
/// debug information, before any growth while traced: the fixture fragments, then
/// leaktrace attaches. Its pages must be jemalloc's own counts (`mallctl`'s
/// `stats.arenas.<all>.{pactive,pdirty,pmuzzy}`, printed by the fixture after the
/// trace) exactly, the dirty pages the fixture's RssAnon growth, and the verdict
/// fragmentation, with jemalloc's remedy for the bytes it keeps. Twice: the fixture as
/// built, and a copy without its debug information (what a release build keeps: the
/// symbols) whose debug file is found by build id in a --debug-dir (where a
/// distribution's -dbgsym package puts it).
#[test]
fn root_jemalloc_state_read_before_growth() {
    require_root();
    let built = std::path::PathBuf::from(env!("CARGO_BIN_EXE_alloc_rjem"));
    check_jemalloc_state(&built, &[]);

    let dir = temp_path("debug-dir");
    let id = build_id(&built);
    let by_id = dir.join(".build-id").join(&id[..2]);
    std::fs::create_dir_all(&by_id).expect("debug dir");
    let stripped = dir.join("alloc_rjem");
    let run = |cmd: &mut std::process::Command| {
        let st = cmd.status().expect("binutils");
        assert!(st.success(), "{cmd:?}");
    };
    run(std::process::Command::new("objcopy")
        .arg("--only-keep-debug")
        .arg(&built)
        .arg(by_id.join(format!("{}.debug", &id[2..]))));
    run(std::process::Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&stripped)
        .arg(&built));
    let dir_arg = dir.to_str().unwrap().to_owned();
    check_jemalloc_state(&stripped, &["--debug-dir", &dir_arg]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// An ELF file's GNU build id, hex, as readelf prints it.
fn build_id(path: &std::path::Path) -> String {
    let out = std::process::Command::new("readelf")
        .arg("-n")
        .arg(path)
        .output()
        .expect("readelf");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: ").map(str::to_owned))
        .expect("a build id")
}

fn check_jemalloc_state(program: &std::path::Path, tracer_args: &[&str]) {
    let mut fx = Fixture::spawn_program(program, &["fragment"], &[]);
    let before = rss_anon(fx.pid);
    fx.run_scenario();
    let grew = rss_anon(fx.pid) - before;
    let (r, counts) = report_then_counts(&mut fx, tracer_args);
    let pages: Vec<u64> = counts
        .split_whitespace()
        .skip(1)
        .step_by(2)
        .map(|n| n.parse().expect("a count"))
        .collect();
    let state = &r["allocator"]["state"];
    let j = &state["jemalloc"][0];
    eprintln!("{}: mallctl: {counts}; leaktrace: {j:#}", program.display());
    assert_eq!(state["jemalloc"].as_array().unwrap().len(), 1, "{state:#}");
    assert!(
        j["object"].as_str().unwrap().ends_with("/alloc_rjem"),
        "{j:#}"
    );
    assert_eq!(j["page_bytes"], 4096);
    for (field, want) in ["active_bytes", "dirty_bytes", "muzzy_bytes"]
        .iter()
        .zip(&pages)
    {
        assert_eq!(j[field].as_u64().unwrap(), want * 4096, "{field}: {counts}");
    }
    // 1530 of 1536 blocks of 16 KiB per thread, each in a 20 KiB extent (jemalloc
    // offsets large blocks within an extra page), written: about 119.5 MiB.
    let kept = (j["dirty_bytes"].as_u64().unwrap() + j["muzzy_bytes"].as_u64().unwrap()) as f64
        / (1 << 20) as f64;
    eprintln!("jemalloc keeps {kept:.1} MiB; RssAnon grew {grew:.1} MiB");
    assert!(
        kept >= 0.9 * grew - 2.0 && kept <= grew + 1.0,
        "{kept:.1} vs {grew:.1}"
    );
    let v = &r["verdict"];
    assert_eq!(v["kind"], "fragmentation", "{v:#}");
    let top = &v["remedies"][0];
    assert!(
        top["action"]
            .as_str()
            .unwrap()
            .starts_with("_RJEM_MALLOC_CONF=background_thread:true"),
        "{top:#}"
    );
    assert_eq!(
        top["expected_bytes"].as_u64().unwrap(),
        j["dirty_bytes"].as_u64().unwrap() + j["muzzy_bytes"].as_u64().unwrap()
    );
    // Where RSS goes: jemalloc's freed pages, capped by the anonymous memory there is.
    let parts = r["memory"]["parts"].as_array().unwrap();
    let free: u64 = parts
        .iter()
        .filter(|p| p["kind"] == "allocator-free")
        .map(|p| p["bytes"].as_u64().unwrap())
        .sum();
    assert!(
        free as f64 >= 0.95 * kept * (1 << 20) as f64,
        "allocator-free {free}: {parts:#?}"
    );
    assert!(
        r["allocator"]["notes"][0]
            .as_str()
            .unwrap()
            .ends_with("its own state is read from its arenas"),
        "{:#}",
        r["allocator"]["notes"]
    );
}

/// mimalloc 3's own state (the mimalloc crate's, linked into a Rust program with its
/// debug information), read from its arenas and pages before any growth while traced:
/// the fixture fragments, then leaktrace attaches. Blocks in use, freed blocks inside
/// pages and the page count must be mimalloc's own view of its pages
/// (`mi_heap_visit_blocks`, summed by the fixture after the trace) exactly; the free
/// slices it says are not purged must be what `mi_collect(true)` then returns
/// (RssAnon's drop); and the verdict is fragmentation, with mimalloc 3's remedy for
/// those bytes.
#[test]
fn root_mimalloc_state_read_before_growth() {
    require_root();
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_alloc_mimalloc"));
    let mut fx = Fixture::spawn_program(bin, &["fragment"], &[]);
    fx.run_scenario();
    let (r, counts) = report_then_counts(&mut fx, &[]);
    let own: Vec<u64> = counts
        .split_whitespace()
        .skip(1)
        .step_by(2)
        .map(|n| n.parse().expect("a count"))
        .collect();
    let state = &r["allocator"]["state"];
    assert_eq!(state["mimalloc"].as_array().unwrap().len(), 1, "{state:#}");
    let m = &state["mimalloc"][0];
    eprintln!("mimalloc's own view: {counts}; leaktrace: {m:#}");
    assert_eq!(m["object"], bin.to_str().unwrap());
    assert_eq!(m["slice_bytes"], 65536);
    for (field, want) in ["in_use_bytes", "page_free_bytes", "pages"]
        .iter()
        .zip(&own)
    {
        assert_eq!(m[field].as_u64().unwrap(), *want, "{field}: {counts}");
    }
    assert_eq!(m["unreadable_pages"], 0);
    assert_eq!(m["unreadable_arenas"], 0);
    // Four threads freed all but 6 of 1536 blocks of 16 KiB each: most pages emptied
    // and went back to the arena as free slices, unpurged (the threads are parked).
    let free_slices = m["free_resident_bytes"].as_u64().unwrap();
    assert_eq!(m["purgeable_bytes"], free_slices, "not pinned: {m:#}");
    assert!(free_slices > 40 << 20, "{m:#}");
    released(
        &mut fx,
        "mi_collect",
        free_slices,
        0.95,
        "free slices not purged",
    );
    let kept = m["page_free_bytes"].as_u64().unwrap() + free_slices;
    check_state_verdict(
        &r,
        "MIMALLOC_PURGE_DELAY=0 (mimalloc 3",
        free_slices,
        kept,
        own[0],
    );
    let notes = r["allocator"]["notes"].to_string();
    assert!(notes.contains("its own state is read"), "{notes}");
}

/// gperftools 2.10's tcmalloc built with its debug information from Debian's source
/// (`cargo xtask setup` builds it), preloaded: its state read from its page heap and
/// caches must be its own figures (MallocExtension's numeric properties, printed by
/// the fixture after the trace) exactly; the free spans it is said to keep what
/// `ReleaseFreeMemory` then returns; the verdict fragmentation from before attach,
/// with gperftools' remedy for those spans.
#[test]
fn root_tcmalloc_state_read_before_growth() {
    require_root();
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let lib = format!("{home}/.cache/leaktrace/gperftools-2.10/libtcmalloc_minimal.so");
    assert!(
        std::path::Path::new(&lib).exists(),
        "{lib} is missing (cargo xtask setup builds it)"
    );
    let mut fx =
        Fixture::spawn_with_env("verdicts", &["prefragmented", "5"], &[("LD_PRELOAD", &lib)]);
    fx.run_scenario();
    let (r, counts) = report_then_counts(&mut fx, &[]);
    let own = named_counts(&counts);
    let state = &r["allocator"]["state"];
    assert_eq!(state["tcmalloc"].as_array().unwrap().len(), 1, "{state:#}");
    let t = &state["tcmalloc"][0];
    eprintln!("tcmalloc's own figures: {counts}; leaktrace: {t:#}");
    assert_eq!(t["object"], lib.as_str());
    for (field, theirs) in [
        ("system_bytes", "heap"),
        ("page_heap_free_bytes", "free"),
        ("unmapped_bytes", "unmapped"),
        ("central_cache_bytes", "central"),
        ("transfer_cache_bytes", "transfer"),
        ("thread_cache_bytes", "thread"),
        ("in_use_bytes", "allocated"),
    ] {
        assert_eq!(t[field].as_u64().unwrap(), own[theirs], "{field}: {counts}");
    }
    // Four threads' 24 MiB each, all but survivors freed: most of it in free spans.
    let spans = t["page_heap_free_bytes"].as_u64().unwrap();
    assert!(spans > 40 << 20, "{t:#}");
    released(&mut fx, "gperftools-release", spans, 0.85, "free spans");
    let kept = spans
        + t["thread_cache_bytes"].as_u64().unwrap()
        + t["central_cache_bytes"].as_u64().unwrap()
        + t["transfer_cache_bytes"].as_u64().unwrap();
    check_state_verdict(
        &r,
        "TCMALLOC_RELEASE_RATE=10",
        spans,
        kept,
        own["allocated"],
    );
    let parts = r["memory"]["parts"].as_array().unwrap();
    let unwalked: u64 = parts
        .iter()
        .filter(|p| p["kind"] == "heap-unwalked")
        .map(|p| p["bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(unwalked, 0, "its brk heap is its own: {parts:#?}");
    let notes = r["allocator"]["notes"].to_string();
    assert!(notes.contains("its own state is read"), "{notes}");
}

/// Traces a fixture whose scenario has run (its heap fragmented before attach) for
/// 2 s, then asks it for its allocator's own counts: the report, and its counts line.
#[track_caller]
fn report_then_counts(fx: &mut Fixture, tracer_args: &[&str]) -> (serde_json::Value, String) {
    let pid = fx.pid.to_string();
    let mut args = vec!["--pid", &pid, "-d", "2"];
    args.extend_from_slice(tracer_args);
    let mut tracer = Tracer::start(&args);
    let r = tracer.wait_report(0);
    check_shape(&r);
    fx.send("counts");
    (r, fx.read_line())
}

/// A counts line `name N name N …` by name.
fn named_counts(line: &str) -> std::collections::HashMap<&str, u64> {
    line.split_whitespace()
        .collect::<Vec<_>>()
        .chunks(2)
        .map(|kv| (kv[0], kv[1].parse().expect("a count")))
        .collect()
}

/// Asks the fixture to make its allocator release free memory (`release`, done by
/// `how`): what its RssAnon dropped by must be what leaktrace said (`said` bytes of
/// `what`), at least `least` of it and at most 5% (and a MiB) more.
#[track_caller]
fn released(fx: &mut Fixture, how: &str, said: u64, least: f64, what: &str) {
    fx.send("release");
    let line = fx.read_line();
    let words: Vec<&str> = line.split(' ').collect();
    assert_eq!((words[0], words[3]), ("released", how), "{line}");
    let returned = (words[1].parse::<u64>().unwrap() - words[2].parse::<u64>().unwrap()) * 1024;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    eprintln!(
        "leaktrace: {:.1} MiB of {what}; {how} returned {:.1} MiB",
        mib(said),
        mib(returned)
    );
    assert!(
        returned as f64 >= least * said as f64
            && returned as f64 <= 1.05 * said as f64 + (1 << 20) as f64,
        "{what}: {said} said vs {returned} returned"
    );
}

/// A report whose allocator state was read: the verdict is fragmentation with the
/// allocator's remedy first, expecting `expected` bytes; "where RSS goes" puts `kept`
/// under allocator-free and `in_use` under allocator-in-use.
#[track_caller]
fn check_state_verdict(r: &serde_json::Value, remedy: &str, expected: u64, kept: u64, in_use: u64) {
    let v = &r["verdict"];
    assert_eq!(v["kind"], "fragmentation", "{v:#}");
    let top = &v["remedies"][0];
    assert!(
        top["action"].as_str().unwrap().starts_with(remedy),
        "{top:#}"
    );
    assert_eq!(top["expected_bytes"].as_u64().unwrap(), expected);
    let parts = r["memory"]["parts"].as_array().unwrap();
    let sum = |kind: &str| -> u64 {
        parts
            .iter()
            .filter(|p| p["kind"] == kind)
            .map(|p| p["bytes"].as_u64().unwrap())
            .sum()
    };
    assert_eq!(sum("allocator-free"), kept, "{parts:#?}");
    assert_eq!(sum("allocator-in-use"), in_use, "{parts:#?}");
}

/// A Go program built with its symbols and debug information (tests/fixtures/go_heap.go):
/// the runtime's heap statistics, read from outside, must be what the program's own
/// `runtime.ReadMemStats` says after the trace: its spans exactly, its live bytes up
/// to what the per-P caches it flushes first account; and "where RSS goes" splits
/// Go's arena space with them.
#[test]
fn root_go_runtime_statistics_read() {
    require_root();
    let mut fx = Fixture::spawn("go_heap", &[]);
    fx.run_scenario();
    let (r, counts) = report_then_counts(&mut fx, &[]);
    let own = named_counts(&counts);
    let h = &r["allocator"]["state"]["go"];
    eprintln!("ReadMemStats: {counts}; leaktrace: {h:#}");
    assert!(h["object"].as_str().unwrap().ends_with("/go_heap"), "{h:#}");
    let field = |k: &str| h[k].as_u64().unwrap_or_else(|| panic!("{k}: {h:#}"));
    assert_eq!(field("in_use_bytes"), own["HeapInuse"]);
    // ReadMemStats first flushes each P's cached spans, which moves HeapAlloc by what
    // those spans account (a few size classes' spans); read from outside, nothing is
    // flushed.
    assert!(
        field("alloc_bytes").abs_diff(own["HeapAlloc"]) < 64 << 10,
        "{h:#} vs {counts}"
    );
    assert_eq!(field("released_bytes"), own["HeapReleased"]);
    assert_eq!(field("free_bytes"), own["HeapIdle"] - own["HeapReleased"]);
    // 4096 blocks of 10 KiB are kept: 40 MiB live, give or take the runtime's own.
    assert!(
        (40 << 20..42 << 20).contains(&field("alloc_bytes")),
        "{h:#}"
    );
    let parts = r["memory"]["parts"].as_array().unwrap();
    let go_in_use = parts
        .iter()
        .find(|p| {
            p["kind"] == "allocator-in-use"
                && p["detail"].as_str().unwrap().starts_with("Go runtime")
        })
        .unwrap_or_else(|| panic!("{parts:#?}"));
    assert!(
        go_in_use["bytes"].as_u64().unwrap() >= 40 << 20,
        "{go_in_use:#}"
    );
    let notes = r["allocator"]["notes"][0].as_str().unwrap();
    assert!(
        notes.contains("The runtime's own heap statistics are read from outside"),
        "{notes}"
    );
}
