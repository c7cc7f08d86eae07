//! `relay-soak`: runs a relay-server, agents and backends under a mixed user load for a
//! given time while faults are injected on every link, classifies every operation (OK,
//! a visible error by cause, or SILENT: looked complete and was wrong) and checks that
//! resources come back when the load stops. Exit status 1 on any SILENT outcome or a
//! resource that does not come back. See `docs/RELIABILITY.md`.

mod backend;
mod chart;
mod load;
// Shared with relay-bench, which uses more of it.
#[allow(dead_code)]
#[path = "../procfs.rs"]
mod procfs;
mod proxy;
mod report;
mod world;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;

use crate::proxy::Fault;
use crate::report::{Report, Sample};
use crate::world::World;

/// Soak and chaos run of the relay.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// How long the load runs.
    #[arg(long, env = "RELAY_SOAK_DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Concurrent users.
    #[arg(long, env = "RELAY_SOAK_USERS", default_value_t = 8)]
    users: usize,
    /// Time between two injected faults (0: no faults).
    #[arg(long, env = "RELAY_SOAK_FAULT_EVERY", default_value = "6s", value_parser = humantime::parse_duration)]
    fault_every: Duration,
    /// Largest download or upload in bytes.
    #[arg(long, env = "RELAY_SOAK_MAX_SIZE", default_value_t = 4_000_000)]
    max_size: usize,
    /// Also write the report as JSON here.
    #[arg(long, env = "RELAY_SOAK_JSON")]
    json: Option<std::path::PathBuf>,
    /// Also draw the run as an SVG chart here.
    #[arg(long, env = "RELAY_SOAK_SVG")]
    svg: Option<std::path::PathBuf>,
    /// Only draw the chart of an earlier run's JSON (--json) into --svg, and exit.
    #[arg(long, requires = "svg")]
    chart_of: Option<std::path::PathBuf>,
}

/// The faults, in the order the schedule cycles through them.
const SCHEDULE: [&str; 8] = [
    "agent link cut",
    "agent killed",
    "agent link stalled 10s",
    "user link reset",
    "agent link reset",
    "user link delayed 300ms for 5s",
    "server killed",
    "user link cut",
];

fn inject(world: &Mutex<World>, n: usize) -> &'static str {
    let what = SCHEDULE[n % SCHEDULE.len()];
    let mut w = world.lock().expect("poisoned");
    match n % SCHEDULE.len() {
        0 => w.agent_link.inject(Fault::Cut),
        1 => w.restart_agent(n / SCHEDULE.len() % 2),
        2 => w.agent_link.inject(Fault::Stall(Duration::from_secs(10))),
        3 => w.user_link.inject(Fault::Reset),
        4 => w.agent_link.inject(Fault::Reset),
        5 => w.user_link.inject(Fault::Delay(
            Duration::from_millis(300),
            Duration::from_secs(5),
        )),
        6 => w.restart_server(),
        _ => w.user_link.inject(Fault::Cut),
    }
    what
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let (Some(from), Some(to)) = (&args.chart_of, &args.svg) {
        let report: serde_json::Value = serde_json::from_slice(&std::fs::read(from)?)?;
        let title = report["command"]
            .as_str()
            .unwrap_or("relay-soak")
            .to_owned();
        std::fs::write(to, chart::svg(&report, &title))?;
        return Ok(());
    }
    let world = World::start().await;
    let relay = world.user_link.addr;
    let server_addr = world.server_addr;
    let silent_uploads = world.backend.silent_uploads.clone();
    let world = Arc::new(Mutex::new(world));
    wait_ready(relay).await?;
    let (server_pid, _) = world.lock().expect("poisoned").pids();
    let baseline_fds = world::open_fds(server_pid);
    let t0 = Instant::now();
    let report = Arc::new(Mutex::new(Report::new(t0)));
    let stop = tokio_util::sync::CancellationToken::new();

    // Users.
    let mut users = Vec::new();
    for u in 0..args.users {
        let (report, stop, max) = (report.clone(), stop.clone(), args.max_size);
        users.push(tokio::spawn(async move {
            let mut x = 0x1234_5678_9abc_def0u64 ^ (u as u64).wrapping_mul(0x9E37_79B9);
            while !stop.is_cancelled() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let done = load::one(relay, x % 100, x >> 8, max).await;
                report.lock().expect("poisoned").record(done);
            }
        }));
    }
    // Samples of the processes, every second.
    let sampler = {
        let (world, report, stop) = (world.clone(), report.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            while !stop.is_cancelled() {
                tick.tick().await;
                let (server, agents) = world.lock().expect("poisoned").pids();
                let s = Sample::of(server, &agents);
                report.lock().expect("poisoned").sample(s);
            }
        })
    };
    // Faults: none in the first tenth (errors there are not attributable to one).
    let warm_up = args.duration / 10;
    tokio::time::sleep(warm_up).await;
    let mut n = 0;
    if !args.fault_every.is_zero() {
        while t0.elapsed() + args.fault_every < args.duration {
            let w = world.clone();
            let what = tokio::task::block_in_place(|| inject(&w, n));
            report.lock().expect("poisoned").fault(what);
            n += 1;
            tokio::time::sleep(args.fault_every).await;
        }
    }
    tokio::time::sleep(args.duration.saturating_sub(t0.elapsed())).await;
    stop.cancel();
    for u in users {
        u.await?;
    }
    sampler.await?;

    // Resources must come back once the load stops.
    let leaks = settle(server_addr, server_pid_now(&world), baseline_fds).await;
    let mut r = report.lock().expect("poisoned");
    r.silent_uploads = silent_uploads.load(std::sync::atomic::Ordering::SeqCst);
    r.leaks = leaks;
    println!("{}", r.markdown(&args_line(&args)));
    let mut json = r.json();
    json["command"] = serde_json::Value::String(args_line(&args));
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    if let Some(path) = &args.svg {
        std::fs::write(path, chart::svg(&json, &args_line(&args)))?;
    }
    if r.silent() > 0 || !r.leaks.is_empty() {
        eprintln!(
            "relay-soak: FAILED ({} silent, leaks: {:?})",
            r.silent(),
            r.leaks
        );
        std::process::exit(1);
    }
    Ok(())
}

fn args_line(a: &Args) -> String {
    format!(
        "relay-soak --duration {} --users {} --fault-every {} --max-size {}",
        humantime::format_duration(a.duration),
        a.users,
        humantime::format_duration(a.fault_every),
        a.max_size
    )
}

fn server_pid_now(world: &Mutex<World>) -> u32 {
    world.lock().expect("poisoned").pids().0
}

/// Waits until both backends answer through the relay.
async fn wait_ready(relay: std::net::SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let small = load::one(relay, 0, 1, 1000).await;
        let ws = load::one(relay, 99, 1, 1000).await;
        if small.outcome == load::Outcome::Ok && ws.outcome == load::Outcome::Ok {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the agents did not connect within 30 s")
}

/// Waits (up to 60 s) for the server to hold no request, tunnel or extra descriptor;
/// returns what did not come back.
async fn settle(server: std::net::SocketAddr, pid: u32, baseline_fds: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let metrics = report::metrics(server).await.unwrap_or_default();
        let in_flight = report::value(&metrics, "relay_requests_in_flight");
        let tunnels = report::value(&metrics, "relay_open_tunnels");
        let buffered = report::value(&metrics, "relay_buffered_bytes");
        let fds = world::open_fds(pid);
        // Agents' parked polls hold a few connections; users hold none.
        let mut leaks = Vec::new();
        if in_flight != 0 {
            leaks.push(format!("{in_flight} requests in flight"));
        }
        if tunnels != 0 {
            leaks.push(format!("{tunnels} tunnels open"));
        }
        if buffered != 0 {
            leaks.push(format!("{buffered} bytes buffered"));
        }
        if fds > baseline_fds + 16 {
            leaks.push(format!("{fds} descriptors open (baseline {baseline_fds})"));
        }
        if leaks.is_empty() || Instant::now() > deadline {
            return leaks;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
