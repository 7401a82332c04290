//! Foreign roots for the container tests: Debian sid's minimal root with python3.14
//! (3.14 on glibc 2.43), made with debootstrap into a directory xtask owns
//! (`~/.cache/leaktrace/sid-root`) and reused once there. The tests run its
//! python3.14 in a chroot and in a container (their own mount and pid namespaces,
//! overlayfs over this root, pivot_root).

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result};

use crate::run;

/// Where the sid root lives.
pub fn sid_root() -> PathBuf {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache/leaktrace/sid-root")
}

/// Debian packages the roots need, where missing.
pub fn missing_packages() -> Vec<&'static str> {
    if sid_root().join("usr/bin/python3.14").exists() || which::which("debootstrap").is_ok() {
        Vec::new()
    } else {
        vec!["debootstrap"]
    }
}

/// Makes the sid root if it is not there (about 35–55 s), atomically: a
/// half-made root is never taken for a whole one.
pub fn setup() -> Result<()> {
    let root = sid_root();
    if root.join("usr/bin/python3.14").exists() {
        return Ok(());
    }
    let tmp = root.with_extension("partial");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("failed to remove {}", tmp.display()))?;
    }
    eprintln!(
        "xtask: making Debian sid's root with python3.14 at {} (debootstrap, about a minute)",
        root.display()
    );
    run(Command::new("debootstrap")
        .args(["--variant=minbase", "--include=python3.14", "sid"])
        .arg(&tmp)
        .arg("http://deb.debian.org/debian"))?;
    std::fs::rename(&tmp, &root)
        .with_context(|| format!("failed to move {} to {}", tmp.display(), root.display()))?;
    Ok(())
}
