//! One listener's accept loop and each connection it accepts: admission against the
//! connection limits, protocol detection, TLS, the request service, and a supervisor that
//! closes the connection gracefully when the server stops or it idles.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_util::task::TaskTracker;

use crate::base::activity::{Activity, IdleBounds, Tracked};
use crate::base::auth::{cert_grant, Grant};
use crate::base::body::{text_response, RelayBody};
use crate::base::limits::{ConnLimits, ConnRefused, FirstBytes, Pool};
use crate::base::movable::Movable;
use crate::base::streams::{ConnExec, Streams};
use crate::base::tls::Tls;
use crate::front;
use crate::listener::Face;
use crate::shards::{self, HandedTls, Handoff, Peeked, Shards};
use crate::State;

/// Longest TLS handshake before the connection is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What every connection of the accept loops shares.
pub struct Conns<'a> {
    /// The server.
    pub state: &'a Arc<State>,
    /// HTTP settings of this listener, for a connection whose HTTP/2 streams go to the
    /// given executor.
    pub builder: &'a (dyn Fn(ConnExec) -> auto::Builder<ConnExec> + Sync),
    /// Connection limits.
    pub limits: &'a Arc<ConnLimits>,
    /// Owner of every connection task.
    pub tracker: &'a TaskTracker,
    /// TLS termination, when configured.
    pub tls: Option<&'a Arc<Tls>>,
    /// The shards connections may be placed on (`--shards`), on the main runtime.
    pub shards: Option<&'a Arc<Shards>>,
}

impl Conns<'_> {
    /// Accepts on `listener`, if there is one.
    pub async fn accept_optional(&self, listener: Option<TcpListener>, face: Face) {
        if let Some(l) = listener {
            self.accept_loop(l, face).await;
        }
    }

    /// Accepts on `listener` until the stop, serving each connection on the tracker.
    pub async fn accept_loop(&self, listener: TcpListener, face: Face) {
        loop {
            let (stream, peer) = tokio::select! {
                _ = self.state.stop.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            if let Some(permit) = self.admit(peer, face) {
                self.spawn(Conn::Plain(stream), peer, face, permit, None);
            }
        }
    }

    /// A permit of the connection limits, or `None` (the connection is closed at once).
    fn admit(&self, peer: SocketAddr, face: Face) -> Option<Arc<crate::base::limits::ConnPermit>> {
        // Every connection counts against its address until a request on it authenticates
        // as an agent (see `service`), on the agent listener too: otherwise one address
        // could hold the agent listener's every place without a token. Replicas and trusted
        // proxies are few addresses carrying many clients; they count only against their
        // listener's allowance.
        let pool = match face {
            Face::Shared | Face::Public => Pool::Main,
            Face::Agent => Pool::Agent,
            Face::Admin => Pool::Admin,
            Face::Cluster => Pool::Cluster,
        };
        let per_ip = face != Face::Cluster && !self.state.auth().trusts(peer.ip().to_canonical());
        match self.limits.admit(peer.ip(), pool, per_ip) {
            Ok(p) => Some(Arc::new(p)),
            Err(e) => {
                tracing::debug!(%peer, reason = %e, "connection refused");
                self.state.metrics.rejected(match e {
                    ConnRefused::Total(_) => "connections",
                    ConnRefused::PerIp(_) => "connections_per_ip",
                });
                None
            }
        }
    }

    /// Serves a connection the main runtime placed on this shard, with the bytes it read
    /// (and a TLS connection's session).
    pub fn serve_handed(&self, h: Handoff) {
        match Conn::back(h.stream, h.tls) {
            Ok(conn) => self.spawn(conn, h.peer, h.face, h.permit, Some(h.head)),
            Err(e) => {
                tracing::debug!(peer = %h.peer, error = %e, "a handed-over connection failed")
            }
        }
    }

    /// Serves one connection on the tracker: the TLS handshake when configured (and not
    /// done yet), protocol detection, the request service, the supervisor. `head` is what
    /// was read of it already (a connection handed to a shard); without it, a connection
    /// may be placed on a shard by its first head (`shards.rs`).
    fn spawn(
        &self,
        conn: Conn,
        peer: SocketAddr,
        face: Face,
        permit: Arc<crate::base::limits::ConnPermit>,
        head: Option<Bytes>,
    ) {
        let (https, cert) = match &conn {
            Conn::Plain(s) => {
                let _ = s.set_nodelay(true);
                let https = self.tls.is_some() && !matches!(face, Face::Admin | Face::Cluster);
                (https, None)
            }
            Conn::Tls(_, grant) => (true, grant.clone()),
        };
        let activity = Arc::new(Activity::default());
        // What the client certificate (TLS) grants, set once the handshake is done.
        let cert: Arc<OnceLock<Grant>> = Arc::new(cert.map(OnceLock::from).unwrap_or_default());
        let svc = service(
            self.state.clone(),
            peer,
            https,
            face,
            &activity,
            &permit,
            &cert,
        );
        let mut streams = Streams::default();
        let builder = (self.builder)(streams.exec());
        // The cluster listener's `tls` is its own (`--cluster-tls-cert`).
        let acceptor = self
            .tls
            .filter(|_| face != Face::Admin && matches!(conn, Conn::Plain(_)))
            .map(|t| t.acceptor());
        let stop = self.state.stop.clone();
        let server = self.state.clone();
        let cfg = &self.state.cfg;
        let (detect, idle) = (cfg.header_read_timeout, cfg.idle_timeout);
        // The slowloris guard of HTTP/1.1: a head must arrive within the header read
        // timeout (or the idle timeout, if shorter) of the connection's start or of the end
        // of the last response. The supervisor's one timer enforces it (see `Activity`).
        let idle = IdleBounds {
            http1: detect.min(idle),
            http2: idle,
        };
        let placing = match (head.is_none(), self.shards) {
            (true, Some(s)) if face != Face::Admin && face != Face::Cluster => {
                Some((s.clone(), self.state.clone()))
            }
            _ => None,
        };
        self.tracker.spawn(async move {
            let mut conn = match (acceptor, conn) {
                (Some(acceptor), Conn::Plain(stream)) => {
                    // Boxed: a handshake's state is a few KiB.
                    let tls = Box::pin(handshake(acceptor, stream, peer, &cert)).await;
                    let Some(tls) = tls else { return };
                    Conn::Tls(tls, None)
                }
                (_, conn) => conn,
            };
            let mut permit = permit;
            let mut head = head.unwrap_or_default();
            if let Some((shards, state)) = placing {
                let max = state.cfg.max_head_bytes;
                let peeked = tokio::select! {
                    p = conn.peek(max, idle.http1) => p,
                    // Between requests, as hyper would be: the stop closes it.
                    _ = stop.cancelled() => Peeked::Closed,
                };
                let Peeked::Bytes(read) = peeked else {
                    return;
                };
                head = read.freeze();
                if let Some(i) = shards.shard_for(&state, face, &head) {
                    let Some(h) = conn.hand_off(head, peer, face, permit, cert.get()) else {
                        return;
                    };
                    match shards.hand_off(i, h) {
                        Ok(()) => {
                            state.metrics.shard_handoff();
                            return;
                        }
                        // The shard has stopped (the server is stopping): served here.
                        Err(h) => {
                            let Ok(back) = Conn::back(h.stream, h.tls) else {
                                return;
                            };
                            (conn, head, permit) = (back, h.head, h.permit);
                        }
                    }
                }
            }
            // Users' plain GETs and agents' long polls are served by the relay's own front
            // until a request is hyper's (`crate::front`); a connection admitted on
            // probation goes to hyper, which answers its refusal.
            let front = (matches!(face, Face::Public | Face::Shared | Face::Agent)
                && !permit.on_probation())
            .then_some(front::Front {
                state: &server,
                peer,
                https,
                face,
                activity: &activity,
                permit: &permit,
                cert: &cert,
            });
            let http = crate::served::Http {
                builder: &builder,
                streams: &mut streams,
                activity: &activity,
                idle,
                stop: &stop,
            };
            let result = match conn {
                Conn::Plain(stream) => {
                    let first = FirstBytes::new(stream, detect, &activity).after(head);
                    http.serve(first, front, svc).await
                }
                // Boxed: a TLS connection's state is much larger than a plain one's, and
                // unboxed every plain connection's task would be as large.
                Conn::Tls(tls, _) => {
                    let first = FirstBytes::new(tls, detect, &activity).after(head);
                    Box::pin(http.serve(first, front, svc)).await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

/// An accepted connection: a socket, or a TLS session around one (after its handshake,
/// with what its client certificate grants when it was handed over).
enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<Movable>>, Option<Grant>),
}

impl Conn {
    /// Its first request's head (`shards::peek`), read through TLS for a TLS connection.
    async fn peek(&mut self, max: usize, within: Duration) -> Peeked {
        match self {
            Conn::Plain(s) => shards::peek(s, max, within).await,
            Conn::Tls(t, _) => shards::peek(t, max, within).await,
        }
    }

    /// The connection taken off this runtime for a shard, with what was read of it; `None`
    /// when its socket cannot leave (it is then closed).
    fn hand_off(
        self,
        head: Bytes,
        peer: SocketAddr,
        face: Face,
        permit: Arc<crate::base::limits::ConnPermit>,
        cert: Option<&Grant>,
    ) -> Option<Handoff> {
        let (stream, tls) = match self {
            Conn::Plain(s) => (s.into_std().ok()?, None),
            Conn::Tls(mut t, _) => {
                let socket = t.get_mut().0.take_std()?;
                let cert = cert.cloned();
                (socket, Some(Box::new(HandedTls { stream: t, cert })))
            }
        };
        Some(Handoff {
            stream,
            tls,
            head,
            peer,
            face,
            permit,
        })
    }

    /// A handed-over connection registered on this runtime: on the shard it was handed
    /// to, or back where it was accepted when that shard had stopped.
    fn back(stream: std::net::TcpStream, tls: Option<Box<HandedTls>>) -> std::io::Result<Conn> {
        match tls {
            None => TcpStream::from_std(stream).map(Conn::Plain),
            Some(mut t) => {
                t.stream.get_mut().0.put_std(stream)?;
                Ok(Conn::Tls(t.stream, t.cert))
            }
        }
    }
}

/// The TLS handshake, bounded in time; records what the client certificate grants.
async fn handshake(
    acceptor: tokio_rustls::TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
    cert: &OnceLock<Grant>,
) -> Option<Box<TlsStream<Movable>>> {
    let accept = acceptor.accept(Movable::new(stream));
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, accept).await {
        Ok(Ok(s)) => {
            if let Some(g) = cert_grant(s.get_ref().1.peer_certificates()) {
                let _ = cert.set(g);
            }
            Some(Box::new(s))
        }
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            None
        }
    }
}

/// The request service of one connection. A connection whose first agent call
/// authenticates leaves the per-address count (agents behind one NAT address are many).
fn service(
    state: Arc<State>,
    peer: SocketAddr,
    https: bool,
    face: Face,
    activity: &Arc<Activity>,
    permit: &Arc<crate::base::limits::ConnPermit>,
    cert: &Arc<OnceLock<Grant>>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Tracked<RelayBody>>,
    Error = Infallible,
    Future = impl std::future::Future<Output = Result<Response<Tracked<RelayBody>>, Infallible>>
                 + Send
                 + 'static,
> + Clone {
    let (activity, permit, cert) = (activity.clone(), permit.clone(), cert.clone());
    service_fn(move |mut req: Request<Incoming>| {
        crate::base::switch::offer_place(&mut req, &permit);
        let state = state.clone();
        let busy = activity.begin();
        let cert = cert.clone();
        crate::dispatch::exempt_agent(&state, &permit, face, &mut req, cert.get());
        // Past the limit when it came; served if its address has a place free by now.
        let refused = (permit.on_probation() && !permit.take_freed_place()).then(|| {
            state.metrics.rejected("connections_per_ip");
            tracing::debug!(%peer, "request past the per-address connection limit refused");
            past_the_limit(state.cfg.max_connections_per_ip, req.version())
        });
        // Routed at once: the future hyper keeps for the request holds only the answer or
        // the handler's box (see `dispatch::route`).
        let routed = match refused {
            Some(resp) => crate::dispatch::Routed::Now(Some(resp)),
            None => crate::dispatch::route(state, req, peer, https, face, &cert),
        };
        async move {
            let resp = routed.await;
            // The connection counts as busy until the response body is over.
            Ok::<_, Infallible>(resp.map(|b| Tracked::new(b, busy)))
        }
    })
}

/// The answer to a request on a connection admitted past its address's limit that did not
/// authenticate as an agent. RFC 9110 §15.6.4 (503 with Retry-After); RFC 9112 §9.6
/// (`Connection: close`): an HTTP/1.1 connection ends after it, so its place goes back (an
/// HTTP/2 connection cannot carry the field, RFC 9113 §8.2.2: it ends when idle).
fn past_the_limit(limit: usize, version: Version) -> Response<RelayBody> {
    let mut resp = text_response(
        StatusCode::SERVICE_UNAVAILABLE,
        &crate::base::limits::ConnRefused::PerIp(limit).to_string(),
    );
    let h = resp.headers_mut();
    if version < Version::HTTP_2 {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp
}
