//! Operator views: the status page and its JSON, the Prometheus exposition. Reads every
//! layer; no layer reads it.

pub mod page;
pub mod status;
