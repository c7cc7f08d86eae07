//! The user side: routing a request to a backend name, access control (tokens, signed
//! links, forward auth), queueing it for an agent and turning the agent's answer into the
//! user's response or tunnel. Uses [`crate::agent`] and [`crate::base`].

pub mod access;
pub mod downstream;
pub mod error;
pub mod forward_auth;
pub mod forwarded;
pub mod link;
pub mod prepare;
pub mod relayed;
pub mod router;
pub mod tunnel;
