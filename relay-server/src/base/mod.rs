//! The base layer every feature stands on: credentials, response bodies, the byte budget,
//! connections' activity, limits and HTTP/2 streams, switched connections' places and users'
//! tunnels per address, metrics and the request history, TLS termination, memory
//! trimming, the client of external services.
//! Nothing here knows about users, agents or replicas.

pub mod activity;
pub mod auth;
pub mod body;
pub mod budget;
pub mod first_headers;
pub mod history;
pub mod limits;
pub mod metrics;
pub mod movable;
pub mod outbound;
pub mod placement;
pub mod queue;
pub mod revocation;
pub mod streams;
pub mod switch;
pub mod tls;
pub mod trim;
pub mod tunnel_places;
