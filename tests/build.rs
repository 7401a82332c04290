//! Builds the C fixture programs into OUT_DIR with the system C compiler.
use std::{env, path::PathBuf, process::Command};

/// (output name, source, extra flags)
const FIXTURES: &[(&str, &str, &[&str])] = &[
    ("heap_ops", "heap_ops.c", &["-pthread"]),
    ("mappings", "mappings.c", &[]),
    ("threads", "threads.c", &["-pthread"]),
    ("launch", "launch.c", &[]),
    ("no_alloc", "no_alloc.c", &["-nostdlib", "-static"]),
    ("libbump_alloc.so", "bump_alloc.c", &["-shared", "-fPIC"]),
    ("verdicts", "verdicts.c", &["-pthread"]),
];

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let src =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("manifest dir")).join("fixtures");
    println!("cargo:rerun-if-changed={}", src.display());
    let cc = env::var("CC").unwrap_or_else(|_| "cc".into());
    for (name, file, extra) in FIXTURES {
        let status = Command::new(&cc)
            .args(["-O0", "-g", "-fno-omit-frame-pointer", "-Wall"])
            .args(*extra)
            .arg("-o")
            .arg(out.join(name))
            .arg(src.join(file))
            .status()
            .unwrap_or_else(|e| {
                panic!("failed to run {cc} for fixture {name}: {e} (run `cargo xtask setup`)")
            });
        assert!(status.success(), "failed to build fixture {name}");
    }
    println!("cargo:rustc-env=FIXTURE_DIR={}", out.display());
}
