//! Connection-level limits: how many connections, and how long a silent one may stay
//! before it says which protocol it speaks. How long a connection may go without a request
//! (an HTTP/1.1 head must arrive within the header read timeout; an HTTP/2 connection may
//! idle for the idle timeout) is `base::activity`'s.
//!
//! Request-level limits (head size, header count, target length, body size and inactivity,
//! parked requests) live where the request is read; see `docs/ARCHITECTURE.md`.

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::base::activity::Activity;
use crate::base::first_headers::PREFACE;
use tokio::time::Sleep;

/// Which listener a connection came in on. Each listener has its own allowance of
/// connections, so a flood on one (anonymous users on the public listener, or unauthenticated
/// connections on the agent listener) cannot refuse the other's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pool {
    /// The public (or shared) listener.
    Main = 0,
    /// `--agent-listen`.
    Agent = 1,
    /// `--admin-listen`.
    Admin = 2,
    /// `--cluster-listen`.
    Cluster = 3,
}

/// Open connections, per listener and per source address.
pub struct ConnLimits {
    totals: [AtomicUsize; 4],
    per_ip: DashMap<IpAddr, Places>,
    max_total: usize,
    max_per_ip: usize,
}

/// One address's connections: those counted against its limit, those admitted past it on
/// probation (see [`ConnLimits::admit`]), and those of authenticated agents.
#[derive(Default)]
struct Places {
    counted: usize,
    probation: usize,
    agents: usize,
}

impl Places {
    fn of(&mut self, standing: u8) -> Option<&mut usize> {
        match standing {
            COUNTED => Some(&mut self.counted),
            PROBATION => Some(&mut self.probation),
            AGENT => Some(&mut self.agents),
            _ => None,
        }
    }
}

/// How an admitted connection stands towards its address's limit: not tracked (trusted
/// proxies, replicas), counted, on probation past the limit, or an authenticated agent's.
const FREE: u8 = 0;
const COUNTED: u8 = 1;
const PROBATION: u8 = 2;
const AGENT: u8 = 3;

/// One admitted connection; dropping it frees its place.
pub struct ConnPermit {
    limits: Arc<ConnLimits>,
    pool: Pool,
    ip: IpAddr,
    /// `FREE`, `COUNTED`, `PROBATION` or `AGENT`.
    standing: AtomicU8,
}

/// Why a connection was not admitted.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConnRefused {
    /// The listener's limit.
    #[error("{0} connections are open on this listener, the limit")]
    Total(usize),
    /// The per-address limit.
    #[error("{0} connections are open from this address, the limit")]
    PerIp(usize),
}

impl ConnLimits {
    /// Limits of `max_total` connections per listener and `max_per_ip` from one address
    /// (all listeners together).
    pub fn new(max_total: usize, max_per_ip: usize) -> Self {
        ConnLimits {
            totals: Default::default(),
            per_ip: DashMap::new(),
            max_total,
            max_per_ip,
        }
    }

    /// Places on probation per address: twice the limit. 200 tunnels opened at once
    /// through one `relay-client connect` beside an agent on long polls hold 200 counted
    /// places and make the agent open about 400 connections (a response and an upload
    /// exchange per tunnel), all of them before they authenticate: with as many as the
    /// limit (256 + 256 places), 17 were refused in one run and their tunnels closed
    /// without a byte; a quarter left tunnels hanging. An attacker sharing an agent's
    /// address holds at most three times the limit, each extra connection for one header
    /// read.
    fn probation_places(&self) -> usize {
        2 * self.max_per_ip
    }

    /// Open connections, all listeners together.
    pub fn open(&self) -> usize {
        self.totals.iter().map(|t| t.load(Ordering::Acquire)).sum()
    }

    /// Addresses with connections counted against them (or on probation); the
    /// per-address table holds only addresses with open connections.
    pub fn addresses(&self) -> usize {
        self.per_ip
            .iter()
            .filter(|p| p.counted + p.probation > 0)
            .count()
    }

    /// Connections from `ip` that count against its limit (an agent's do not).
    pub fn counted_at(&self, ip: IpAddr) -> usize {
        self.per_ip.get(&ip.to_canonical()).map_or(0, |p| p.counted)
    }

    /// Connections from `ip` admitted past its limit that have not (yet) authenticated as
    /// an agent's. An agent's HTTP client may open a connection it then leaves unused in
    /// its pool (a request it was opened for took another that came free), which stays on
    /// probation, unauthenticated, until it idles out.
    pub fn on_probation_at(&self, ip: IpAddr) -> usize {
        self.per_ip
            .get(&ip.to_canonical())
            .map_or(0, |p| p.probation)
    }

    /// Admits a connection from `ip` on the listener of `pool`, or says which limit it hit.
    /// `per_ip` false admits it without counting it against its address (replicas, and
    /// trusted proxies, behind which every user has the proxy's address).
    ///
    /// An address at its limit from which an agent is connected gets as many places again
    /// on probation: such a connection may send one request, which is served only if it
    /// authenticates as an agent (see [`ConnPermit::on_probation`]). Agents often share
    /// their users' address (one NAT, or `relay-client connect` beside the agent) and open
    /// a connection per exchange; refused before their first request could say who they
    /// are, the requests they carry would wait for their timeout. Addresses without an
    /// agent keep the plain limit (a slowloris cannot double its hold).
    pub fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        pool: Pool,
        per_ip: bool,
    ) -> Result<ConnPermit, ConnRefused> {
        // IPv4-mapped IPv6 peers are the same hosts as their IPv4 form.
        let ip = ip.to_canonical();
        let total = &self.totals[pool as usize];
        if total.fetch_add(1, Ordering::AcqRel) >= self.max_total {
            total.fetch_sub(1, Ordering::AcqRel);
            return Err(ConnRefused::Total(self.max_total));
        }
        let standing = if per_ip {
            let mut places = self.per_ip.entry(ip).or_default();
            if places.counted < self.max_per_ip {
                places.counted += 1;
                COUNTED
            } else if places.agents > 0 && places.probation < self.probation_places() {
                places.probation += 1;
                PROBATION
            } else {
                drop(places);
                total.fetch_sub(1, Ordering::AcqRel);
                return Err(ConnRefused::PerIp(self.max_per_ip));
            }
        } else {
            FREE
        };
        Ok(ConnPermit {
            limits: self.clone(),
            pool,
            ip,
            standing: AtomicU8::new(standing),
        })
    }
}

impl ConnPermit {
    /// Stops counting the connection against its address: an authenticated agent's
    /// connections (one per exchange in flight) are bounded by its tokens' owner, not by
    /// a limit meant for anonymous users sharing an address.
    pub fn exempt_from_per_ip(&self) {
        let was = self.standing.load(Ordering::Acquire);
        if (was == COUNTED || was == PROBATION)
            && self
                .standing
                .compare_exchange(was, AGENT, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            if let Some(mut places) = self.limits.per_ip.get_mut(&self.ip) {
                *places.of(was).expect("bug: tracked") -= 1;
                places.agents += 1;
            }
        }
    }

    /// Whether the connection still counts against its address's limit (or is on
    /// probation past it): a request on it that authenticates as an agent exempts it.
    pub fn counts_per_ip(&self) -> bool {
        matches!(self.standing.load(Ordering::Acquire), COUNTED | PROBATION)
    }

    /// Whether the connection came past its address's limit and has not authenticated as
    /// an agent: its requests are refused (503) and it is closed.
    pub fn on_probation(&self) -> bool {
        self.standing.load(Ordering::Acquire) == PROBATION
    }

    /// A connection on probation whose address has a counted place free again (its agent's
    /// connections that were counted when they came have authenticated and left the count
    /// since, or others closed) takes that place and is served as any other; false when
    /// there is none. Without this, a user who came while an agent's fresh connections
    /// (one per tunnel) still held counted places was refused though the address was back
    /// under its limit when the request arrived: 200 tunnels at once through one
    /// `relay-client connect` lost some that way (once in several dozen runs).
    pub fn take_freed_place(&self) -> bool {
        if self.standing.load(Ordering::Acquire) != PROBATION {
            return false;
        }
        let Some(mut places) = self.limits.per_ip.get_mut(&self.ip) else {
            return false;
        };
        if places.counted >= self.limits.max_per_ip {
            return false;
        }
        // Under the address's entry lock: no other connection moves between the counts.
        if self
            .standing
            .compare_exchange(PROBATION, COUNTED, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        places.probation -= 1;
        places.counted += 1;
        true
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let standing = *self.standing.get_mut();
        if standing != FREE {
            self.limits.per_ip.remove_if_mut(&self.ip, |_, places| {
                *places.of(standing).expect("bug: tracked") -= 1;
                places.counted + places.probation + places.agents == 0
            });
        }
        self.limits.totals[self.pool as usize].fetch_sub(1, Ordering::AcqRel);
    }
}

/// A stream that fails its reads with `TimedOut` if, by the deadline, the peer has not sent
/// enough bytes to tell HTTP/1.1 from HTTP/2. hyper-util's protocol detection has no timer
/// of its own, and hyper's header read timeout starts only after it, so without this a peer
/// that connects and sends nothing (or half a preface) would hold its connection forever.
pub struct FirstBytes<S> {
    inner: S,
    /// Bytes read from `inner` before (a connection placed on a shard), read first.
    before: Bytes,
    deadline: Option<Pin<Box<Sleep>>>,
    matched: usize,
    /// Told when the whole preface arrived (the connection speaks HTTP/2).
    activity: Arc<Activity>,
}

impl<S> FirstBytes<S> {
    /// Wraps `inner`; the protocol must be recognisable within `timeout`. An HTTP/2
    /// preface is reported to `activity`, whose idle bound depends on the protocol.
    pub fn new(inner: S, timeout: Duration, activity: &Arc<Activity>) -> Self {
        FirstBytes {
            inner,
            before: Bytes::new(),
            deadline: Some(Box::pin(tokio::time::sleep(timeout))),
            matched: 0,
            activity: activity.clone(),
        }
    }

    /// The same, with `before` (bytes already read from `inner`) read first.
    pub fn after(mut self, before: Bytes) -> Self {
        self.before = before;
        self
    }

    /// Puts `bytes`, read from it before, back in front of what is still to be read.
    pub fn put_back(&mut self, bytes: Bytes) {
        if self.before.is_empty() {
            self.before = bytes;
        } else if !bytes.is_empty() {
            let mut joined = bytes::BytesMut::with_capacity(bytes.len() + self.before.len());
            joined.extend_from_slice(&bytes);
            joined.extend_from_slice(&self.before);
            self.before = joined.freeze();
        }
    }

    /// Whether detection is over: a byte left the preface, or the whole preface arrived.
    fn observe(&mut self, bytes: &[u8]) {
        // A read may hold the preface and what follows it (the relay's HTTP/1.1 front reads
        // 4 KiB at a time; hyper's detection read exactly the preface's 24 bytes).
        for &b in bytes {
            if self.matched == PREFACE.len() {
                break;
            }
            if b != PREFACE[self.matched] {
                self.deadline = None;
                return;
            }
            self.matched += 1;
        }
        if self.matched == PREFACE.len() {
            self.deadline = None;
            self.activity.speaks_http2();
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FirstBytes<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.before.is_empty() {
            let n = this.before.len().min(buf.remaining());
            let bytes = this.before.split_to(n);
            buf.put_slice(&bytes);
            if this.before.is_empty() {
                // An empty view still holds the buffer it came from, for as long as the
                // connection lives (an agent's session: hours).
                this.before = Bytes::new();
            }
            if this.deadline.is_some() {
                this.observe(&bytes);
            }
            return Poll::Ready(Ok(()));
        }
        if this.deadline.is_none() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.observe(&buf.filled()[before..]);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let expired = this
                    .deadline
                    .as_mut()
                    .is_some_and(|d| d.as_mut().poll(cx).is_ready());
                if expired {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no HTTP request line or preface in time",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FirstBytes<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, b)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_count_per_address_and_free_their_place() {
        let l = Arc::new(ConnLimits::new(8, 2));
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let m = Pool::Main;
        let p1 = l.admit(a, m, true).unwrap();
        let _p2 = l.admit(mapped, m, true).unwrap();
        assert!(!p1.on_probation() && p1.counts_per_ip());
        // At the limit, without an agent at this address: refused.
        assert_eq!(l.admit(a, m, true).err(), Some(ConnRefused::PerIp(2)));
        // A connection that authenticates as an agent leaves the count...
        p1.exempt_from_per_ip();
        assert!(!p1.counts_per_ip());
        let _p3 = l.admit(a, m, true).unwrap();
        // ...and with an agent there, twice as many again come in on probation, no more.
        let on_probation = l.admit(a, m, true).unwrap();
        assert!(on_probation.on_probation() && on_probation.counts_per_ip());
        let probation1 = l.admit(a, m, true).unwrap();
        let _probation = [l.admit(a, m, true).unwrap(), l.admit(a, m, true).unwrap()];
        assert_eq!(l.admit(a, m, true).err(), Some(ConnRefused::PerIp(2)));
        // One on probation that authenticates frees its probation place.
        on_probation.exempt_from_per_ip();
        assert!(!on_probation.on_probation() && !on_probation.counts_per_ip());
        let probation2 = l.admit(a, m, true).unwrap();
        assert!(probation2.on_probation());
        assert_eq!(l.open(), 8);
        assert_eq!(l.admit(b, m, true).err(), Some(ConnRefused::Total(8)));
        // With no counted place free, a connection on probation stays there.
        assert!(!probation2.take_freed_place() && probation2.on_probation());
        drop(probation1);
        let _b1 = l.admit(b, m, true).unwrap();
        // Another listener has its own allowance.
        let on_agent = l.admit(b, Pool::Agent, true).unwrap();
        assert_eq!(l.addresses(), 2);
        drop((on_agent, _b1));
        assert_eq!(l.addresses(), 1);
        // The agents gone, the address is back to its plain limit.
        drop((p1, on_probation));
        assert_eq!(l.admit(a, m, true).err(), Some(ConnRefused::PerIp(2)));
        drop((_p2, _p3, probation2, _probation));
        assert_eq!(l.addresses(), 0);
        assert!(l.per_ip.is_empty(), "no entry outlives its connections");
        let _trusted = l.admit(a, m, false).unwrap();
        assert!(l.per_ip.is_empty());
    }

    /// A connection that came on probation takes a counted place that freed since (the
    /// agent's counted connections authenticated meanwhile), and then counts as any other:
    /// the address never holds more counted connections than its limit.
    #[test]
    fn a_connection_on_probation_takes_a_place_freed_since() {
        let l = Arc::new(ConnLimits::new(16, 2));
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let m = Pool::Main;
        let agent = l.admit(a, m, true).unwrap();
        agent.exempt_from_per_ip();
        let (fresh, user) = (l.admit(a, m, true).unwrap(), l.admit(a, m, true).unwrap());
        let late = l.admit(a, m, true).unwrap();
        assert!(late.on_probation(), "past the limit, beside an agent");
        assert!(
            !user.take_freed_place(),
            "only a connection on probation moves"
        );
        // The agent's fresh connection authenticates: a counted place is free.
        fresh.exempt_from_per_ip();
        assert!(late.take_freed_place());
        assert!(!late.on_probation() && late.counts_per_ip());
        assert_eq!(
            l.per_ip.get(&a).map(|p| (p.counted, p.probation)),
            Some((2, 0))
        );
        // The limit holds: the next one comes on probation and finds no place.
        let next = l.admit(a, m, true).unwrap();
        assert!(next.on_probation() && !next.take_freed_place());
        drop((late, next, user, fresh, agent));
        assert!(l.per_ip.is_empty(), "no entry outlives its connections");
    }

    #[test]
    fn detection_ends_on_a_non_preface_byte_or_the_whole_preface() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let activity = Arc::new(Activity::default());
            let mut f = FirstBytes::new((), Duration::from_secs(1), &activity);
            f.observe(b"PRI * HT");
            assert!(f.deadline.is_some());
            assert!(!activity.http2());
            f.observe(b"TP/2.0\r\n\r\nSM\r\n\r\n");
            assert!(f.deadline.is_none());
            assert!(activity.http2());
            // The preface and the frames after it in one read.
            let activity = Arc::new(Activity::default());
            let mut f = FirstBytes::new((), Duration::from_secs(1), &activity);
            f.observe(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0");
            assert!(f.deadline.is_none());
            assert!(activity.http2());
            let activity = Arc::new(Activity::default());
            let mut f = FirstBytes::new((), Duration::from_secs(1), &activity);
            f.observe(b"G");
            assert!(f.deadline.is_none());
            assert!(!activity.http2());
        });
    }
}
