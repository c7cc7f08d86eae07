//! The global bound on relayed bytes held in memory.
//!
//! Response bytes (and tunnel bytes towards users) wait in small per-request channels until
//! the user's connection takes them. Each channel is bounded, but many slow users together
//! could still hold a lot; every chunk therefore holds its size from one global budget while
//! it waits. When the budget is spent, response exchanges stop reading from their agents
//! (TCP backpressure reaches the backends) until users catch up.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The byte budget shared by every request.
pub struct Budget {
    sem: Arc<Semaphore>,
    total: usize,
}

/// Bytes held from the budget; returned on drop.
#[derive(Debug)]
pub struct Held(#[allow(dead_code)] OwnedSemaphorePermit);

impl Budget {
    /// A budget of `bytes` (at least one 64 KiB chunk).
    pub fn new(bytes: usize) -> Self {
        let total = bytes.clamp(64 * 1024, u32::MAX as usize);
        Budget {
            sem: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    /// Waits until `n` bytes are free and holds them. A chunk larger than the whole budget
    /// holds all of it.
    pub async fn hold(&self, n: usize) -> Held {
        let n = n.clamp(1, self.total) as u32;
        Held(
            self.sem
                .clone()
                .acquire_many_owned(n)
                .await
                .expect("bug: the budget semaphore is never closed"),
        )
    }

    /// Bytes held now.
    pub fn in_use(&self) -> usize {
        self.total - self.sem.available_permits()
    }

    /// The budget.
    pub fn total(&self) -> usize {
        self.total
    }
}
