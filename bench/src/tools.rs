//! The peers' tools: rathole and bore installed with cargo into the tools folder, and the
//! `TCP_NODELAY` shim preloaded into the `rathole-nodelay` target, each made once.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

/// Installs `krate` into `root` with cargo unless `bin` is already there.
pub fn install(root: &Path, krate: &str, bin: &str, extra: &[&str]) -> anyhow::Result<PathBuf> {
    let path = root.join("bin").join(bin);
    if path.exists() {
        return Ok(path);
    }
    eprintln!("installing {krate} into {} (once)…", root.display());
    // The published lock file first; some (rathole 0.5's pins a `time` that no longer
    // builds on current compilers) need fresh compatible versions instead.
    for locked in [true, false] {
        let mut cmd = Command::new("cargo");
        cmd.arg("install");
        if locked {
            cmd.arg("--locked");
        }
        let status = cmd
            .arg("--root")
            .arg(root)
            .arg(krate)
            .args(extra)
            .status()?;
        if status.success() && path.exists() {
            return Ok(path);
        }
    }
    bail!("cargo install {krate} failed")
}

/// `scripts/lib/nodelay.c` built into `root` (once, with `cc`): preloaded into rathole, it
/// sets `TCP_NODELAY` on every connection rathole accepts or makes. rathole 0.5.0 leaves
/// Nagle's algorithm on for the visitor's and the backend's connections, and with several
/// HTTP/2 answers in flight it then stalls 40 ms at a time (docs/PERFORMANCE.md, the
/// thirtieth round); its README says `TCP_NODELAY` is on by default.
pub fn nodelay_shim(root: &Path) -> anyhow::Result<PathBuf> {
    let lib = root.join("nodelay.so");
    if lib.exists() {
        return Ok(lib);
    }
    std::fs::create_dir_all(root)?;
    let src = root.join("nodelay.c");
    std::fs::write(&src, include_str!("../../scripts/lib/nodelay.c"))?;
    let status = Command::new("cc")
        .args(["-O2", "-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg(&src)
        .arg("-ldl")
        .status()
        .context("running cc to build the TCP_NODELAY shim for rathole")?;
    anyhow::ensure!(status.success(), "cc failed to build {}", lib.display());
    Ok(lib)
}
