//! The bound on relayed bytes held in memory, and its fair shares.
//!
//! Response bytes (and tunnel bytes towards users) wait in small per-request channels until
//! the user's connection takes them. Each channel is bounded, but many slow users together
//! could still hold a lot; every chunk therefore holds its size from a global budget while
//! it waits. When the budget is spent, response exchanges stop reading from their agents
//! (TCP backpressure reaches the backends) until users catch up.
//!
//! One global pool alone would let the users who stop reading freeze everyone: their chunks
//! keep their bytes, and every other backend's responses wait behind them. So each chunk
//! also holds its size from two shares: its backend name's (a quarter of the budget) and its
//! client address's (an eighth), and a request whose user takes none of its waiting bytes
//! for the write timeout forfeits what it holds ([`Budget::cut_stalled`]). Stuck readers of
//! one name or one address can then spend at most their share, and only for as long as
//! the timeout.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use relay_common::fasthash::FastHash;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// The byte budget shared by every request.
pub struct Budget {
    global: Arc<Semaphore>,
    total: usize,
    per_name: usize,
    per_client: usize,
    names: DashMap<String, Arc<Semaphore>>,
    clients: DashMap<IpAddr, Arc<Semaphore>>,
    /// Accounts holding bytes now (the ones [`Budget::cut_stalled`] looks at).
    holding: Arc<DashMap<usize, Account, FastHash>>,
}

/// Smallest budget and share: one 64 KiB chunk.
const MIN: usize = 64 * 1024;

impl Budget {
    /// A budget of `bytes` (at least one 64 KiB chunk); a name may hold a quarter of it, a
    /// client address an eighth (each at least one chunk).
    pub fn new(bytes: usize) -> Self {
        let total = bytes.clamp(MIN, u32::MAX as usize);
        Budget {
            global: Arc::new(Semaphore::new(total)),
            total,
            per_name: (total / 4).max(MIN).min(total),
            per_client: (total / 8).max(MIN).min(total),
            names: DashMap::new(),
            clients: DashMap::new(),
            holding: Arc::new(DashMap::default()),
        }
    }

    /// The account of one request for backend `name` from `client`.
    pub fn account(&self, name: &str, client: IpAddr) -> Account {
        // Looked up before inserted: the name is owned (copied) only the first time.
        let name_share = match self.names.get(name) {
            Some(s) => s.clone(),
            None => self
                .names
                .entry(name.to_owned())
                .or_insert_with(|| Arc::new(Semaphore::new(self.per_name)))
                .clone(),
        };
        let client = client.to_canonical();
        // Looked up before inserted too: `entry` takes the shard's write lock.
        let client_share = match self.clients.get(&client) {
            Some(s) => s.clone(),
            None => self
                .clients
                .entry(client)
                .or_insert_with(|| Arc::new(Semaphore::new(self.per_client)))
                .clone(),
        };
        Account(Arc::new(Mutex::new(Holdings {
            // Shares first: a request waiting for its share holds nothing of the pool.
            pools: [name_share, client_share, self.global.clone()],
            largest: self.per_client.min(self.per_name),
            held: 0,
            waiting_since: Instant::now(),
            forfeited: false,
            stalled: None,
            holding: self.holding.clone(),
        })))
    }

    /// Forfeits the holdings of every request whose user has taken none of its waiting
    /// bytes for `timeout` (see [`Account::forfeit`]); returns how many. Run periodically.
    pub fn cut_stalled(&self, timeout: Duration) -> usize {
        // Clones first: an account's lock is never taken under the table's.
        let accounts: Vec<Account> = self.holding.iter().map(|e| e.value().clone()).collect();
        let now = Instant::now();
        accounts
            .into_iter()
            .filter(|a| a.stalled_for(now) >= timeout)
            .map(|a| a.forfeit())
            .count()
    }

    /// Forgets the shares nobody holds (run periodically; a share in use is referenced by
    /// its requests' accounts).
    pub fn reap(&self) {
        let idle =
            |s: &Arc<Semaphore>, size| Arc::strong_count(s) == 1 && s.available_permits() == size;
        self.names.retain(|_, s| !idle(s, self.per_name));
        self.clients.retain(|_, s| !idle(s, self.per_client));
    }

    /// Bytes held now.
    pub fn in_use(&self) -> usize {
        self.total - self.global.available_permits()
    }

    /// The budget.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Names and client addresses with a share in use or not yet reaped.
    pub fn shares(&self) -> usize {
        self.names.len() + self.clients.len()
    }
}

struct Holdings {
    pools: [Arc<Semaphore>; 3],
    largest: usize,
    held: usize,
    /// Since when bytes have waited without the user taking any (valid while `held > 0`).
    waiting_since: Instant,
    forfeited: bool,
    /// Made when something first waits for the forfeit ([`Account::stalled`]): most
    /// requests (small responses) never hold a byte and never wait for it.
    stalled: Option<CancellationToken>,
    holding: Arc<DashMap<usize, Account, FastHash>>,
}

/// What one request holds of the budget and its shares.
#[derive(Clone)]
pub struct Account(Arc<Mutex<Holdings>>);

/// A request's [`Account`], opened at its first use: most requests (small responses) never
/// hold a byte, and opening one took two hashed lookups, an allocation and a clock read
/// (about 700 instructions of a small request's 34 000 on the relay-server).
pub struct LazyAccount {
    source: (Arc<Budget>, IpAddr),
    account: std::sync::OnceLock<Account>,
}

impl LazyAccount {
    /// The account of a request from `client`, opened in `budget` when first used.
    pub fn new(budget: Arc<Budget>, client: IpAddr) -> Self {
        LazyAccount {
            source: (budget, client),
            account: std::sync::OnceLock::new(),
        }
    }

    /// The account of a request for backend `name` (the same name at every call).
    pub fn get(&self, name: &str) -> &Account {
        self.account.get_or_init(|| {
            let (budget, client) = &self.source;
            budget.account(name, *client)
        })
    }
}

/// Bytes held by one chunk; returned on drop (when the user side took the chunk).
#[derive(Debug)]
pub struct Held {
    account: Option<Account>,
    n: usize,
}

impl std::fmt::Debug for Account {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Account")
    }
}

impl Account {
    fn key(&self) -> usize {
        Arc::as_ptr(&self.0) as usize
    }

    /// Waits until `n` bytes are free in the request's shares and the pool, and holds
    /// them. A chunk larger than a share holds all of it. Cancel-safe: a wait given up
    /// holds nothing.
    pub async fn hold(&self, n: usize) -> Held {
        let nothing = Held {
            account: None,
            n: 0,
        };
        let (pools, n) = {
            let h = self.0.lock().expect("bug: poisoned");
            if h.forfeited {
                return nothing;
            }
            (h.pools.clone(), n.clamp(1, h.largest))
        };
        let mut permits = Vec::with_capacity(pools.len());
        for pool in &pools {
            permits.push(
                pool.acquire_many(n as u32)
                    .await
                    .expect("bug: budget semaphores are never closed"),
            );
        }
        let mut h = self.0.lock().expect("bug: poisoned");
        if h.forfeited {
            // Forfeited while waiting: the permits go back as they drop.
            return nothing;
        }
        permits.into_iter().for_each(|p| p.forget());
        self.record(&mut h, n)
    }

    /// Counts `n` bytes whose permits are taken as held by this request.
    fn record(&self, h: &mut Holdings, n: usize) -> Held {
        if h.held == 0 {
            h.waiting_since = Instant::now();
            h.holding.insert(self.key(), self.clone());
        }
        h.held += n;
        Held {
            account: Some(self.clone()),
            n,
        }
    }

    /// Holds `n` bytes now if the request's shares and the pool have them free, as
    /// [`Account::hold`] would; `None` when one of them has not (then wait with `hold`).
    /// Never takes permits that queued waiters were promised: tokio's semaphore hands
    /// released permits to its queue first.
    pub fn try_hold(&self, n: usize) -> Option<Held> {
        let mut h = self.0.lock().expect("bug: poisoned");
        if h.forfeited {
            return Some(Held {
                account: None,
                n: 0,
            });
        }
        let n = n.clamp(1, h.largest);
        let taken = h
            .pools
            .iter()
            .take_while(|pool| pool.try_acquire_many(n as u32).map(|p| p.forget()).is_ok())
            .count();
        if taken < h.pools.len() {
            h.pools[..taken].iter().for_each(|p| p.add_permits(n));
            return None;
        }
        Some(self.record(&mut h, n))
    }

    /// How long bytes have waited for the user without it taking any (zero when none wait).
    pub fn stalled_for(&self, now: Instant) -> Duration {
        let h = self.0.lock().expect("bug: poisoned");
        if h.held == 0 || h.forfeited {
            return Duration::ZERO;
        }
        now - h.waiting_since
    }

    /// Gives back everything the request holds, now, although its chunks still wait for a
    /// user who stopped reading: from here on they are not counted, nothing more is held,
    /// and [`Account::stalled`] fires so the request ends.
    pub fn forfeit(&self) {
        let mut h = self.0.lock().expect("bug: poisoned");
        if !h.forfeited {
            h.forfeited = true;
            let n = std::mem::take(&mut h.held);
            h.pools.iter().for_each(|p| p.add_permits(n));
            h.holding.remove(&self.key());
            if let Some(t) = &h.stalled {
                t.cancel();
            }
        }
    }

    /// Fires when the account was forfeited.
    pub fn stalled(&self) -> WaitForCancellationFutureOwned {
        let mut h = self.0.lock().expect("bug: poisoned");
        let forfeited = h.forfeited;
        let token = h.stalled.get_or_insert_with(|| {
            let t = CancellationToken::new();
            if forfeited {
                t.cancel();
            }
            t
        });
        token.clone().cancelled_owned()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(account) = &self.account {
            let mut h = account.0.lock().expect("bug: poisoned");
            if !h.forfeited {
                h.held -= self.n;
                h.pools.iter().for_each(|p| p.add_permits(self.n));
                if h.held == 0 {
                    h.holding.remove(&account.key());
                } else {
                    // The user took a chunk: progress.
                    h.waiting_since = Instant::now();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: usize = 1024;

    #[tokio::test]
    async fn a_lazy_account_opens_at_its_first_use_and_holds_in_its_shares() {
        let b = Arc::new(Budget::new(1024 * KIB));
        let lazy = LazyAccount::new(b.clone(), "127.0.0.1".parse().unwrap());
        assert_eq!(b.shares(), 0, "nothing looked up before a use");
        let held = lazy.get("a").hold(64 * KIB).await;
        // The name's and the address's shares, and the pool.
        assert_eq!(b.shares(), 2);
        assert_eq!(b.in_use(), 64 * KIB);
        // The same account at every call: its holdings add up.
        let more = lazy.get("a").try_hold(64 * KIB).expect("room");
        assert_eq!(b.in_use(), 128 * KIB);
        drop((held, more));
        assert_eq!(b.in_use(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_name_or_an_address_holds_at_most_its_share() {
        let b = Budget::new(1024 * KIB);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let c: IpAddr = "127.0.0.2".parse().unwrap();
        let d: IpAddr = "127.0.0.3".parse().unwrap();
        // One address's stuck reads of one name: an eighth of the budget, then they wait.
        let stuck = b.account("a", a);
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(stuck.hold(64 * KIB).await);
        }
        let more = tokio::time::timeout(std::time::Duration::from_secs(1), stuck.hold(64 * KIB));
        assert!(more.await.is_err(), "the address's share is spent");
        assert_eq!(b.in_use(), 128 * KIB);
        // Other addresses on the same name fill the name's quarter...
        let other = b.account("a", c);
        held.push(other.hold(128 * KIB).await);
        let more = tokio::time::timeout(std::time::Duration::from_secs(1), other.hold(KIB));
        assert!(more.await.is_err(), "the name's share is spent");
        // ...and another name is served all the same.
        let free = b.account("b", d);
        let _h = tokio::time::timeout(std::time::Duration::from_secs(1), free.hold(KIB))
            .await
            .expect("another name waits behind nobody");
        drop(held);
        assert_eq!(b.in_use(), KIB);
    }

    #[tokio::test(start_paused = true)]
    async fn a_user_who_takes_nothing_for_the_timeout_forfeits_its_bytes() {
        let b = Budget::new(1024 * KIB);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let acc = b.account("a", ip);
        let h1 = acc.hold(64 * KIB).await;
        let h2 = acc.hold(64 * KIB).await;
        assert_eq!(b.in_use(), 128 * KIB);
        // The user takes one chunk after 3 s: progress restarts the clock.
        tokio::time::advance(Duration::from_secs(3)).await;
        drop(h1);
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(b.cut_stalled(Duration::from_secs(5)), 0);
        let stalled = acc.stalled();
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(b.cut_stalled(Duration::from_secs(5)), 1);
        assert_eq!(b.in_use(), 0);
        stalled.await;
        // A wait that begins after the forfeit ends at once.
        tokio::time::timeout(Duration::from_millis(1), acc.stalled())
            .await
            .expect("already forfeited");
        let h1 = Held {
            account: None,
            n: 0,
        };
        // The chunks it held go later without giving anything back twice.
        drop((h1, h2));
        assert_eq!(b.in_use(), 0);
        let after = acc.hold(KIB).await;
        assert_eq!(b.in_use(), 0, "a forfeited request holds nothing more");
        drop(after);
        drop(acc);
        b.reap();
        assert_eq!(b.shares(), 0, "unused shares are forgotten");
    }

    #[tokio::test(start_paused = true)]
    async fn holding_without_a_wait_takes_what_is_free_and_never_a_waiters_turn() {
        let b = Budget::new(1024 * KIB);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let acc = b.account("a", ip);
        // The address's eighth (128 KiB) in two holds; a third finds nothing free and
        // takes nothing from the pools it could have had (the global one, the name's).
        let h1 = acc.try_hold(64 * KIB).expect("free");
        let h2 = acc.try_hold(64 * KIB).expect("free");
        assert!(acc.try_hold(KIB).is_none(), "the address's share is spent");
        assert_eq!(b.in_use(), 128 * KIB);
        // A waiter queues for 64 KiB; what is given back is its turn, not a try's.
        let waiter = acc.clone();
        let queued = tokio::spawn(async move { waiter.hold(64 * KIB).await });
        tokio::task::yield_now().await;
        drop(h1);
        assert!(
            acc.try_hold(KIB).is_none(),
            "the freed bytes are the waiter's"
        );
        let h3 = queued.await.unwrap();
        assert_eq!(b.in_use(), 128 * KIB);
        drop((h2, h3));
        assert_eq!(b.in_use(), 0);
        // A forfeited request holds nothing, waiting or not.
        acc.forfeit();
        let _none = acc.try_hold(KIB).expect("nothing to wait for");
        assert_eq!(b.in_use(), 0);
    }
}
