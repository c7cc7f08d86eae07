//! TCP keep-alive on the connections the agent opens (`--tcp-keepalive`): to its backend, to
//! its service ports and to the relay-server; and on `relay-client connect`'s tunnels.
//!
//! Why: a peer whose host or network goes away without closing (power lost, a VM killed, a
//! NAT or firewall that forgot the flow) sends no FIN or RST. A connection to it looks open
//! for as long as nothing is sent on it, and once something is, the kernel retransmits for
//! about 15 minutes (`tcp_retries2`, with RFC 6298's backoff) before it gives up. An event
//! stream or long poll from such a backend waits for ever, a pooled HTTP/1.1 connection
//! hangs the request that takes it, and the one HTTP/2 connection of `--backend-http2`
//! hangs every request to the backend.
//!
//! With keep-alive (RFC 1122 §4.2.3.6, RFC 9293 §3.8.4) the kernel probes a connection that
//! was silent for the interval, three times a third of it apart, and fails it when none is
//! answered: a vanished peer is noticed within twice the interval, the pool drops the
//! connection, and the next request opens a new one. The HTTP/2 backend connection also
//! gets `TCP_USER_TIMEOUT` (RFC 5482) of twice the interval: data it sent that stays
//! unacknowledged that long ends it too (keep-alive probes only a connection with nothing in
//! flight, and requests keep that one busy).
//!
//! Keep-alive probes rather than HTTP/2 PING frames: the peer's kernel answers them, so they
//! cost the backend nothing and cannot trip a gRPC server's ping policing (by default it
//! answers pings that come more often than every five minutes while it sends no data with
//! GOAWAY `too_many_pings`), and they cover HTTP/1.1 and HTTPS connections as well.

use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// Unanswered probes that fail a connection, a third of the interval apart: the connection
/// fails twice the interval after it went silent.
pub const PROBES: u32 = 3;

/// The time between probes for an interval of `idle` (at least a second).
pub fn probe_every(idle: Duration) -> Duration {
    (idle / PROBES).max(Duration::from_secs(1))
}

/// Sets keep-alive with interval `idle` on `tcp` (none when `idle` is zero); `shared`
/// connections (the HTTP/2 backend's) also get `TCP_USER_TIMEOUT` of twice `idle`.
pub fn apply(tcp: &TcpStream, idle: Duration, shared: bool) -> std::io::Result<()> {
    if idle.is_zero() {
        return Ok(());
    }
    let sock = SockRef::from(tcp);
    sock.set_tcp_keepalive(
        &TcpKeepalive::new()
            .with_time(idle)
            .with_interval(probe_every(idle))
            .with_retries(PROBES),
    )?;
    // TCP_USER_TIMEOUT is Linux's (and Android's); elsewhere keep-alive alone.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if shared {
        sock.set_tcp_user_timeout(Some(idle * 2))?;
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = shared;
    Ok(())
}

// The user timeout is read back through a Linux-only call.
#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::time::Duration;

    use socket2::SockRef;
    use tokio::net::{TcpListener, TcpStream};

    async fn connected() -> (TcpStream, TcpListener) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        (tcp, l)
    }

    /// The interval, the probes and (for a shared connection) the user timeout are what the
    /// kernel holds for the socket afterwards.
    #[tokio::test]
    async fn keepalive_and_the_user_timeout_reach_the_socket() {
        let (tcp, _l) = connected().await;
        super::apply(&tcp, Duration::from_secs(30), true).unwrap();
        let s = SockRef::from(&tcp);
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_keepalive_time().unwrap(), Duration::from_secs(30));
        assert_eq!(s.tcp_keepalive_interval().unwrap(), Duration::from_secs(10));
        assert_eq!(s.tcp_keepalive_retries().unwrap(), 3);
        assert_eq!(s.tcp_user_timeout().unwrap(), Some(Duration::from_secs(60)));

        let (tcp, _l) = connected().await;
        super::apply(&tcp, Duration::from_secs(3), false).unwrap();
        let s = SockRef::from(&tcp);
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_keepalive_interval().unwrap(), Duration::from_secs(1));
        assert_eq!(s.tcp_user_timeout().unwrap(), None);
    }

    /// `--tcp-keepalive 0s` leaves the socket as the kernel made it.
    #[tokio::test]
    async fn an_interval_of_zero_sets_nothing() {
        let (tcp, _l) = connected().await;
        super::apply(&tcp, Duration::ZERO, true).unwrap();
        let s = SockRef::from(&tcp);
        assert!(!s.keepalive().unwrap());
        assert_eq!(s.tcp_user_timeout().unwrap(), None);
    }
}
