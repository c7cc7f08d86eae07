//! Requests in progress that a reload can revoke: every request admitted by a user
//! credential (a user token, or a signed-link session) registers here for as long as its
//! response streams or its tunnel runs, and a reload that takes the credential away ends it
//! at once, the same way a revoked agent's work ends. Open and forward-auth requests hold
//! no credential of the relay's and are not registered.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use relay_common::fasthash::FastHash;
use tokio_util::sync::CancellationToken;

/// What admitted a user request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credential {
    /// A user token (its digest).
    UserToken([u8; 32]),
    /// A signed-link session opened with the link key of this tag.
    LinkKey(String),
}

struct Entry {
    credential: Credential,
    name: String,
    cut: CancellationToken,
}

/// Every open request admitted by a credential.
#[derive(Default)]
pub struct Revocations {
    next: AtomicU64,
    open: Arc<DashMap<u64, Entry, FastHash>>,
}

/// One registered request; the registration ends when the last clone goes.
pub struct Admission {
    id: u64,
    open: Arc<DashMap<u64, Entry, FastHash>>,
    cut: CancellationToken,
}

impl Admission {
    /// Cancelled when the credential that admitted the request is revoked.
    pub fn cut(&self) -> &CancellationToken {
        &self.cut
    }
}

/// Resolves when `admission`'s credential is revoked; never without one.
pub async fn revoked(admission: Option<&Admission>) {
    match admission {
        Some(a) => a.cut.cancelled().await,
        None => std::future::pending().await,
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.open.remove(&self.id);
    }
}

impl Revocations {
    /// Registers a request for `name` admitted by `credential`.
    pub fn admit(&self, credential: Credential, name: &str) -> Arc<Admission> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let cut = CancellationToken::new();
        self.open.insert(
            id,
            Entry {
                credential,
                name: name.to_owned(),
                cut: cut.clone(),
            },
        );
        Arc::new(Admission {
            id,
            open: self.open.clone(),
            cut,
        })
    }

    /// Ends every open request whose credential `still` no longer admits to its name;
    /// returns how many.
    pub fn revoke(&self, still: impl Fn(&Credential, &str) -> bool) -> usize {
        let mut n = 0;
        self.open.retain(|_, e| {
            let keep = still(&e.credential, &e.name);
            if !keep {
                e.cut.cancel();
                n += 1;
            }
            keep
        });
        n
    }

    /// Open requests registered now.
    pub fn len(&self) -> usize {
        self.open.len()
    }

    /// Whether none is registered.
    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revoked_credential_cuts_its_requests_and_registrations_go_with_them() {
        let r = Revocations::default();
        let kept = r.admit(Credential::UserToken([1; 32]), "a");
        let gone = r.admit(Credential::UserToken([2; 32]), "a");
        let link = r.admit(Credential::LinkKey("old".into()), "b");
        assert_eq!(r.len(), 3);
        let n = r.revoke(|c, _| match c {
            Credential::UserToken(d) => d[0] == 1,
            Credential::LinkKey(tag) => tag == "new",
        });
        assert_eq!(n, 2);
        assert!(!kept.cut().is_cancelled());
        assert!(gone.cut().is_cancelled() && link.cut().is_cancelled());
        drop(kept);
        assert!(r.is_empty());
        drop((gone, link));
        assert!(r.is_empty());
    }
}
