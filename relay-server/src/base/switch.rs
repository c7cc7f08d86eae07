//! A connection's switch of protocols (RFC 9110 §7.8, a 101) together with its place
//! under the connection limits.
//!
//! hyper lets go of a connection once it has switched: its task ends and with it the
//! connection's hold on its place ([`ConnPermit`]). An agent's switched connection (its
//! session, a tunnel exchange) stays open for hours, so whatever carries it keeps the place
//! until it closes: without that, an agent whose only connection is a session counted as no
//! agent at all, and its other connections were refused at the limit instead of coming in
//! on probation (`ConnLimits::admit`). Only agent paths are offered their place
//! ([`offer_place`]); a user's tunnel gives its place up at the 101, so for users
//! [`Switch::of`] finds none. A user's tunnel holds a place of its own instead, under the
//! tunnels of its address ([`Switch::hold`], `base/tunnel_places.rs`).

use std::sync::Arc;

use http::{header, Request};
use hyper::upgrade::{OnUpgrade, Upgraded};

use crate::base::limits::ConnPermit;
use crate::base::tunnel_places::TunnelPlace;

/// The places of a switched connection, under the connection limits (an agent's) or under
/// its address's tunnels (a user's): held as long as the connection is carried, dropped
/// when it closes.
pub struct Place {
    _held: Option<Arc<ConnPermit>>,
    _tunnel: Option<TunnelPlace>,
}

/// Marks `req` as holding `permit` when it is an agent's request that may switch its
/// connection (an agent path, `/server/…`, asking for an upgrade): [`Switch::of`] takes it
/// with the switch. Only such requests carry it: the extension map is an allocation every
/// other request is spared.
///
/// Users' tunnels are not offered theirs (they give it up at the 101, as before switched
/// connections kept places): counting them made the users of one address meet its limit
/// while the agent's exchange connections were still being authenticated (the 200-tunnel
/// test on long polls).
pub fn offer_place<B>(req: &mut Request<B>, permit: &Arc<ConnPermit>) {
    if req.uri().path().starts_with("/server/") && req.headers().contains_key(header::UPGRADE) {
        req.extensions_mut().insert(permit.clone());
    }
}

/// The switch of one request's connection, with the connection's place.
pub struct Switch {
    on: OnUpgrade,
    place: Option<Arc<ConnPermit>>,
    tunnel: Option<TunnelPlace>,
}

impl Switch {
    /// The switch of `req`'s connection (done once the 101 is written), and its place.
    pub fn of<B>(req: &mut Request<B>) -> Switch {
        Switch {
            on: hyper::upgrade::on(&mut *req),
            place: req.extensions_mut().remove::<Arc<ConnPermit>>(),
            tunnel: None,
        }
    }

    /// Holds `tunnel` until the switched connection closes, or until the switch is dropped
    /// (the backend did not switch, the user left first).
    pub fn hold(&mut self, tunnel: TunnelPlace) {
        self.tunnel = Some(tunnel);
    }

    /// Waits for the switch: the connection, and the place its carrier keeps while it is
    /// open. An error when the connection closed or failed before switching.
    pub async fn switched(self) -> Result<(Upgraded, Place), hyper::Error> {
        let io = self.on.await?;
        Ok((
            io,
            Place {
                _held: self.place,
                _tunnel: self.tunnel,
            },
        ))
    }
}
