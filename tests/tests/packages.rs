//! The Debian packages `scripts/package.sh` builds (the README's test command runs it first),
//! installed on this machine with dpkg as root: the installed binaries run and check the
//! installed configs, the installed units verify, the system users exist and can read their
//! configs, and a purge leaves nothing behind.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use relay_tests::procs::TempDir;

/// The package of `name` in target/debian.
fn deb(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debian");
    std::fs::read_dir(&dir)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{name}_")) && n.ends_with(".deb"))
        })
        .unwrap_or_else(|| {
            panic!(
                "no {name} package in {}: run scripts/package.sh (the README's test command does)",
                dir.display()
            )
        })
}

/// Runs `cmd`; its output when it succeeded.
fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{cmd:?} failed: {said}");
    said
}

fn has_user(name: &str) -> bool {
    Command::new("getent")
        .args(["passwd", name])
        .output()
        .unwrap()
        .status
        .success()
}

#[test]
fn debian_packages_install_run_verify_and_purge() {
    let (server, client) = (deb("relay-server"), deb("relay-client"));
    assert_eq!(
        ok(Command::new("id").arg("-u")).trim(),
        "0",
        "installing packages needs root (the README's test command runs as root)"
    );
    ok(Command::new("dpkg").arg("-i").arg(&server).arg(&client));

    for bin in ["relay-server", "relay-client"] {
        let v = ok(Command::new(format!("/usr/bin/{bin}")).arg("--version"));
        assert!(v.starts_with(bin), "{v}");
    }
    // The installed example configs check out with the installed binaries.
    let dir = TempDir::new("packages");
    let key = dir.0.join("link.key");
    std::fs::write(&key, "k".repeat(40)).unwrap();
    ok(Command::new("/usr/bin/relay-server")
        .args(["check-config", "/etc/relay/relay.toml"])
        .env("RELAY_LINK_SECRET_FILE", &key));
    ok(Command::new("/usr/bin/relay-client").args([
        "--config",
        "/etc/relay-client/agent.toml",
        "--version",
    ]));
    // The installed units verify (they name the installed binaries and the system users).
    let said = ok(Command::new("systemd-analyze").args([
        "verify",
        "/lib/systemd/system/relay-server.service",
        "/lib/systemd/system/relay-client.service",
    ]));
    assert!(said.trim().is_empty(), "systemd-analyze verify: {said}");
    // Each config is readable by its service's system user and nobody else.
    for (file, user) in [
        ("/etc/relay/relay.toml", "relay"),
        ("/etc/relay-client/agent.toml", "relay-client"),
    ] {
        assert!(has_user(user), "{user}");
        let meta = std::fs::metadata(file).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o640, "{file}");
        assert_eq!(meta.uid(), 0, "{file}");
        let gid = ok(Command::new("id").args(["-g", user]));
        assert_eq!(meta.gid().to_string(), gid.trim(), "{file}");
    }
    let listed = ok(Command::new("dpkg").args(["-L", "relay-server"]));
    assert!(listed.contains("/etc/relay/relay.toml"), "{listed}");
    // Man pages and completions made from the binaries' own flags.
    for bin in ["relay-server", "relay-client"] {
        let page = std::fs::read(format!("/usr/share/man/man1/{bin}.1.gz")).unwrap();
        assert_eq!(&page[..2], b"\x1f\x8b", "{bin}.1.gz is gzip");
        let bash = std::fs::read_to_string(format!("/usr/share/bash-completion/completions/{bin}"))
            .unwrap();
        assert!(bash.contains("--otlp-endpoint"), "{bin} bash completion");
        assert!(Path::new(&format!("/usr/share/zsh/vendor-completions/_{bin}")).exists());
        assert!(Path::new(&format!("/usr/share/fish/vendor_completions.d/{bin}.fish")).exists());
    }

    ok(Command::new("dpkg").args(["--purge", "relay-client", "relay-server"]));
    for gone in [
        "/usr/bin/relay-server",
        "/usr/bin/relay-client",
        "/lib/systemd/system/relay-server.service",
        "/etc/relay/relay.toml",
        "/etc/relay-client/agent.toml",
        "/usr/share/man/man1/relay-server.1.gz",
    ] {
        assert!(!Path::new(gone).exists(), "{gone} is left after the purge");
    }
    assert!(!has_user("relay") && !has_user("relay-client"));
}
