//! gperftools' tcmalloc with its debug information, for the tests that read its state
//! from outside. Debian's libtcmalloc-minimal4 is stripped and its -dbgsym package
//! lives in the debian-debug archive; so the same source Debian builds it from
//! (google-perftools 2.10's orig tarball, from Debian's pool, checked against the
//! checksum in Debian's `google-perftools_2.10-1.dsc`) is built here with `-g`, once,
//! under `~/.cache/leaktrace/gperftools-2.10` (about 15 s).

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::run;

const TARBALL: &str = "google-perftools_2.10.orig.tar.gz";
const POOL: &str = "http://deb.debian.org/debian/pool/main/g/google-perftools/";
/// From `google-perftools_2.10-1.dsc`'s Checksums-Sha256.
const SHA256: &str = "b0dcfe3aca1a8355955f4b415ede43530e3bb91953b6ffdd75c45891070fe0f1";

fn dir() -> PathBuf {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache/leaktrace/gperftools-2.10")
}

/// The built library (what the tests preload).
pub fn library() -> PathBuf {
    dir().join("libtcmalloc_minimal.so")
}

/// Debian packages the build needs, where missing.
pub fn missing_packages() -> Vec<&'static str> {
    if library().exists() {
        return Vec::new();
    }
    // cmake only recommends make, and recommends are not installed.
    ["cmake", "curl", "make"]
        .into_iter()
        .filter(|t| which::which(t).is_err())
        .collect()
}

/// Builds the library if it is not there; a half-built one is never taken for a whole
/// one (it is moved into place last).
pub fn setup() -> Result<()> {
    if library().exists() {
        return Ok(());
    }
    let work = dir().with_extension("partial");
    if work.exists() {
        std::fs::remove_dir_all(&work)
            .with_context(|| format!("failed to remove {}", work.display()))?;
    }
    std::fs::create_dir_all(&work)?;
    eprintln!(
        "xtask: building gperftools 2.10's tcmalloc with debug information (Debian's source)"
    );
    let tarball = work.join(TARBALL);
    run(Command::new("curl")
        .args(["-fsS", "--retry", "3", "-o"])
        .arg(&tarball)
        .arg(format!("{POOL}{TARBALL}")))?;
    let sum = crate::output(Command::new("sha256sum").arg(&tarball))?;
    if sum.split_whitespace().next() != Some(SHA256) {
        bail!("{TARBALL}: checksum {sum} is not Debian's {SHA256}");
    }
    run(Command::new("tar")
        .arg("xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(&work))?;
    let src = work.join("gperftools-gperftools-2.10");
    let build = src.join("build");
    std::fs::create_dir_all(&build)?;
    run(Command::new("cmake").current_dir(&build).args([
        "..",
        "-Dgperftools_build_minimal=ON",
        "-DGPERFTOOLS_BUILD_STATIC=OFF",
        "-DBUILD_TESTING=OFF",
        "-DCMAKE_BUILD_TYPE=RelWithDebInfo",
    ]))?;
    run(Command::new("make")
        .current_dir(&build)
        .args(["-j2", "tcmalloc_minimal"]))?;
    let built = std::fs::read_dir(&build)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libtcmalloc_minimal.so.") && !p.is_symlink())
        })
        .context("the build made no libtcmalloc_minimal.so")?;
    std::fs::copy(&built, work.join("libtcmalloc_minimal.so"))?;
    std::fs::remove_dir_all(&src)?;
    std::fs::remove_file(&tarball)?;
    if dir().exists() {
        std::fs::remove_dir_all(dir())?;
    }
    std::fs::rename(&work, dir())?;
    Ok(())
}
