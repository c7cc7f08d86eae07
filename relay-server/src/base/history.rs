//! Requests and errors per backend over the last 15 minutes, and the latest errors, for the
//! status page.
//!
//! The history is kept per connected name in 10-second buckets and dropped with the name,
//! so its size is bounded like the metrics' label sets.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use serde_json::{json, Value};

/// Width of one history bucket.
pub const BUCKET_SECS: u64 = 10;
/// Buckets kept: 15 minutes.
const BUCKETS: usize = 90;
/// Recent errors kept.
const RECENT_ERRORS: usize = 50;

/// Seconds since the epoch (the history's clock).
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[derive(Default)]
struct Series {
    /// (bucket start, requests, errors), oldest first.
    buckets: VecDeque<(u64, u64, u64)>,
    requests: u64,
    errors: u64,
}

/// One name's series, kept by its caller (a handle of a forgotten name records into a
/// series nobody shows).
pub struct NameHistory(Arc<Mutex<Series>>);

/// Requests and errors over time, per backend name, and the latest errors.
pub struct History {
    names: DashMap<String, Arc<Mutex<Series>>>,
    errors: Mutex<VecDeque<Value>>,
    started: u64,
}

impl Default for History {
    fn default() -> Self {
        History {
            names: DashMap::new(),
            errors: Mutex::new(VecDeque::new()),
            started: now(),
        }
    }
}

impl History {
    /// Records an answered request for a connected `name` (`None`: a name without agents,
    /// which only counts when it failed).
    /// `series` is the name's series when the caller keeps it ([`History::handle`]); without
    /// it the series is looked up by name.
    pub fn record(
        &self,
        name: Option<&str>,
        series: Option<&NameHistory>,
        status: u16,
        error: Option<&str>,
    ) {
        let t = now();
        if let Some(name) = name {
            let found;
            let entry = match series {
                Some(h) => &h.0,
                None => {
                    found = self.handle(name);
                    &found.0
                }
            };
            let mut s = entry.lock().expect("bug: poisoned");
            let bucket = t - t % BUCKET_SECS;
            if s.buckets.back().map(|b| b.0) != Some(bucket) {
                s.buckets.push_back((bucket, 0, 0));
                while s.buckets.len() > BUCKETS {
                    s.buckets.pop_front();
                }
            }
            let failed = status >= 500;
            let last = s.buckets.back_mut().expect("bug: pushed above");
            last.1 += 1;
            last.2 += u64::from(failed);
            s.requests += 1;
            s.errors += u64::from(failed);
        }
        if let Some(message) = error.filter(|_| status >= 500) {
            let mut errors = self.errors.lock().expect("bug: poisoned");
            errors.push_front(json!({
                "time": t,
                "name": name.unwrap_or_default(),
                "status": status,
                "message": message,
            }));
            errors.truncate(RECENT_ERRORS);
        }
    }

    /// The latest errors, newest first.
    pub fn recent_errors(&self) -> Vec<Value> {
        let errors = self.errors.lock().expect("bug: poisoned");
        errors.iter().cloned().collect()
    }

    /// When the history began (the server's start), in seconds since the epoch.
    pub fn started(&self) -> u64 {
        self.started
    }

    /// The series of `name`, made if it has none: a caller that keeps it records without a
    /// lookup by name.
    pub fn handle(&self, name: &str) -> NameHistory {
        // The common case finds the series without allocating the key.
        let series = match self.names.get(name) {
            Some(e) => e.clone(),
            None => self.names.entry(name.to_owned()).or_default().clone(),
        };
        NameHistory(series)
    }

    /// Drops the history of a name nobody serves any more.
    pub fn forget(&self, name: &str) {
        self.names.remove(name);
    }

    /// The JSON summary and dense series of `name` at time `t`.
    pub fn series(&self, name: &str, t: u64) -> Value {
        let Some(entry) = self.names.get(name) else {
            return json!({"requests": 0, "errors": 0, "rps": 0.0, "error_rate": 0.0, "series": []});
        };
        let s = entry.lock().expect("bug: poisoned");
        let current = t - t % BUCKET_SECS;
        let first = current.saturating_sub(BUCKET_SECS * (BUCKETS as u64 - 1));
        // A dense series, one point per bucket, zeros where nothing happened.
        let mut points = Vec::with_capacity(BUCKETS);
        let mut it = s.buckets.iter().peekable();
        let mut start = first;
        while start <= current {
            while it.peek().is_some_and(|b| b.0 < start) {
                it.next();
            }
            let (r, e) = match it.peek() {
                Some(b) if b.0 == start => (b.1, b.2),
                _ => (0, 0),
            };
            points.push(json!([r, e]));
            start += BUCKET_SECS;
        }
        // The last minute (six buckets, the current one partial).
        let (r, e) = s
            .buckets
            .iter()
            .filter(|b| b.0 + 60 > current)
            .fold((0, 0), |acc, b| (acc.0 + b.1, acc.1 + b.2));
        json!({
            "requests": s.requests,
            "errors": s.errors,
            "rps": r as f64 / 60.0,
            "error_rate": if r == 0 { 0.0 } else { e as f64 / r as f64 },
            "series": points,
        })
    }
}
