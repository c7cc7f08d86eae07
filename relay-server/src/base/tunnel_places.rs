//! Users' tunnels counted per client address (`--max-tunnels-per-ip`).
//!
//! A user's connection leaves the connection limits when it switches (`base/switch.rs`
//! says why), and a tunnel can stay open for hours: without a count of its own, one
//! address could open tunnels until the relay ran out of sockets or memory, 256
//! connections at a time. Each upgrade request takes a place here before it is relayed;
//! the place goes with its tunnel, or at once when the backend does not switch. The count
//! is by the user's address as the request names it: behind a `--trusted-proxy`, the
//! forwarded client's (so a proxy's users do not share one allowance); a replica counts
//! only the tunnels of users who reached it, not those another replica forwards to it.

use std::net::IpAddr;
use std::sync::Arc;

use dashmap::DashMap;

/// The tunnels open (or being opened) from each address, and the limit.
pub struct TunnelPlaces {
    per_ip: DashMap<IpAddr, usize>,
    max_per_ip: usize,
}

/// A place of one tunnel, freed when dropped.
pub struct TunnelPlace {
    places: Arc<TunnelPlaces>,
    ip: IpAddr,
}

/// A tunnel refused because its address holds the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0} tunnels are already open from this address, the most one address may hold; close one and try again")]
pub struct TooManyTunnels(pub usize);

impl TunnelPlaces {
    /// Places for `max_per_ip` tunnels per address.
    pub fn new(max_per_ip: usize) -> Arc<Self> {
        Arc::new(TunnelPlaces {
            per_ip: DashMap::new(),
            max_per_ip,
        })
    }

    /// A place for a tunnel of `ip`, or the refusal when the address holds the limit.
    pub fn take(self: &Arc<Self>, ip: IpAddr) -> Result<TunnelPlace, TooManyTunnels> {
        let ip = ip.to_canonical();
        let mut open = self.per_ip.entry(ip).or_default();
        if *open >= self.max_per_ip {
            let refused = TooManyTunnels(self.max_per_ip);
            // A refusal leaves no entry behind (a limit of 0 would otherwise keep one).
            drop(open);
            self.per_ip.remove_if(&ip, |_, n| *n == 0);
            return Err(refused);
        }
        *open += 1;
        Ok(TunnelPlace {
            places: self.clone(),
            ip,
        })
    }

    /// Tunnels open (or being opened) from `ip`.
    pub fn open_at(&self, ip: IpAddr) -> usize {
        self.per_ip.get(&ip.to_canonical()).map_or(0, |n| *n)
    }

    /// Addresses with a tunnel open (or being opened).
    pub fn addresses(&self) -> usize {
        self.per_ip.len()
    }
}

impl Drop for TunnelPlace {
    fn drop(&mut self) {
        self.places.per_ip.remove_if_mut(&self.ip, |_, n| {
            *n -= 1;
            *n == 0
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_holds_at_most_its_limit_and_a_place_frees_with_its_tunnel() {
        let places = TunnelPlaces::new(2);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let first = places.take(a).unwrap();
        let _second = places.take(a).unwrap();
        assert_eq!(places.take(a).err(), Some(TooManyTunnels(2)));
        // Another address has its own allowance; an IPv4-mapped IPv6 address is the same.
        let _other = places.take(b).unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.2".parse().unwrap();
        let _mapped = places.take(mapped).unwrap();
        assert_eq!(places.take(b).err(), Some(TooManyTunnels(2)));
        assert_eq!((places.open_at(a), places.open_at(b)), (2, 2));
        drop(first);
        assert_eq!(places.open_at(a), 1);
        let _again = places.take(a).unwrap();
    }

    #[test]
    fn no_entry_outlives_its_tunnels_or_a_refusal() {
        let places = TunnelPlaces::new(1);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let p = places.take(ip).unwrap();
        assert!(places.take(ip).is_err());
        drop(p);
        assert_eq!(places.addresses(), 0);
        let none = TunnelPlaces::new(0);
        assert_eq!(none.take(ip).err(), Some(TooManyTunnels(0)));
        assert_eq!(none.addresses(), 0);
    }
}
