//! [`AdminLockout`]: refuses, for a while, the client addresses that keep presenting wrong
//! admin tokens.
//!
//! Counting is per client address (an IPv6 client by its /64, which one host usually owns
//! whole), so a flood of wrong tokens from one address locks out that address only: the
//! operator on another address keeps working. While an address is locked every admin
//! request from it is refused, the right token included, so guessing from it learns nothing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

/// Wrong tokens one address may present within [`FAILURE_WINDOW`] before it is locked.
pub const MAX_FAILURES: u32 = 10;
/// The window wrong tokens are counted in, from the first of them.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// How long an address stays locked.
pub const LOCKOUT: Duration = Duration::from_secs(60);
/// Addresses tracked at most; past that, stale entries go first, then the oldest.
pub const MAX_TRACKED: usize = 10_000;

/// Which addresses are counted together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Client {
    V4([u8; 4]),
    V6Prefix([u8; 8]),
    /// No address known (a service called in-process, not over a socket).
    Unknown,
}

impl Client {
    fn of(ip: Option<IpAddr>) -> Self {
        match ip.map(|ip| ip.to_canonical()) {
            Some(IpAddr::V4(v4)) => Client::V4(v4.octets()),
            Some(IpAddr::V6(v6)) => {
                let mut prefix = [0u8; 8];
                prefix.copy_from_slice(&v6.octets()[..8]);
                Client::V6Prefix(prefix)
            }
            None => Client::Unknown,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Record {
    window_start: Instant,
    failures: u32,
    locked_until: Option<Instant>,
}

impl Record {
    fn stale(&self, now: Instant) -> bool {
        let locked = self.locked_until.is_some_and(|until| until > now);
        !locked && now.duration_since(self.window_start) >= FAILURE_WINDOW
    }
}

/// Wrong-token counts per client address.
#[derive(Debug, Default)]
pub struct AdminLockout {
    clients: Mutex<HashMap<Client, Record>>,
}

impl AdminLockout {
    /// How long `ip` must still wait, if it is locked out.
    pub fn locked_for(&self, ip: Option<IpAddr>) -> Option<Duration> {
        let now = Instant::now();
        let clients = self.lock();
        let until = clients.get(&Client::of(ip))?.locked_until?;
        (until > now).then(|| until - now)
    }

    /// Counts a wrong token from `ip`; returns how long it is now locked out, if it is.
    pub fn record_failure(&self, ip: Option<IpAddr>) -> Option<Duration> {
        let now = Instant::now();
        let client = Client::of(ip);
        let mut clients = self.lock();
        if !clients.contains_key(&client) && clients.len() >= MAX_TRACKED {
            make_room(&mut clients, now);
        }
        let record = clients.entry(client).or_insert(Record {
            window_start: now,
            failures: 0,
            locked_until: None,
        });
        if record.stale(now) {
            *record = Record {
                window_start: now,
                failures: 0,
                locked_until: None,
            };
        }
        record.failures += 1;
        if record.failures >= MAX_FAILURES {
            record.locked_until = Some(now + LOCKOUT);
            return Some(LOCKOUT);
        }
        None
    }

    /// The right token from `ip`: its count starts over.
    pub fn record_success(&self, ip: Option<IpAddr>) {
        let client = Client::of(ip);
        let mut clients = self.lock();
        if clients.contains_key(&client) {
            clients.remove(&client);
        }
    }

    /// Addresses currently tracked.
    pub fn tracked(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Client, Record>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Drops stale records; if none were stale, the one whose window started first.
fn make_room(clients: &mut HashMap<Client, Record>, now: Instant) {
    clients.retain(|_, r| !r.stale(now));
    if clients.len() >= MAX_TRACKED {
        if let Some(oldest) = clients
            .iter()
            .min_by_key(|(_, r)| r.window_start)
            .map(|(c, _)| *c)
        {
            clients.remove(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn v4(last: u8) -> Option<IpAddr> {
        Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, last)))
    }

    #[tokio::test(start_paused = true)]
    async fn locks_after_the_limit_and_unlocks_after_the_lockout() {
        let lockout = AdminLockout::default();
        for _ in 1..MAX_FAILURES {
            assert_eq!(lockout.record_failure(v4(1)), None);
            assert_eq!(lockout.locked_for(v4(1)), None);
        }
        assert_eq!(lockout.record_failure(v4(1)), Some(LOCKOUT));
        assert_eq!(lockout.locked_for(v4(1)), Some(LOCKOUT));
        // Another address is not affected.
        assert_eq!(lockout.locked_for(v4(2)), None);
        assert_eq!(lockout.record_failure(v4(2)), None);

        tokio::time::advance(LOCKOUT - Duration::from_secs(1)).await;
        assert_eq!(lockout.locked_for(v4(1)), Some(Duration::from_secs(1)));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(lockout.locked_for(v4(1)), None);
        // After the lockout the count starts over.
        assert_eq!(lockout.record_failure(v4(1)), None);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_spread_beyond_the_window_never_lock() {
        let lockout = AdminLockout::default();
        for _ in 0..3 * MAX_FAILURES {
            assert_eq!(lockout.record_failure(v4(1)), None);
            // At most MAX_FAILURES - 1 of them fall within any window from a first failure.
            let spacing = FAILURE_WINDOW / (MAX_FAILURES - 2) + Duration::from_millis(1);
            tokio::time::advance(spacing).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn success_starts_the_count_over() {
        let lockout = AdminLockout::default();
        for _ in 1..MAX_FAILURES {
            lockout.record_failure(v4(1));
        }
        lockout.record_success(v4(1));
        assert_eq!(lockout.record_failure(v4(1)), None);
        assert_eq!(lockout.tracked(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_ipv6_host_counts_as_its_slash_64_and_mapped_v4_as_v4() {
        let lockout = AdminLockout::default();
        for i in 0..MAX_FAILURES {
            let ip = Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, i as u16);
            lockout.record_failure(Some(IpAddr::V6(ip)));
        }
        let same_net = Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0xffff, 1, 2, 3);
        assert!(lockout.locked_for(Some(IpAddr::V6(same_net))).is_some());
        let other_net = Ipv6Addr::new(0x2001, 0xdb8, 0, 2, 0, 0, 0, 1);
        assert!(lockout.locked_for(Some(IpAddr::V6(other_net))).is_none());

        let mapped = Ipv4Addr::new(192, 0, 2, 7).to_ipv6_mapped();
        lockout.record_failure(Some(IpAddr::V6(mapped)));
        lockout.record_success(v4(7));
        assert_eq!(lockout.tracked(), 1, "the mapped address is the IPv4 one");
    }

    #[tokio::test(start_paused = true)]
    async fn tracking_is_bounded() {
        let lockout = AdminLockout::default();
        for i in 0..(MAX_TRACKED as u32 + 50) {
            let ip = Ipv4Addr::from(0x0a00_0000 + i);
            lockout.record_failure(Some(IpAddr::V4(ip)));
        }
        assert!(lockout.tracked() <= MAX_TRACKED);
    }
}
