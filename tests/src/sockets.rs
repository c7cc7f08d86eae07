//! Sockets of this test process as the kernel sees them.

/// The keep-alive timers of this process's established connections to `port`, from
/// /proc/net/tcp: seconds left on each socket's timer, `None` for one without keep-alive;
/// `None` for the whole table while any of them has another timer running (data in flight
/// waits for its ACK: that timer shows instead), so the caller looks again.
/// Only this process's sockets count (matched by inode with `/proc/self/fd`): the table is
/// the whole machine's.
pub fn keepalive_timers(port: u16) -> Option<Vec<Option<f64>>> {
    let own: std::collections::HashSet<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|t| {
            let t = t.to_str()?;
            Some(t.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let remote = format!(":{port:04X}");
    let mut seen = std::collections::HashMap::new();
    for l in table.lines().skip(1) {
        let f: Vec<_> = l.split_whitespace().collect();
        // sl local rem st tx:rx tr:when retrnsmt uid timeout inode; 01 = ESTABLISHED.
        if f.len() > 9 && f[2].ends_with(&remote) && f[3] == "01" && own.contains(f[9]) {
            // Timer 2 is the keep-alive timer (sk_timer), its time left in USER_HZ ticks;
            // 0 is none.
            let (kind, when) = f[5].split_once(':').unwrap();
            let timer = match kind {
                "00" => None,
                "02" => Some(u64::from_str_radix(when, 16).unwrap() as f64 / 100.0),
                _ => return None,
            };
            seen.insert(f[9].to_owned(), timer);
        }
    }
    Some(seen.into_values().collect())
}
