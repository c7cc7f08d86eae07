//! Figures of processes read from /proc: memory, CPU time, the open-file limit.

use std::time::Duration;

/// A memory figure of a process from /proc (KiB).
pub fn rss_kib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0)
}

/// The soft open-file limit of this process (and so of its children).
pub fn open_file_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(1024)
}

/// User plus system CPU time of a process, in clock ticks (1/100 s).
pub fn cpu_ticks(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 of stat, counted after the command name.
    n(11) + n(12)
}

/// A process's CPU use in % of one core since `ticks0` (from [`cpu_ticks`]) over `dur`.
pub fn cpu_percent(pid: u32, ticks0: f64, dur: Duration) -> f64 {
    (cpu_ticks(pid) - ticks0) / 100.0 / dur.as_secs_f64() * 100.0
}

/// The processes whose parent is `pid` (from each process's stat in /proc).
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            // The parent is the second field after the command name.
            let parent = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .nth(1);
            parent == Some(pid.to_string().as_str())
        })
        .collect()
}
