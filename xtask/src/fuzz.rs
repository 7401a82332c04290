//! The fuzzing tier: cargo-fuzz targets (`fuzz/`) over every parser of data a target
//! controls. `cargo xtask test` runs each target briefly after replaying the inputs
//! that once failed (`fuzz/regressions/TARGET/`); `cargo xtask fuzz` runs longer.

use std::{path::Path, process::Command};

use anyhow::{Context as _, Result, bail};

/// The targets, as named in fuzz/Cargo.toml.
pub const TARGETS: &[&str] = &[
    "proc_text",
    "elf_objects",
    "heap_walk",
    "python_code",
    "capture",
];

/// cargo-fuzz on the nightly toolchain, in `fuzz/`, without the BPF build (the
/// targets only call parsers) and without the stable toolchain's environment.
fn cargo_fuzz(workspace: &Path) -> Command {
    let mut c = Command::new("rustup");
    c.args(["run", "nightly", "cargo", "fuzz"])
        .current_dir(workspace.join("fuzz"))
        .env("AYA_BUILD_SKIP", "1")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO");
    c
}

fn run(c: &mut Command) -> Result<()> {
    eprintln!("xtask: running {c:?}");
    let status = c.status().with_context(|| format!("failed to run {c:?}"))?;
    if !status.success() {
        bail!("{c:?} failed: {status}");
    }
    Ok(())
}

/// Builds the targets, replays each one's regression inputs, then fuzzes each for
/// `secs` seconds (`only`: one target). A crash fails with libFuzzer's report; its
/// input is left in fuzz/artifacts/TARGET/.
pub fn run_targets(workspace: &Path, secs: u64, only: Option<&str>) -> Result<()> {
    run(cargo_fuzz(workspace).arg("build"))?;
    for t in TARGETS.iter().filter(|t| only.is_none_or(|o| o == **t)) {
        let regressions = workspace.join("fuzz/regressions").join(t);
        if regressions.is_dir() {
            // -runs=0: run the given inputs once each, no fuzzing.
            run(cargo_fuzz(workspace)
                .args(["run", t])
                .arg(&regressions)
                .args(["--", "-runs=0"]))?;
        }
        run(cargo_fuzz(workspace).args(["run", t]).args([
            "--".to_owned(),
            format!("-max_total_time={secs}"),
            "-rss_limit_mb=2048".to_owned(),
            "-timeout=10".to_owned(),
            "-print_final_stats=1".to_owned(),
        ]))?;
    }
    Ok(())
}
