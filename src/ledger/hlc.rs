//! Hybrid logical clock: versions that follow wall time when it is sane and stay monotonic when it
//! is not.

use std::fmt;

/// Bits of the logical counter (the low bits of an [`Hlc`]).
const COUNTER_BITS: u32 = 16;
/// Largest representable unix millisecond (48 bits: the year 10889).
const MAX_MILLIS: u64 = (1 << 48) - 1;

/// How far ahead of local time one observation may move the clock: 24 hours.
pub const DEFAULT_MAX_AHEAD_MS: u64 = 24 * 60 * 60 * 1000;

/// 2024-01-01T00:00:00Z. A wall clock earlier than this is taken as unset (a board without RTC
/// boots in 1970): such a node cannot judge whether a remote clock is in the future.
pub const CLOCK_SET_FLOOR_MS: u64 = 1_704_067_200_000;

/// A hybrid logical clock value: unix milliseconds (48 bits) << 16 | counter (16 bits).
///
/// Ordering is the ordering of the `u64`: by time, then by counter.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hlc(pub u64);

impl Hlc {
    /// The smallest value.
    pub const ZERO: Hlc = Hlc(0);

    /// A value from its parts; milliseconds past the 48-bit range are clamped.
    #[must_use]
    pub fn new(unix_ms: u64, counter: u16) -> Hlc {
        Hlc((unix_ms.min(MAX_MILLIS) << COUNTER_BITS) | u64::from(counter))
    }

    /// The wall-clock part, in unix milliseconds.
    #[must_use]
    pub fn millis(self) -> u64 {
        self.0 >> COUNTER_BITS
    }

    /// The logical counter.
    #[must_use]
    pub fn counter(self) -> u16 {
        (self.0 & 0xffff) as u16
    }
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.millis(), self.counter())
    }
}

impl fmt::Debug for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hlc({self})")
    }
}

/// True when `unix_ms` looks like a set wall clock (not before [`CLOCK_SET_FLOOR_MS`]).
#[must_use]
pub fn wall_clock_is_set(unix_ms: u64) -> bool {
    unix_ms >= CLOCK_SET_FLOOR_MS
}

/// A remote clock value refused by [`Clock::observe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooFarAhead {
    /// The refused value.
    pub remote: Hlc,
    /// The latest acceptable unix millisecond at that moment.
    pub limit_ms: u64,
}

impl fmt::Display for TooFarAhead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "remote clock {} is after the horizon {} ms",
            self.remote, self.limit_ms
        )
    }
}

impl std::error::Error for TooFarAhead {}

/// This node's hybrid logical clock.
///
/// - [`tick`](Self::tick) stamps a local event: the wall clock when it is ahead of every value
///   seen, else the last value plus one (so versions stay strictly increasing when the wall clock
///   steps back or stalls; the counter carries into the milliseconds after 65,536 ticks).
/// - [`observe`](Self::observe) takes a remote value into account, refusing (and counting) one more
///   than `max_ahead` past both the local wall clock and the clock's own last value; with an unset
///   wall clock (before [`CLOCK_SET_FLOOR_MS`]) every value is adopted, so a board that booted in
///   1970 moves to the network's time at the first message.
/// - [`advance`](Self::advance) adopts a value already vetted elsewhere (the ledger's own future
///   check), without a bound.
#[derive(Debug, Clone)]
pub struct Clock {
    last: Hlc,
    max_ahead_ms: u64,
    rejected_future: u64,
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock {
    /// A clock at zero that accepts remote values up to [`DEFAULT_MAX_AHEAD_MS`] ahead.
    #[must_use]
    pub fn new() -> Self {
        Self::with_max_ahead(DEFAULT_MAX_AHEAD_MS)
    }

    /// A clock at zero with another bound for [`observe`](Self::observe).
    #[must_use]
    pub fn with_max_ahead(max_ahead_ms: u64) -> Self {
        Self {
            last: Hlc::ZERO,
            max_ahead_ms,
            rejected_future: 0,
        }
    }

    /// The last value produced or adopted.
    #[must_use]
    pub fn last(&self) -> Hlc {
        self.last
    }

    /// Remote values refused by [`observe`](Self::observe) so far.
    #[must_use]
    pub fn rejected_future(&self) -> u64 {
        self.rejected_future
    }

    /// A new value for a local event, strictly greater than every value before.
    pub fn tick(&mut self, unix_ms: u64) -> Hlc {
        let wall = Hlc::new(unix_ms, 0);
        self.last = if wall > self.last {
            wall
        } else {
            Hlc(self.last.0.saturating_add(1))
        };
        self.last
    }

    /// Takes a remote clock value into account (see the type documentation for the bound).
    /// Returns the clock's value afterwards; a refused value leaves the clock unchanged.
    pub fn observe(&mut self, remote: Hlc, unix_ms: u64) -> Result<Hlc, TooFarAhead> {
        if wall_clock_is_set(unix_ms) {
            let limit_ms = unix_ms
                .max(self.last.millis())
                .saturating_add(self.max_ahead_ms);
            if remote.millis() > limit_ms {
                self.rejected_future += 1;
                return Err(TooFarAhead { remote, limit_ms });
            }
        }
        self.advance(remote);
        Ok(self.last)
    }

    /// Adopts `vetted` when it is ahead, without any bound.
    pub fn advance(&mut self, vetted: Hlc) {
        if vetted > self.last {
            self.last = vetted;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_760_000_000_000;

    #[test]
    fn parts_round_trip_and_clamp() {
        let h = Hlc::new(NOW, 7);
        assert_eq!((h.millis(), h.counter()), (NOW, 7));
        assert_eq!(Hlc::new(u64::MAX, 0).millis(), MAX_MILLIS);
        assert!(Hlc::new(NOW, 1) > Hlc::new(NOW, 0));
        assert!(Hlc::new(NOW + 1, 0) > Hlc::new(NOW, u16::MAX));
        assert_eq!(Hlc::new(5, 2).to_string(), "5.2");
    }

    #[test]
    fn tick_is_monotonic_when_the_wall_clock_goes_back() {
        let mut c = Clock::new();
        let a = c.tick(NOW);
        let b = c.tick(NOW);
        let d = c.tick(NOW - 60_000);
        let e = c.tick(NOW + 5);
        assert!(a < b && b < d && d < e, "{a} {b} {d} {e}");
        assert_eq!(e, Hlc::new(NOW + 5, 0));
        assert_eq!(d.millis(), NOW);
    }

    #[test]
    fn counter_overflow_carries_into_millis() {
        let mut c = Clock::new();
        c.advance(Hlc::new(NOW, u16::MAX));
        let next = c.tick(NOW);
        assert_eq!(next, Hlc::new(NOW + 1, 0));
        let mut top = Clock::new();
        top.advance(Hlc(u64::MAX));
        assert_eq!(top.tick(0), Hlc(u64::MAX));
    }

    #[test]
    fn observe_adopts_remote_time_and_stamps_after_it() {
        let mut c = Clock::new();
        c.tick(NOW);
        let remote = Hlc::new(NOW + 3_600_000, 4);
        assert_eq!(c.observe(remote, NOW), Ok(remote));
        assert!(c.tick(NOW) > remote);
        // An older remote value changes nothing.
        assert!(c.observe(Hlc::new(NOW - 1, 0), NOW).unwrap() > remote);
    }

    #[test]
    fn observe_refuses_more_than_a_day_ahead_and_counts() {
        let mut c = Clock::new();
        c.tick(NOW);
        let far = Hlc::new(NOW + DEFAULT_MAX_AHEAD_MS + 1, 0);
        assert_eq!(
            c.observe(far, NOW),
            Err(TooFarAhead {
                remote: far,
                limit_ms: NOW + DEFAULT_MAX_AHEAD_MS
            })
        );
        assert_eq!(c.rejected_future(), 1);
        assert_eq!(c.last().millis(), NOW);
        let edge = Hlc::new(NOW + DEFAULT_MAX_AHEAD_MS, 0);
        assert!(c.observe(edge, NOW).is_ok());
    }

    #[test]
    fn a_board_booted_in_1970_adopts_the_network_time() {
        let mut c = Clock::new();
        let boot = 12_000;
        c.tick(boot);
        let network = Hlc::new(NOW, 0);
        assert_eq!(c.observe(network, boot), Ok(network));
        let local = c.tick(boot + 10);
        assert!(local > network, "local writes follow the adopted time");
        assert_eq!(c.rejected_future(), 0);
    }
}
