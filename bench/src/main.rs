//! `relay-bench`: the same load against the backend directly, this relay, rathole and bore,
//! in one run, reported as ratios to direct (medians of several runs), as a table and as
//! JSON; nginx and HAProxy as reverse proxies beside them in the rates compared in turns.
//! `--smoke` is the few-second version the test command runs (the proxies, but no rathole
//! or bore).

mod backend;
mod h2load;
mod idle;
mod load;
mod procfs;
mod report;
mod scenarios;
mod targets;
mod tools;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use scenarios::{Plan, Table};

/// Benchmark suite of the relay (see docs/PERFORMANCE.md).
#[derive(Parser, Debug)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Sub>,
    /// A few seconds in total: no rathole or bore (the proxies still), short runs, small sizes.
    #[arg(long)]
    pub smoke: bool,
    /// Runs per scenario; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Seconds per rate measurement.
    #[arg(long, default_value_t = 2.0)]
    pub secs: f64,
    /// Tunnel bytes each way (MiB).
    #[arg(long, default_value_t = 1024)]
    pub tunnel_mib: u64,
    /// Idle agents parked on the relay for the idle-scale scenario.
    #[arg(long, default_value_t = 10_000)]
    pub idle_agents: usize,
    /// Idle tunnels held open through the relay (default: 10 000, or fewer when the open-file
    /// limit cannot hold three descriptors per tunnel in each process).
    #[arg(long)]
    pub idle_tunnels: Option<usize>,
    /// Skip rathole, bore (no installation), nginx and HAProxy.
    #[arg(long)]
    pub no_peers: bool,
    /// Skip the three-replica cluster target (needs redis-server).
    #[arg(long)]
    pub no_cluster: bool,
    /// Where rathole and bore are installed when missing.
    #[arg(long, default_value = "target/bench-tools")]
    pub tools: PathBuf,
    /// Only these scenarios (numbers 1-8, comma-separated), e.g. `--only 1,5`; all by default.
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u8).range(1..=8))]
    pub only: Vec<u8>,
    /// JSON results file.
    #[arg(long, default_value = "target/bench-results.json")]
    pub out: PathBuf,
}

#[derive(clap::Subcommand, Debug)]
pub enum Sub {
    /// Internal: the backend process.
    Backend,
    /// Small GETs of `<url>/small` on keep-alive connections, for profiling a running relay
    /// under concurrency (scripts/profile-small-requests.sh); prints req/s and latencies.
    Load {
        /// Base URL, e.g. `http://127.0.0.1:8080/client/p`.
        url: String,
        /// Keep-alive connections.
        #[arg(long, default_value_t = 16)]
        conns: usize,
        /// Seconds of load.
        #[arg(long, default_value_t = 5.0)]
        secs: f64,
        /// HTTP/2 instead (prior knowledge): this many concurrent streams on one
        /// connection, the name in `X-Server-Name` (the URL's last path segment, as in
        /// `/client/<name>`). For profiling the HTTP/2 path, which curl 7.88 cannot drive
        /// (it fails every request after the first on a reused h2c connection).
        #[arg(long)]
        h2: Option<usize>,
        /// With `--h2`: the streams from nghttp2's `h2load` instead of the suite's hyper
        /// client (scenario 7 measures with both; see docs/PERFORMANCE.md).
        #[arg(long, requires = "h2")]
        h2load: bool,
        /// A burst instead: this many requests at once over HTTP/2 connections of 100
        /// streams each (scenario 6), the name as for `--h2`; prints the seconds until the
        /// last answer. For measuring the relay's CPU per request in a burst.
        #[arg(long, conflicts_with = "h2")]
        burst: Option<usize>,
        /// The CA that signed the relay's certificate, for an `https://` URL (keep-alive
        /// HTTP/1.1 loads only; the certificate must name the URL's IP address): for
        /// measuring a relay that terminates TLS itself.
        #[arg(long)]
        ca: Option<std::path::PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Sub::Backend) => {
            let rt = tokio::runtime::Runtime::new()?;
            return rt.block_on(backend::run());
        }
        Some(Sub::Load {
            ref url,
            conns,
            secs,
            h2,
            h2load,
            burst,
            ref ca,
        }) => {
            let url: http::Uri = url.parse()?;
            let tls = match url.scheme_str() {
                Some("https") => {
                    let cfg = relay_client::tls::client_config(ca.as_deref(), None)?;
                    Some(tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg)))
                }
                _ => None,
            };
            anyhow::ensure!(
                tls.is_none() || (h2.is_none() && burst.is_none()),
                "https:// is measured with keep-alive HTTP/1.1 connections only"
            );
            let addr = std::net::ToSocketAddrs::to_socket_addrs(
                &url.authority().context("the URL has no host")?.as_str(),
            )?
            .next()
            .context("the URL's host has no address")?;
            let t = load::Target {
                addr,
                prefix: url.path().trim_end_matches('/').to_owned(),
                tls,
            };
            let rt = tokio::runtime::Runtime::new()?;
            let dur = Duration::from_secs_f64(secs);
            // HTTP/2 loads name the agent in `X-Server-Name`: the URL path's last segment.
            let name = t.prefix.rsplit('/').next().filter(|n| !n.is_empty());
            if let Some(n) = burst {
                let (s, ok) = rt.block_on(load::burst(addr, name, n))?;
                println!("{s:.3} s, {ok} of {n} answered 200");
                return Ok(());
            }
            let r = match h2 {
                Some(streams) if h2load => rt.block_on(h2load::run(addr, name, streams, dur))?,
                Some(streams) => rt.block_on(load::h2(addr, name, streams, dur))?,
                None => rt.block_on(load::small_gets(&t, conns, false, dur))?,
            };
            println!(
                "{:.0} req/s, p50 {:.3} ms, p99 {:.3} ms",
                r.rps, r.p50, r.p99
            );
            return Ok(());
        }
        None => {}
    }
    let plan = plan(&cli);
    let want = |n: u8| cli.only.is_empty() || cli.only.contains(&n);
    let b = targets::backend()?;
    let mut running = vec![targets::direct(&b), targets::relay(b.addrs())?];
    if !cli.no_cluster {
        running.push(targets::cluster(&b)?);
    }
    if !cli.smoke && !cli.no_peers && (1..=8).any(|n| n != 5 && want(n)) {
        let rathole = tools::install(
            &cli.tools,
            "rathole",
            "rathole",
            &["--no-default-features", "--features", "server,client"],
        )?;
        let bore = tools::install(&cli.tools, "bore-cli", "bore", &[])?;
        running.push(targets::rathole(&b, &rathole, None)?);
        // rathole as its README describes it, for the rates compared in turns only: the
        // ratios to rathole as shipped are the targets' (docs/PERFORMANCE.md).
        let shim = tools::nodelay_shim(&cli.tools)?;
        running.push(targets::rathole(&b, &rathole, Some(&shim))?);
        running.push(targets::bore(&b, &bore)?);
    }
    // Reverse proxies beside the tunnels, in smoke runs too (the test command installs them).
    if !cli.no_peers && [1, 2, 7].into_iter().any(&want) {
        running.push(targets::nginx(&b)?);
        running.push(targets::haproxy(&b)?);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut table = Table::default();
    eprintln!("measuring every target in turn (scenarios 1, 2 and 7)…");
    if let Err(e) = rt.block_on(scenarios::run_in_turns(&plan, &running, want, &mut table)) {
        for t in &mut running {
            t.dump_output();
        }
        return Err(e);
    }
    for t in &mut running {
        if t.reference {
            continue;
        }
        eprintln!("measuring {}…", t.name);
        // Scenario 5 measures the relay's idle tunnels in a relay of their own, started
        // fresh (a process that held other things first reuses what it freed).
        let addrs = b.addrs();
        let start_relay = move || targets::relay(addrs);
        let fresh: scenarios::Fresh<'_> = (t.name == "relay").then_some(&start_relay);
        if let Err(e) = rt.block_on(scenarios::run_all(&plan, t, fresh, want, &mut table)) {
            // What the target's processes said (warnings and errors) is what explains a
            // failed request; they are killed when `running` drops.
            t.dump_output();
            return Err(e);
        }
    }
    let names: Vec<&'static str> = running.iter().map(|t| t.name).collect();
    report::write(&cli, &plan, &names, &table)?;
    eprintln!("results written to {}", cli.out.display());
    Ok(())
}

/// The sizes and counts `cli` asks for (small and short in smoke mode).
fn plan(cli: &Cli) -> Plan {
    // Each tunnel costs three descriptors in the relay-server and the agent (the user's or the
    // service's connection, the response exchange and the upload exchange).
    let fd_room = procfs::open_file_limit().saturating_sub(1_000) / 3;
    if cli.smoke {
        return Plan {
            runs: 1,
            dur: Duration::from_secs_f64(0.3),
            tunnel: 8 << 20,
            sizes: &[1_000, 1_000_000],
            burst: 200,
            big_mib: 16,
            idle_agents: 50,
            idle_tunnels: 50,
            idle_hold: Duration::from_millis(300),
        };
    }
    Plan {
        runs: cli.runs.max(1),
        dur: Duration::from_secs_f64(cli.secs),
        tunnel: cli.tunnel_mib << 20,
        sizes: &[1_000, 1_000_000, 100_000_000],
        burst: 10_000,
        big_mib: 1024,
        idle_agents: cli.idle_agents,
        idle_tunnels: cli.idle_tunnels.unwrap_or(10_000.min(fd_room)),
        idle_hold: Duration::from_secs(30),
    }
}
