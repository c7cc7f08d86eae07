//! The scenarios, one function each, numbered as in docs/PERFORMANCE.md. Each runs its
//! measurement `plan.runs` times against each target and records the medians. The steady
//! rates read as ratios between targets (scenarios 1, 2 and 7: [`run_in_turns`]) give
//! every target one run in turn, so that a ratio compares measurements seconds apart
//! rather than minutes: on the benchmark's virtual machines a rate drifts by a fifth or
//! more within minutes (the twentieth round in docs/PERFORMANCE.md), and one target
//! measured wholly after another carried the drift into its ratio.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::procfs::{cpu_percent, cpu_ticks, rss_kib};
use crate::targets::{self, Running};
use crate::{h2load, idle, load};
use anyhow::Context as _;

/// Sizes and counts of one benchmark run (smaller in smoke mode).
pub struct Plan {
    /// Runs per measurement (the median is kept).
    pub runs: usize,
    /// Length of one rate measurement.
    pub dur: Duration,
    /// Tunnel bytes each way.
    pub tunnel: u64,
    /// Body sizes of scenario 3.
    pub sizes: &'static [usize],
    /// Requests sent at once in scenario 6.
    pub burst: usize,
    /// Size of scenario 8's download, MiB.
    pub big_mib: usize,
    /// Idle agents of scenario 5.
    pub idle_agents: usize,
    /// Idle tunnels of scenario 5.
    pub idle_tunnels: usize,
    /// How long idle agents and tunnels are held while CPU is measured.
    pub idle_hold: Duration,
}

/// Results: metric → target → median value.
#[derive(Default)]
pub struct Table(pub BTreeMap<String, BTreeMap<&'static str, f64>>);

impl Table {
    fn put(&mut self, metric: impl Into<String>, target: &'static str, v: f64) {
        self.0.entry(metric.into()).or_default().insert(target, v);
    }
}

/// The median of `v` (0 when empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The median of one figure of each run's rate.
fn median_of(runs: &[load::Rate], figure: fn(&load::Rate) -> f64) -> f64 {
    median(runs.iter().map(figure).collect())
}

/// How far apart a target's runs of one figure were: (highest − lowest) / median, in %
/// (0 for fewer than two runs). A ratio between two targets is only as good as both
/// spreads: on a VM one target's slow stretch can carry it (the twenty-first round).
pub fn spread(v: &[f64]) -> f64 {
    if v.len() < 2 {
        return 0.0;
    }
    let (lo, hi) = v
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        });
    let mid = median(v.to_vec());
    if mid <= 0.0 {
        return 0.0;
    }
    (hi - lo) / mid * 100.0
}

/// Puts the median of `runs`' rates as `metric`, and their spread beside it.
fn put_rate(out: &mut Table, metric: &str, target: &'static str, runs: &[load::Rate]) {
    let rps: Vec<f64> = runs.iter().map(|r| r.rps).collect();
    out.put(format!("{metric} spread %"), target, spread(&rps));
    out.put(metric, target, median(rps));
}

/// Runs one timed load through `t` and notes the CPU time its relaying processes used per
/// request ([`Running::relaying`]; clock ticks of 10 ms, so a load of a few seconds at
/// thousands of requests a second reads to a few percent).
async fn with_cpu(
    t: &Running,
    plan: &Plan,
    load: impl std::future::Future<Output = anyhow::Result<load::Rate>>,
) -> anyhow::Result<load::Rate> {
    let ticks = || t.relaying.iter().map(|&p| cpu_ticks(p)).sum::<f64>();
    let before = ticks();
    let mut rate = load.await?;
    let requests = rate.rps * plan.dur.as_secs_f64();
    if requests > 0.0 {
        rate.cpu_us = (ticks() - before) * 10_000.0 / requests;
    }
    Ok(rate)
}

/// The median CPU per request of `runs` ([`with_cpu`]), for a target that relays.
fn put_cpu(out: &mut Table, m: &str, t: &Running, runs: &[load::Rate]) {
    if !t.relaying.is_empty() {
        let cpu = median_of(runs, |r| r.cpu_us);
        out.put(format!("{m} relaying CPU µs per request"), t.name, cpu);
    }
}

/// Starts another target like the one measured, in fresh processes.
pub type Fresh<'a> = Option<&'a (dyn Fn() -> anyhow::Result<Running> + Sync)>;

/// Runs the scenarios `want` selects whose rates are compared between targets (1, 2 and
/// 7), every run of each going to the targets in turn ([`in_turns`]).
pub async fn run_in_turns(
    plan: &Plan,
    targets: &[Running],
    want: impl Fn(u8) -> bool,
    out: &mut Table,
) -> anyhow::Result<()> {
    let targets: Vec<&Running> = targets.iter().collect();
    if want(1) {
        keep_alive(plan, &targets, out).await?;
    }
    if want(2) {
        new_connections(plan, &targets, out).await?;
    }
    if want(7) {
        h2_streams(plan, &targets, out).await?;
    }
    Ok(())
}

/// Runs the other scenarios `want` selects (6, 3, 4, 8 and 5: the burst, bulk transfers
/// and idle holdings) against `t` (`fresh` starts another like it, where a scenario
/// wants a process that held nothing before).
pub async fn run_all(
    plan: &Plan,
    t: &Running,
    fresh: Fresh<'_>,
    want: impl Fn(u8) -> bool,
    out: &mut Table,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let what = |n: u8| format!("scenario {n} through {}", t.name);
    if want(6) {
        burst(plan, t, out).await.with_context(|| what(6))?;
    }
    if want(3) {
        bodies(plan, t, out).await.with_context(|| what(3))?;
    }
    if want(4) {
        tunnel(plan, t, out).await.with_context(|| what(4))?;
    }
    if want(8) {
        small_during_big(plan, t, out)
            .await
            .with_context(|| what(8))?;
    }
    if want(5) {
        idle(plan, t, fresh, out).await.with_context(|| what(5))?;
    }
    Ok(())
}

/// `measure` run `plan.runs` times on each of `targets`, the targets taking turns: each
/// target's results, in the order of `targets`.
async fn in_turns<'t, T, F, Fut>(
    plan: &Plan,
    targets: &[&'t Running],
    scenario: u8,
    mut measure: F,
) -> anyhow::Result<Vec<Vec<T>>>
where
    F: FnMut(&'t Running) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut all: Vec<Vec<T>> = targets.iter().map(|_| Vec::new()).collect();
    for _ in 0..plan.runs {
        for (t, got) in targets.iter().zip(&mut all) {
            let r = measure(t)
                .await
                .with_context(|| format!("scenario {scenario} through {}", t.name))?;
            got.push(r);
        }
    }
    Ok(all)
}

/// 1: small GETs on keep-alive connections (1, 16 and 64).
async fn keep_alive(plan: &Plan, targets: &[&Running], out: &mut Table) -> anyhow::Result<()> {
    for conns in [1usize, 16, 64] {
        let all = in_turns(plan, targets, 1, |t| {
            with_cpu(t, plan, load::small_gets(&t.http, conns, false, plan.dur))
        })
        .await?;
        let m = format!("1 keep-alive {conns} conn");
        for (t, runs) in targets.iter().zip(all) {
            put_rate(out, &format!("{m} req/s"), t.name, &runs);
            out.put(format!("{m} p50 ms"), t.name, median_of(&runs, |r| r.p50));
            out.put(format!("{m} p99 ms"), t.name, median_of(&runs, |r| r.p99));
            put_cpu(out, &m, t, &runs);
        }
    }
    Ok(())
}

/// 2: a new connection per request (16 at a time).
async fn new_connections(plan: &Plan, targets: &[&Running], out: &mut Table) -> anyhow::Result<()> {
    let all = in_turns(plan, targets, 2, |t| {
        load::small_gets(&t.http, 16, true, plan.dur)
    })
    .await?;
    for (t, runs) in targets.iter().zip(all) {
        put_rate(out, "2 new connection per request req/s", t.name, &runs);
        let p50 = median_of(&runs, |r| r.p50);
        out.put("2 new connection per request p50 ms", t.name, p50);
    }
    Ok(())
}

/// 3: downloads and uploads of each size.
async fn bodies(plan: &Plan, t: &Running, out: &mut Table) -> anyhow::Result<()> {
    for &size in plan.sizes {
        let label = match size {
            1_000 => "1 KB".to_owned(),
            1_000_000 => "1 MB".to_owned(),
            n => format!("{} MB", n / 1_000_000),
        };
        let (mut down, mut up) = (Vec::new(), Vec::new());
        for _ in 0..plan.runs {
            down.push(load::download(&t.http, size, plan.dur).await?);
            up.push(load::upload(&t.http, size, plan.dur).await?);
        }
        out.put(format!("3 download {label} MB/s"), t.name, median(down));
        out.put(format!("3 upload {label} MB/s"), t.name, median(up));
    }
    Ok(())
}

/// 4: raw bytes through a TCP tunnel, each way.
async fn tunnel(plan: &Plan, t: &Running, out: &mut Table) -> anyhow::Result<()> {
    let (mut up, mut down) = (Vec::new(), Vec::new());
    for _ in 0..plan.runs {
        let (u, d) = load::tcp_copy(t.tcp, plan.tunnel).await?;
        up.push(u);
        down.push(d);
    }
    out.put("4 tunnel up MB/s", t.name, median(up));
    out.put("4 tunnel down MB/s", t.name, median(down));
    Ok(())
}

/// 7: small GETs over one HTTP/2 connection, 32 streams at a time, from the suite's hyper
/// client and from `h2load` (why both: [`crate::h2load`]), one after the other in each turn.
async fn h2_streams(plan: &Plan, targets: &[&Running], out: &mut Table) -> anyhow::Result<()> {
    let with: Vec<&Running> = targets.iter().copied().filter(|t| t.h2.is_some()).collect();
    let all = in_turns(plan, &with, 7, |t| async move {
        let (addr, name) =
            t.h2.as_ref()
                .expect("bug: only targets with HTTP/2 are here");
        let hyper = with_cpu(t, plan, load::h2(*addr, name.as_deref(), 32, plan.dur)).await?;
        let h2load = with_cpu(t, plan, h2load::run(*addr, name.as_deref(), 32, plan.dur))
            .await
            .context("scenario 7 with h2load")?;
        anyhow::Ok((hyper, h2load))
    })
    .await?;
    for (t, runs) in with.iter().zip(all) {
        let (hyper, h2load): (Vec<_>, Vec<_>) = runs.into_iter().unzip();
        put_rate(out, "7 HTTP/2 32 streams req/s", t.name, &hyper);
        put_cpu(out, "7 HTTP/2 32 streams", t, &hyper);
        put_rate(out, "7 HTTP/2 32 streams h2load req/s", t.name, &h2load);
        put_cpu(out, "7 HTTP/2 32 streams h2load", t, &h2load);
    }
    Ok(())
}

/// 8: small GETs on one connection while one large download runs through the same target.
async fn small_during_big(plan: &Plan, t: &Running, out: &mut Table) -> anyhow::Result<()> {
    let mib = plan.big_mib;
    let (rate, mbs) = load::small_during_download(&t.http, mib << 20).await?;
    let m = format!("8 small GETs during a {mib} MiB download");
    out.put(format!("{m}, p50 ms"), t.name, rate.p50);
    out.put(format!("{m}, p99 ms"), t.name, rate.p99);
    out.put(format!("{m}, req/s"), t.name, rate.rps);
    out.put(format!("{m}, download MB/s"), t.name, mbs);
    Ok(())
}

/// 6: a burst of requests at once; the relay's memory before, at the peak, after (per
/// target, its runs back to back: the memory is read around them).
async fn burst(plan: &Plan, t: &Running, out: &mut Table) -> anyhow::Result<()> {
    let Some((addr, name)) = &t.h2 else {
        return Ok(());
    };
    let n = plan.burst;
    let before = t.server_pid.map(|p| rss_kib(p, "VmRSS"));
    let mut secs = Vec::new();
    for _ in 0..plan.runs {
        let (s, ok) = load::burst(*addr, name.as_deref(), n).await?;
        anyhow::ensure!(ok == n, "{}: {ok} of {n} burst requests answered", t.name);
        secs.push(s);
    }
    out.put(
        format!("6 burst of {n} requests, s spread %"),
        t.name,
        spread(&secs),
    );
    out.put(format!("6 burst of {n} requests, s"), t.name, median(secs));
    if let (Some(pid), Some(before)) = (t.server_pid, before) {
        // The relay hands memory back on its next housekeeping tick (1 s).
        tokio::time::sleep(Duration::from_secs(3)).await;
        let peak = rss_kib(pid, "VmHWM") / 1024.0;
        out.put("6 burst relay-server peak RSS MiB", t.name, peak);
        let growth = (rss_kib(pid, "VmRSS") - before) / 1024.0;
        out.put("6 burst relay-server RSS growth after MiB", t.name, growth);
    }
    Ok(())
}

/// 5: idle agents and idle tunnels held by the relay (the relay's memory and CPU only).
async fn idle(plan: &Plan, t: &Running, fresh: Fresh<'_>, out: &mut Table) -> anyhow::Result<()> {
    let Some(pid) = t.server_pid else {
        return Ok(());
    };
    let (n, hold) = (plan.idle_agents, plan.idle_hold);
    // What earlier scenarios freed goes back first, outside the measurement.
    rss_settled(pid).await;
    // Sessions first: a phase measured after another may reuse memory the earlier phase
    // freed and the allocator kept (fragments `malloc_trim` cannot return) without the
    // resident size growing, and the session figure is the one nearest its target.
    let sessions = idle::IdleSessions::start(t.http.addr, targets::TOKEN, n);
    let (kib, cpu, _) = held_idle(pid, n, hold, sessions).await?;
    let m = format!("5 idle {n} agents on sessions");
    out.put(format!("{m} KiB per agent"), t.name, kib);
    out.put(format!("{m} server CPU %"), t.name, cpu);

    // The same number of agents on long polls; first the sessions close and the server
    // hands their memory back.
    idle::wait_connections_below(t.http.addr, 100).await?;
    rss_settled(pid).await;
    let agents = idle::IdleAgents::start(t.http.addr, targets::TOKEN, n);
    let (kib, cpu, polls) = held_idle(pid, n, hold, agents).await?;
    let m = format!("5 idle {n} agents");
    out.put(format!("{m} KiB per agent"), t.name, kib);
    out.put(format!("{m} server CPU %"), t.name, cpu);
    let rate = polls as f64 / hold.as_secs_f64();
    out.put(format!("{m} re-polls/s"), t.name, rate);

    // Tunnels in a fresh relay when one can be started: in this one, memory the agents
    // freed and the allocator kept would be reused unmeasured. Otherwise here, after the
    // long polls' memory went back (a trim during the measurement made it negative), and
    // the figure is a lower bound.
    let n = plan.idle_tunnels;
    // Started on a thread of its own: starting waits on a runtime of its own.
    let started = fresh
        .map(|start| std::thread::scope(|s| s.spawn(start).join()))
        .transpose()
        .map_err(|_| anyhow::anyhow!("starting a fresh relay panicked"))?
        .transpose()?;
    let (t, pid) = match &started {
        Some(f) => (f, f.server_pid.context("a fresh relay without a server")?),
        None => {
            idle::wait_connections_below(t.http.addr, 100).await?;
            (t, pid)
        }
    };
    rss_settled(pid).await;
    let tunnels = idle::IdleTunnels::start(t.tcp, t.http.addr, n);
    let (kib, cpu, _) = held_idle(pid, n, hold, tunnels).await?;
    let m = format!("5 idle {n} tunnels");
    out.put(format!("{m} KiB per tunnel"), t.name, kib);
    out.put(format!("{m} server CPU %"), t.name, cpu);
    Ok(())
}

/// Opens `n` idle things with `start` and holds them for `hold`: the relay-server's memory
/// growth per thing (KiB), its CPU while they were held (%), and what they counted then.
async fn held_idle<T: idle::Idle>(
    pid: u32,
    n: usize,
    hold: Duration,
    start: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(f64, f64, usize)> {
    let before = rss_kib(pid, "VmRSS");
    let held = start.await?;
    // Idle means settled: the relay hands the memory of the opening burst's setup back
    // on a quiet tick (`base/trim.rs`), and the figure is what the things cost to hold.
    rss_settled(pid).await;
    let after = rss_kib(pid, "VmRSS");
    let cpu0 = cpu_ticks(pid);
    let counted = held.hold(hold).await;
    let cpu = cpu_percent(pid, cpu0, hold);
    drop(held);
    Ok(((after - before) / n.max(1) as f64, cpu, counted))
}

/// Waits until the process's resident memory stops shrinking, at most 10 s. Its
/// housekeeping hands freed memory back on a tick once a second, so one sample that did
/// not shrink says nothing (the trim may not have run yet): memory counts as settled after
/// 2 s without a fall. Before, a trim of the previous phase's memory could land in the
/// next measurement and make it small or negative.
async fn rss_settled(pid: u32) {
    let mut last = rss_kib(pid, "VmRSS");
    let mut steady = 0;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = rss_kib(pid, "VmRSS");
        steady = if now < last { 0 } else { steady + 1 };
        if steady == 4 {
            return;
        }
        last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::spread;

    #[test]
    fn the_spread_is_the_range_over_the_median_in_percent() {
        assert_eq!(spread(&[]), 0.0);
        assert_eq!(spread(&[5.0]), 0.0, "one run has no spread");
        assert_eq!(spread(&[90.0, 100.0, 110.0]), 20.0);
        assert_eq!(
            spread(&[110.0, 100.0, 100.0]),
            10.0,
            "order does not matter"
        );
        assert_eq!(spread(&[0.0, 0.0]), 0.0);
    }
}
