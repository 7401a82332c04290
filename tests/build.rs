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
    ("prefork", "prefork.c", &[]),
    ("hostile", "hostile.c", &[]),
    ("launch_once", "launch_once.c", &[]),
    ("sigurg", "sigurg.c", &[]),
    ("reload", "reload.c", &[]),
    ("reach", "reach.c", &[]),
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
    // A dynamically linked musl program (its loader ignores LD_TRACE_LOADED_OBJECTS).
    let status = Command::new("musl-gcc")
        .args(["-O0", "-g", "-Wall", "-o"])
        .arg(out.join("launch_once_musl"))
        .arg(src.join("launch_once.c"))
        .status()
        .unwrap_or_else(|e| panic!("failed to run musl-gcc: {e} (run `cargo xtask setup`)"));
    assert!(status.success(), "failed to build fixture launch_once_musl");
    // One plugin source, two libraries: the same code under two names.
    for (lib, name) in [
        ("libreload_a.so", "leak_in_a"),
        ("libreload_b.so", "leak_in_b"),
    ] {
        let status = Command::new(&cc)
            .args(["-O1", "-g", "-shared", "-fPIC", "-Wall"])
            .arg(format!("-DNAME={name}"))
            .arg(format!("-Wl,-soname,{lib}"))
            .arg("-o")
            .arg(out.join(lib))
            .arg(src.join("reload_lib.c"))
            .status()
            .unwrap_or_else(|e| panic!("failed to run {cc} for {lib}: {e}"));
        assert!(status.success(), "failed to build fixture {lib}");
    }
    build_unwind_fixtures(&cc, &src, &out);
    // The Go program, built as `go build` builds by default: with its symbols and
    // debug information. Go's caches go under OUT_DIR.
    let status = Command::new("go")
        .args(["build", "-o"])
        .arg(out.join("go_heap"))
        .arg(src.join("go_heap.go"))
        .env("GOCACHE", out.join("go-cache"))
        .env("GOPATH", out.join("go-path"))
        .env("CGO_ENABLED", "0")
        .status()
        .unwrap_or_else(|e| panic!("failed to run go: {e} (run `cargo xtask setup`)"));
    assert!(status.success(), "failed to build fixture go_heap");
    println!("cargo:rustc-env=FIXTURE_DIR={}", out.display());
}

/// The unwinding fixtures, optimised as production builds are: code without frame
/// pointers (-O2 -fomit-frame-pointer), code with them, and the two mixed across a
/// shared library, plus a library only dlopen'ed and a C++ program.
fn build_unwind_fixtures(cc: &str, src: &std::path::Path, out: &std::path::Path) {
    let nofp = ["-O2", "-g", "-fomit-frame-pointer", "-Wall"];
    let fp = ["-O2", "-g", "-fno-omit-frame-pointer", "-Wall"];
    let c = src.join("unwind.c");
    // compiler, output, flags, source, then what goes after it (libraries).
    let build =
        |compiler: &str, name: &str, flags: &[&str], source: &std::path::Path, after: &[&str]| {
            let status = Command::new(compiler)
                .args(flags)
                .arg("-o")
                .arg(out.join(name))
                .arg(source)
                .args(after)
                .status()
                .unwrap_or_else(|e| {
                    panic!(
                        "failed to run {compiler} for fixture {name}: {e} (run `cargo xtask setup`)"
                    )
                });
            assert!(status.success(), "failed to build fixture {name}");
        };
    for (lib, flags) in [
        ("libunwind_lib_nofp.so", &nofp),
        ("libunwind_lib_fp.so", &fp),
        ("libunwind_dl.so", &nofp),
    ] {
        let soname = format!("-Wl,-soname,{lib}");
        build(
            cc,
            lib,
            &[&flags[..], &["-shared", "-fPIC", "-DUNWIND_LIB"]].concat(),
            &c,
            &[&soname],
        );
    }
    let dir = format!("-L{}", out.display());
    let libs = |lib: &'static str| {
        [
            dir.clone(),
            format!("-l:{lib}"),
            "-Wl,-rpath,$ORIGIN".into(),
            "-pthread".into(),
            "-ldl".into(),
        ]
    };
    // No frame pointers in the program, frame pointers in its library; and the reverse.
    let a = libs("libunwind_lib_fp.so");
    build(
        cc,
        "unwind_nofp",
        &nofp,
        &c,
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let b = libs("libunwind_lib_nofp.so");
    build(
        cc,
        "unwind_fp",
        &fp,
        &c,
        &b.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let cxx = env::var("CXX").unwrap_or_else(|_| "c++".into());
    build(&cxx, "unwind_cpp", &nofp, &src.join("unwind_cpp.cpp"), &[]);
    build(&cxx, "census_cpp", &fp, &src.join("census_cpp.cpp"), &[]);
}
