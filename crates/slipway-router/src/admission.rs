//! Which accepted connections a listener serves: at most `max_connections` at once, and at
//! most `max_connections_per_client` from one client address, so that one host cannot take
//! every slot and shut out everybody else's traffic.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::lock;

/// The limits of one listener.
pub(crate) struct Gate {
    pub(crate) permits: Arc<Semaphore>,
    per_client: Option<PerClient>,
    /// When a refusal was last logged, so a flood of them logs once per [`WARN_EVERY`].
    last_warned: Mutex<Option<Instant>>,
}

/// How often refusals are logged at most.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// A connection's place under the limits, held until it (and anything spliced from it) ends.
pub(crate) struct Admission {
    _permit: OwnedSemaphorePermit,
    _client: Option<ClientGuard>,
}

impl Gate {
    /// `per_client` 0: no limit per client.
    pub(crate) fn new(max_connections: usize, per_client: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max_connections.max(1))),
            per_client: (per_client > 0).then(|| PerClient {
                limit: per_client,
                counts: Arc::new(Mutex::new(HashMap::new())),
            }),
            last_warned: Mutex::new(None),
        }
    }

    /// Whether a refusal should be logged now (at most once per [`WARN_EVERY`]).
    pub(crate) fn should_warn(&self) -> bool {
        let mut last = lock(&self.last_warned);
        let now = Instant::now();
        if last.is_some_and(|at| now.duration_since(at) < WARN_EVERY) {
            return false;
        }
        *last = Some(now);
        true
    }

    /// Admits a connection from `ip` that holds `permit`, unless its client is at its limit
    /// (then the permit is handed back).
    pub(crate) fn admit(
        &self,
        permit: OwnedSemaphorePermit,
        ip: IpAddr,
    ) -> Result<Admission, OwnedSemaphorePermit> {
        let client = match &self.per_client {
            None => None,
            Some(per_client) => match per_client.admit(ip) {
                Some(guard) => Some(guard),
                None => return Err(permit),
            },
        };
        Ok(Admission {
            _permit: permit,
            _client: client,
        })
    }
}

struct PerClient {
    limit: usize,
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl PerClient {
    fn admit(&self, ip: IpAddr) -> Option<ClientGuard> {
        let key = client_key(ip);
        let mut counts = lock(&self.counts);
        let count = counts.entry(key).or_insert(0);
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(ClientGuard {
            key,
            counts: Arc::clone(&self.counts),
        })
    }
}

/// Counts one connection against its client until dropped.
struct ClientGuard {
    key: IpAddr,
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        let mut counts = lock(&self.counts);
        if let Some(count) = counts.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// The client an address belongs to: an IPv4 address (also when mapped into IPv6), or an
/// IPv6 /64, the block one host or site is usually given.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_client_gets_at_most_its_share_and_gets_it_back() {
        let gate = Gate::new(10, 2);
        let permit = || Arc::clone(&gate.permits).try_acquire_owned().unwrap();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let first = gate.admit(permit(), a).unwrap();
        let _second = gate.admit(permit(), a).unwrap();
        assert!(
            gate.admit(permit(), a).is_err(),
            "a third from the same client"
        );
        // The same client seen through IPv6.
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert!(gate.admit(permit(), mapped).is_err());
        let _other = gate.admit(permit(), b).expect("another client");
        drop(first);
        assert!(gate.admit(permit(), a).is_ok(), "a slot given back");
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_64() {
        let gate = Gate::new(10, 1);
        let permit = || Arc::clone(&gate.permits).try_acquire_owned().unwrap();
        let one: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other_64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let _held = gate.admit(permit(), one).unwrap();
        assert!(gate.admit(permit(), same_64).is_err());
        assert!(gate.admit(permit(), other_64).is_ok());
    }

    #[test]
    fn refusals_are_logged_once_per_period() {
        let gate = Gate::new(10, 1);
        assert!(gate.should_warn());
        assert!(
            !gate.should_warn(),
            "a second refusal right after is not logged"
        );
    }

    #[test]
    fn no_limit_per_client_when_zero() {
        let gate = Gate::new(10, 0);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let held: Vec<_> = (0..10)
            .map(|_| {
                let permit = Arc::clone(&gate.permits).try_acquire_owned().unwrap();
                gate.admit(permit, ip).unwrap()
            })
            .collect();
        assert_eq!(held.len(), 10);
    }
}
