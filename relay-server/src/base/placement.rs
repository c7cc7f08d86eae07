//! Where each name's sessions run, when the server runs shards (`--shards`, see
//! `shards.rs`): a shard is a thread with a runtime of its own, and a name's home is the
//! shard that holds most of its sessions. The accept path places connections with it
//! ([`Placement::home`], [`Placement::for_session`]); a session records itself on the
//! shard it runs on for as long as it lives ([`Placement::session_started`]).
//!
//! Only sessions that authenticated are recorded (the record is made by the session, not
//! by the accept path), so the table holds names with a live session and nothing a
//! stranger can grow.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

thread_local! {
    /// The shard this thread runs, if it is one.
    static CURRENT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The shard the calling thread runs, if it is one.
pub fn current() -> Option<usize> {
    CURRENT.with(Cell::get)
}

/// Marks the calling thread as shard `i` (called once by each shard's thread).
pub fn enter(i: usize) {
    CURRENT.with(|c| c.set(Some(i)));
}

/// The sessions of every name per shard.
pub struct Placement {
    /// Sessions per shard, per name (a name is present while it has one).
    names: Mutex<HashMap<String, Vec<usize>>>,
    /// Sessions per shard, all names.
    load: Vec<AtomicUsize>,
}

/// A session's record on its shard, removed when dropped (the session ended).
pub struct SessionHome {
    placement: Arc<Placement>,
    name: String,
    shard: usize,
}

impl Placement {
    /// A table for `shards` shards.
    pub fn new(shards: usize) -> Arc<Self> {
        Arc::new(Placement {
            names: Mutex::default(),
            load: (0..shards).map(|_| AtomicUsize::new(0)).collect(),
        })
    }

    /// How many shards there are.
    pub fn shards(&self) -> usize {
        self.load.len()
    }

    /// The shard holding most of `name`'s sessions, if it has one on a shard.
    pub fn home(&self, name: &str) -> Option<usize> {
        let names = self.names.lock().expect("bug: poisoned");
        let counts = names.get(name)?;
        // The first of the largest counts: a tie keeps the earlier shard.
        let (shard, n) =
            counts.iter().enumerate().fold(
                (0, 0),
                |best, (i, &n)| if n > best.1 { (i, n) } else { best },
            );
        (n > 0).then_some(shard)
    }

    /// Where a new session of `name` goes: its name's home, else the shard with the fewest
    /// sessions.
    pub fn for_session(&self, name: &str) -> usize {
        self.home(name).unwrap_or_else(|| {
            (0..self.load.len())
                .min_by_key(|&i| self.load[i].load(Ordering::Relaxed))
                .unwrap_or(0)
        })
    }

    /// Records a session of `name` on the calling thread's shard; `None` when the thread
    /// is not a shard (a session on the main runtime, such as one over TLS).
    pub fn session_started(self: &Arc<Self>, name: &str) -> Option<SessionHome> {
        let shard = current().filter(|&s| s < self.load.len())?;
        let mut names = self.names.lock().expect("bug: poisoned");
        let counts = names
            .entry(name.to_owned())
            .or_insert_with(|| vec![0; self.load.len()]);
        counts[shard] += 1;
        self.load[shard].fetch_add(1, Ordering::Relaxed);
        Some(SessionHome {
            placement: self.clone(),
            name: name.to_owned(),
            shard,
        })
    }

    /// Names with a session on a shard.
    pub fn names(&self) -> usize {
        self.names.lock().expect("bug: poisoned").len()
    }

    /// Sessions on shard `i`.
    pub fn load(&self, i: usize) -> usize {
        self.load[i].load(Ordering::Relaxed)
    }
}

impl Drop for SessionHome {
    fn drop(&mut self) {
        let p = &self.placement;
        p.load[self.shard].fetch_sub(1, Ordering::Relaxed);
        let mut names = p.names.lock().expect("bug: poisoned");
        if let Some(counts) = names.get_mut(&self.name) {
            counts[self.shard] -= 1;
            if counts.iter().all(|&n| n == 0) {
                names.remove(&self.name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on a fresh thread marked as shard `i`.
    fn on_shard<T: Send>(i: usize, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                enter(i);
                f()
            })
            .join()
            .unwrap()
        })
    }

    #[test]
    fn a_name_lives_where_most_of_its_sessions_are_and_goes_with_them() {
        let p = Placement::new(3);
        assert_eq!(p.home("a"), None);
        // New names go to the least loaded shard.
        assert_eq!(p.for_session("a"), 0);
        let a1 = on_shard(1, || p.session_started("a")).unwrap();
        assert_eq!((p.home("a"), p.for_session("a")), (Some(1), 1));
        assert_eq!(p.for_session("b"), 0);
        let b = on_shard(0, || p.session_started("b")).unwrap();
        assert_eq!(p.for_session("c"), 2);
        let a2 = on_shard(2, || p.session_started("a")).unwrap();
        let a3 = on_shard(2, || p.session_started("a")).unwrap();
        assert_eq!(p.home("a"), Some(2));
        drop((a2, a3));
        assert_eq!(p.home("a"), Some(1));
        drop(a1);
        assert_eq!(p.home("a"), None);
        assert_eq!((p.names(), p.load(0), p.load(1), p.load(2)), (1, 1, 0, 0));
        drop(b);
        assert_eq!(p.names(), 0);
    }

    #[test]
    fn a_session_off_the_shards_is_not_recorded() {
        let p = Placement::new(2);
        assert!(p.session_started("a").is_none());
        assert!(on_shard(5, || p.session_started("a")).is_none());
        assert_eq!(p.names(), 0);
    }
}
