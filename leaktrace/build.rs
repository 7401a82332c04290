//! Builds the BPF object (leaktrace-ebpf) with aya-build; `AYA_BUILD_SKIP=1` skips it.
use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    // With AYA_BUILD_SKIP (for check and clippy) leave an empty object so the crate
    // compiles; loading it then fails with a clear error.
    if std::env::var_os("AYA_BUILD_SKIP").is_some() {
        let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR")?)
            .join("leaktrace");
        if !out.exists() {
            std::fs::write(&out, b"").context("write placeholder BPF object")?;
        }
    }
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("MetadataCommand::exec")?;
    let ebpf_package = packages
        .into_iter()
        .find(|cargo_metadata::Package { name, .. }| name.as_str() == "leaktrace-ebpf")
        .ok_or_else(|| anyhow!("leaktrace-ebpf package not found"))?;
    let cargo_metadata::Package {
        name,
        manifest_path,
        ..
    } = ebpf_package;
    let root_dir = manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {manifest_path}"))?
        .as_str();
    aya_build::build_ebpf(
        [aya_build::Package {
            name: name.as_str(),
            root_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
