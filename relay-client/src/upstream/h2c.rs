//! HTTP/2 with prior knowledge (RFC 9113 §3.3) to a plain-HTTP backend (`--backend-http2`),
//! on one connection driven by the `h2` crate directly.
//!
//! Why not hyper-util's client: through its pool and hyper's dispatch every request took a
//! pool checkout, a channel hop to the connection's task and a task of its own for the
//! response. Here a request is a clone of the connection's handle and one call; the
//! connection's task writes every request the agent's tasks queued before it ran in one
//! write, and its answers come back to the requests' own tasks.

use std::pin::Pin;
use std::sync::Mutex;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response, Uri};
use hyper::body::{Body, Frame, SizeHint};
use tokio::net::TcpStream;

use super::BackendBody;
use crate::keepalive;

/// Stream-level receive window for response bodies (the connection's is the sum of what
/// its streams may hold): 1 MiB, so a download is not held to RFC 9113's 64 KiB default.
const STREAM_WINDOW: u32 = 1024 * 1024;
const CONN_WINDOW: u32 = 16 * 1024 * 1024;
/// How long connecting may take (as hyper-util's connector for the other backends).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A backend reached over HTTP/2 with prior knowledge.
pub struct H2c {
    /// `host:port`.
    addr: String,
    /// TCP keep-alive interval of its connections (`--tcp-keepalive`).
    keepalive: Duration,
    /// The open connection's handle, if any.
    open: Mutex<Option<h2::client::SendRequest<Bytes>>>,
    /// Held while a connection is being opened, so a burst opens one.
    opening: tokio::sync::Mutex<()>,
}

/// Why an HTTP/2 backend request failed.
#[derive(Debug, thiserror::Error)]
pub enum H2cError {
    /// Connecting to the backend failed.
    #[error("connecting to {addr} failed: {source}")]
    Connect {
        /// The backend's `host:port`.
        addr: String,
        /// What failed.
        source: std::io::Error,
    },
    /// The HTTP/2 connection or stream failed.
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
}

impl H2c {
    /// A client for the backend at `addr` (`host:port`), its connection probed by TCP
    /// keep-alive after `keepalive` of silence (`crate::keepalive`).
    pub fn new(addr: String, keepalive: Duration) -> Self {
        H2c {
            addr,
            keepalive,
            open: Mutex::new(None),
            opening: tokio::sync::Mutex::new(()),
        }
    }

    /// A handle on a connection ready for a new stream: the open one, or a new one when
    /// there is none or it ended.
    async fn ready(&self) -> Result<h2::client::SendRequest<Bytes>, H2cError> {
        let cached = self.open.lock().expect("bug: poisoned").clone();
        if let Some(s) = cached {
            // A connection that ended (GOAWAY, error) fails here, before anything was sent
            // on it: a new one is opened below.
            if let Ok(s) = s.ready().await {
                return Ok(s);
            }
        }
        let _opening = self.opening.lock().await;
        // Another request may have opened one while this one waited.
        let cached = self.open.lock().expect("bug: poisoned").clone();
        if let Some(s) = cached {
            if let Ok(s) = s.ready().await {
                return Ok(s);
            }
        }
        let failed = |source| H2cError::Connect {
            addr: self.addr.clone(),
            source,
        };
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.addr))
            .await
            .map_err(|_| failed(std::io::ErrorKind::TimedOut.into()))?
            .map_err(failed)?;
        tcp.set_nodelay(true).map_err(failed)?;
        // Every request to the backend waits on this one connection: a backend gone without
        // a FIN must fail it (and a new one be opened), keep-alive and user timeout both.
        keepalive::apply(&tcp, self.keepalive, true).map_err(failed)?;
        let (send, conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONN_WINDOW)
            .handshake::<_, Bytes>(tcp)
            .await?;
        // The connection's task ends when every handle is dropped or the connection fails.
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "HTTP/2 backend connection ended");
            }
        });
        *self.open.lock().expect("bug: poisoned") = Some(send.clone());
        Ok(send.ready().await?)
    }

    /// Sends `req` (absolute URI; no hop-by-hop fields) and waits for the response head.
    pub async fn send(&self, req: Request<BackendBody>) -> Result<Response<H2Body>, H2cError> {
        let (mut parts, body) = req.into_parts();
        // RFC 9113 §8.3.1: the authority goes in :authority, and a Host field that differs
        // from it must not be sent; the one relayed is the user's (or --rewrite-host's).
        if let Some(host) = parts.headers.remove(header::HOST) {
            if let Ok(host) = host.to_str() {
                let mut uri = std::mem::take(&mut parts.uri).into_parts();
                if let Ok(a) = host.parse() {
                    uri.authority = Some(a);
                }
                parts.uri = Uri::from_parts(uri).unwrap_or_default();
            }
        }
        let end = body.is_end_stream();
        let head = Request::from_parts(parts, ());
        // A request without a body may go once more when the backend did not process it
        // (`unprocessed`); one with a body cannot: its body is gone.
        let again = end.then(|| head.clone());
        let mut body = Some(body);
        match (self.attempt(head, end, &mut body).await, again) {
            (Err(e), Some(head)) if unprocessed(&e) => {
                tracing::debug!(error = %e, "the HTTP/2 backend did not take a request; sending it again");
                self.attempt(head, end, &mut body).await
            }
            (r, _) => r,
        }
    }

    async fn attempt(
        &self,
        head: Request<()>,
        end: bool,
        body: &mut Option<BackendBody>,
    ) -> Result<Response<H2Body>, H2cError> {
        let mut send = self.ready().await?;
        let (resp, stream) = send.send_request(head, end)?;
        // Its own task, so that the body goes on while the head is awaited and while the
        // response is read (a backend may answer first: gRPC's bidirectional streams);
        // owned by the response, so it ends with the request (`Pump`).
        let pump = body
            .take()
            .filter(|_| !end)
            .map(|body| Pump(tokio::spawn(pump(body, stream)).abort_handle()));
        let resp = resp.await?;
        Ok(resp.map(|recv| H2Body {
            recv,
            data_done: false,
            done: false,
            _pump: pump,
        }))
    }
}

/// The task sending a request's body, owned by its response ([`H2Body`], or the wait for
/// the head): dropped, it ends the task, whose stream handle then resets the stream
/// (CANCEL). A request that is over or was cancelled (the user left) stops its upload at
/// once instead of when the upload's own source gives up. An upload cut once the whole
/// response came is what RFC 9113 §8.1 lets a server ask for (its answer did not need the
/// rest).
struct Pump(tokio::task::AbortHandle);

impl Drop for Pump {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Whether the backend is known not to have processed the request (RFC 9113 §8.7): it
/// refused the stream, or went away gracefully (GOAWAY with NO_ERROR, §6.8) before it: the
/// `h2` crate reports that for the streams above the GOAWAY's last stream and for those
/// opened after it. A GOAWAY with an error code fails every stream, processed or not.
fn unprocessed(e: &H2cError) -> bool {
    let H2cError::H2(e) = e else { return false };
    e.reason() == Some(h2::Reason::REFUSED_STREAM)
        || (e.is_go_away() && e.is_remote() && e.reason() == Some(h2::Reason::NO_ERROR))
}

/// Sends a request body on its stream as the backend's window allows, then its trailers.
async fn pump(mut body: BackendBody, mut stream: h2::SendStream<Bytes>) {
    use http_body_util::BodyExt;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            stream.send_reset(h2::Reason::CANCEL);
            return;
        };
        match frame.into_data() {
            Ok(mut data) => {
                while !data.is_empty() {
                    stream.reserve_capacity(data.len());
                    let n = match std::future::poll_fn(|cx| stream.poll_capacity(cx)).await {
                        Some(Ok(n)) => n,
                        _ => return,
                    };
                    if stream
                        .send_data(data.split_to(n.min(data.len())), false)
                        .is_err()
                    {
                        return;
                    }
                }
            }
            Err(f) => {
                if let Ok(t) = f.into_trailers() {
                    let _ = stream.send_trailers(t);
                    return;
                }
            }
        }
    }
    let _ = stream.send_data(Bytes::new(), true);
}

/// A response body from an HTTP/2 backend: data (its window given back as it is taken),
/// then trailers.
pub struct H2Body {
    recv: h2::RecvStream,
    /// The stream's data ended (END_STREAM, on a DATA frame or on the trailers).
    data_done: bool,
    /// The trailers, or their absence, were taken too.
    done: bool,
    /// The request body's task: it ends with this body.
    _pump: Option<Pump>,
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = self.get_mut();
        if !this.data_done {
            if let Some(data) = ready!(this.recv.poll_data(cx)) {
                let data = data?;
                let _ = this.recv.flow_control().release_capacity(data.len());
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            this.data_done = true;
        }
        if this.done {
            return Poll::Ready(None);
        }
        let trailers = ready!(this.recv.poll_trailers(cx));
        this.done = true;
        match trailers {
            Ok(Some(t)) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty};
    use tokio::net::TcpListener;

    fn get(addr: std::net::SocketAddr) -> Request<BackendBody> {
        let body = Empty::new().map_err(|never| match never {}).boxed_unsync();
        let mut req = Request::new(body);
        *req.uri_mut() = format!("http://{addr}/x").parse().unwrap();
        req.headers_mut()
            .insert(header::HOST, "users.example".parse().unwrap());
        req
    }

    /// Serves one request on each of the next `n` connections, answering with the
    /// request's authority and then closing the connection.
    async fn backend(n: usize) -> std::net::SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            for _ in 0..n {
                let (s, _) = l.accept().await.unwrap();
                let mut conn = h2::server::handshake(s).await.unwrap();
                let (req, mut respond) = conn.accept().await.unwrap().unwrap();
                let host = req.uri().authority().unwrap().to_string();
                let host_field = req.headers().contains_key(header::HOST);
                let resp = Response::builder()
                    .header("x-authority", host)
                    .header("x-host-field", host_field.to_string())
                    .body(())
                    .unwrap();
                let mut body = respond.send_response(resp, false).unwrap();
                body.send_data(Bytes::from_static(b"hi"), true).unwrap();
                // Answered: the connection goes away (GOAWAY, then close).
                conn.graceful_shutdown();
                let _ = std::future::poll_fn(|cx| conn.poll_closed(cx)).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn the_host_goes_in_the_authority_and_a_closed_connection_is_replaced() {
        let addr = backend(2).await;
        let c = H2c::new(addr.to_string(), Duration::ZERO);
        for round in 0..2 {
            let resp = c.send(get(addr)).await.expect("answered");
            assert_eq!(
                resp.headers()["x-authority"],
                "users.example",
                "round {round}"
            );
            assert_eq!(resp.headers()["x-host-field"], "false", "RFC 9113 §8.3.1");
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"hi");
        }
    }

    /// Refuses the first stream on its one connection (RST_STREAM REFUSED_STREAM) and
    /// answers the next ones with how many streams it saw.
    async fn refusing_backend() -> std::net::SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut conn = h2::server::handshake(s).await.unwrap();
            let mut seen = 0;
            while let Some(Ok((_req, mut respond))) = conn.accept().await {
                seen += 1;
                if seen == 1 {
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                    continue;
                }
                let resp = Response::builder().header("x-seen", seen).body(()).unwrap();
                respond.send_response(resp, true).unwrap();
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_refused_request_without_a_body_goes_again_and_one_with_a_body_fails() {
        let addr = refusing_backend().await;
        let c = H2c::new(addr.to_string(), Duration::ZERO);
        let resp = c.send(get(addr)).await.expect("sent again and answered");
        assert_eq!(resp.headers()["x-seen"], "2");

        let addr = refusing_backend().await;
        let c = H2c::new(addr.to_string(), Duration::ZERO);
        let mut post = get(addr);
        *post.method_mut() = http::Method::POST;
        *post.body_mut() = http_body_util::Full::new(Bytes::from_static(b"body"))
            .map_err(|never| match never {})
            .boxed_unsync();
        let Err(e) = c.send(post).await else {
            panic!("a refused request with a body was answered")
        };
        assert!(unprocessed(&e), "{e}");
    }

    /// When the response is dropped (the request is over or cancelled), the task sending
    /// the request's body ends too, even while it waits for more of the body.
    #[tokio::test]
    async fn a_request_bodys_task_ends_with_its_response() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut conn = h2::server::handshake(s).await.unwrap();
            // Answers at once and keeps the request's body open (unread, not reset); the
            // connection stays up.
            let mut held = Vec::new();
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                let _ = respond.send_response(Response::new(()), true);
                held.push(req);
            }
        });
        let c = H2c::new(addr.to_string(), Duration::ZERO);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(1);
        let mut post = get(addr);
        *post.method_mut() = http::Method::POST;
        *post.body_mut() =
            http_body_util::StreamBody::new(futures_util::stream::poll_fn(move |cx| {
                rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
            }))
            .boxed_unsync();
        let resp = c.send(post).await.expect("answered");
        tx.send(Bytes::from_static(b"more")).await.unwrap();
        drop(resp);
        tokio::time::timeout(Duration::from_secs(10), tx.closed())
            .await
            .expect("the body's task ended with the response");
    }

    #[tokio::test]
    async fn an_unreachable_backend_is_named_in_the_error() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        // The listener is gone: connecting is refused.
        let c = H2c::new(addr.to_string(), Duration::ZERO);
        let Err(e) = c.send(get(addr)).await else {
            panic!("answered without a backend")
        };
        assert!(matches!(e, H2cError::Connect { .. }), "{e}");
        assert!(e.to_string().contains(&addr.to_string()), "{e}");
    }
}
