//! What a soak run saw: every operation's outcome by kind, latencies and process figures
//! per second, the faults injected; as a Markdown table and as JSON.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use http::Request;
use http_body_util::BodyExt;
use serde_json::{json, Value};

use crate::load::{Done, Outcome, KINDS};

/// Process figures at one moment.
pub struct Sample {
    server_rss_kib: f64,
    agents_rss_kib: f64,
    server_fds: usize,
    server_threads: f64,
}

impl Sample {
    /// Reads the figures of the servers (summed over replicas) and the agents.
    pub fn of(servers: &[u32], agents: &[u32]) -> Sample {
        let sum = |pids: &[u32], field: &str| -> f64 {
            pids.iter().map(|p| crate::procfs::rss_kib(*p, field)).sum()
        };
        Sample {
            server_rss_kib: sum(servers, "VmRSS"),
            agents_rss_kib: sum(agents, "VmRSS"),
            server_fds: servers.iter().map(|p| crate::world::open_fds(*p)).sum(),
            server_threads: sum(servers, "Threads"),
        }
    }
}

/// Per second of the run.
#[derive(Default)]
struct Second {
    ok: u64,
    visible: u64,
    silent: u64,
    latencies_ms: Vec<f64>,
    sample: Option<(f64, f64, usize, f64)>,
}

/// Everything recorded.
pub struct Report {
    t0: Instant,
    counts: BTreeMap<(usize, String), u64>,
    seconds: BTreeMap<u64, Second>,
    faults: Vec<(f64, &'static str)>,
    /// Per fault: when each kind next ended OK, counting only operations started after it.
    recovered: Vec<[Option<f64>; KINDS.len()]>,
    unattributed: u64,
    /// Uploads the backend received wrong but clean (from the backend).
    pub silent_uploads: u64,
    /// Resources that did not come back after the load.
    pub leaks: Vec<String>,
    /// How the load was driven (closed loop, or the open loop's rate).
    pub load: String,
    /// Operations the open loop did not start because too many were running.
    pub shed: u64,
}

fn label(o: &Outcome) -> String {
    match o {
        Outcome::Ok => "ok".into(),
        Outcome::Visible(why) => format!("visible: {why}"),
        Outcome::Silent(why) => format!("SILENT: {why}"),
    }
}

impl Report {
    /// An empty report of a run that started at `t0`.
    pub fn new(t0: Instant) -> Report {
        Report {
            t0,
            counts: BTreeMap::new(),
            seconds: BTreeMap::new(),
            faults: Vec::new(),
            recovered: Vec::new(),
            unattributed: 0,
            silent_uploads: 0,
            leaks: Vec::new(),
            load: "closed loop".into(),
            shed: 0,
        }
    }

    /// Records one operation.
    pub fn record(&mut self, d: Done) {
        *self.counts.entry((d.kind, label(&d.outcome))).or_default() += 1;
        let end = d.started + d.took;
        let sec = end.saturating_duration_since(self.t0).as_secs();
        let s = self.seconds.entry(sec).or_default();
        match d.outcome {
            Outcome::Ok => {
                s.ok += 1;
                s.latencies_ms.push(d.took.as_secs_f64() * 1000.0);
                let started = d.started.saturating_duration_since(self.t0).as_secs_f64();
                let ended = end.saturating_duration_since(self.t0).as_secs_f64();
                // Recent faults only: none takes a minute to recover from.
                for (i, (t, _)) in self.faults.iter().enumerate().rev() {
                    if started - t > 60.0 {
                        break;
                    }
                    if *t <= started {
                        let first = &mut self.recovered[i][d.kind];
                        *first = Some(first.map_or(ended, |f: f64| f.min(ended)));
                    }
                }
            }
            Outcome::Visible(_) => {
                s.visible += 1;
                // Before any fault (or long after the last one) nothing explains it.
                let started = d.started.saturating_duration_since(self.t0).as_secs_f64();
                let explained = self
                    .faults
                    .iter()
                    .any(|(t, _)| *t <= started + d.took.as_secs_f64() && started - t < 90.0);
                if !explained {
                    self.unattributed += 1;
                }
            }
            Outcome::Silent(_) => s.silent += 1,
        }
    }

    /// Records process figures.
    pub fn sample(&mut self, s: Sample) {
        let sec = self.t0.elapsed().as_secs();
        self.seconds.entry(sec).or_default().sample = Some((
            s.server_rss_kib,
            s.agents_rss_kib,
            s.server_fds,
            s.server_threads,
        ));
    }

    /// Records an injected fault.
    pub fn fault(&mut self, what: &'static str) {
        self.faults.push((self.t0.elapsed().as_secs_f64(), what));
        self.recovered.push([None; KINDS.len()]);
    }

    /// Per fault kind: (count, median and longest recovery in seconds). A fault's recovery
    /// is the time until every kind of operation started after it has ended OK once: how
    /// long users wait for the relay to serve them again (an agent noticing a black-holed
    /// link, agents reconnecting after a restart).
    pub fn recoveries(&self) -> BTreeMap<&'static str, (usize, f64, f64)> {
        let mut by: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
        for ((t, what), firsts) in self.faults.iter().zip(&self.recovered) {
            let last = firsts.iter().flatten().copied().fold(f64::NAN, f64::max);
            if !last.is_nan() {
                by.entry(what).or_default().push(last - t);
            }
        }
        by.into_iter()
            .map(|(w, mut v)| {
                let n = v.len();
                (
                    w,
                    (
                        n,
                        Self::percentile(&mut v, 0.5),
                        Self::percentile(&mut v, 1.0),
                    ),
                )
            })
            .collect()
    }

    /// Operations recorded so far.
    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    /// SILENT outcomes, users' and the backend's together.
    pub fn silent(&self) -> u64 {
        self.counts
            .iter()
            .filter(|((_, l), _)| l.starts_with("SILENT"))
            .map(|(_, n)| n)
            .sum::<u64>()
            + self.silent_uploads
    }

    fn percentile(all: &mut [f64], p: f64) -> f64 {
        if all.is_empty() {
            return 0.0;
        }
        all.sort_by(|a, b| a.total_cmp(b));
        all[((all.len() - 1) as f64 * p) as usize]
    }

    /// The report as Markdown, headed by the command that produced it.
    pub fn markdown(&self, command: &str) -> String {
        let mut out = format!("`{command}`\n\n| kind | outcome | count |\n|---|---|---|\n");
        for ((kind, outcome), n) in &self.counts {
            out += &format!("| {} | {outcome} | {n} |\n", KINDS[*kind]);
        }
        let mut lat: Vec<f64> = self
            .seconds
            .values()
            .flat_map(|s| s.latencies_ms.iter().copied())
            .collect();
        let total: u64 = self.counts.values().sum();
        let samples: Vec<_> = self.seconds.values().filter_map(|s| s.sample).collect();
        let rss = |f: fn(&(f64, f64, usize, f64)) -> f64| {
            let v: Vec<f64> = samples.iter().map(f).collect();
            (
                v.first().copied().unwrap_or(0.0) / 1024.0,
                v.iter().copied().fold(0.0, f64::max) / 1024.0,
                v.last().copied().unwrap_or(0.0) / 1024.0,
            )
        };
        let (s0, smax, s1) = rss(|s| s.0);
        let (a0, amax, a1) = rss(|s| s.1);
        out += &format!(
            "\n{total} operations ({}; {} shed); OK latency p50 {:.1} ms, p99 {:.1} ms; {} faults injected \
             ({}); {} visible errors not explained by a fault; SILENT: {} (users) + {} \
             (uploads the backend got wrong); server RSS {s0:.1} → max {smax:.1} → {s1:.1} MiB; \
             agents' RSS {a0:.1} → max {amax:.1} → {a1:.1} MiB; after the load: {}\n",
            self.load,
            self.shed,
            Self::percentile(&mut lat, 0.5),
            Self::percentile(&mut lat, 0.99),
            self.faults.len(),
            summarize(&self.faults),
            self.unattributed,
            self.silent() - self.silent_uploads,
            self.silent_uploads,
            if self.leaks.is_empty() {
                "every request, tunnel, buffered byte and descriptor came back".to_owned()
            } else {
                format!("NOT BACK: {}", self.leaks.join(", "))
            },
        );
        let rec = self.recoveries();
        if !rec.is_empty() {
            out += "\n| fault | times | recovery: median | longest |\n|---|---|---|---|\n";
            for (w, (n, med, max)) in rec {
                out += &format!("| {w} | {n} | {med:.1} s | {max:.1} s |\n");
            }
        }
        out
    }

    /// The report as JSON (totals, faults, and the per-second series).
    pub fn json(&self) -> Value {
        let series: Vec<Value> = self
            .seconds
            .iter()
            .map(|(t, s)| {
                let mut l = s.latencies_ms.clone();
                json!({
                    "t": t, "ok": s.ok, "visible": s.visible, "silent": s.silent,
                    "p50_ms": Self::percentile(&mut l, 0.5),
                    "p99_ms": Self::percentile(&mut l, 0.99),
                    "server_rss_kib": s.sample.map(|x| x.0),
                    "agents_rss_kib": s.sample.map(|x| x.1),
                    "server_fds": s.sample.map(|x| x.2),
                    "server_threads": s.sample.map(|x| x.3),
                })
            })
            .collect();
        let counts: Vec<Value> = self
            .counts
            .iter()
            .map(|((k, o), n)| json!({"kind": KINDS[*k], "outcome": o, "count": n}))
            .collect();
        json!({
            "counts": counts,
            "faults": self.faults.iter().map(|(t, w)| json!({"t": t, "fault": w})).collect::<Vec<_>>(),
            "recovery": self.recoveries().into_iter().map(|(w, (n, med, max))| json!({
                "fault": w, "times": n, "median_s": med, "longest_s": max,
            })).collect::<Vec<_>>(),
            "load": self.load,
            "shed": self.shed,
            "unattributed_visible": self.unattributed,
            "silent": self.silent(),
            "silent_uploads": self.silent_uploads,
            "leaks": self.leaks,
            "series": series,
        })
    }
}

fn summarize(faults: &[(f64, &'static str)]) -> String {
    let mut n: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, w) in faults {
        *n.entry(w).or_default() += 1;
    }
    n.iter()
        .map(|(w, c)| format!("{c}× {w}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The server's `/metrics` text (asked on loopback, where it is served).
pub async fn metrics(server: std::net::SocketAddr) -> Option<String> {
    let req = Request::get(format!("http://{server}/metrics"))
        .body(relay_tests::empty())
        .ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(5), relay_tests::client().request(req))
        .await
        .ok()?
        .ok()?;
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    String::from_utf8(body.to_vec()).ok()
}

/// One unlabelled series' value (0 when absent).
pub fn value(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map_or(0, |v| v as u64)
}
