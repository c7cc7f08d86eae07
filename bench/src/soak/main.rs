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
    /// Cluster mode: two replicas sharing a Redis (the HTTP agent reaches both, the
    /// WebSocket agent one); replica kills and Redis restarts join the fault schedule.
    #[arg(long, env = "RELAY_SOAK_CLUSTER")]
    cluster: bool,
    /// Open-loop load at this fraction of the capacity measured in the fault-free warm-up
    /// (the first tenth, run closed-loop by --users): operations start at a fixed rate
    /// whatever happens, as real users' do. Without it the users run closed-loop.
    #[arg(long, env = "RELAY_SOAK_LOAD_FRACTION")]
    load_fraction: Option<f64>,
}

/// The faults, in the order the schedule cycles through them (cluster mode adds its own).
fn schedule(cluster: bool) -> Vec<&'static str> {
    let mut s = vec![
        "agent link cut",
        "agent killed",
        "agent link stalled 10s",
        "user link reset",
        "agent link reset",
        "user link delayed 300ms for 5s",
        if cluster {
            "replica killed"
        } else {
            "server killed"
        },
        "user link cut",
    ];
    if cluster {
        s.push("redis restarted");
    }
    s
}

fn inject(world: &Mutex<World>, what: &str, round: usize) {
    let mut w = world.lock().expect("poisoned");
    let links = |w: &World, f: Fault| w.agent_links.iter().for_each(|l| l.inject(f));
    match what {
        "agent link cut" => links(&w, Fault::Cut),
        "agent killed" => w.restart_agent(round % 2),
        "agent link stalled 10s" => links(&w, Fault::Stall(Duration::from_secs(10))),
        "user link reset" => w.user_link.inject(Fault::Reset),
        "agent link reset" => links(&w, Fault::Reset),
        "user link delayed 300ms for 5s" => w.user_link.inject(Fault::Delay(
            Duration::from_millis(300),
            Duration::from_secs(5),
        )),
        "server killed" | "replica killed" => {
            let i = round % w.servers.len();
            w.restart_server(i);
        }
        "redis restarted" => w.restart_redis(),
        _ => w.user_link.inject(Fault::Cut),
    }
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
    raise_descriptor_limit();
    let world = World::start(if args.cluster { 2 } else { 1 }).await;
    let relay = world.user_link.addr;
    let server_addrs = world.server_addrs.clone();
    let silent_uploads = world.backend.silent_uploads.clone();
    let world = Arc::new(Mutex::new(world));
    wait_ready(relay).await?;
    let baseline_fds: Vec<usize> = server_pids(&world)
        .into_iter()
        .map(world::open_fds)
        .collect();
    let t0 = Instant::now();
    let report = Arc::new(Mutex::new(Report::new(t0)));
    let stop = tokio_util::sync::CancellationToken::new();
    let warm_up = args.duration / 10;

    // Users: closed-loop (each starts its next operation when the last ends), all run or
    // only for the warm-up, which measures the capacity an open loop then uses.
    let closed = match args.load_fraction {
        Some(_) => stop.child_token(),
        None => stop.clone(),
    };
    let mut users = Vec::new();
    for u in 0..args.users {
        let (report, stop, max) = (report.clone(), closed.clone(), args.max_size);
        users.push(tokio::spawn(async move {
            let mut x = 0x1234_5678_9abc_def0u64 ^ (u as u64).wrapping_mul(0x9E37_79B9);
            while !stop.is_cancelled() {
                let done = load::one(relay, next(&mut x) % 100, x >> 8, max).await;
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
                let (servers, agents) = world.lock().expect("poisoned").pids();
                let s = Sample::of(&servers, &agents);
                report.lock().expect("poisoned").sample(s);
            }
        })
    };
    // Faults: none in the first tenth (errors there are not attributable to one).
    tokio::time::sleep(warm_up).await;
    let open = args.load_fraction.map(|fraction| {
        closed.cancel();
        let capacity = report.lock().expect("poisoned").total() as f64 / warm_up.as_secs_f64();
        let rate = (capacity * fraction).max(1.0);
        report.lock().expect("poisoned").load = format!(
            "open loop at {rate:.0} operations/s ({fraction} × {capacity:.0}/s measured closed-loop \
             with {} users in the warm-up)",
            args.users
        );
        tokio::spawn(open_loop(relay, rate, OPEN_LOOP_CAP, args.max_size, report.clone(), stop.clone()))
    });
    let sched = schedule(args.cluster);
    let mut n = 0;
    if !args.fault_every.is_zero() {
        while t0.elapsed() + args.fault_every < args.duration {
            let (w, what) = (world.clone(), sched[n % sched.len()]);
            let round = n / sched.len();
            tokio::task::block_in_place(|| inject(&w, what, round));
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
    if let Some(open) = open {
        open.await?;
    }
    sampler.await?;

    // Resources must come back once the load stops.
    let mut leaks = Vec::new();
    for ((addr, pid), fds) in server_addrs
        .iter()
        .zip(server_pids(&world))
        .zip(baseline_fds)
    {
        leaks.extend(settle(*addr, pid, fds).await);
    }
    if std::env::var_os("RELAY_SOAK_DUMP").is_some() {
        let mut w = world.lock().expect("poisoned");
        for (i, s) in w.servers.iter_mut().enumerate() {
            s.drain_output()
                .iter()
                .for_each(|l| eprintln!("server {i}: {l}"));
        }
        for (i, a) in w.agents.iter_mut().enumerate() {
            a.proc
                .drain_output()
                .iter()
                .for_each(|l| eprintln!("agent {i}: {l}"));
        }
    }
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
    let mut line = format!(
        "relay-soak --duration {} --users {} --fault-every {} --max-size {}",
        humantime::format_duration(a.duration),
        a.users,
        humantime::format_duration(a.fault_every),
        a.max_size
    );
    if let Some(f) = a.load_fraction {
        line += &format!(" --load-fraction {f}");
    }
    if a.cluster {
        line += " --cluster";
    }
    line
}

fn server_pids(world: &Mutex<World>) -> Vec<u32> {
    world.lock().expect("poisoned").pids().0
}

/// Most operations the open loop keeps running at once: enough for everything started
/// during a fault's worst case (requests lost with a black-holed session wait for the 60 s
/// response timeout) without starving the rest, bounded for the machine's descriptors.
const OPEN_LOOP_CAP: usize = 4096;

/// An open loop holds thousands of connections at worst (each twice, through the user
/// link): the soft descriptor limit goes up to the hard one (children inherit it).
fn raise_descriptor_limit() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `l` is a valid rlimit for getrlimit to fill and setrlimit to read.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

/// The next number of a xorshift sequence.
fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Starts operations at `rate` per second until `stop`, at most `cap` at once (an
/// operation that would pass the cap is shed and counted), then waits for those running.
async fn open_loop(
    relay: std::net::SocketAddr,
    rate: f64,
    cap: usize,
    max_size: usize,
    report: Arc<Mutex<Report>>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut running = tokio::task::JoinSet::new();
    let mut x = 0x0bad_cafe_dead_beefu64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => break,
        }
        while running.try_join_next().is_some() {}
        if running.len() >= cap {
            report.lock().expect("poisoned").shed += 1;
            continue;
        }
        let (pick, seed) = (next(&mut x) % 100, x >> 8);
        let report = report.clone();
        running.spawn(async move {
            let done = load::one(relay, pick, seed, max_size).await;
            report.lock().expect("poisoned").record(done);
        });
    }
    while running.join_next().await.is_some() {}
}

/// Waits until both backends and the service port answer through the relay, four times in
/// a row (through every replica: the user link spreads connections round-robin).
async fn wait_ready(relay: std::net::SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut in_a_row = 0;
    while Instant::now() < deadline {
        let small = load::one(relay, 0, 1, 1000).await;
        let ws = load::one(relay, 90, 1, 1000).await;
        let tunnel = load::one(relay, 99, 1, 1000).await;
        if [small, ws, tunnel]
            .iter()
            .all(|d| d.outcome == load::Outcome::Ok)
        {
            in_a_row += 1;
            if in_a_row == 4 {
                return Ok(());
            }
            continue;
        }
        in_a_row = 0;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the agents did not connect within 30 s")
}

/// Waits (up to 60 s) for the server to hold no request, tunnel, tunnel carrier or extra
/// descriptor;
/// returns what did not come back.
async fn settle(server: std::net::SocketAddr, pid: u32, baseline_fds: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let metrics = report::metrics(server).await.unwrap_or_default();
        let in_flight = report::value(&metrics, "relay_requests_in_flight");
        let tunnels = report::value(&metrics, "relay_open_tunnels");
        let carriers = report::value(&metrics, "relay_tunnel_carriers");
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
        if carriers != 0 {
            leaks.push(format!("{carriers} tunnel carriers open"));
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
