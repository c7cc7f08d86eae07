//! HTTP/2 load from nghttp2's `h2load`, the standard HTTP/2 load generator (Debian:
//! `nghttp2-client`), beside the suite's own hyper client ([`crate::load::h2`]).
//!
//! Scenario 7 measures with both because on the benchmark's two cores the generator shares
//! the machine with the target, and the two generators cost very differently: hyper's
//! client, its connection task and 32 request tasks on a two-thread runtime, spends
//! 5.4 µs of CPU per request against rathole and 7.5 µs against the relay (whose answers
//! arrive in bigger batches and wake more of its tasks across its threads), while `h2load`,
//! one event loop in C, spends 1.3–1.4 µs against either (docs/PERFORMANCE.md, the
//! thirtieth round). Neither is the one truth about HTTP/2 clients, so both are reported.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;

use crate::load::Rate;

/// `h2load` over one connection with `streams` concurrent streams for `dur`, GETs of
/// `/small`, naming the backend with `X-Server-Name` when `server_name` is set. The rate
/// is h2load's own (requests completed in the timed duration); the percentiles come
/// from its per-request log. Any failed, errored or non-2xx request is an error.
pub async fn run(
    addr: SocketAddr,
    server_name: Option<&str>,
    streams: usize,
    dur: Duration,
) -> anyhow::Result<Rate> {
    let dir = std::env::temp_dir().join(format!(
        "relay-bench-h2load-{}-{}",
        std::process::id(),
        addr.port()
    ));
    std::fs::create_dir_all(&dir)?;
    let log = dir.join("requests.tsv");
    let mut cmd = tokio::process::Command::new("h2load");
    cmd.arg("--clients=1")
        .arg(format!("--max-concurrent-streams={streams}"))
        .arg(format!("--duration={}ms", dur.as_millis().max(1)))
        .arg(format!("--log-file={}", log.display()));
    if let Some(n) = server_name {
        cmd.arg(format!("--header=x-server-name: {n}"));
    }
    cmd.arg(format!("http://{addr}/small")).kill_on_drop(true);
    let ran = cmd.output().await;
    let lat = std::fs::read_to_string(&log);
    // The log goes whatever happened (it is a few MB per second of load).
    let _ = std::fs::remove_dir_all(&dir);
    let out = match ran {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
            "h2load is not installed: scenario 7 measures HTTP/2 with it \
             (Debian: apt install nghttp2-client)"
        ),
        other => other.context("running h2load")?,
    };
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "h2load failed ({}): {text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = Summary::parse(&text)?;
    anyhow::ensure!(
        summary.done > 0 && summary.failed == 0 && summary.errored == 0,
        "h2load: {} done, {} failed, {} errored: {text}",
        summary.done,
        summary.failed,
        summary.errored
    );
    // Status codes are counted as heads arrive, so a run stopped with answers under way
    // can count one more 2xx than requests done: only the other classes mean an error.
    anyhow::ensure!(
        summary.not_ok == 0,
        "h2load: {} answers were not 2xx: {text}",
        summary.not_ok
    );
    let lat = latencies(&lat.context("reading h2load's request log")?)?;
    let mut rate = crate::load::percentiles(lat, dur.as_secs_f64());
    rate.rps = summary.rps;
    Ok(rate)
}

/// What `h2load` prints at the end of a run.
#[derive(Debug, PartialEq)]
struct Summary {
    /// `finished in …, <rps> req/s`.
    rps: f64,
    /// Requests done, failed and errored (`requests:` line).
    done: u64,
    failed: u64,
    errored: u64,
    /// 3xx, 4xx and 5xx answers (`status codes:` line).
    not_ok: u64,
}

impl Summary {
    fn parse(text: &str) -> anyhow::Result<Summary> {
        let line = |prefix: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(prefix))
                .with_context(|| format!("h2load printed no `{prefix}` line: {text}"))
        };
        // `<n> <word>` pairs of a comma-separated line.
        let count = |l: &str, word: &str| -> anyhow::Result<u64> {
            l.split(',')
                .find_map(|part| part.trim().strip_suffix(word))
                .with_context(|| format!("no `{word}` in h2load's line `{l}`"))?
                .trim()
                .parse()
                .with_context(|| format!("h2load's `{word}` count in `{l}`"))
        };
        let finished = line("finished in ")?;
        let rps = finished
            .split(',')
            .find_map(|part| part.trim().strip_suffix(" req/s"))
            .with_context(|| format!("no req/s in h2load's `{finished}`"))?
            .parse()
            .context("h2load's req/s")?;
        let requests = line("requests: ")?;
        let codes = line("status codes: ")?;
        Ok(Summary {
            rps,
            done: count(requests, " done")?,
            failed: count(requests, " failed")?,
            errored: count(requests, " errored")?,
            not_ok: ["3xx", "4xx", "5xx"]
                .iter()
                .map(|class| count(codes, &format!(" {class}")))
                .sum::<anyhow::Result<u64>>()?,
        })
    }
}

/// Per-request latencies in µs from h2load's `--log-file` (tab-separated: start time,
/// status, µs until the end of the response).
fn latencies(log: &str) -> anyhow::Result<Vec<u32>> {
    log.lines()
        .map(|l| {
            l.split('\t')
                .nth(2)
                .and_then(|us| us.trim().parse().ok())
                .with_context(|| format!("h2load's request log line `{l}`"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The end of a real h2load 1.52 run.
    const OUTPUT: &str = "finished in 4.00s, 64321.67 req/s, 1.59MB/s
requests: 192965 total, 192997 started, 192965 done, 192960 succeeded, 5 failed, 0 errored, 0 timeout
status codes: 192960 2xx, 0 3xx, 0 4xx, 5 5xx
traffic: 4.78MB (5017159) total, 1.46MB (1535761) headers (space savings 89.65%), 499.88KB (511882) data
";

    #[test]
    fn the_summary_is_read_from_h2loads_output() {
        assert_eq!(
            Summary::parse(OUTPUT).unwrap(),
            Summary {
                rps: 64321.67,
                done: 192965,
                failed: 5,
                errored: 0,
                not_ok: 5
            }
        );
        let err = Summary::parse("finished in 4.00s, 1 req/s\n").unwrap_err();
        assert!(err.to_string().contains("requests: "), "{err}");
    }

    #[test]
    fn latencies_are_the_logs_third_column() {
        let log = "1796643010803596\t200\t461\n1796643010803602\t200\t536\n";
        assert_eq!(latencies(log).unwrap(), vec![461, 536]);
        assert!(latencies("1796643010803596\t200\n").is_err());
    }
}
