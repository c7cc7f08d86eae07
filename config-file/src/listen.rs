//! The listening sockets of both binaries.
//!
//! tokio's `TcpListener::bind` asks the kernel for a queue of 128 connections not yet
//! accepted (the standard library's value). A burst of connections arriving faster than
//! the accept loop takes them overflows it, and the kernel drops their SYNs: each such
//! client retransmits after its initial timeout, one second (RFC 6298 §2.1). 200 tunnels
//! opened at once through one `relay-client connect` lost about 30 SYNs that way (the
//! kernel's `TcpExtListenOverflows`), and 15–35 % of the tunnels took a second longer.
//! Asked for more, the kernel caps the queue at `net.core.somaxconn` (4096 by default
//! since Linux 5.4).

use std::io;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};

/// Connections waiting to be accepted, per listener: what nginx and Go ask for on Linux
/// (511 and `somaxconn`) are of this order.
pub const BACKLOG: u32 = 1024;

/// Binds a listener on `addr` (`SO_REUSEADDR`, as tokio's `bind`) with a queue of
/// [`BACKLOG`] connections not yet accepted.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 300 clients connect at once and none is accepted yet: with tokio's queue of 128 the
    /// kernel would drop the SYNs past it, and those connects would never complete while
    /// nobody accepts; with [`BACKLOG`] they all complete in the kernel. (The timeout only
    /// turns a hang into a failure.)
    #[tokio::test]
    async fn connections_past_128_wait_in_the_queue_instead_of_being_dropped() {
        let l = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..300 {
            set.spawn(tokio::net::TcpStream::connect(addr));
        }
        let connected = tokio::time::timeout(std::time::Duration::from_secs(60), async {
            let mut n = 0;
            while let Some(c) = set.join_next().await {
                c.unwrap().unwrap();
                n += 1;
            }
            n
        })
        .await
        .expect("every connect completes without an accept");
        assert_eq!(connected, 300);
        drop(l);
    }
}
