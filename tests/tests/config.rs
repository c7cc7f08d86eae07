//! Configuration files with the real binaries: precedence (flag > env > file > default),
//! errors that name the line and key, `check-config`, reload on SIGHUP and on change
//! without dropping connections, and the agent reading its settings from a file.

use std::process::Command;

use relay_tests::procs::{binary, Proc, TempDir};
use relay_tests::*;
use tokio::io::AsyncWriteExt;

const USER1: &str = "user-one-token-0123456789";
const USER2: &str = "user-two-token-0123456789";

/// Starts the server binary with `args` and `env`; returns it and its address.
fn server(args: &[&str], env: &[(&str, &str)]) -> (Proc, std::net::SocketAddr) {
    let mut cmd = Command::new(binary("relay-server"));
    cmd.args(args)
        .env("RELAY_LOG", "info")
        .env_remove("RELAY_ACCESS");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut p = Proc::spawn(cmd);
    let addr = p.wait_addr("relay-server listening on http://");
    (p, addr)
}

/// One request on a keep-alive connection; returns the status code.
async fn status_on(conn: &mut tokio::net::TcpStream, path: &str, token: Option<&str>) -> u16 {
    let auth = token
        .map(|t| format!("X-Relay-Token: {t}\r\n"))
        .unwrap_or_default();
    conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n").as_bytes())
        .await
        .unwrap();
    let (head, _) = read_response(conn).await;
    head[9..12].parse().unwrap()
}

async fn status(addr: std::net::SocketAddr, path: &str, token: Option<&str>) -> u16 {
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    status_on(&mut c, path, token).await
}

#[tokio::test]
async fn flag_beats_env_beats_file_beats_default() {
    let dir = TempDir::new("cfg-precedence");
    let file = dir.0.join("relay.toml");
    std::fs::write(
        &file,
        format!("listen = \"127.0.0.1:0\"\naccess = \"token\"\nuser_token = {{ \"*\" = \"{USER1}\" }}\n"),
    )
    .unwrap();
    let f = file.to_str().unwrap();
    // File over default: token access (401 without a token, not 503).
    let (_s, addr) = server(&["--config", f], &[]);
    assert_eq!(status(addr, "/client/a/", None).await, 401);
    assert_eq!(status(addr, "/client/a/", Some(USER1)).await, 503);
    // Env over file: open access.
    let (_s, addr) = server(&["--config", f], &[("RELAY_ACCESS", "open")]);
    assert_eq!(status(addr, "/client/a/", None).await, 503);
    // Flag over env.
    let (_s, addr) = server(
        &["--config", f, "--access", "token"],
        &[("RELAY_ACCESS", "open")],
    );
    assert_eq!(status(addr, "/client/a/", None).await, 401);
}

#[test]
fn bad_files_are_refused_with_line_and_key_and_check_config_says_why() {
    let dir = TempDir::new("cfg-errors");
    let bad_value = dir.write(
        "v.toml",
        "# limits\nlisten = \"127.0.0.1:0\"\npickup_timeout = \"soon\"\n",
    );
    let unknown = dir.write(
        "k.toml",
        "listen = \"127.0.0.1:0\"\nmax_parked_per_nam = 3\n",
    );
    let bad_mode = dir.write(
        "m.toml",
        "listen = \"127.0.0.1:0\"\naccess_for = { nb = \"signed-link\" }\n",
    );
    let good = dir.write(
        "g.toml",
        "listen = \"127.0.0.1:0\"\naccess = \"token\"\nuser_token = { \"*\" = \"user-token-0123456789abc\" }\nagent_token = [\"robot=agent-token-0123456789\"]\n",
    );
    let run = |args: &[&str]| {
        let out = Command::new(binary("relay-server"))
            .args(args)
            .env_remove("RELAY_ACCESS")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (code, out) = run(&["--config", bad_value.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    assert!(
        out.contains("v.toml:3: `pickup_timeout`: invalid value 'soon'"),
        "{out}"
    );
    let (code, out) = run(&["check-config", unknown.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(
        out.contains(
            "k.toml:2: unknown key `max_parked_per_nam` (did you mean `max_parked_per_name`?)"
        ),
        "{out}"
    );
    let (code, out) = run(&["check-config", bad_mode.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(out.contains("--link-secret-file"), "{out}");
    let (code, out) = run(&["check-config", good.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("ok") && out.contains("1 agent token(s), 1 user token(s), access token"),
        "{out}"
    );
}

#[tokio::test]
async fn reload_swaps_tokens_on_sighup_and_change_and_keeps_connections() {
    let dir = TempDir::new("cfg-reload");
    let file = dir.0.join("relay.toml");
    let config = |user: &str| {
        format!(
            "listen = \"127.0.0.1:0\"\naccess = \"token\"\nuser_token = {{ \"*\" = \"{user}\" }}\n"
        )
    };
    std::fs::write(&file, config(USER1)).unwrap();
    let (mut s, addr) = server(&["--config", file.to_str().unwrap()], &[]);
    // A keep-alive connection that must survive every reload.
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert_eq!(status_on(&mut conn, "/healthz", None).await, 200);
    assert_eq!(status(addr, "/client/a/", Some(USER1)).await, 503);
    assert_eq!(status(addr, "/client/a/", Some(USER2)).await, 403);

    // A changed file is picked up by itself.
    let reloads = |p: &mut Proc| p.next_line("configuration reloaded");
    std::fs::write(&file, config(USER2)).unwrap();
    reloads(&mut s);
    assert_eq!(status(addr, "/client/a/", Some(USER2)).await, 503);
    assert_eq!(status(addr, "/client/a/", Some(USER1)).await, 403);
    assert_eq!(status_on(&mut conn, "/healthz", None).await, 200);

    // A broken file is refused on SIGHUP; the running rules stay.
    std::fs::write(&file, "access = \"sesame\"\n").unwrap();
    let hup = |p: &Proc| {
        assert!(Command::new("kill")
            .args(["-HUP", &p.child.id().to_string()])
            .status()
            .unwrap()
            .success())
    };
    hup(&s);
    let line = s.next_line("reload refused");
    assert!(line.contains("sesame"), "{line}");
    assert_eq!(status(addr, "/client/a/", Some(USER2)).await, 503);
    // A good file on SIGHUP applies.
    std::fs::write(&file, config(USER1)).unwrap();
    hup(&s);
    reloads(&mut s);
    assert_eq!(status(addr, "/client/a/", Some(USER1)).await, 503);
    assert_eq!(status_on(&mut conn, "/healthz", None).await, 200);

    // A relative token file is found next to the configuration file, not in the server's
    // working directory (the test's, elsewhere).
    std::fs::write(dir.0.join("users"), format!("*={USER2}\n")).unwrap();
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:0\"\naccess = \"token\"\nuser_token_file = \"users\"\n",
    )
    .unwrap();
    hup(&s);
    reloads(&mut s);
    assert_eq!(status(addr, "/client/a/", Some(USER2)).await, 503);
    assert_eq!(status(addr, "/client/a/", Some(USER1)).await, 403);
}

/// An agent call (`/server/probe`) with `token`; returns the status code.
async fn agent_status(addr: std::net::SocketAddr, token: &str) -> u16 {
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req =
        format!("GET /server/probe HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n");
    c.write_all(req.as_bytes()).await.unwrap();
    let (head, _) = read_response(&mut c).await;
    head[9..12].parse().unwrap()
}

#[tokio::test]
async fn a_token_removed_from_the_file_is_refused_after_the_reload() {
    const AGENT: &str = "agent-token-in-the-file-0123456789";
    let dir = TempDir::new("cfg-revoke");
    let file = dir.0.join("relay.toml");
    let base = "listen = \"127.0.0.1:0\"\n";
    std::fs::write(
        &file,
        format!("{base}agent_token = {{ \"*\" = \"{AGENT}\" }}\n"),
    )
    .unwrap();
    let (mut s, addr) = server(&["--config", file.to_str().unwrap()], &[]);
    assert_eq!(agent_status(addr, AGENT).await, 200);
    // The last token leaves the file: no agent is admitted any more (nothing was generated
    // at start, so nothing is kept).
    std::fs::write(&file, base).unwrap();
    s.next_line("configuration reloaded");
    assert_eq!(agent_status(addr, AGENT).await, 401);
    // Back in the file, back in force.
    std::fs::write(
        &file,
        format!("{base}agent_token = {{ \"*\" = \"{AGENT}\" }}\n"),
    )
    .unwrap();
    s.next_line("configuration reloaded");
    assert_eq!(agent_status(addr, AGENT).await, 200);
}

#[tokio::test]
async fn the_generated_token_survives_reloads_of_a_file_without_tokens() {
    const USER: &str = "user-token-for-the-reload-0123456789";
    let dir = TempDir::new("cfg-generated");
    let file = dir.0.join("relay.toml");
    std::fs::write(&file, "listen = \"127.0.0.1:0\"\n").unwrap();
    let (mut s, addr) = server(&["--config", file.to_str().unwrap()], &[]);
    let line = s.next_line("--token ");
    let token = line.rsplit("--token ").next().unwrap().trim().to_owned();
    assert_eq!(agent_status(addr, &token).await, 200);
    std::fs::write(
        &file,
        format!("listen = \"127.0.0.1:0\"\nuser_token = {{ \"*\" = \"{USER}\" }}\n"),
    )
    .unwrap();
    s.next_line("configuration reloaded");
    assert_eq!(agent_status(addr, &token).await, 200);
}

#[tokio::test]
async fn a_reload_rotates_the_link_key_and_names_what_needs_a_restart() {
    let (k1, k2) = (
        "first-link-key-0123456789abcdef0123",
        "second-link-key-0123456789abcdef012",
    );
    let dir = TempDir::new("cfg-link-key");
    std::fs::write(dir.0.join("k1"), k1).unwrap();
    std::fs::write(dir.0.join("k2"), k2).unwrap();
    let file = dir.0.join("relay.toml");
    let config = |key: &str, extra: &str| {
        format!(
            "listen = \"127.0.0.1:0\"\naccess = \"signed-link\"\nlink_secret_file = \"{key}\"\n{extra}"
        )
    };
    std::fs::write(&file, config("k1", "")).unwrap();
    let (mut s, addr) = server(&["--config", file.to_str().unwrap()], &[]);
    let link = |key: &str| {
        let secret = relay_server::Secret(key.to_owned());
        let q =
            relay_server::user::link::sign(&secret, "a", "/", std::time::Duration::from_secs(60));
        format!("/client/a/?{q}")
    };
    // A session opened with the first key: admitted (503: no agent serves `a` here).
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    c.write_all(format!("GET {} HTTP/1.1\r\nHost: x\r\n\r\n", link(k1)).as_bytes())
        .await
        .unwrap();
    let (head, _) = read_response(&mut c).await;
    assert!(head.starts_with("HTTP/1.1 303"), "{head}");
    let cookie = head
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .and_then(|v| v.split(';').next())
        .expect("a session cookie")
        .to_owned();
    let with_session = |cookie: String| async move {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(
            format!("GET /client/a/ HTTP/1.1\r\nHost: x\r\nCookie: {cookie}\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let (head, _) = read_response(&mut c).await;
        head[9..12].parse::<u16>().unwrap()
    };
    assert_eq!(with_session(cookie.clone()).await, 503);
    // The key is rotated (it leaked): links signed with the old one stop at once, and so
    // do the sessions they opened. A changed limit is named as needing a restart instead
    // of being ignored silently.
    std::fs::write(&file, config("k2", "pickup_timeout = \"3s\"\n")).unwrap();
    let line = s.next_line("take effect only after a restart");
    assert!(line.contains("pickup_timeout"), "{line}");
    assert!(!line.contains("link"), "{line}");
    s.next_line("configuration reloaded");
    assert_eq!(status(addr, &link(k1), None).await, 403);
    assert_eq!(with_session(cookie).await, 403);
    assert_eq!(status(addr, &link(k2), None).await, 303);
}

#[tokio::test]
async fn the_agent_reads_its_settings_from_a_file() {
    let (backend, seen) = recording_backend().await;
    let (mut s, addr) = relay_tests::procs::relay_server(&[]);
    let dir = TempDir::new("cfg-agent");
    let file = dir.0.join("agent.toml");
    std::fs::write(
        &file,
        format!(
            "relay_url = \"http://{addr}\"\nname = \"from-file\"\nbackend_url = \"http://{backend}\"\ntoken = \"{TOKEN}\"\npollers = 2\n"
        ),
    )
    .unwrap();
    let mut agent = Proc::spawn({
        let mut c = Command::new(binary("relay-client"));
        c.args(["--config", file.to_str().unwrap()]);
        c
    });
    agent.wait_line("relay-client started");
    s.wait_line("relay-client connected name=\"from-file\"");
    assert_eq!(status(addr, "/client/from-file/x", None).await, 200);
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_revoked_agent_token_ends_work_in_progress_and_gets_no_new_request() {
    use http::{Request, StatusCode};
    use http_body_util::BodyExt;
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = hits.clone();
    // `/stream` sends one chunk and then holds the response open (an SSE feed).
    let backend = backend(move |req: Request<hyper::body::Incoming>| {
        let seen = seen.clone();
        async move {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if req.uri().path() == "/stream" {
                let (tx, body) = channel_body(1);
                tokio::spawn(async move {
                    tx.send(data("event: hello\n\n")).await.unwrap();
                    tx.closed().await;
                });
                return hyper::Response::new(body);
            }
            hyper::Response::new(full("secret page"))
        }
    })
    .await;
    let server = Server::default().await;
    let agent = Agent::start(Agent::config(
        &server.url(),
        "a",
        &format!("http://{backend}"),
    ));
    server.wait_agent("a").await;
    let c = client();
    let resp = c
        .request(
            Request::get(format!("{}/client/a/stream", server.url()))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut stream = resp.into_body();
    let first = stream.frame().await.unwrap().unwrap();
    assert_eq!(first.data_ref().unwrap().as_ref(), b"event: hello\n\n");
    // The agent's polls are parked again, holding the old token.
    wait_for(|| {
        server
            .state
            .broker
            .live_backend("a")
            .is_some_and(|b| b.has_parked_poll())
    })
    .await;
    let before = hits.load(std::sync::atomic::Ordering::SeqCst);

    // The operator replaces the token (it leaked) and reloads.
    let mut cfg = server_config();
    cfg.agent_tokens = vec![(
        relay_server::TokenScope::Any,
        relay_server::Secret("the-new-agent-token-0123456789".into()),
    )];
    server.state.reload(&cfg).unwrap();

    // The open stream ends visibly (an error, not a clean end that looks complete)...
    let end = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            match stream.frame().await {
                Some(Ok(_)) => continue,
                Some(Err(_)) => return "error",
                None => return "clean end",
            }
        }
    })
    .await
    .expect("the stream of a revoked agent stayed open");
    assert_eq!(end, "error");
    // ...the next request is refused at once instead of reaching a parked poll of the
    // revoked agent (with the user's cookies)...
    let resp = c
        .request(
            Request::get(format!("{}/client/a/page", server.url()))
                .header("cookie", "sid=users-session")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), before);
    // ...and the agent learns it was refused (401) and stops.
    match agent.exited().await {
        Err(relay_client::AgentError::Refused { status: 401, .. }) => {}
        other => panic!("expected a 401 refusal, got {other:?}"),
    }
    server.wait_idle().await;
}
