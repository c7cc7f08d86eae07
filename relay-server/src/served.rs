//! Serving one connection's requests once it is accepted and placed: the relay's own
//! HTTP/1.1 front first (for a user connection), then hyper from the first request the
//! front leaves to it; and the supervisor that ends the connection gracefully when the
//! server stops or the connection idles.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto;
use relay_common::gate::gated;
use tokio_util::sync::CancellationToken;

use crate::base::activity::{Activity, IdleBounds, Tracked};
use crate::base::body::RelayBody;
use crate::base::limits::FirstBytes;
use crate::base::streams::{ConnExec, Streams};
use crate::front;

/// What serving one connection's requests takes.
pub(crate) struct Http<'a> {
    pub builder: &'a auto::Builder<ConnExec>,
    pub streams: &'a mut Streams,
    pub activity: &'a Arc<Activity>,
    pub idle: IdleBounds,
    pub stop: &'a CancellationToken,
}

impl Http<'_> {
    /// Serves the connection: with the front first when there is one, then with hyper
    /// (from the first request the front leaves to it).
    pub(crate) async fn serve<S, Svc>(
        self,
        mut first: FirstBytes<S>,
        front: Option<front::Front<'_>>,
        svc: Svc,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        Svc: hyper::service::Service<
                Request<Incoming>,
                Response = Response<Tracked<RelayBody>>,
                Error = Infallible,
            > + Clone
            + Send
            + 'static,
        Svc::Future: Send + 'static,
    {
        if let Some(front) = front {
            // Boxed: inline, the front's state would stay in the task of every connection
            // hyper serves after it.
            let mut served = Box::pin(front.serve(&mut first, self.stop));
            let supervised = front::supervise(served.as_mut(), self.activity, self.idle, self.stop);
            let ended = supervised.await?;
            drop(served);
            match ended {
                front::Ended::Closed => return Ok(()),
                front::Ended::Hyper(rest) => first.put_back(rest),
            }
        }
        let io = TokioIo::new(first);
        let conn = self.builder.serve_connection_with_upgrades(io, svc);
        // Boxed too: hyper's connection state (3.5 KB) inline would make the task of every
        // connection the front keeps (idle keep-alive users, parked long polls) as large;
        // boxed, a connection pays for it once, when it goes to hyper.
        Box::pin(supervise(
            conn,
            self.streams,
            self.activity,
            self.idle,
            self.stop,
        ))
        .await
    }
}

/// Runs one connection to its end; asks it to finish gracefully (HTTP/2 GOAWAY, HTTP/1.1
/// close after the response in progress, or at once when it is between requests) when the
/// server stops or the connection has had no request in progress for its `idle` bound.
async fn supervise<I, S>(
    conn: auto::UpgradeableConnection<'_, I, S, ConnExec>,
    streams: &mut Streams,
    activity: &Activity,
    idle: IdleBounds,
    stop: &CancellationToken,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    S: hyper::service::Service<
        Request<Incoming>,
        Response = Response<Tracked<RelayBody>>,
        Error = Infallible,
    >,
    S::Future: 'static,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    ConnExec: auto::HttpServerConnExec<S::Future, Tracked<RelayBody>>,
{
    let mut conn = std::pin::pin!(conn);
    // Gated: the connection's task wakes for every read and every response, and these two
    // waits would be polled again each time (relay_common::gate).
    let stopped = gated(stop.cancelled());
    let idled = gated(activity.idle_for(idle));
    tokio::select! {
        // In order, not at random: the task polls this for every read and every response,
        // and the two waits are gated (a draw per poll was ≈ 100 instructions a request).
        biased;
        r = streams.drive(&mut conn) => return r,
        _ = stopped => {}
        _ = idled => {}
    }
    conn.as_mut().graceful_shutdown();
    // A connection that does not finish within a second after the stop is dropped, and its
    // streams with it.
    match tokio::time::timeout(Duration::from_secs(1), streams.drive(&mut conn)).await {
        Ok(r) => r,
        Err(_) => Ok(()),
    }
}
