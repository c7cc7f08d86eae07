//! The fault proxy: a TCP proxy placed on a link (agent ↔ server, user ↔ server) that
//! passes bytes through until told to break the connections it carries: close them (cut),
//! reset them (RST), black-hole them (stall: nothing passes either way, nothing closes),
//! or delay every chunk.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A fault applied to the connections a proxy carries at that moment.
#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// Close both sides (FIN).
    Cut,
    /// Reset both sides (RST).
    Reset,
    /// Pass nothing either way for this long, closing nothing.
    Stall(Duration),
    /// Hold every chunk this long before passing it on, for the given time.
    Delay(Duration, Duration),
}

struct Conn {
    end: CancellationToken,
    reset: Arc<std::sync::atomic::AtomicBool>,
    stalled: watch::Sender<bool>,
    delay: watch::Sender<Duration>,
}

/// A running proxy to one target.
pub struct FaultProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    conns: Arc<Mutex<HashMap<u64, Conn>>>,
}

impl FaultProxy {
    /// A proxy to `target` on a fresh loopback port.
    pub async fn start(target: SocketAddr) -> FaultProxy {
        FaultProxy::start_to(vec![target]).await
    }

    /// A proxy on a fresh loopback port spreading connections over `targets` round-robin
    /// (one that does not accept is skipped, as a balancer's health check would).
    pub async fn start_to(targets: Vec<SocketAddr>) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let conns: Arc<Mutex<HashMap<u64, Conn>>> = Arc::default();
        let next = Arc::new(AtomicU64::new(0));
        let c = conns.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let targets = targets.clone();
                let id = next.fetch_add(1, Ordering::Relaxed);
                let conns = c.clone();
                tokio::spawn(async move {
                    for i in 0..targets.len() {
                        let to = targets[(id as usize + i) % targets.len()];
                        if let Ok(server) = TcpStream::connect(to).await {
                            carry(id, client, server, conns).await;
                            return;
                        }
                    }
                    // Dropping `client` closes it: every target is down.
                });
            }
        });
        FaultProxy { addr, conns }
    }

    /// Applies `fault` to every connection carried now.
    pub fn inject(&self, fault: Fault) {
        let conns = self.conns.lock().expect("poisoned");
        for c in conns.values() {
            match fault {
                Fault::Cut => c.end.cancel(),
                Fault::Reset => {
                    c.reset.store(true, Ordering::SeqCst);
                    c.end.cancel();
                }
                Fault::Stall(d) => {
                    let _ = c.stalled.send(true);
                    let s = c.stalled.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(d).await;
                        let _ = s.send(false);
                    });
                }
                Fault::Delay(d, for_) => {
                    let _ = c.delay.send(d);
                    let s = c.delay.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(for_).await;
                        let _ = s.send(Duration::ZERO);
                    });
                }
            }
        }
    }
}

async fn carry(
    id: u64,
    client: TcpStream,
    server: TcpStream,
    conns: Arc<Mutex<HashMap<u64, Conn>>>,
) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let end = CancellationToken::new();
    let reset = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (stalled, stalled_rx) = watch::channel(false);
    let (delay, delay_rx) = watch::channel(Duration::ZERO);
    conns.lock().expect("poisoned").insert(
        id,
        Conn {
            end: end.clone(),
            reset: reset.clone(),
            stalled,
            delay,
        },
    );
    // Raw descriptors, valid while the halves live: a reset sets SO_LINGER 0 on them just
    // before they close, so the close sends RST.
    let fds = [client.as_raw_fd(), server.as_raw_fd()];
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pipe(cr, sw, end.clone(), stalled_rx.clone(), delay_rx.clone());
    let down = pipe(sr, cw, end.clone(), stalled_rx, delay_rx);
    let halves = tokio::join!(up, down);
    if reset.load(Ordering::SeqCst) {
        for fd in fds {
            linger_zero(fd);
        }
    }
    drop(halves);
    conns.lock().expect("poisoned").remove(&id);
}

fn linger_zero(fd: std::os::fd::RawFd) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `fd` is an open socket owned by a half still alive in the caller; the
    // option value is a valid `linger` of the size passed.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

type Halves = (OwnedReadHalf, OwnedWriteHalf);

/// Copies one direction until it ends, is cut or fails; gives its halves back.
async fn pipe(
    mut rd: OwnedReadHalf,
    mut wr: OwnedWriteHalf,
    end: CancellationToken,
    mut stalled: watch::Receiver<bool>,
    delay: watch::Receiver<Duration>,
) -> Halves {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            r = async {
                let _ = stalled.wait_for(|s| !*s).await;
                rd.read(&mut buf).await
            } => match r {
                Ok(0) | Err(_) => {
                    let _ = wr.shutdown().await;
                    return (rd, wr);
                }
                Ok(n) => n,
            },
            _ = end.cancelled() => return (rd, wr),
        };
        let d = *delay.borrow();
        let ok = tokio::select! {
            r = async {
                if !d.is_zero() {
                    tokio::time::sleep(d).await;
                }
                let _ = stalled.wait_for(|s| !*s).await;
                wr.write_all(&buf[..n]).await
            } => r.is_ok(),
            _ = end.cancelled() => return (rd, wr),
        };
        if !ok {
            return (rd, wr);
        }
    }
}
