//! This relay as a target: one relay-server and its agent, or three replicas in cluster
//! mode on a real redis-server; each with a `relay-client connect` entry for the TCP service.

use std::net::SocketAddr;
use std::process::Command;

use relay_tests::procs::Proc;

use super::{addr_after, binary, log_level, wait_http, Addrs, Backend, Running};
use crate::load::Target;

/// The agent token of the benchmark relay.
pub const TOKEN: &str = "bench-token-0123456789abcdef";

/// relay-server and relay-client (the release binaries next to this one), with the TCP
/// service as a service port reached through `relay-client connect`.
pub fn relay(b: Addrs) -> anyhow::Result<Running> {
    let mut server = Proc::spawn({
        let mut c = Command::new(binary("relay-server"));
        c.args(["--listen", "127.0.0.1:0", "--agent-token"])
            .arg(format!("*={TOKEN}"))
            // The load (and the idle scenario's thousands of tunnels) comes from one address,
            // and the burst scenario parks 10 000 requests for one name at once (the
            // defaults refuse more than 1 000 per name with 503).
            .args(["--max-connections-per-ip", "1000000", "--log", &log_level()])
            .args(["--max-tunnels-per-ip", "1000000"])
            .args(["--max-parked-per-name", "20000", "--max-parked", "20000"]);
        c
    });
    let addr = addr_after(&mut server, "relay-server listening on http://")?;
    let url = format!("http://{addr}");
    let (agent, connect, tcp) = agent_and_entry(b, &url, TOKEN, &url)?;
    let http = Target {
        addr,
        prefix: "/client/bench".into(),
        tls: None,
    };
    wait_http(&http)?;
    Ok(Running {
        name: "relay",
        http,
        tcp,
        h2: Some((addr, Some("bench".into()))),
        server_pid: Some(server.child.id()),
        relaying: vec![server.child.id(), agent.child.id()],
        reference: false,
        nginx: None,
        procs: vec![server, agent, connect],
        _dir: None,
        _secret: None,
    })
}

/// The agent `bench` on `agent_relay` (the backend, and the TCP service as service port
/// `sink`) and a `relay-client connect` entry for that service through `entry_relay`; the
/// entry's TCP address.
fn agent_and_entry(
    b: Addrs,
    agent_relay: &str,
    token: &str,
    entry_relay: &str,
) -> anyhow::Result<(Proc, Proc, SocketAddr)> {
    let agent = Proc::spawn({
        let mut c = Command::new(binary("relay-client"));
        c.args([
            "--relay-url",
            agent_relay,
            "--name",
            "bench",
            "--token",
            token,
        ])
        .arg("--backend-url")
        .arg(format!("http://{}", b.http))
        .arg("--service")
        .arg(format!("sink={}", b.tcp))
        // Every idle tunnel of scenario 5 is an exchange in flight.
        .args(["--max-in-flight", "20000", "--log", &log_level()]);
        c
    });
    let mut connect = Proc::spawn({
        let mut c = Command::new(binary("relay-client"));
        c.args(["connect", "--relay-url", entry_relay]).args([
            "--name",
            "bench",
            "--app",
            "sink",
            "--listen",
            "127.0.0.1:0",
        ]);
        c
    });
    let tcp = addr_after(&mut connect, "relay-client connect listening on")?;
    Ok((agent, connect, tcp))
}

/// Three relay-server replicas in cluster mode on a real redis-server; the agent serves from
/// replica 0 and every request (HTTP, HTTP/2, the tunnel) enters at replica 1, so each one
/// takes the internal hop: the worst case of a balancer that ignores where agents are.
pub fn cluster(b: &Backend) -> anyhow::Result<Running> {
    use relay_tests::cluster::{replica, Redis, Secret};
    let mut redis = Redis::start();
    let secret = Secret::new();
    let flags = [
        "--max-connections-per-ip",
        "1000000",
        "--max-tunnels-per-ip",
        "1000000",
        "--max-parked-per-name",
        "20000",
        "--max-parked",
        "20000",
    ];
    let mut r: Vec<_> = (0..3).map(|_| replica(&redis, &secret, &flags)).collect();
    let home = r[0].url();
    let entry = r[1].public;
    // The replicas take the test harness's agent token.
    let (agent, connect, tcp) = agent_and_entry(
        b.addrs(),
        &home,
        relay_tests::TOKEN,
        &format!("http://{entry}"),
    )?;
    let http = Target {
        addr: entry,
        prefix: "/client/bench".into(),
        tls: None,
    };
    wait_http(&http)?;
    // The agent and the replicas (a request may pass two of them); not redis.
    let mut relaying = vec![agent.child.id()];
    relaying.extend(r.iter().map(|x| x.proc.child.id()));
    let mut procs = vec![agent, connect];
    procs.extend(redis.proc.take());
    procs.extend(r.drain(..).map(|x| x.proc));
    Ok(Running {
        name: "cluster",
        http,
        tcp,
        h2: Some((entry, Some("bench".into()))),
        server_pid: None,
        relaying,
        reference: false,
        nginx: None,
        procs,
        _dir: None,
        _secret: Some(secret),
    })
}
