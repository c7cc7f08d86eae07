//! relay-client: the agent that serves a private backend through a relay-server, using only
//! outbound HTTP(S) calls.
//!
//! # Layout
//! - [`agent`]: start-up probe, the long-poll loop, dispatch, cancellation, drain.
//! - [`relay`]: calls to the relay-server (`/server/request`, `/server/response`,
//!   `/server/requeststream`, `/server/probe`).
//! - [`session`]: the agent's end of a session (protocol 2 over a WebSocket): OPEN frames
//!   in, whole small responses and credit out, pings; long polls are the fallback.
//! - [`exchange`]: serving one request: upload pump, backend call, response exchanges.
//! - [`whole`]: whole responses: on the session (kept until acknowledged) or in one exchange.
//! - [`upstream`]: building and sending backend requests, and the agent's own HTTP/1.1
//!   connections to a plain-HTTP backend.
//! - [`service`]: Backend.AI-style service ports answered by the agent itself.
//! - [`bodies`]: the framed response body, bounded exchange bodies, the upload body.
//! - [`connect`]: `relay-client connect`, local TCP connections as service-port WebSockets.
//! - [`tls`], [`config`], [`error`].
//!
//! # Life of a request (agent side)
//! 1. A long poll returns a request head. [`agent`] spawns a task for it with its own
//!    cancellation token (cancelled when a later poll lists the id under `cancel`).
//! 2. If it has a body, a pump pulls it through `/server/requeststream` exchanges into the
//!    backend request body as it arrives.
//! 3. The backend's answer becomes frames (HEAD, DATA…, END/TRAILERS/ABORT) posted to
//!    `/server/response`: one streaming POST, or bounded POSTs ending in CONTINUE when a
//!    buffering proxy sits in between.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![deny(rust_2018_idioms)]

pub mod admin;
pub mod agent;
mod backoff;
pub mod bodies;
pub mod config;
pub mod connect;
pub mod error;
pub mod exchange;
mod keepalive;
pub mod relay;
pub mod service;
pub mod session;
pub mod splice;
pub mod tls;
pub mod tunnel;
pub mod upstream;
pub mod whole;

pub use agent::run;
pub use config::{Config, Secret, Transport};
pub use error::AgentError;
