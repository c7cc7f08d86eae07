//! `relay-bench`: the same load against the backend directly, this relay, rathole and bore,
//! in one run, reported as ratios to direct (medians of several runs), as a table and as
//! JSON. `--smoke` is the few-second version the test command runs (no rathole or bore).

mod backend;
mod load;
mod targets;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde_json::{json, Value};

/// Benchmark suite of the relay (see docs/PERFORMANCE.md).
#[derive(Parser, Debug)]
struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,
    /// A few seconds in total: no rathole or bore, short runs, small sizes.
    #[arg(long)]
    smoke: bool,
    /// Runs per scenario; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Seconds per rate measurement.
    #[arg(long, default_value_t = 2.0)]
    secs: f64,
    /// Tunnel bytes each way (MiB).
    #[arg(long, default_value_t = 1024)]
    tunnel_mib: u64,
    /// Idle agents parked on the relay for the idle-scale scenario.
    #[arg(long, default_value_t = 10_000)]
    idle_agents: usize,
    /// Idle tunnels held open through the relay (default: 10 000, or fewer when the open-file
    /// limit cannot hold three descriptors per tunnel in each process).
    #[arg(long)]
    idle_tunnels: Option<usize>,
    /// Skip rathole and bore (no installation).
    #[arg(long)]
    no_peers: bool,
    /// Skip the three-replica cluster target (needs redis-server).
    #[arg(long)]
    no_cluster: bool,
    /// Where rathole and bore are installed when missing.
    #[arg(long, default_value = "target/bench-tools")]
    tools: PathBuf,
    /// Only these scenarios (numbers 1-7, comma-separated), e.g. `--only 1,5`; all by default.
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u8).range(1..=7))]
    only: Vec<u8>,
    /// JSON results file.
    #[arg(long, default_value = "target/bench-results.json")]
    out: PathBuf,
}

#[derive(clap::Subcommand, Debug)]
enum Sub {
    /// Internal: the backend process.
    Backend,
}

/// A memory figure of a process from /proc (KiB).
fn rss_kib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0)
}

/// The soft open-file limit of this process (and so of its children).
fn open_file_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(1024)
}

/// User plus system CPU time of a process, in clock ticks (1/100 s).
fn cpu_ticks(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 of stat, counted after the command name.
    n(11) + n(12)
}

/// A process's CPU use in % of one core since `ticks0` (from [`cpu_ticks`]) over `dur`.
fn cpu_percent(pid: u32, ticks0: f64, dur: Duration) -> f64 {
    (cpu_ticks(pid) - ticks0) / 100.0 / dur.as_secs_f64() * 100.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// One row of results: metric → target → median value.
type Table = BTreeMap<String, BTreeMap<&'static str, f64>>;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Sub::Backend) = cli.command {
        let rt = tokio::runtime::Runtime::new()?;
        return rt.block_on(backend::run());
    }
    let (runs, secs, tunnel, sizes): (usize, f64, u64, &[usize]) = if cli.smoke {
        (1, 0.3, 8 << 20, &[1_000, 1_000_000])
    } else {
        (
            cli.runs.max(1),
            cli.secs,
            cli.tunnel_mib << 20,
            &[1_000, 1_000_000, 100_000_000],
        )
    };
    let (burst, idle, idle_hold) = if cli.smoke {
        (200, 50, Duration::from_millis(300))
    } else {
        (10_000, cli.idle_agents, Duration::from_secs(30))
    };
    // Each tunnel costs three descriptors in the relay-server and the agent (the user's or the
    // service's connection, the response exchange and the upload exchange).
    let fd_room = open_file_limit().saturating_sub(1_000) / 3;
    let idle_tunnels = match (cli.smoke, cli.idle_tunnels) {
        (true, _) => 50,
        (false, Some(n)) => n,
        (false, None) => 10_000.min(fd_room),
    };
    let dur = Duration::from_secs_f64(secs);
    let want = |n: u8| cli.only.is_empty() || cli.only.contains(&n);
    let b = targets::backend()?;
    let mut running = vec![targets::direct(&b), targets::relay(&b)?];
    if !cli.no_cluster {
        running.push(targets::cluster(&b)?);
    }
    if !cli.smoke && !cli.no_peers && (1..=7).any(|n| n != 5 && want(n)) {
        let rathole = targets::install(
            &cli.tools,
            "rathole",
            "rathole",
            &["--no-default-features", "--features", "server,client"],
        )?;
        let bore = targets::install(&cli.tools, "bore-cli", "bore", &[])?;
        running.push(targets::rathole(&b, &rathole)?);
        running.push(targets::bore(&b, &bore)?);
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut table: Table = BTreeMap::new();
    let mut put = |metric: String, target: &'static str, v: f64| {
        table.entry(metric).or_default().insert(target, v);
    };
    for t in &running {
        eprintln!("measuring {}…", t.name);
        rt.block_on(async {
            for conns in [1usize, 16].into_iter().filter(|_| want(1)) {
                let mut rps = Vec::new();
                let mut p50 = Vec::new();
                let mut p99 = Vec::new();
                for _ in 0..runs {
                    let r = load::small_gets(&t.http, conns, false, dur).await?;
                    rps.push(r.rps);
                    p50.push(r.p50);
                    p99.push(r.p99);
                }
                put(
                    format!("1 keep-alive {conns} conn req/s"),
                    t.name,
                    median(rps),
                );
                put(
                    format!("1 keep-alive {conns} conn p50 ms"),
                    t.name,
                    median(p50),
                );
                put(
                    format!("1 keep-alive {conns} conn p99 ms"),
                    t.name,
                    median(p99),
                );
            }
            if want(2) {
                let mut rps = Vec::new();
                let mut p50 = Vec::new();
                for _ in 0..runs {
                    let r = load::small_gets(&t.http, 16, true, dur).await?;
                    rps.push(r.rps);
                    p50.push(r.p50);
                }
                put(
                    "2 new connection per request req/s".into(),
                    t.name,
                    median(rps),
                );
                put(
                    "2 new connection per request p50 ms".into(),
                    t.name,
                    median(p50),
                );
            }
            for &size in sizes.iter().filter(|_| want(3)) {
                let label = match size {
                    1_000 => "1 KB".to_owned(),
                    1_000_000 => "1 MB".to_owned(),
                    n => format!("{} MB", n / 1_000_000),
                };
                let mut down = Vec::new();
                let mut up = Vec::new();
                for _ in 0..runs {
                    down.push(load::download(&t.http, size, dur).await?);
                    up.push(load::upload(&t.http, size, dur).await?);
                }
                put(format!("3 download {label} MB/s"), t.name, median(down));
                put(format!("3 upload {label} MB/s"), t.name, median(up));
            }
            if want(4) {
                let mut up = Vec::new();
                let mut down = Vec::new();
                for _ in 0..runs {
                    let (u, d) = load::tcp_copy(t.tcp, tunnel).await?;
                    up.push(u);
                    down.push(d);
                }
                put("4 tunnel up MB/s".into(), t.name, median(up));
                put("4 tunnel down MB/s".into(), t.name, median(down));
            }
            if let Some((addr, name)) = t.h2.as_ref().filter(|_| want(7)) {
                let mut rps = Vec::new();
                for _ in 0..runs {
                    rps.push(load::h2(*addr, name.as_deref(), 32, dur).await?.rps);
                }
                put("7 HTTP/2 32 streams req/s".into(), t.name, median(rps));
            }
            if let Some((addr, name)) = t.h2.as_ref().filter(|_| want(6)) {
                // 6: a burst at once; the relay's memory before, at the peak, after.
                let before = t.server_pid.map(|p| rss_kib(p, "VmRSS"));
                let mut secs = Vec::new();
                for _ in 0..runs {
                    let (s, ok) = load::burst(*addr, name.as_deref(), burst).await?;
                    anyhow::ensure!(
                        ok == burst,
                        "{}: {ok} of {burst} burst requests answered",
                        t.name
                    );
                    secs.push(s);
                }
                put(
                    format!("6 burst of {burst} requests, s"),
                    t.name,
                    median(secs),
                );
                if let (Some(pid), Some(before)) = (t.server_pid, before) {
                    // The relay hands memory back on its next housekeeping tick (1 s).
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    put(
                        "6 burst relay-server peak RSS MiB".into(),
                        t.name,
                        rss_kib(pid, "VmHWM") / 1024.0,
                    );
                    put(
                        "6 burst relay-server RSS growth after MiB".into(),
                        t.name,
                        (rss_kib(pid, "VmRSS") - before) / 1024.0,
                    );
                }
            }
            // 5: idle agents (the relay only).
            if let Some(pid) = t.server_pid.filter(|_| want(5)) {
                let before = rss_kib(pid, "VmRSS");
                let agents = load::IdleAgents::start(t.http.addr, targets::TOKEN, idle).await?;
                let after = rss_kib(pid, "VmRSS");
                let cpu0 = cpu_ticks(pid);
                let polls = agents.polls_during(idle_hold).await;
                let cpu = cpu_percent(pid, cpu0, idle_hold);
                drop(agents);
                put(
                    format!("5 idle {idle} agents KiB per agent"),
                    t.name,
                    (after - before) / idle as f64,
                );
                put(format!("5 idle {idle} agents server CPU %"), t.name, cpu);
                put(
                    format!("5 idle {idle} agents re-polls/s"),
                    t.name,
                    polls as f64 / idle_hold.as_secs_f64(),
                );
                let before = rss_kib(pid, "VmRSS");
                let tunnels = load::IdleTunnels::start(t.tcp, t.http.addr, idle_tunnels).await?;
                let after = rss_kib(pid, "VmRSS");
                let cpu0 = cpu_ticks(pid);
                tokio::time::sleep(idle_hold).await;
                let cpu = cpu_percent(pid, cpu0, idle_hold);
                drop(tunnels);
                put(
                    format!("5 idle {idle_tunnels} tunnels KiB per tunnel"),
                    t.name,
                    (after - before) / idle_tunnels as f64,
                );
                put(
                    format!("5 idle {idle_tunnels} tunnels server CPU %"),
                    t.name,
                    cpu,
                );
            }
            anyhow::Ok(())
        })?;
    }

    // The table: values, and ratios to direct.
    let names: Vec<&'static str> = running.iter().map(|t| t.name).collect();
    print!("{:<40}", "scenario");
    for n in &names {
        print!("{n:>18}");
    }
    println!();
    let mut rows = Vec::new();
    for (metric, by) in &table {
        print!("{metric:<40}");
        let direct = by.get("direct").copied().unwrap_or(0.0);
        let mut row = json!({"metric": metric});
        for n in &names {
            let v = by.get(n).copied().unwrap_or(0.0);
            let ratio = if direct > 0.0 { v / direct } else { 0.0 };
            if v.abs() < 10.0 {
                print!("{:>10.3} ({:>4.2}×)", v, ratio);
            } else {
                print!("{:>10.1} ({:>4.2}×)", v, ratio);
            }
            row[n] = json!({"value": v, "ratio_to_direct": ratio});
        }
        println!();
        rows.push(row);
    }
    let machine = json!({
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "os": std::env::consts::OS,
    });
    let out: Value = json!({
        "smoke": cli.smoke,
        "runs": runs,
        "secs_per_measurement": secs,
        "tunnel_bytes": tunnel,
        "machine": machine,
        "targets": names,
        "results": rows,
    });
    if let Some(dir) = cli.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&cli.out, serde_json::to_string_pretty(&out)?)?;
    eprintln!("results written to {}", cli.out.display());
    Ok(())
}
