//! Cluster mode (`--cluster-redis`): the Redis directory of which replica holds which names,
//! and the calls between replicas (forwarded user requests and agent calls). Uses
//! [`crate::user`], [`crate::agent`] and [`crate::base`]; nothing below knows it exists.

pub mod directory;
pub mod head;
pub mod parked;
pub mod peer;
pub mod pool;
pub mod renewal;
pub mod seal;
pub mod sessions;
