//! Token-bucket rate limits keyed by source, in a table of bounded size.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// A rate: `burst` events at once, refilled at `per_minute` events per minute.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Rate {
    /// Events allowed in a burst (bucket size).
    pub burst: u32,
    /// Sustained events per minute.
    pub per_minute: u32,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Token buckets per key (a source IP address), at most `capacity` of them.
///
/// When the table is full, a new key takes the slot of the least recently active one: a source
/// idle long enough to be evicted would have refilled its bucket anyway, and the table never
/// grows past `capacity` however many addresses a flood forges.
#[derive(Debug)]
pub struct Limiter<K: Ord + Copy> {
    rate: Rate,
    capacity: usize,
    buckets: BTreeMap<K, Bucket>,
}

impl<K: Ord + Copy> Limiter<K> {
    /// An empty table.
    #[must_use]
    pub fn new(rate: Rate, capacity: usize) -> Self {
        Limiter {
            rate,
            capacity: capacity.max(1),
            buckets: BTreeMap::new(),
        }
    }

    /// Takes one token for `key` at `now`; false when its bucket is empty.
    pub fn allow(&mut self, key: K, now: Instant) -> bool {
        let burst = f64::from(self.rate.burst.max(1));
        let per_sec = f64::from(self.rate.per_minute) / 60.0;
        if !self.buckets.contains_key(&key) && self.buckets.len() >= self.capacity {
            let oldest = self
                .buckets
                .iter()
                .min_by_key(|(_, b)| b.last)
                .map(|(k, _)| *k);
            if let Some(oldest) = oldest {
                self.buckets.remove(&oldest);
            }
        }
        let bucket = self.buckets.entry(key).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * per_sec).min(burst);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Drops buckets idle for at least `idle` (they are full again).
    pub fn prune(&mut self, now: Instant, idle: Duration) {
        self.buckets
            .retain(|_, b| now.saturating_duration_since(b.last) < idle);
    }

    /// Keys tracked.
    #[cfg(test)]
    #[must_use]
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// True when no key is tracked.
    #[cfg(test)]
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill_and_table_stays_bounded() {
        let mut l = Limiter::new(
            Rate {
                burst: 3,
                per_minute: 60,
            },
            4,
        );
        let t0 = Instant::now();
        assert_eq!((0..5).filter(|_| l.allow(1u32, t0)).count(), 3);
        assert!(!l.allow(1, t0 + Duration::from_millis(500)));
        assert!(l.allow(1, t0 + Duration::from_millis(1100)));
        for k in 0..100u32 {
            l.allow(k, t0 + Duration::from_secs(2 + u64::from(k)));
        }
        assert_eq!(l.len(), 4);
        l.prune(t0 + Duration::from_secs(1000), Duration::from_secs(10));
        assert!(l.is_empty());
    }
}
