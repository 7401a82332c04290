//! Native call stacks on code built without frame pointers: unwound with the
//! objects' CFI tables, each fixture must give its full chain to `main` or the
//! thread start. Each test prints the share of live heap bytes whose stacks reach
//! `main`/`Py_BytesMain` or a thread start.

use leaktrace_tests::{
    Fixture, Tracer, check_shape, fixture_path, functions, require_root, script_path, trace_fixture,
};
use serde_json::Value;
use std::io::Write as _;

/// Every heap stack of the report (asked for with a large --top).
fn heap_stacks(r: &Value) -> &Vec<Value> {
    r["heap"]["stacks"].as_array().expect("heap stacks")
}

/// Native function names of a stack, innermost first.
fn native(s: &Value) -> Vec<String> {
    s["frames"]
        .as_array()
        .expect("frames")
        .iter()
        .filter(|f| f["kind"] == "native")
        .map(|f| f["function"].as_str().unwrap_or("??").to_owned())
        .collect()
}

const OUTERMOST: [&str; 6] = [
    "main",
    "Py_BytesMain",
    "start_thread",
    "clone",
    "clone3",
    "__clone3",
];

/// Share of live heap bytes on stacks that reach main or a thread start, printed.
fn share_reaching_start(r: &Value, what: &str) -> f64 {
    let total = r["heap"]["live_bytes"].as_u64().expect("live bytes");
    let listed: u64 = heap_stacks(r)
        .iter()
        .map(|s| s["live_bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(
        listed, total,
        "every live byte is in a listed stack (raise --top)"
    );
    let reaching: u64 = heap_stacks(r)
        .iter()
        .filter(|s| native(s).iter().any(|f| OUTERMOST.contains(&f.as_str())))
        .map(|s| s["live_bytes"].as_u64().unwrap())
        .sum();
    let share = reaching as f64 * 100.0 / total.max(1) as f64;
    // Written to the process's stderr directly, not through the captured print macros,
    // so the figure shows in CI logs for passing tests too.
    let _ = writeln!(
        std::io::stderr(),
        "{what}: {share:.1}% of {total} live heap bytes sit on stacks reaching main or a thread start (report: {:.1}% on complete stacks, unwinder {})",
        r["stacks"]["complete_pct"].as_f64().unwrap_or(f64::NAN),
        r["stacks"]["unwinder"]
    );
    share
}

/// The one heap stack whose innermost user frame is `function`, with its exact bytes
/// and blocks, and its native chain starting with `chain` and ending at `outermost`.
#[track_caller]
fn assert_chain(
    r: &Value,
    function: &str,
    bytes: u64,
    blocks: u64,
    chain: &[&str],
    outermost: &[&str],
) {
    let found: Vec<&Value> = heap_stacks(r)
        .iter()
        .filter(|s| native(s).first().is_some_and(|f| f == function))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one heap stack allocating from {function}; stacks: {:#?}",
        heap_stacks(r).iter().map(native).collect::<Vec<_>>()
    );
    let s = found[0];
    let names = native(s);
    assert_eq!(
        &names[..chain.len().min(names.len())],
        chain,
        "chain of {function}: {names:?}"
    );
    assert!(
        names
            .last()
            .is_some_and(|l| outermost.contains(&l.as_str())),
        "{function}'s stack ends at {outermost:?}: {names:?}"
    );
    assert_eq!(s["truncated"], false, "{function}'s stack is complete");
    assert_eq!(s["live_bytes"].as_u64(), Some(bytes), "{function}'s bytes");
    assert_eq!(
        s["live_allocations"].as_u64(),
        Some(blocks),
        "{function}'s blocks"
    );
}

fn trace(fixture: &str, mode: &str) -> (Fixture, Value) {
    let mut fx = Fixture::spawn(fixture, &[mode]);
    let r = trace_fixture(&mut fx, &["--top", "1000"]);
    assert_eq!(
        r["stacks"]["unwinder"], "cfi",
        "CFI is the default unwinder"
    );
    (fx, r)
}

const MAIN_END: &[&str] = &["_start"];
const THREAD_END: &[&str] = &["clone3", "__clone3", "clone", "__clone"];

#[test]
fn root_five_calls_deep_without_frame_pointers() {
    require_root();
    let (_fx, r) = trace("unwind_nofp", "deep");
    assert_chain(
        &r,
        "deep5",
        100 * 4242,
        100,
        &["deep5", "deep4", "deep3", "deep2", "deep1", "main"],
        MAIN_END,
    );
    assert!(share_reaching_start(&r, "-O2 -fomit-frame-pointer, 5 deep") >= 99.0);
}

#[test]
fn root_threads_reach_their_start() {
    require_root();
    let (_fx, r) = trace("unwind_nofp", "threads");
    assert_chain(
        &r,
        "worker_leak",
        4 * 50 * 3333,
        200,
        &["worker_leak", "thread_main", "start_thread"],
        THREAD_END,
    );
    assert!(share_reaching_start(&r, "4 threads, no frame pointers") >= 99.0);
}

#[test]
fn root_frame_pointer_and_omitted_code_mix_across_a_library() {
    require_root();
    // unwind_nofp: a program without frame pointers calling a library built with
    // them; unwind_fp: the reverse. In both, the library calls back into the program.
    for fixture in ["unwind_nofp", "unwind_fp"] {
        let (_fx, r) = trace(fixture, "lib");
        assert_chain(
            &r,
            "lib_middle",
            60 * 5151,
            60,
            &["lib_middle", "lib_entry", "app_call_lib", "main"],
            MAIN_END,
        );
        assert_chain(
            &r,
            "app_callback",
            40 * 6161,
            40,
            &[
                "app_callback",
                "lib_middle",
                "lib_entry",
                "app_call_lib",
                "main",
            ],
            MAIN_END,
        );
        assert!(share_reaching_start(&r, fixture) >= 99.0);
    }
}

#[test]
fn root_cpp_new_and_vector() {
    require_root();
    let (_fx, r) = trace("unwind_cpp", "");
    // operator new is the innermost frame; the user function that called it and its
    // callers follow, through libstdc++ (no frame pointers) and the inlined
    // std::vector machinery.
    let through = |user: &str| -> Vec<&Value> {
        heap_stacks(&r)
            .iter()
            .filter(|s| {
                let n = native(s);
                n.first().is_some_and(|f| f.starts_with("operator new"))
                    && n.iter().any(|f| f.starts_with(user))
            })
            .collect()
    };
    let records = through("make_records(int)");
    assert_eq!(records.len(), 1, "one stack through make_records");
    let names = native(records[0]);
    assert_eq!(
        names,
        [
            "operator new(unsigned long)",
            "make_records(int)",
            "build_index()",
            "main",
            "__libc_start_call_main",
            "__libc_start_main_impl",
            "_start"
        ],
        "new Record from make_records"
    );
    assert_eq!(records[0]["live_bytes"].as_u64(), Some(80 * 96));
    // The vector's last buffer: 16384 longs, allocated by push_back in fill_vector.
    let vector: Vec<&Value> = through("fill_vector(int)")
        .into_iter()
        .filter(|s| s["live_bytes"].as_u64() == Some(16384 * 8))
        .collect();
    assert_eq!(vector.len(), 1, "one stack holds the vector's buffer");
    let names = native(vector[0]);
    let at = names
        .iter()
        .position(|f| f == "fill_vector(int)")
        .expect("fill_vector");
    assert!(
        names[..at].iter().any(|f| f.contains("push_back")),
        "push_back below fill_vector: {names:?}"
    );
    assert_eq!(names[at + 1..at + 3], ["build_index()", "main"]);
    assert!(share_reaching_start(&r, "C++ -O2") >= 99.0);
}

/// The same C++ program on jemalloc (Debian's libjemalloc2, preloaded): its
/// `operator new` inlines the allocation and calls no malloc, so the leak is seen
/// only through the probe on jemalloc's own `operator new` — on an emulated
/// instruction, not the single-stepped entry — and the vector's old buffers go back
/// through its sized `operator delete`.
#[test]
fn root_cpp_on_jemalloc_through_operator_new() {
    require_root();
    let jemalloc = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2";
    assert!(
        std::path::Path::new(jemalloc).exists(),
        "{jemalloc} is missing (cargo xtask setup installs libjemalloc2)"
    );
    let mut fx = Fixture::spawn_with_env("unwind_cpp", &[""], &[("LD_PRELOAD", jemalloc)]);
    let r = trace_fixture(&mut fx, &["--top", "1000"]);
    let new = r["probes"]
        .as_array()
        .expect("probes")
        .iter()
        .find(|p| {
            p["function"] == "_Znwm" && p["object"].as_str().unwrap().ends_with("libjemalloc.so.2")
        })
        .unwrap_or_else(|| panic!("no probe on jemalloc's operator new: {:#}", r["probes"]));
    assert_eq!(new["offset_in_function"], 7, "{new:#}");
    let records: Vec<&Value> = heap_stacks(&r)
        .iter()
        .filter(|s| native(s).first().is_some_and(|f| f == "make_records(int)"))
        .collect();
    assert_eq!(
        records.len(),
        1,
        "one stack from make_records: {:#}",
        r["heap"]
    );
    assert_eq!(
        (
            records[0]["live_bytes"].as_u64(),
            records[0]["live_allocations"].as_u64()
        ),
        (Some(80 * 96), Some(80)),
        "{:#}",
        records[0]
    );
    assert_eq!(native(records[0])[1..3], ["build_index()", "main"]);
    // Every buffer the vector outgrew was deleted: only the last one, 16384 longs, stays,
    // with the vector object itself (24 bytes, also made by fill_vector).
    let vector: Vec<&Value> = heap_stacks(&r)
        .iter()
        .filter(|s| native(s).iter().any(|f| f == "fill_vector(int)"))
        .collect();
    let live: u64 = vector
        .iter()
        .map(|s| s["live_bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(live, 16384 * 8 + 24, "{vector:#?}");
    assert_eq!(r["counters"]["free_unknown"], 0, "{}", r["counters"]);
    assert_eq!(r["lost_total"], 0, "{}", r["lost"]);
}

#[test]
fn root_library_dlopened_after_attach() {
    require_root();
    let mut fx = Fixture::spawn(
        "unwind_nofp",
        &["dlopen", fixture_path("libunwind_dl.so").to_str().unwrap()],
    );
    let pid = fx.pid.to_string();
    let mut tracer = Tracer::start(&["--pid", &pid, "--top", "1000"]);
    fx.send("go");
    fx.expect_line("loaded");
    // Its tables are loaded as soon as its mapping is seen; only then does it allocate.
    tracer.wait_stderr("unwind tables loaded for");
    assert!(
        tracer
            .stderr_lines
            .iter()
            .any(|l| l.contains("libunwind_dl.so")),
        "the dlopen'ed library's tables: {:?}",
        tracer.stderr_lines
    );
    fx.send("leak");
    fx.expect_line("done");
    let r = tracer.finish();
    check_shape(&r);
    assert_chain(
        &r,
        "dl_middle",
        30 * 7171,
        30,
        &["dl_middle", "dl_entry", "main"],
        MAIN_END,
    );
    let after = r["stacks"]["tables"]["loaded_after_attach"]
        .as_array()
        .expect("loaded_after_attach");
    assert!(
        after
            .iter()
            .any(|o| o.as_str().is_some_and(|o| o.ends_with("libunwind_dl.so"))),
        "the report lists it: {after:?}"
    );
}

/// Debian's python3.11: static libpython, LTO+PGO, no frame pointers. A
/// multithreaded script whose allocations go through malloc.
#[test]
fn root_debian_python_stacks_reach_main_or_thread_start() {
    require_root();
    let python = std::path::Path::new("/usr/bin/python3.11");
    assert!(
        python.exists(),
        "Debian's python3.11 is required (cargo xtask setup installs it)"
    );
    let script = script_path("py_stacks.py");
    let mut fx = Fixture::spawn_program(python, &[script.to_str().unwrap()], &[]);
    let r = trace_fixture(&mut fx, &["--top", "1000"]);
    let share = share_reaching_start(&r, "Debian python3.11, 3 threads");
    assert!(share >= 95.0, "at least 95% reach main or a thread start");
    // The workers' cache: Python frames between native frames that reach the thread start.
    let cache: Vec<&Value> = heap_stacks(&r)
        .iter()
        .filter(|s| functions(s).iter().any(|f| f == "grow_cache"))
        .collect();
    assert!(!cache.is_empty(), "grow_cache stacks");
    for s in cache {
        let n = native(s);
        assert!(
            n.iter().any(|f| f == "start_thread"),
            "worker stack reaches start_thread: {:?}",
            functions(s)
        );
    }
}

/// A stripped program: its frames are `??`, and the report lists it once with its
/// build id; with its debug file in a `--debug-dir` tree (`.build-id/xx/rest.debug`,
/// as distributions install them) the same frames are named.
#[test]
fn root_stripped_program_is_listed_and_named_from_a_debug_dir() {
    require_root();
    let dir = leaktrace_tests::temp_path("debug-dir");
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("heap_ops");
    std::fs::copy(fixture_path("heap_ops"), &exe).unwrap();
    let debug = dir.join("heap_ops.debug");
    let run = |cmd: &mut std::process::Command| {
        let out = cmd.output().expect("binutils");
        assert!(out.status.success(), "{cmd:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(std::process::Command::new("objcopy")
        .arg("--only-keep-debug")
        .arg(&exe)
        .arg(&debug));
    run(std::process::Command::new("strip")
        .arg("--strip-all")
        .arg(&exe));
    let notes = run(std::process::Command::new("readelf").arg("-n").arg(&exe));
    let build_id = notes
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: "))
        .expect("the fixture has a build id")
        .to_owned();
    let tree = dir.join("tree/.build-id").join(&build_id[..2]);
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::rename(&debug, tree.join(format!("{}.debug", &build_id[2..]))).unwrap();
    let exe_name = exe.to_str().unwrap().to_owned();

    let leak_frames = |r: &Value| -> Vec<Value> {
        // The stack of leak_malloc's five 100-byte blocks: 500 bytes.
        let s = heap_stacks(r)
            .iter()
            .find(|s| s["live_bytes"] == 500)
            .unwrap_or_else(|| panic!("no 500-byte stack: {:#}", r["heap"]));
        s["frames"].as_array().unwrap().clone()
    };
    let in_exe = |frames: &[Value]| -> Vec<Value> {
        frames
            .iter()
            .filter(|f| f["module"] == exe_name.as_str())
            .cloned()
            .collect()
    };

    let mut fx = Fixture::spawn_program(&exe, &["basic"], &[]);
    let r = trace_fixture(&mut fx, &[]);
    let frames = leak_frames(&r);
    let ours = in_exe(&frames);
    assert!(
        !ours.is_empty() && ours.iter().all(|f| f["function"].is_null()),
        "stripped: no names in the program: {frames:#?}"
    );
    let unnamed = r["stacks"]["unnamed_objects"].as_array().unwrap();
    let listed = unnamed
        .iter()
        .find(|u| u["object"] == exe_name.as_str())
        .unwrap_or_else(|| panic!("the stripped program is listed: {unnamed:#?}"));
    assert_eq!(listed["build_id"], build_id.as_str());
    assert_eq!(listed["named_addresses"], 0, "{listed}");
    assert!(
        listed["unnamed_addresses"].as_u64().unwrap() >= 2,
        "{listed}"
    );
    drop(fx);

    let tree_arg = dir.join("tree").to_str().unwrap().to_owned();
    let mut fx = Fixture::spawn_program(&exe, &["basic"], &[]);
    let r = trace_fixture(&mut fx, &["--debug-dir", &tree_arg]);
    let frames = leak_frames(&r);
    let ours = in_exe(&frames);
    let names: Vec<&str> = ours.iter().filter_map(|f| f["function"].as_str()).collect();
    assert_eq!(names.len(), ours.len(), "every frame named: {frames:#?}");
    assert_eq!(names[..2], ["leak_malloc", "main"], "{frames:#?}");
    let unnamed = r["stacks"]["unnamed_objects"].as_array().unwrap();
    assert!(
        !unnamed.iter().any(|u| u["object"] == exe_name.as_str()),
        "named from the debug dir: {unnamed:#?}"
    );
    drop(fx);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A plugin unloaded and another loaded where it was (the kernel reuses the address
/// range): the same addresses are other code now. Before, the second plugin's leak
/// was added to the first one's stack and named after it: BPF deduplicated the stacks
/// by address, and the symbolizer cached names by address. Code mapped where code was
/// now bumps a generation that is part of every stack's id, stacks recorded before
/// the new mapping are named before it replaces the old, and the old names go.
#[test]
fn root_plugin_reloaded_at_one_address_keeps_both_names() {
    use std::io::BufRead as _;
    require_root();
    // Launched: each library is held until its unwind tables are in, so the stacks
    // through it are whole (with --pid, calls right after dlopen can beat the tables).
    let (a, b) = (
        fixture_path("libreload_a.so"),
        fixture_path("libreload_b.so"),
    );
    let prog = fixture_path("reload");
    let mut tracer = leaktrace_tests::Tracer::start_with(
        &[
            "--",
            prog.to_str().unwrap(),
            a.to_str().unwrap(),
            b.to_str().unwrap(),
        ],
        std::process::Stdio::piped(),
    );
    let mut stdin = tracer.stdin();
    let mut out = tracer.stdout();
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.starts_with("ready"), "{line}");
    writeln!(stdin, "go").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    let w: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        (w.first().copied(), w.get(1), w.get(2).is_some()),
        (Some("entries"), w.get(2), true),
        "the second library is mapped where the first was: {line}"
    );
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "done");
    drop(stdin);
    let r = tracer.wait_report(0);
    let live = |f: &str| -> u64 {
        leaktrace_tests::stacks_at(&r, "heap", f)
            .iter()
            .map(|s| s["live_bytes"].as_u64().unwrap())
            .sum()
    };
    assert_eq!(
        (live("leak_in_a"), live("leak_in_b")),
        (10 * 1000, 10 * 2000),
        "{:#}",
        r["heap"]["stacks"]
    );
}
