//! Python stacks in live CPython processes, per interpreter: the leaking
//! function's Python frames with file and line, a thread that allocates with the
//! GIL released, and small-object growth attributed through pymalloc arenas.

use std::path::{Path, PathBuf};

use leaktrace_tests::{Fixture, require_root, script_line, script_path, trace_fixture};
use serde_json::Value;

/// Python frames of a stack: (function, line), innermost first.
fn py_frames(s: &Value) -> Vec<(String, u64)> {
    s["frames"]
        .as_array()
        .expect("frames")
        .iter()
        .filter(|f| f["kind"] == "python")
        .map(|f| {
            (
                f["function"].as_str().unwrap_or("?").to_owned(),
                f["line"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// Sum of a section's bytes over stacks whose innermost Python frames are `chain`
/// and, for heap stacks with `block` set, whose blocks all have that size.
fn bytes_through(
    r: &Value,
    section: &str,
    key: &str,
    chain: &[(&str, u64)],
    block: Option<u64>,
) -> u64 {
    r[section]["stacks"]
        .as_array()
        .expect("stacks")
        .iter()
        .filter(|s| {
            let py = py_frames(s);
            py.len() >= chain.len()
                && py
                    .iter()
                    .zip(chain)
                    .all(|((f, l), (wf, wl))| f == wf && (*wl == 0 || l == wl))
        })
        .filter(|s| {
            block.is_none_or(|b| {
                s["live_bytes"].as_u64() == s["live_allocations"].as_u64().map(|n| n * b)
            })
        })
        .map(|s| s[key].as_u64().unwrap())
        .sum()
}

/// The first `pythonX.Y` under pyenv's versions for minor `minor`.
fn pyenv(minor: u32) -> Option<PathBuf> {
    let root =
        std::env::var_os("PYENV_ROOT").map_or_else(|| PathBuf::from("/root/.pyenv"), PathBuf::from);
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root.join("versions"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .collect();
    dirs.sort();
    dirs.into_iter()
        .filter(|d| {
            d.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with(&format!("3.{minor}."))
                    && n[5..].chars().all(|c| c.is_ascii_digit() || c == '.')
            })
        })
        .map(|d| d.join(format!("bin/python3.{minor}")))
        .find(|p| p.exists())
}

fn check(interpreter: &Path) {
    let script = script_path("py_stacks.py");
    let mut fx = Fixture::spawn_program(interpreter, &[script.to_str().unwrap()], &[]);
    let r = trace_fixture(&mut fx, &[]);
    let name = interpreter.display();
    let line = |needle| script_line("py_stacks.py", needle);
    // 2 threads × 100 bytearray(32768), each 32,769 bytes, from serve → grow_cache.
    let cache = bytes_through(
        &r,
        "heap",
        "live_bytes",
        &[
            ("grow_cache", line("CACHE.append(bytearray")),
            ("serve", line("        grow_cache(i)")),
        ],
        Some(32769),
    );
    // 100 × malloc(12345) through ctypes, which drops the GIL for the call.
    let native = bytes_through(
        &r,
        "heap",
        "live_bytes",
        &[("native_alloc", line("KEPT.append(LIBC.malloc"))],
        Some(12345),
    );
    // Small objects: pymalloc arenas mapped from keep_small.
    let small = bytes_through(&r, "mappings", "mapped_bytes", &[("keep_small", 0)], None);
    let arenas = r["mappings"]["split"]["pymalloc_arenas"].as_u64().unwrap();
    eprintln!(
        "{name}: grow_cache {cache} B, native_alloc {native} B, keep_small arenas {small} B ({arenas} pymalloc arenas)"
    );
    assert_eq!(cache, 200 * 32769, "{name}: {:#}", r["heap"]);
    assert_eq!(
        native,
        100 * 12345,
        "{name}: GIL-released allocations keep their own stack: {:#}",
        r["heap"]
    );
    assert!(
        small >= 8 << 20 && arenas >= 8,
        "{name}: small objects through pymalloc arenas: {:#}",
        r["mappings"]
    );
    let files: Vec<&str> = r["heap"]["stacks"][0]["frames"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["file"].as_str())
        .collect();
    assert!(
        files.iter().any(|f| f.ends_with("py_stacks.py")),
        "{name}: file names: {files:?}"
    );
    assert_eq!(r["lost_total"], 0, "{name}: {}", r["lost"]);
}

/// Debian's python3.11 package: static, LTO+PGO, no frame pointers. Must exist.
#[test]
fn root_python_debian_311() {
    require_root();
    let p = Path::new("/usr/bin/python3.11");
    assert!(
        p.exists(),
        "Debian's python3.11 is missing (cargo xtask setup installs it)"
    );
    check(p);
}

/// pyenv's 3.11 (shared libpython): must exist on the development and CI machines.
#[test]
fn root_python_pyenv_311() {
    require_root();
    check(&pyenv(11).expect(
        "pyenv 3.11 is missing (expected under $PYENV_ROOT/versions, default /root/.pyenv)",
    ));
}

/// The other minor versions leaktrace reads, from pyenv: each must be installed and pass.
#[test]
fn root_python_other_versions() {
    require_root();
    for minor in [9, 10, 12, 13] {
        let p = pyenv(minor).unwrap_or_else(|| {
            panic!("pyenv 3.{minor} is missing (expected under $PYENV_ROOT/versions)")
        });
        check(&p);
    }
}
