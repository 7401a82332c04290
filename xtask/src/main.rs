//! Orchestration for leaktrace: `cargo xtask setup | test | kernels | demo | bench`.
//!
//! The BPF object itself is built by `leaktrace/build.rs` (aya-build); xtask
//! installs what that build and the tests need, and runs things in order.

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, Result, bail};

mod bench;
mod census;
mod fuzz;
mod gperftools;
mod kernels;
mod roots;
mod servers;
mod soak;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "leaktrace's setup, test, demo and bench tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and tests need, the kernel tier's too (idempotent; fast when done).
    Setup,
    /// Set up, build, and run every test (the probe tests need root), then, without test
    /// arguments, the kernel tier and the benchmark smoke.
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, build, and run only the kernel tier: Debian's kernels under qemu.
    Kernels {
        /// Kernel series to boot (6.1, 6.12, 5.10); all when none.
        series: Vec<String>,
    },
    /// Set up, build, and trace the demo program as it leaks.
    Demo,
    /// Set up, then fuzz every parser of target-controlled data (cargo-fuzz, nightly):
    /// the regression inputs first, then SECS seconds per target.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 600)]
        secs: u64,
        /// One target only (proc_text, elf_objects, heap_walk, python_code).
        target: Option<String>,
    },
    /// Set up, build in release mode, and attach leaktrace for MINUTES to a process
    /// allocating at a high rate, recording leaktrace's memory and CPU.
    Soak {
        /// Minutes to run.
        #[arg(long, default_value_t = 60)]
        minutes: u64,
        /// Allocating threads in the target.
        #[arg(long, default_value_t = 1)]
        threads: u32,
        /// Run leaktrace with --continuous (sampled, aged, a rolling window).
        #[arg(long)]
        continuous: bool,
    },
    /// Set up, build in release mode, and run the benchmarks.
    Bench {
        /// Small workloads, to check the harness works (used by the tests).
        #[arg(long)]
        quick: bool,
        /// Only the real servers (redis, CPython, nginx): no engine figures, no microbenchmarks.
        #[arg(long)]
        servers: bool,
        /// Only the heap census of a ~1 GiB CPython heap.
        #[arg(long)]
        census: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.task {
        Task::Setup => setup(true),
        Task::Test { args } => {
            // Filtered runs leave the tier out; otherwise it runs unless opted out.
            let tier = args.is_empty() && !kernels::skipped();
            setup(tier).and_then(|()| test(&args, tier))
        }
        Task::Kernels { series } => setup(true).and_then(|()| kernel_tier(&series)),
        Task::Demo => setup(false).and_then(|()| demo()),
        Task::Soak {
            minutes,
            threads,
            continuous,
        } => setup(false).and_then(|()| {
            run(cargo().args(["build", "--release", "-p", "leaktrace"]))?;
            soak::run(
                &workspace(),
                &workspace().join("target/release/leaktrace"),
                minutes,
                threads,
                continuous,
            )
        }),
        Task::Fuzz { secs, target } => {
            setup(false).and_then(|()| fuzz::run_targets(&workspace(), secs, target.as_deref()))
        }
        Task::Bench {
            quick,
            servers,
            census,
        } => setup(false).and_then(|()| {
            if census {
                run(cargo().args(["build", "--release", "-p", "leaktrace"]))?;
                census::run(
                    &workspace(),
                    &workspace().join("target/release/leaktrace"),
                    quick,
                )
            } else {
                bench(quick, servers)
            }
        }),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("failed to run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("failed to run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn works(cmd: &mut Command) -> bool {
    cmd.output().is_ok_and(|o| o.status.success())
}

/// Installs, only where missing: a C compiler (fixtures, demo), the nightly
/// toolchain's rust-src (the BPF build uses -Z build-std=core), and bpf-linker
/// built against the nightly toolchain's own libLLVM (no prebuilt download works here);
/// with `kernels`, what the kernel tier needs (qemu, virtme-ng, Debian's kernels).
fn setup(kernels: bool) -> Result<()> {
    // Debian packages the tests need: C and C++ compilers for the fixtures, and Debian's own
    // python3.11 (static libpython, LTO+PGO, no frame pointers), which the Python
    // fixtures run on. Installed only when missing.
    let mut missing = Vec::new();
    if !works(Command::new("cc").arg("--version")) {
        missing.extend(["gcc", "libc6-dev"]);
    }
    // The unwinding fixtures include a C++ program (operator new, std::vector).
    if !works(Command::new("c++").arg("--version")) {
        missing.push("g++");
    }
    // glibc's symbol tables (its .so is stripped): without them thread stacks end in
    // an unnamed address instead of start_thread.
    if !works(Command::new("dpkg").args(["-s", "libc6-dbg"])) {
        missing.push("libc6-dbg");
    }
    if !Path::new("/usr/bin/python3.11").exists() {
        missing.push("python3.11");
    }
    // jemalloc, for the C++ program on jemalloc (its operator new inlines the allocation).
    if !Path::new("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2").exists() {
        missing.push("libjemalloc2");
    }
    // The other allocators a program is preloaded with.
    if !Path::new("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4").exists() {
        missing.push("libtcmalloc-minimal4");
    }
    if !Path::new("/usr/lib/x86_64-linux-gnu/libmimalloc.so.2").exists() {
        missing.push("libmimalloc2.0");
    }
    // A real Go program (dynamically linked, its heap the Go runtime's own).
    if !Path::new("/usr/bin/prometheus").exists() {
        missing.push("prometheus");
    }
    // Go's toolchain, for the Go fixture built with its symbols and debug information
    // (whose runtime statistics leaktrace reads from outside).
    if !Path::new("/usr/bin/go").exists() {
        missing.push("golang-go");
    }
    // A real static binary (glibc linked in, stripped): traced without heap probes.
    if !works(Command::new("dpkg").args(["-s", "busybox-static"]))
        && !missing.contains(&"busybox-static")
    {
        missing.push("busybox-static");
    }
    // musl's compiler: a launched musl program (whose loader would run it for
    // LD_TRACE_LOADED_OBJECTS) must run once.
    if !works(Command::new("musl-gcc").arg("--version")) {
        missing.push("musl-tools");
    }
    // A real PostgreSQL, whose clusters the server tests create with initdb.
    let has_postgres = std::fs::read_dir("/usr/lib/postgresql").is_ok_and(|d| {
        d.filter_map(Result::ok)
            .any(|e| e.path().join("bin/initdb").exists())
    });
    if !has_postgres {
        missing.push("postgresql");
    }
    // Debian's redis (on jemalloc, run by a link to another name) and its benchmark.
    if !Path::new("/usr/bin/redis-server").exists() {
        missing.push("redis-server");
    }
    if !Path::new("/usr/bin/redis-benchmark").exists() {
        missing.push("redis-tools");
    }
    // A terminal for the live view's test (tmux: send-keys, capture-pane).
    if !Path::new("/usr/bin/tmux").exists() {
        missing.push("tmux");
    }
    // memcached (a stripped binary that fills 1 MiB slab pages) and its load generator.
    if !Path::new("/usr/bin/memcached").exists() {
        missing.push("memcached");
    }
    if !Path::new("/usr/bin/memcslap").exists() {
        missing.push("libmemcached-tools");
    }
    missing.extend(roots::missing_packages());
    missing.extend(gperftools::missing_packages());
    if kernels {
        missing.extend(kernels::missing_packages());
    }
    if !missing.is_empty() {
        run(Command::new("apt-get").arg("update"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing))?;
    }
    if !works(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    ensure_bpf_linker()?;
    // cargo-fuzz, for the fuzzing tier (its targets build with the nightly).
    if !works(Command::new("cargo").args(["fuzz", "--version"])) {
        run(Command::new("cargo").args([
            "install",
            "cargo-fuzz",
            "--version",
            "0.13.2",
            "--locked",
        ]))?;
    }
    roots::setup()?;
    gperftools::setup()?;
    if kernels {
        kernels::setup()?;
    }
    Ok(())
}

/// bpf-linker must use the same LLVM as the nightly rustc that emits the bitcode.
fn ensure_bpf_linker() -> Result<()> {
    let sysroot =
        output(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))?;
    let libdir = Path::new(sysroot.trim()).join("lib");
    let lib = std::fs::read_dir(&libdir)
        .with_context(|| format!("failed to list {}", libdir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| {
            format!(
                "no libLLVM.so.* in {} (nightly without LLVM?)",
                libdir.display()
            )
        })?;
    // "libLLVM.so.22.1-rust-1.97.0-nightly" → 22
    let major: u32 = lib["libLLVM.so.".len()..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("cannot read the LLVM version from {lib}"))?;
    // A prefix directory whose lib/ holds libLLVM.so (for bpf-linker's build) and the
    // versioned name (its runtime SONAME, found through the RUNPATH the build records).
    let home = env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    let prefix = home.join(".cache/leaktrace/llvm-prefix");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("failed to create {}", prefix_lib.display()))?;
    for name in ["libLLVM.so", lib.as_str()] {
        let link = prefix_lib.join(name);
        let target = libdir.join(&lib);
        if std::fs::read_link(&link).ok().as_deref() != Some(target.as_path()) {
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&target, &link).with_context(|| {
                format!("failed to link {} → {}", link.display(), target.display())
            })?;
        }
    }
    // Built against this prefix, it uses exactly the nightly's LLVM; anything else is rebuilt.
    if works(Command::new("bpf-linker").arg("--version")) && linked_against(&prefix_lib) {
        return Ok(());
    }
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--force",
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{major}"))
        .env("LLVM_PREFIX", &prefix)
        .current_dir(env::temp_dir()))?;
    if !works(Command::new("bpf-linker").arg("--version")) {
        bail!("bpf-linker was installed but does not run; is ~/.cargo/bin on PATH?");
    }
    Ok(())
}

/// Whether the installed bpf-linker loads its LLVM from our prefix.
fn linked_against(prefix_lib: &Path) -> bool {
    let Ok(path) = which::which("bpf-linker") else {
        return false;
    };
    output(Command::new("ldd").arg(path)).is_ok_and(|o| o.contains(&*prefix_lib.to_string_lossy()))
}

fn cargo() -> Command {
    let mut c = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace());
    c
}

fn test(args: &[String], tier: bool) -> Result<()> {
    run(cargo().args(["build", "-p", "leaktrace"]))?;
    let bin = workspace().join("target/debug/leaktrace");
    run(cargo()
        .args(["test", "--workspace", "--exclude", "leaktrace-ebpf", "--"])
        .args(args)
        .env("LEAKTRACE_BIN", &bin))?;
    if tier {
        kernels::run_tier(&workspace(), cargo(), &bin, &[])?;
    } else if !args.is_empty() {
        eprintln!(
            "xtask: kernel tier not run (test arguments given; `cargo xtask kernels` runs it)"
        );
    }
    if args.is_empty() {
        // The fuzzing tier, briefly: the inputs that once failed, then 15 s per target.
        fuzz::run_targets(&workspace(), 15, None)?;
        // A quick run of the benchmark harness, so it never rots (numbers not asserted).
        run(cargo().args(["build", "--release", "-p", "leaktrace"]))?;
        bench::run(
            &workspace(),
            &workspace().join("target/release/leaktrace"),
            true,
        )?;
        println!("bench smoke: every workload ran under every installed tool");
    }
    Ok(())
}

/// The kernel tier alone, on the series given (all when none).
fn kernel_tier(series: &[String]) -> Result<()> {
    run(cargo().args(["build", "-p", "leaktrace"]))?;
    let bin = workspace().join("target/debug/leaktrace");
    kernels::run_tier(&workspace(), cargo(), &bin, series)
}

fn demo() -> Result<()> {
    run(cargo().args(["build", "--release", "-p", "leaktrace"]))?;
    let dir = workspace().join("target/demo");
    std::fs::create_dir_all(&dir)?;
    let leaky = dir.join("leaky");
    run(Command::new("cc")
        .args(["-O0", "-g", "-fno-omit-frame-pointer", "-o"])
        .arg(&leaky)
        .arg(workspace().join("demo/leaky.c")))?;
    eprintln!(
        "xtask: leaktrace launches the demo program, which leaks at three places while it serves 3000 requests"
    );
    run(Command::new(workspace().join("target/release/leaktrace"))
        .args(["--top", "5", "--max-frames", "4", "--"])
        .arg(&leaky))
}

/// The peers the full benchmark compares against, and the real servers with their load
/// generators (redis-server, redis-tools, nginx, wrk), from Debian, where missing.
fn ensure_bench_peers() -> Result<()> {
    let mut missing: Vec<&str> = ["bpftrace", "heaptrack", "sqlite3"]
        .into_iter()
        .filter(|bin| which::which(bin).is_err())
        .collect();
    missing.extend(servers::missing_packages());
    if !missing.is_empty() {
        eprintln!(
            "xtask: installing the benchmark's peers: {}",
            missing.join(" ")
        );
        run(Command::new("apt-get").arg("update"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing))?;
    }
    Ok(())
}

/// Engine throughput, then the side-by-side table of workloads and tracers.
fn bench(quick: bool, servers_only: bool) -> Result<()> {
    if !quick {
        ensure_bench_peers()?;
    }
    if servers_only {
        run(cargo().args(["build", "--release", "-p", "leaktrace"]))?;
        let (summaries, failures) = servers::run(
            &workspace(),
            &workspace().join("target/release/leaktrace"),
            quick,
        );
        servers::print_summary(&summaries, None);
        if !failures.is_empty() {
            bail!(
                "{} server runs failed: {}",
                failures.len(),
                failures.join("; ")
            );
        }
        return Ok(());
    }
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "leaktrace",
        "--example",
        "consumer_bench",
    ]))?;
    if !quick {
        run(&mut Command::new(
            workspace().join("target/release/examples/consumer_bench"),
        ))?;
    }
    run(cargo().args(["build", "--release", "-p", "leaktrace"]))?;
    bench::run(
        &workspace(),
        &workspace().join("target/release/leaktrace"),
        quick,
    )
}
