//! The formats other tools read, each checked by its reference reader: pprof by
//! `go tool pprof` (Debian's golang-go), folded stacks by their grammar and inferno
//! (the flamegraph), and two reports compared by `--diff` and by pprof's
//! `-diff_base`.

use std::{path::Path, process::Command};

use leaktrace_tests::{Fixture, Tracer, leaktrace_bin, require_root, temp_path};

/// `go tool pprof ARGS FILE`'s stdout; it must succeed.
#[track_caller]
fn pprof(args: &[&str], file: &Path) -> String {
    let out = Command::new("go")
        .args(["tool", "pprof"])
        .args(args)
        .arg(file)
        .output()
        .expect("go tool pprof runs (golang-go is installed by cargo xtask setup)");
    assert!(
        out.status.success(),
        "go tool pprof {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `flat` per function from `go tool pprof -top` in bytes or counts (`-unit=byte`
/// prints `500B`; counts print bare).
fn flat(top: &str, function: &str) -> Option<u64> {
    top.lines().find_map(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        (cols.len() == 6 && cols[5] == function)
            .then(|| cols[0].trim_end_matches('B').parse().ok())
            .flatten()
    })
}

/// Runs leaktrace offline (no target) with `args`; it must succeed.
#[track_caller]
fn offline(args: &[&str]) -> String {
    let out = Command::new(leaktrace_bin())
        .args(args)
        .output()
        .expect("leaktrace runs");
    assert!(
        out.status.success(),
        "leaktrace {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The change in bytes of the stack whose innermost frame is `f` among a JSON diff's
/// new stacks.
fn new_in_diff(d: &serde_json::Value, f: &str) -> Option<i64> {
    d["new"]
        .as_array()?
        .iter()
        .find(|c| c["frames"][0] == f)
        .map(|c| c["change_bytes"].as_i64().unwrap())
}

/// `--diff BASE NEW --format json`, parsed.
#[track_caller]
fn diff_json(base: &Path, new: &Path) -> serde_json::Value {
    serde_json::from_str(&offline(&[
        "--diff",
        base.to_str().unwrap(),
        new.to_str().unwrap(),
        "--format",
        "json",
    ]))
    .expect("diff JSON")
}

/// `--replay CAPTURE --format json` equals the live report, field by field.
#[track_caller]
fn assert_replays_to(capture: &Path, live: &serde_json::Value) -> serde_json::Value {
    let (json, _) = offline_both(&["--replay", capture.to_str().unwrap(), "--format", "json"]);
    let replayed: serde_json::Value = serde_json::from_str(&json).expect("replayed JSON");
    for key in live.as_object().expect("an object").keys() {
        assert_eq!(replayed[key], live[key], "{key} differs");
    }
    assert_eq!(&replayed, live);
    replayed
}

/// `--diff BASE NEW --format json` says heap_ops' two leaks are new, with their bytes.
#[track_caller]
fn assert_heap_ops_leaks_new(base: &Path, new: &Path) {
    let d = diff_json(base, new);
    assert_eq!(new_in_diff(&d, "leak_malloc"), Some(500), "{d:#}");
    assert_eq!(new_in_diff(&d, "leak_calloc"), Some(900), "{d:#}");
}

/// heap_ops `basic` leaves 5 blocks of 100 bytes from leak_malloc and 3 of 300 from
/// leak_calloc, and churns 1000 malloc'd blocks of 16..1015 bytes in churn, all
/// freed. A live `--format pprof` profile read by go tool pprof says exactly that per
/// function, in Go's four sample types; the flamegraph drawn beside it is an SVG
/// naming both.
#[test]
fn root_pprof_is_read_by_go_tool_pprof() {
    require_root();
    let mut fx = Fixture::spawn("heap_ops", &["basic"]);
    let svg = temp_path("heap.svg");
    let pid = fx.pid.to_string();
    let tracer = Tracer::start_as(
        "pprof",
        &["--pid", &pid, "--flamegraph", svg.to_str().unwrap()],
    );
    fx.run_scenario();
    let bytes = tracer.finish_bytes();
    assert_eq!(&bytes[..2], &[0x1f, 0x8b], "gzipped");
    let file = temp_path("heap.pb.gz");
    std::fs::write(&file, &bytes).unwrap();
    let inuse = pprof(&["-top", "-sample_index=inuse_space", "-unit=byte"], &file);
    assert_eq!(flat(&inuse, "leak_malloc"), Some(500), "{inuse}");
    assert_eq!(flat(&inuse, "leak_calloc"), Some(900), "{inuse}");
    assert_eq!(flat(&inuse, "churn"), None, "{inuse}");
    let objects = pprof(&["-top", "-sample_index=inuse_objects"], &file);
    assert_eq!(flat(&objects, "leak_malloc"), Some(5), "{objects}");
    let allocs = pprof(&["-top", "-sample_index=alloc_space", "-unit=byte"], &file);
    // sum(16 + i for i < 1000), plus the 100 calloc(4, 8) blocks of the second loop.
    assert_eq!(flat(&allocs, "churn"), Some(515_500 + 3_200), "{allocs}");
    let alloc_objects = pprof(&["-top", "-sample_index=alloc_objects"], &file);
    assert_eq!(flat(&alloc_objects, "churn"), Some(1100), "{alloc_objects}");
    let raw = pprof(&["-raw"], &file);
    assert!(
        raw.contains("alloc_objects/count alloc_space/bytes inuse_objects/count inuse_space/bytes"),
        "{raw}"
    );
    assert!(raw.contains("PeriodType: space bytes"), "{raw}");
    assert!(raw.contains("heap_ops.c:10"), "lines: {raw}");
    // Mappings carry the objects' build ids (gcc and Debian's libc have them).
    let libc = raw
        .lines()
        .find(|l| l.contains("libc.so.6") && l.contains("/0x"))
        .unwrap_or_else(|| panic!("no libc mapping: {raw}"));
    assert!(
        libc.split_whitespace()
            .any(|w| w.len() == 40 && w.chars().all(|c| c.is_ascii_hexdigit())),
        "no build id: {libc}"
    );
    let svg = std::fs::read_to_string(&svg).expect("the flamegraph");
    assert!(
        svg.starts_with("<?xml") && svg.contains("<svg"),
        "{}",
        &svg[..200.min(svg.len())]
    );
    assert!(svg.contains("leak_calloc") && svg.contains("leak_malloc"));
    let _ = std::fs::remove_file(&file);
}

/// One run's interval reports (JSON Lines): the first before the scenario, the last
/// after. `--diff` of the two says leak_malloc and leak_calloc are new with their exact
/// bytes; each converted to pprof, `go tool pprof -diff_base` says the same; folded
/// lines follow the grammar and sum to the live heap.
#[test]
fn root_reports_diff_convert_and_fold() {
    require_root();
    let mut fx = Fixture::spawn("heap_ops", &["basic"]);
    let pid = fx.pid.to_string();
    let tracer = Tracer::start(&["--pid", &pid, "--interval", "0.2"]);
    let lines = || {
        std::fs::read_to_string(tracer.out_path())
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let t = std::time::Instant::now();
    while lines().is_empty() {
        assert!(t.elapsed().as_secs() < 30, "no interval report");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let before = lines()[0].clone();
    fx.run_scenario();
    let all = String::from_utf8(tracer.finish_bytes()).expect("JSON Lines");
    let report: serde_json::Value =
        serde_json::from_str(all.lines().last().expect("a final report")).expect("JSON");
    assert_eq!(report["final_report"], true);
    // The new side is the whole JSON Lines file: its last document is read.
    let (a, b) = (temp_path("before.json"), temp_path("after.jsonl"));
    std::fs::write(&a, &before).unwrap();
    std::fs::write(&b, &all).unwrap();
    let text = offline(&["--diff", a.to_str().unwrap(), b.to_str().unwrap()]);
    assert!(
        text.contains("leak_malloc") && text.contains("+500 B"),
        "{text}"
    );
    assert_heap_ops_leaks_new(&a, &b);
    // pprof's own diff of two of our profiles.
    let (pa, pb) = (temp_path("before.pb.gz"), temp_path("after.pb.gz"));
    offline(&[
        "--convert",
        a.to_str().unwrap(),
        "--format",
        "pprof",
        "-o",
        pa.to_str().unwrap(),
    ]);
    offline(&[
        "--convert",
        b.to_str().unwrap(),
        "--format",
        "pprof",
        "-o",
        pb.to_str().unwrap(),
    ]);
    let diffed = pprof(
        &[
            "-top",
            "-sample_index=inuse_space",
            "-unit=byte",
            &format!("-diff_base={}", pa.display()),
        ],
        &pb,
    );
    assert_eq!(flat(&diffed, "leak_malloc"), Some(500), "{diffed}");
    assert_eq!(flat(&diffed, "leak_calloc"), Some(900), "{diffed}");
    // Folded stacks: `frame;frame;… N`, no empty frame, N the live bytes.
    let folded = offline(&["--convert", b.to_str().unwrap(), "--format", "folded"]);
    let mut sum = 0;
    for l in folded.lines() {
        let (stack, n) = l
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no count: {l:?}"));
        assert!(stack.split(';').all(|f| !f.is_empty()), "{l:?}");
        assert!(stack.split(';').next_back() != Some(""), "{l:?}");
        sum += n.parse::<u64>().unwrap_or_else(|_| panic!("count: {l:?}"));
    }
    let live: u64 = report["heap"]["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["live_bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(sum, live, "{folded}");
    assert!(
        folded.lines().any(|l| l.ends_with(";leak_malloc 500")),
        "{folded}"
    );
    for f in [a, b, pa, pb] {
        let _ = std::fs::remove_file(f);
    }
}

/// Bad input gets one clear line and a non-zero exit.
#[test]
fn offline_modes_refuse_bad_input() {
    let not_json = temp_path("not.json");
    std::fs::write(&not_json, "hello").unwrap();
    let report = temp_path("minimal.json");
    std::fs::write(
        &report,
        r#"{"pid": 1, "duration_s": 1.0, "heap": {"sample_rate_bytes": 0, "stacks": []}}"#,
    )
    .unwrap();
    for args in [
        vec!["--convert", not_json.to_str().unwrap(), "--format", "pprof"],
        vec![
            "--diff",
            not_json.to_str().unwrap(),
            "/nonexistent/report.json",
        ],
        vec!["--convert", report.to_str().unwrap(), "--format", "text"],
        vec!["--format", "pprof", "--interval", "1", "--pid", "1"],
        vec!["--replay", report.to_str().unwrap()],
        vec!["--replay", "/nonexistent/run.ltcap"],
        vec!["--pid", "1", "--follow-forks", "--record", "/tmp/x.ltcap"],
        vec!["--pid", "1", "--live", "--interval", "1"],
    ] {
        let out = Command::new(leaktrace_bin()).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("leaktrace: "), "{err}");
    }
    let out = Command::new(leaktrace_bin())
        .args(["--replay", report.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("leaktrace: {}: not a leaktrace capture\n", report.display())
    );
    // A well-formed report converts, even with no stack.
    let out = Command::new(leaktrace_bin())
        .args(["--convert", report.to_str().unwrap(), "--format", "folded"])
        .output()
        .unwrap();
    assert!(out.status.success() && out.stdout.is_empty(), "{out:?}");
    let _ = std::fs::remove_file(not_json);
    let _ = std::fs::remove_file(report);
}

/// `--pprof-dir` with `--interval`: a profile at each report, the newest kept, each
/// read by go tool pprof; the last one has heap_ops' exact bytes.
#[test]
fn root_pprof_dir_keeps_the_newest_profiles() {
    require_root();
    let dir = temp_path("pprof-dir");
    std::fs::create_dir_all(&dir).unwrap();
    let mut fx = Fixture::spawn("heap_ops", &["basic"]);
    let pid = fx.pid.to_string();
    let tracer = Tracer::start(&[
        "--pid",
        &pid,
        "--interval",
        "0.2",
        "--pprof-dir",
        dir.to_str().unwrap(),
        "--pprof-keep",
        "3",
    ]);
    fx.run_scenario();
    let listed = || {
        let mut v: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    };
    // Enough reports to have rotated.
    let t = std::time::Instant::now();
    while t.elapsed().as_secs_f64() < 1.5 {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = tracer.finish_bytes();
    let files = listed();
    assert_eq!(files.len(), 3, "{files:?}");
    for f in &files {
        let name = f.file_name().unwrap().to_str().unwrap();
        assert!(
            name.starts_with(&format!("leaktrace-{pid}-")) && name.ends_with(".pb.gz"),
            "{name}"
        );
    }
    let last = files.last().unwrap();
    let top = pprof(&["-top", "-sample_index=inuse_space", "-unit=byte"], last);
    assert_eq!(flat(&top, "leak_malloc"), Some(500), "{top}");
    assert_eq!(flat(&top, "leak_calloc"), Some(900), "{top}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs leaktrace offline with `args`; it must succeed. Returns stdout and stderr.
#[track_caller]
fn offline_both(args: &[&str]) -> (String, String) {
    let out = Command::new(leaktrace_bin())
        .args(args)
        .output()
        .expect("leaktrace runs");
    assert!(
        out.status.success(),
        "leaktrace {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A capture recorded beside a live JSON report replays, without the target, to the
/// same report: every field, the verdict and the bytes per stack included. Its pprof
/// replay is read by go tool pprof with leak_malloc's and leak_calloc's exact bytes.
/// A copy taken before the scenario (its last record possibly cut mid-write) replays
/// to before the leaks, and `--diff` of the two captures says what the scenario left.
#[test]
fn root_record_replays_to_the_live_report() {
    require_root();
    let mut fx = Fixture::spawn("heap_ops", &["basic"]);
    let pid = fx.pid.to_string();
    let cap = temp_path("run.ltcap");
    let tracer = Tracer::start(&[
        "--pid",
        &pid,
        "--interval",
        "0.2",
        "--record",
        cap.to_str().unwrap(),
    ]);
    // The first interval report is in the capture: copy it as it is now.
    tracer.wait_first_report();
    let early = temp_path("early.ltcap");
    std::fs::copy(&cap, &early).expect("the capture is in place while recording");
    fx.run_scenario();
    let all = String::from_utf8(tracer.finish_bytes()).expect("JSON Lines");
    let live: serde_json::Value =
        serde_json::from_str(all.lines().last().expect("a final report")).expect("JSON");
    assert_eq!(live["final_report"], true);

    let (_, said) = offline_both(&["--replay", cap.to_str().unwrap(), "--format", "json"]);
    assert!(
        said.contains(&format!("replaying {}: pid {pid}", cap.display())),
        "{said}"
    );
    assert!(!said.contains("cut short"), "{said}");
    let replayed = assert_replays_to(&cap, &live);
    assert_eq!(
        leaktrace_tests::live_bytes_of(&replayed, "leak_malloc"),
        Some(500)
    );
    assert_eq!(
        leaktrace_tests::live_bytes_of(&replayed, "leak_calloc"),
        Some(900)
    );

    let profile = temp_path("replayed.pb.gz");
    offline(&[
        "--replay",
        cap.to_str().unwrap(),
        "--format",
        "pprof",
        "-o",
        profile.to_str().unwrap(),
    ]);
    let inuse = pprof(
        &["-top", "-sample_index=inuse_space", "-unit=byte"],
        &profile,
    );
    assert_eq!(flat(&inuse, "leak_malloc"), Some(500), "{inuse}");
    assert_eq!(flat(&inuse, "leak_calloc"), Some(900), "{inuse}");
    let raw = pprof(&["-raw"], &profile);
    assert!(
        raw.lines().any(|l| l.contains("libc.so.6")
            && l.split_whitespace()
                .any(|w| w.len() == 40 && w.chars().all(|c| c.is_ascii_hexdigit()))),
        "the recorded build ids: {raw}"
    );

    // The early copy: before the scenario, with or without a last record cut short.
    let (early_json, _) = offline_both(&["--replay", early.to_str().unwrap(), "--format", "json"]);
    let before: serde_json::Value = serde_json::from_str(&early_json).expect("JSON");
    assert_eq!(leaktrace_tests::live_bytes_of(&before, "leak_malloc"), None);
    assert_heap_ops_leaks_new(&early, &cap);

    // Cut anywhere: it replays up to its last complete record and says so.
    let bytes = std::fs::read(&cap).unwrap();
    let cut = temp_path("cut.ltcap");
    for at in [bytes.len() / 3, bytes.len() - 5] {
        std::fs::write(&cut, &bytes[..at]).unwrap();
        let (text, said) = offline_both(&["--replay", cut.to_str().unwrap()]);
        assert!(said.contains("is cut short after record"), "{said}");
        assert!(text.contains("the capture is cut short"), "{text}");
    }
    for f in [&cap, &early, &cut, &profile] {
        let _ = std::fs::remove_file(f);
    }
}

/// A sampled, duty-cycled trace of a CPython daemon (Debian's 3.11) that leaks:
/// replayed, its report is the live one, field for field: the Python stacks, the
/// census, the collector's state, the duty cycle's windows and the verdict (a leak).
/// A copy of the capture taken at the first interval report compares with the whole
/// one by type: the leaked bytearrays grew, 64 bytes of object each.
#[test]
fn root_record_replays_a_sampled_python_run() {
    require_root();
    let mut fx = leaktrace_tests::spawn_debian_python("py_verdict.py", &["leak", "50"]);
    let pid = fx.pid.to_string();
    let cap = temp_path("py.ltcap");
    let tracer = Tracer::start(&[
        "--pid",
        &pid,
        "--sample-rate",
        "64K",
        "--interval",
        "1",
        "--record",
        cap.to_str().unwrap(),
    ]);
    fx.send("go");
    tracer.wait_first_report();
    let early = temp_path("py-early.ltcap");
    std::fs::copy(&cap, &early).expect("the capture is in place while recording");
    fx.expect_line("done");
    let all = String::from_utf8(tracer.finish_bytes()).expect("JSON Lines");
    let live: serde_json::Value =
        serde_json::from_str(all.lines().last().expect("a final report")).expect("JSON");
    assert_eq!(live["verdict"]["kind"], "leak", "{:#}", live["verdict"]);
    let duty = &live["heap"]["duty_cycle"];
    assert!(duty["windows"].as_u64().unwrap() > 0, "{duty:#}");
    assert!(!live["python"]["gc"].is_null() && !live["census"].is_null());
    assert_replays_to(&cap, &live);
    let d = diff_json(&early, &cap);
    let types = &d["types"];
    assert_eq!(types["kind"], "python", "{d:#}");
    let bytearray = types["grown"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "bytearray")
        .unwrap_or_else(|| panic!("bytearray did not grow: {types:#}"));
    let more = bytearray["new_count"].as_i64().unwrap() - bytearray["base_count"].as_i64().unwrap();
    assert!(more > 0, "{bytearray:#}");
    assert_eq!(
        bytearray["change_bytes"].as_i64().unwrap(),
        64 * more,
        "{bytearray:#}"
    );
    for f in [&cap, &early] {
        let _ = std::fs::remove_file(f);
    }
}

/// A leaktrace killed with SIGKILL leaves a capture that replays up to its last
/// complete record (written at least every 250 ms): the scenario's leaks are in it,
/// and the replay says the capture has no final report.
#[test]
fn root_record_killed_replays_to_its_last_record() {
    require_root();
    let mut fx = Fixture::spawn("heap_ops", &["basic"]);
    let pid = fx.pid.to_string();
    let cap = temp_path("killed.ltcap");
    let tracer = Tracer::start(&["--pid", &pid, "--record", cap.to_str().unwrap()]);
    fx.run_scenario();
    // Two ticks' flushes after the scenario's last event.
    std::thread::sleep(std::time::Duration::from_millis(600));
    tracer.kill();
    let (json, said) = offline_both(&["--replay", cap.to_str().unwrap(), "--format", "json"]);
    assert!(said.contains("has no final report"), "{said}");
    let r: serde_json::Value = serde_json::from_str(&json).expect("replayed JSON");
    assert!(
        r["end_reason"]
            .as_str()
            .is_some_and(|s| s.starts_with("the capture ends before its final report")),
        "{}",
        r["end_reason"]
    );
    assert_eq!(leaktrace_tests::live_bytes_of(&r, "leak_malloc"), Some(500));
    assert_eq!(leaktrace_tests::live_bytes_of(&r, "leak_calloc"), Some(900));
    let _ = std::fs::remove_file(&cap);
}
