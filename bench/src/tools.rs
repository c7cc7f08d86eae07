//! The peers' tools: rathole and bore installed with cargo into the tools folder, and the
//! `TCP_NODELAY` shim preloaded into the `rathole-nodelay` target, each made once (the shim
//! again when its source changes).

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
/// thirtieth round); its README says `TCP_NODELAY` is on by default. Built again when the
/// source this binary carries differs from the copy kept beside the library.
pub fn nodelay_shim(root: &Path) -> anyhow::Result<PathBuf> {
    const SOURCE: &str = include_str!("../../scripts/lib/nodelay.c");
    let lib = root.join("nodelay.so");
    let src = root.join("nodelay.c");
    if lib.exists() && std::fs::read_to_string(&src).is_ok_and(|kept| kept == SOURCE) {
        return Ok(lib);
    }
    std::fs::create_dir_all(root)?;
    // The library first, the source after a successful build: a failed build is tried again.
    let _ = std::fs::remove_file(&src);
    let building = root.join("nodelay.build.c");
    std::fs::write(&building, SOURCE)?;
    let status = Command::new("cc")
        .args(["-O2", "-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg(&building)
        .arg("-ldl")
        .status()
        .context("running cc to build the TCP_NODELAY shim for rathole")?;
    anyhow::ensure!(status.success(), "cc failed to build {}", lib.display());
    std::fs::rename(&building, &src)?;
    Ok(lib)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shim is built once, used as it is while its source is the same, and built again
    /// when the kept source differs (a changed `scripts/lib/nodelay.c`).
    #[test]
    fn the_shim_is_built_again_when_its_source_changes() {
        let dir = relay_tests::procs::TempDir::new("bench-tools");
        let lib = nodelay_shim(&dir.0).unwrap();
        let built = std::fs::metadata(&lib).unwrap().modified().unwrap();
        // The same source: the library is reused, not built again.
        assert_eq!(nodelay_shim(&dir.0).unwrap(), lib);
        assert_eq!(std::fs::metadata(&lib).unwrap().modified().unwrap(), built);
        // Another source kept beside it (as after an edit of nodelay.c): built again, and the
        // kept source is this binary's once more.
        std::fs::write(dir.0.join("nodelay.c"), "/* an older shim */\n").unwrap();
        std::fs::write(&lib, b"not a library").unwrap();
        nodelay_shim(&dir.0).unwrap();
        let rebuilt = std::fs::read(&lib).unwrap();
        assert!(
            rebuilt.starts_with(b"\x7fELF"),
            "the library was built again"
        );
        assert_eq!(
            std::fs::read_to_string(dir.0.join("nodelay.c")).unwrap(),
            include_str!("../../scripts/lib/nodelay.c")
        );
    }
}
