//! The agent side: the endpoints relay-clients call (`/server/request`, `/server/response`,
//! `/server/requeststream`, `/server/probe`), the broker that hands requests to their polls,
//! and the state of one request in flight with its upload and response exchanges; the Go
//! relay-client's protocol ([`v1alpha1`]) is a second adapter over the same state.
//! Uses [`crate::base`] only.

pub mod broker;
pub mod endpoints;
pub mod error;
pub mod forward_auth;
pub mod handout;
pub mod pending;
pub mod poll;
pub mod registration;
pub mod response;
pub mod response_side;
pub mod session;
#[cfg(test)]
mod tests;
pub mod tunnel;
pub mod upload;
pub mod upload_side;
pub mod v1alpha1;
