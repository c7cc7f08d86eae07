//! Access control as an operator meets it: the relay-server binary's flags, its refusal to
//! serve open backends beyond loopback, and `relay-server sign-link`.

use std::process::Command;
use std::time::Duration;

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

#[tokio::test]
async fn sign_link_takes_key_url_and_domain_from_the_server_config() {
    let dir = TempDir::new("links-config");
    let key = dir.0.join("link.key");
    std::fs::write(&key, "k3y-from-the-config-0123456789abcdef\n").unwrap();
    let file = dir.0.join("relay.toml");
    std::fs::write(
        &file,
        format!(
            "access = \"signed-link\"\nlink_secret_file = \"{}\"\npublic_url = \"https://relay.example:8443\"\n",
            key.display()
        ),
    )
    .unwrap();
    let sign = |extra: &[&str]| {
        let out = Command::new(binary("relay-server"))
            .args([
                "sign-link",
                "--config",
                file.to_str().unwrap(),
                "--name",
                "nb",
            ])
            .args(["--ttl", "10m"])
            .args(extra)
            .env_remove("RELAY_PUBLIC_URL")
            .env_remove("RELAY_PUBLIC_DOMAIN")
            .env_remove("RELAY_LINK_SECRET_FILE")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let link = sign(&[]);
    assert!(
        link.starts_with("https://relay.example:8443/client/nb/?relay_exp="),
        "{link}"
    );
    // The link is signed with the config's key: a server with that key redeems it.
    let sessions = relay_server::user::link::Sessions::new(
        relay_server::Secret("k3y-from-the-config-0123456789abcdef".into()),
        Duration::from_secs(60),
        Duration::from_secs(600),
        10,
    );
    let query = link.split_once('?').unwrap().1;
    let params = relay_server::user::link::LinkParams::parse(query).unwrap();
    assert!(sessions.redeem("nb", "/", &params).await.is_ok());
    // A flag still wins over the file; a public domain makes a host link.
    let link = sign(&["--public-domain", "apps.example"]);
    assert!(
        link.starts_with("https://nb.apps.example:8443/?relay_exp="),
        "{link}"
    );
}
