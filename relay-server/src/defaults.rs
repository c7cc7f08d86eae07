//! The server's defaults, written once: the binary's flags show and apply them, and
//! [`Config::default`](crate::Config::default) is built from them. Durations are in the
//! flags' own notation (`10s`, `12h`), so the help text shows what the code uses.

use std::time::Duration;

/// Parses one of the duration defaults below.
pub fn duration(d: &str) -> Duration {
    humantime::parse_duration(d).expect("bug: the duration defaults parse")
}

/// Address to listen on.
pub const LISTEN: &str = "127.0.0.1:8080";

/// Prefix of every Redis key.
pub const CLUSTER_KEY_PREFIX: &str = "relay:";

/// How long a request waits for a connected agent to pick it up.
pub const PICKUP_TIMEOUT: &str = "10s";

/// How long a request waits for its response head.
pub const RESPONSE_TIMEOUT: &str = "60s";

/// How long an upgrade request waits for its answer.
pub const UPGRADE_RESPONSE_TIMEOUT: &str = "120s";

/// A switched connection idle this long is closed.
pub const TUNNEL_IDLE_TIMEOUT: &str = "10m";

/// How long a long poll is held.
pub const POLL_TIMEOUT: &str = "25s";

/// How long an agent may be without a parked poll.
pub const AGENT_GRACE: &str = "5s";

/// How long shutdown waits for requests in flight.
pub const DRAIN_TIMEOUT: &str = "20s";

/// Time allowed for a request head.
pub const HEADER_READ_TIMEOUT: &str = "10s";

/// An idle HTTP/2 connection is closed after this.
pub const IDLE_TIMEOUT: &str = "75s";

/// A request body without a new byte for this long is refused.
pub const UPLOAD_INACTIVITY_TIMEOUT: &str = "60s";
/// A user who takes none of the waiting response bytes for this long has its response failed.
pub const USER_WRITE_TIMEOUT: &str = "60s";

/// A signed-link session unused this long ends.
pub const SESSION_IDLE: &str = "1h";

/// A signed-link session ends this long after its link was used.
pub const SESSION_MAX_AGE: &str = "12h";

/// How long the authorization service may take.
pub const FORWARD_AUTH_TIMEOUT: &str = "5s";

/// How long a directory entry outlives the replica that wrote it.
pub const CLUSTER_LEASE: &str = "30s";

/// Requests waiting for pickup per name: a tenth of all places, so that a burst for one
/// name (200 tunnels opened at once, a client fanning out) passes while ten flooding names
/// still cannot take every place.
pub const MAX_PARKED_PER_NAME: usize = 1_000;

/// Requests waiting for pickup in total.
pub const MAX_PARKED: usize = 10_000;

/// Largest request head in bytes.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Most header fields per request.
pub const MAX_HEADERS: usize = 100;

/// Longest request target in bytes.
pub const MAX_URI_BYTES: usize = 8 * 1024;

/// Relayed bytes held in memory across all requests.
pub const MAX_BUFFERED_BYTES: usize = 256 * 1024 * 1024;

/// Open connections in total.
pub const MAX_CONNECTIONS: usize = 50_000;

/// Open connections from one IP address.
pub const MAX_CONNECTIONS_PER_IP: usize = 256;

/// How long a single-threaded runtime spins after its work before it parks (`--spin`):
/// long enough to cover the gap between a request's hops under load, short enough that a
/// lone request costs little CPU (docs/PERFORMANCE.md, "Spinning before parking").
pub const SPIN: &str = relay_config_file::spin::DEFAULT;

/// Shard threads (`--shards`): one per core, as the worker threads.
pub fn shards() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Users' tunnels open from one client address: a few users' notebooks, terminals and
/// `relay-client connect` sessions (200 tunnels at once through one is a test), not one
/// address holding the relay's sockets for hours.
pub const MAX_TUNNELS_PER_IP: usize = 1024;
