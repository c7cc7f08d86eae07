//! The benchmark suite's smoke mode (a few seconds; direct, relay, the three-replica
//! cluster, and nginx and HAProxy as reverse proxies), so the suite cannot rot: every
//! scenario runs end to end through the real binaries and reports a value for every target.

use std::process::Command;

use relay_tests::procs::{binary, TempDir};

/// Runs `relay-bench --smoke` with `args`; returns its JSON results.
fn bench(args: &[&str]) -> serde_json::Value {
    let dir = TempDir::new("bench");
    let out = dir.0.join("results.json");
    let run = Command::new(binary("relay-bench"))
        .arg("--smoke")
        .args(args)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap()
}

#[test]
fn bench_smoke_runs_every_scenario() {
    let v = bench(&[]);
    assert_eq!(
        v["targets"],
        serde_json::json!(["direct", "relay", "cluster", "nginx", "haproxy"])
    );
    let rows = v["results"].as_array().unwrap();
    for scenario in [
        "1 keep-alive 16 conn req/s",
        "1 keep-alive 64 conn req/s",
        "2 new connection",
        "3 download 1 MB",
        "3 upload 1 MB",
        "4 tunnel up",
        "7 HTTP/2 32 streams req/s",
        "7 HTTP/2 32 streams h2load req/s",
        "8 small GETs during a 16 MiB download, req/s",
    ] {
        let row = rows
            .iter()
            .find(|r| r["metric"].as_str().unwrap().starts_with(scenario))
            .unwrap_or_else(|| panic!("no {scenario} row"));
        for t in ["direct", "relay", "cluster"] {
            assert!(
                row[t]["value"].as_f64().unwrap() > 0.0,
                "{scenario} {t}: {row}"
            );
        }
        // The proxies are rulers for the rates compared in turns (1, 2 and 7) only.
        for proxy in ["nginx", "haproxy"] {
            let v = row[proxy]["value"].as_f64().unwrap();
            if ["1 ", "2 ", "7 "].iter().any(|p| scenario.starts_with(p)) {
                assert!(v > 0.0, "{scenario} {proxy}: {row}");
            } else {
                assert_eq!(v, 0.0, "{scenario} {proxy}: {row}");
            }
        }
    }
    // The relaying processes' CPU per request, for the targets that have them (the
    // backend alone relays nothing).
    for metric in [
        "1 keep-alive 16 conn relaying CPU µs per request",
        "7 HTTP/2 32 streams relaying CPU µs per request",
        "7 HTTP/2 32 streams h2load relaying CPU µs per request",
    ] {
        let row = rows
            .iter()
            .find(|r| r["metric"] == metric)
            .unwrap_or_else(|| panic!("no {metric} row"));
        for t in ["relay", "cluster", "nginx", "haproxy"] {
            let v = row[t]["value"].as_f64().unwrap();
            assert!(v.is_finite() && v > 0.0, "{metric} {t}: {row}");
        }
        assert_eq!(row["direct"]["value"].as_f64(), Some(0.0), "{row}");
    }
    // Each steady rate has its runs' spread beside it.
    for rate in [
        "1 keep-alive 16 conn req/s",
        "7 HTTP/2 32 streams req/s",
        "7 HTTP/2 32 streams h2load req/s",
    ] {
        let metric = format!("{rate} spread %");
        let row = rows
            .iter()
            .find(|r| r["metric"] == metric.as_str())
            .unwrap_or_else(|| panic!("no {metric} row"));
        for t in ["direct", "relay", "cluster", "nginx", "haproxy"] {
            let v = row[t]["value"].as_f64().unwrap();
            assert!(v.is_finite() && v >= 0.0, "{metric} {t}: {row}");
        }
    }
}

#[test]
fn bench_only_runs_the_chosen_scenarios() {
    let v = bench(&["--no-cluster", "--only", "2,5"]);
    let metrics: Vec<&str> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["metric"].as_str().unwrap())
        .collect();
    assert!(metrics.iter().any(|m| m.starts_with("2 ")), "{metrics:?}");
    assert!(
        metrics.iter().any(|m| m.contains("agents KiB per agent")),
        "{metrics:?}"
    );
    assert!(
        metrics
            .iter()
            .any(|m| m.contains("agents on sessions KiB per agent")),
        "{metrics:?}"
    );
    assert!(
        metrics
            .iter()
            .all(|m| m.starts_with("2 ") || m.starts_with("5 ")),
        "{metrics:?}"
    );
    // A scenario number outside 1-8 is refused with a clear message.
    let bad = Command::new(binary("relay-bench"))
        .args(["--smoke", "--only", "9"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("--only"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

/// `relay-bench load` drives a relay that terminates TLS itself (`https://` with `--ca`),
/// and refuses what it cannot measure over TLS with a clear message.
#[tokio::test]
async fn the_load_generator_measures_a_relay_that_terminates_tls() {
    use relay_tests::*;
    let dir = TempDir::new("bench-tls");
    let (ca, leaf, key) = relay_tests::pki::throwaway_pki_pem();
    let ca = dir.write("ca.pem", &ca);
    let (backend, seen) = recording_backend().await;
    let mut cfg = server_config();
    cfg.tls = Some((dir.write("cert.pem", &leaf), dir.write("key.pem", &key)));
    let server = Server::start(cfg).await;
    let base = format!("https://127.0.0.1:{}", server.addr.port());
    let mut acfg = Agent::config(&base, "a", &format!("http://{backend}"));
    acfg.relay_ca_file = Some(ca.clone());
    let _agent = Agent::start(acfg);
    server.wait_agent("a").await;
    let load = |args: Vec<String>| {
        tokio::process::Command::new(binary("relay-bench"))
            .arg("load")
            .args(args)
            .output()
    };
    let url = format!("{base}/client/a");
    let ca_arg = ca.display().to_string();
    let out = load(vec![
        url.clone(),
        "--ca".into(),
        ca_arg.clone(),
        "--conns".into(),
        "2".into(),
        "--secs".into(),
        "0.3".into(),
    ])
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rate: f64 = text.split(" req/s").next().unwrap().trim().parse().unwrap();
    assert!(rate > 0.0, "{text}");
    assert!(
        seen.lock().unwrap().len() >= 2,
        "the requests reached the backend"
    );
    // Without the CA the relay's certificate is not trusted: an error, not a rate.
    let out = load(vec![url.clone(), "--secs".into(), "0.3".into()])
        .await
        .unwrap();
    assert!(!out.status.success());
    // HTTP/2 and bursts are not measured over TLS.
    let out = load(vec![url, "--ca".into(), ca_arg, "--h2".into(), "4".into()])
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("keep-alive HTTP/1.1 connections only"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
