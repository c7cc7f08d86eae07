//! A real sshd behind NAT, reached with the real ssh and scp clients through
//! `relay-client connect` → relay-server → agent service port. All real binaries.

use std::io::Write;
use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Command, Stdio};

use relay_tests::procs::{binary, relay_client, relay_server, Proc, TempDir};

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sshd_binary() -> &'static str {
    assert!(
        Path::new("/usr/sbin/sshd").exists(),
        "sshd is not installed: run the README's test command, which installs openssh-server"
    );
    "/usr/sbin/sshd"
}

/// sshd in inetd mode behind a listener the test owns: each accepted connection gets its
/// own `sshd -i` (no fixed port, no port guessing).
fn start_sshd(dir: &Path) -> std::net::SocketAddr {
    let sshd = sshd_binary();
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", ""])
        .arg("-f")
        .arg(dir.join("host_key")));
    let conf = dir.join("sshd_config");
    std::fs::write(
        &conf,
        format!(
            "HostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\n\
             PidFile none\nLogLevel ERROR\nSubsystem sftp internal-sftp\n",
            d = dir.display()
        ),
    )
    .unwrap();
    // Privilege separation needs this directory (the package creates it at boot).
    let _ = std::fs::create_dir_all("/run/sshd");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let out = stream.try_clone().unwrap();
            let _ = Command::new(sshd)
                .arg("-i")
                .arg("-f")
                .arg(&conf)
                .stdin(Stdio::from(OwnedFd::from(stream)))
                .stdout(Stdio::from(OwnedFd::from(out)))
                .stderr(Stdio::null())
                .spawn();
        }
    });
    addr
}

fn crc_of(path: &Path) -> (u64, u32) {
    let data = std::fs::read(path).unwrap();
    (data.len() as u64, crc32fast::hash(&data))
}

/// sshd behind an agent's `ssh` service port on a relay: the user key, the user name, the
/// relay's address, and the processes.
struct Lab {
    dir: TempDir,
    user: String,
    relay: std::net::SocketAddr,
    _server: Proc,
    _agent: Proc,
}

impl Lab {
    fn start(tag: &str) -> Lab {
        let dir = TempDir::new(tag);
        let d = &dir.0;
        let sshd = start_sshd(d);
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", ""])
            .arg("-f")
            .arg(d.join("user_key")));
        std::fs::copy(d.join("user_key.pub"), d.join("authorized_keys")).unwrap();
        let user = run(Command::new("id").arg("-un")).trim().to_owned();
        let (mut server, relay) = relay_server(&[]);
        let agent = relay_client(
            &format!("http://{relay}"),
            "box",
            "http://127.0.0.1:9",
            &["--service", &format!("ssh={sshd}")],
        );
        server.wait_line("relay-client connected");
        Lab {
            dir,
            user,
            relay,
            _server: server,
            _agent: agent,
        }
    }

    /// The options every ssh and scp call takes: the key, no host key prompts, batch mode.
    fn ssh_opts(&self, c: &mut Command) {
        c.arg("-i")
            .arg(self.dir.0.join("user_key"))
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
            ])
            .args(["-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]);
    }
}

/// A file of `mib` MiB of a pattern.
fn pattern_file(path: &Path, mib: u32) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut block = vec![0u8; 1 << 20];
    for i in 0..mib {
        for (j, b) in block.iter_mut().enumerate() {
            *b = (i as usize * 7 + j * 13) as u8;
        }
        f.write_all(&block).unwrap();
    }
}

#[test]
fn ssh_and_scp_of_a_gibibyte_through_the_relay() {
    let lab = Lab::start("ssh");
    let (d, user, relay) = (&lab.dir.0, &lab.user, lab.relay);
    let mut connect_cmd = Command::new(binary("relay-client"));
    connect_cmd.args([
        "connect",
        "--relay-url",
        &format!("http://{relay}"),
        "--name",
        "box",
        "--app",
        "ssh",
    ]);
    let mut connect = Proc::spawn(connect_cmd);
    let line = connect.wait_line("relay-client connect listening on ");
    let port = line.rsplit(':').next().unwrap().trim().to_owned();

    let ssh_opts = |c: &mut Command| lab.ssh_opts(c);
    let mut ssh = Command::new("ssh");
    ssh.args(["-p", &port]);
    ssh_opts(&mut ssh);
    ssh.arg(format!("{user}@127.0.0.1"))
        .arg("echo through-the-relay; echo $((6*7))");
    assert_eq!(run(&mut ssh), "through-the-relay\n42\n");

    // 1 GiB up and back down with scp, checksums intact.
    let big = d.join("big.bin");
    pattern_file(&big, 1024);
    let up = d.join("up.bin");
    let mut scp = Command::new("scp");
    scp.args(["-P", &port]);
    ssh_opts(&mut scp);
    scp.arg(&big)
        .arg(format!("{user}@127.0.0.1:{}", up.display()));
    run(&mut scp);
    let want = crc_of(&big);
    assert_eq!(crc_of(&up), want, "upload");
    let down = d.join("down.bin");
    let mut scp = Command::new("scp");
    scp.args(["-P", &port]);
    ssh_opts(&mut scp);
    scp.arg(format!("{user}@127.0.0.1:{}", up.display()))
        .arg(&down);
    run(&mut scp);
    assert_eq!(crc_of(&down), want, "download");
}

#[test]
fn ssh_and_scp_with_relay_client_as_proxy_command() {
    let lab = Lab::start("ssh-stdio");
    let (d, user) = (&lab.dir.0, &lab.user);
    // No local port: ssh runs relay-client itself and talks through its stdin and stdout.
    let proxy = format!(
        "ProxyCommand={} connect --stdio --relay-url http://{} --name box --app ssh",
        binary("relay-client").display(),
        lab.relay
    );
    let with_proxy = |c: &mut Command| {
        lab.ssh_opts(c);
        c.args(["-o", &proxy]);
    };
    let mut ssh = Command::new("ssh");
    with_proxy(&mut ssh);
    ssh.arg(format!("{user}@lab1"))
        .arg("echo through-stdio; echo $((6*7))");
    assert_eq!(run(&mut ssh), "through-stdio\n42\n");
    // Input that ends (ssh passes the EOF on as the session's EOF; the remote side still
    // answers after it).
    let mut ssh = Command::new("ssh");
    with_proxy(&mut ssh);
    ssh.arg(format!("{user}@lab1")).arg("wc -c");
    ssh.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut child = ssh.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&vec![b'x'; 100_000])
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "100000");
    // scp both ways, checksums intact.
    let file = d.join("file.bin");
    pattern_file(&file, 32);
    let up = d.join("up.bin");
    let mut scp = Command::new("scp");
    with_proxy(&mut scp);
    scp.arg(&file).arg(format!("{user}@lab1:{}", up.display()));
    run(&mut scp);
    assert_eq!(crc_of(&up), crc_of(&file), "upload");
    let down = d.join("down.bin");
    let mut scp = Command::new("scp");
    with_proxy(&mut scp);
    scp.arg(format!("{user}@lab1:{}", up.display())).arg(&down);
    run(&mut scp);
    assert_eq!(crc_of(&down), crc_of(&file), "download");
}
