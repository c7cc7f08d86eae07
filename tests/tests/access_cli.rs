//! Access control as an operator meets it: the relay-server binary's flags, its refusal to
//! serve open backends beyond loopback, and `relay-server sign-link`.

use std::process::Command;

use http::{header, Request, StatusCode};
use relay_tests::procs::{binary, relay_server, TempDir};
use relay_tests::*;

fn refused(args: &[&str]) -> String {
    refused_with(1, args)
}

fn refused_with(code: i32, args: &[&str]) -> String {
    let out = Command::new(binary("relay-server"))
        .args(args)
        .env_remove("RELAY_ACCESS")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(code), "{args:?} was not refused");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn refuses_configurations_that_cannot_be_safe() {
    // Validated before binding: nothing ever listens on the public address.
    let err = refused(&["--listen", "0.0.0.0:0"]);
    assert!(
        err.contains("not loopback") && err.contains("--allow-open"),
        "{err}"
    );
    let err = refused(&[
        "--listen",
        "127.0.0.1:0",
        "--access-for",
        "a=open",
        "--access",
        "token",
    ]);
    assert!(err.contains("no --user-token"), "{err}");
    let err = refused(&["--listen", "127.0.0.1:0", "--access", "signed-link"]);
    assert!(err.contains("--link-secret-file"), "{err}");
    let err = refused(&["--listen", "127.0.0.1:0", "--access", "forward-auth"]);
    assert!(err.contains("--forward-auth-url"), "{err}");
    // A usage error (clap's status 2).
    let err = refused_with(2, &["--listen", "127.0.0.1:0", "--access", "sesame"]);
    assert!(err.contains("unknown access mode"), "{err}");
}

#[tokio::test]
async fn sign_link_prints_a_link_the_server_honours_once() {
    let dir = TempDir::new("links");
    let key = dir.0.join("link.key");
    std::fs::write(&key, "k3y-0123456789abcdef0123456789abcdef\n").unwrap();
    let key = key.to_str().unwrap();
    let (mut server, addr) = relay_server(&[
        "--access",
        "signed-link",
        "--access-for",
        "open-one=open",
        "--link-secret-file",
        key,
    ]);
    let (backend, seen) = recording_backend().await;
    let url = format!("http://{addr}");
    let _a = Agent::start(Agent::config(&url, "nb", &format!("http://{backend}")));
    let _b = Agent::start(Agent::config(
        &url,
        "open-one",
        &format!("http://{backend}"),
    ));
    server.wait_line("relay-client connected name=\"nb\"");
    server.wait_line("relay-client connected name=\"open-one\"");

    let out = Command::new(binary("relay-server"))
        .args([
            "sign-link",
            "--name",
            "nb",
            "--ttl",
            "5m",
            "--base-url",
            &url,
        ])
        .args(["--link-secret-file", key])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let link = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(
        link.starts_with(&format!("{url}/client/nb/?relay_exp=")),
        "{link}"
    );

    let c = client();
    let resp = c
        .request(Request::get(&link).body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let cookie = resp.headers()[header::SET_COOKIE]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let again = c
        .request(Request::get(&link).body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::FORBIDDEN);

    let resp = c
        .request(
            Request::get(format!("{url}/client/nb/notebook"))
                .header("cookie", &cookie)
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let status = resp.status();
    assert_eq!(status, StatusCode::OK);
    // The per-name override: open without a link.
    let resp = c
        .request(
            Request::get(format!("{url}/client/open-one/"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(seen.lock().unwrap().iter().any(|s| s.target == "/notebook"));
}
