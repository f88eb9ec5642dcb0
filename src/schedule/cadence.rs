//! How often a pair runs and when it runs again after success or failure.
//!
//! Three rules shape a pair's schedule:
//!
//! * **Phase.** Every pair runs once per `interval`, but at its own offset
//!   inside the interval, derived from a hash of the pair. An agent serving
//!   thousands of pairs would otherwise start them all at once after a
//!   restart (and again after every blackout), hammering the source servers
//!   and the receiver in bursts and idling in between. Hashing rather than
//!   random numbers keeps the phase the same in every agent process and
//!   across restarts, so the spread survives redeploys and several agents
//!   sharing the control database agree on it.
//! * **No overlap.** The next cycle is due one interval after the previous
//!   one *started*, so cycles keep a steady rhythm however long they take,
//!   but never before the previous one ended: a slow cycle delays its
//!   successor instead of running alongside it.
//! * **Blackout.** Nothing is due inside the nightly blackout; what would be
//!   is moved to the window's end plus the pair's phase, so the pairs held
//!   back by the window spread out again instead of all starting at its end.
//!
//! [`Backoff`] spaces out retries after failures.

use super::store::PairKey;
use super::window::Blackout;
use chrono::{DateTime, TimeDelta, Utc};
use sha2::{Digest, Sha256};
use std::time::Duration;

/// How many times [`Cadence::not_in_blackout`] moves a time past a window
/// plus the phase before it settles for the window's end. With a phase
/// shorter than the open time between windows, once is always enough.
const MAX_BLACKOUT_HOPS: usize = 8;

/// A pair's rhythm: one cycle per `interval`, none starting in `blackout`.
#[derive(Debug, Clone, Copy)]
pub struct Cadence {
    pub interval: Duration,
    pub blackout: Option<Blackout>,
}

impl Cadence {
    /// The pair's fixed offset in `[0, interval)`: the first 8 bytes of
    /// SHA-256 of `"{tenant}/{app}"`, read big-endian, modulo the interval
    /// in milliseconds. The formula is part of the schedule's behaviour:
    /// changing it would move every pair at the next deploy.
    /// A zero interval has no room for a phase and gives zero.
    pub fn phase(&self, pair: &PairKey) -> Duration {
        let interval_ms = self.interval.as_millis();
        if interval_ms == 0 {
            return Duration::ZERO;
        }
        let digest = Sha256::digest(format!("{}/{}", pair.tenant, pair.app).as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        let hash = u64::from_be_bytes(first);
        // The remainder is below the interval and below 2^64, so it fits.
        let ms = (u128::from(hash) % interval_ms) as u64;
        Duration::from_millis(ms)
    }

    /// When a pair never seen before runs first: `now` plus its phase, so
    /// the pairs of a fresh agent spread over the first interval instead of
    /// all starting at once.
    pub fn first_due(&self, pair: &PairKey, now: DateTime<Utc>) -> DateTime<Utc> {
        self.not_in_blackout(pair, add(now, self.phase(pair)))
    }

    /// When a pair runs next after a cycle that ran from `started` to
    /// `ended` (whatever its outcome, backoff aside). Measuring from the
    /// start keeps the pair on its phase; the floor at `ended` keeps a
    /// late cycle from overlapping its successor, which then starts right
    /// away.
    pub fn after_run(&self, pair: &PairKey, started: DateTime<Utc>, ended: DateTime<Utc>) -> DateTime<Utc> {
        let due = add(started, self.interval).max(ended);
        self.not_in_blackout(pair, due)
    }

    /// `due`, or when it falls into a blackout window, the window's end
    /// plus the pair's phase. The phase is added so that the pairs the
    /// window held back restart spread over an interval rather than all at
    /// the window's end. Should that land in another window (only possible
    /// if the phase is longer than the open time between windows) it moves
    /// again, a bounded number of times, and finally settles for a window's
    /// end, which is never inside a window.
    pub fn not_in_blackout(&self, pair: &PairKey, due: DateTime<Utc>) -> DateTime<Utc> {
        let Some(blackout) = self.blackout else { return due };
        let phase = self.phase(pair);
        let mut due = due;
        for _ in 0..MAX_BLACKOUT_HOPS {
            match blackout.window_at(due) {
                Some((_, end)) => due = add(end, phase),
                None => return due,
            }
        }
        blackout.next_open(due)
    }
}

/// Delays between retries of a failing pair: exponential, capped, with
/// full jitter.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The longest delay after `failures` failures in a row: `base` doubled
    /// for each failure after the first, at most `max`; zero before any
    /// failure. Failures are counted in the store and never reset while a
    /// pair keeps failing, so the count can grow without bound: the
    /// computation saturates instead of overflowing.
    pub fn cap(&self, failures: u32) -> Duration {
        if failures == 0 || self.base.is_zero() || self.max.is_zero() {
            return Duration::ZERO;
        }
        let mut cap = self.base;
        // Doubling stops as soon as the cap reaches max, so this loops at
        // most ~128 times whatever the failure count.
        for _ in 1..failures {
            if cap >= self.max {
                break;
            }
            cap = cap.checked_mul(2).unwrap_or(Duration::MAX);
        }
        cap.min(self.max)
    }

    /// The delay before the next retry: uniform in `[0, cap]` in whole
    /// milliseconds ("full jitter"), so pairs that failed together (a
    /// receiver outage) do not retry together. The caller passes the
    /// randomness, which keeps this function deterministic under test;
    /// the modulo bias is negligible for a 64-bit random number.
    pub fn delay(&self, failures: u32, random: u64) -> Duration {
        let cap_ms = self.cap(failures).as_millis();
        if cap_ms == 0 {
            return Duration::ZERO;
        }
        // Below 2^64 because `random` is.
        let ms = (u128::from(random) % (cap_ms + 1)) as u64;
        Duration::from_millis(ms)
    }
}

/// `t + d`, saturating at the end of chrono's calendar instead of
/// panicking: a schedule absurdly far away is still "not now".
fn add(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    TimeDelta::from_std(d).ok().and_then(|d| t.checked_add_signed(d)).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{AppId, TenantId};
    use chrono::TimeZone;

    fn pair(tenant: &str, app: &str) -> PairKey {
        PairKey { tenant: TenantId::new(tenant).unwrap(), app: AppId::new(app).unwrap() }
    }

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
    }

    fn minutes(m: u64) -> Duration {
        Duration::from_secs(m * 60)
    }

    fn berlin() -> Blackout {
        Blackout::parse("01:30", "03:00", "Europe/Berlin").unwrap()
    }

    fn cadence(interval: Duration, blackout: Option<Blackout>) -> Cadence {
        Cadence { interval, blackout }
    }

    fn ms(d: Duration) -> TimeDelta {
        TimeDelta::from_std(d).unwrap()
    }

    #[test]
    fn phase_is_deterministic_and_in_range() {
        let c = cadence(minutes(20), None);
        let p = pair("t1", "app");
        let phase = c.phase(&p);
        assert_eq!(phase, c.phase(&p.clone()));
        assert_eq!(phase, cadence(minutes(20), Some(berlin())).phase(&p));
        assert!(phase < minutes(20));
        assert_eq!(phase.subsec_millis() as u128 * 1_000_000, phase.subsec_nanos() as u128);

        // Pinned: the formula must not change between releases.
        let digest = Sha256::digest(b"t1/app");
        let hash = u64::from_be_bytes(digest[..8].try_into().unwrap());
        assert_eq!(phase, Duration::from_millis(hash % 1_200_000));

        for i in 0..500 {
            let p = pair(&format!("t{i}"), "app");
            for interval in
                [Duration::from_millis(1), Duration::from_millis(999), minutes(1), minutes(20), minutes(1440)]
            {
                assert!(cadence(interval, None).phase(&p) < interval);
            }
        }
    }

    #[test]
    fn phase_depends_on_tenant_and_app() {
        let c = cadence(Duration::from_secs(86_400), None);
        assert_ne!(c.phase(&pair("t1", "app")), c.phase(&pair("t2", "app")));
        assert_ne!(c.phase(&pair("t1", "app")), c.phase(&pair("t1", "app2")));
        // "{tenant}/{app}" keeps "a"+"b_c" apart from "a_b"+"c".
        assert_ne!(c.phase(&pair("a", "b_c")), c.phase(&pair("a_b", "c")));
    }

    #[test]
    fn zero_or_tiny_interval_has_zero_phase() {
        assert_eq!(cadence(Duration::ZERO, None).phase(&pair("t1", "app")), Duration::ZERO);
        assert_eq!(cadence(Duration::from_micros(999), None).phase(&pair("t1", "app")), Duration::ZERO);
        assert_eq!(cadence(Duration::from_millis(1), None).phase(&pair("t1", "app")), Duration::ZERO);
    }

    #[test]
    fn thousand_pairs_spread_over_the_interval() {
        let c = cadence(minutes(20), None);
        let mut buckets = [0u32; 20];
        for i in 0..1000 {
            let phase = c.phase(&pair(&format!("t{i}"), "app"));
            buckets[(phase.as_secs() / 60) as usize] += 1;
        }
        for (minute, &n) in buckets.iter().enumerate() {
            assert!((25..=75).contains(&n), "minute {minute} has {n} pairs: {buckets:?}");
        }
        assert_eq!(buckets.iter().sum::<u32>(), 1000);
    }

    #[test]
    fn first_due_without_blackout_is_now_plus_phase() {
        let c = cadence(minutes(20), None);
        let p = pair("t1", "app");
        let now = utc(2026, 6, 10, 12, 0);
        assert_eq!(c.first_due(&p, now), now + ms(c.phase(&p)));
    }

    #[test]
    fn first_due_in_blackout_moves_to_window_end_plus_phase() {
        let c = cadence(minutes(20), Some(berlin()));
        // 2026-06-10 01:30 CEST: now + phase is within 01:30-01:50, inside.
        let now = utc(2026, 6, 9, 23, 30);
        for i in 0..50 {
            let p = pair(&format!("t{i}"), "app");
            let end = utc(2026, 6, 10, 1, 0); // 03:00 CEST
            assert_eq!(c.first_due(&p, now), end + ms(c.phase(&p)), "t{i}");
        }
        // Outside the window nothing moves.
        let p = pair("t1", "app");
        let noon = utc(2026, 6, 10, 10, 0);
        assert_eq!(c.first_due(&p, noon), noon + ms(c.phase(&p)));
    }

    #[test]
    fn pairs_held_back_by_the_window_spread_after_it() {
        let c = cadence(minutes(20), Some(berlin()));
        let due = utc(2026, 6, 10, 0, 0); // 02:00 CEST, inside
        let mut buckets = [0u32; 20];
        let end = utc(2026, 6, 10, 1, 0);
        for i in 0..1000 {
            let at = c.not_in_blackout(&pair(&format!("t{i}"), "app"), due);
            let offset = (at - end).num_seconds();
            assert!((0..1200).contains(&offset));
            buckets[(offset / 60) as usize] += 1;
        }
        assert!(buckets.iter().all(|&n| (25..=75).contains(&n)), "{buckets:?}");
    }

    #[test]
    fn not_in_blackout_boundaries() {
        let c = cadence(minutes(20), Some(berlin()));
        let p = pair("t1", "app");
        let phase = ms(c.phase(&p));
        let (from, to) = (utc(2026, 1, 15, 0, 30), utc(2026, 1, 15, 2, 0));
        let nano = TimeDelta::nanoseconds(1);
        assert_eq!(c.not_in_blackout(&p, from - nano), from - nano);
        assert_eq!(c.not_in_blackout(&p, from), to + phase);
        assert_eq!(c.not_in_blackout(&p, to - nano), to + phase);
        assert_eq!(c.not_in_blackout(&p, to), to);
        // Without a blackout nothing moves.
        assert_eq!(cadence(minutes(20), None).not_in_blackout(&p, from), from);
    }

    #[test]
    fn not_in_blackout_on_dst_nights() {
        let c = cadence(minutes(20), Some(berlin()));
        let p = pair("t1", "app");
        let phase = ms(c.phase(&p));
        // Spring forward: the window ends 03:00 CEST = 01:00 UTC.
        assert_eq!(c.not_in_blackout(&p, utc(2026, 3, 29, 0, 40)), utc(2026, 3, 29, 1, 0) + phase);
        // Fall back: the window ends 03:00 CET = 02:00 UTC.
        assert_eq!(c.not_in_blackout(&p, utc(2026, 10, 25, 1, 30)), utc(2026, 10, 25, 2, 0) + phase);
    }

    #[test]
    fn phase_longer_than_the_open_time_still_ends_outside() {
        // A 24h interval with a phase past 22h30 would land each hop in the
        // next night's window; the result must still be outside.
        let b = berlin();
        let c = cadence(Duration::from_secs(86_400), Some(b));
        let p = (0..10_000)
            .map(|i| pair(&format!("t{i}"), "app"))
            .find(|p| c.phase(p) >= minutes(23 * 60))
            .expect("some pair has a phase past 23h");
        let due = utc(2026, 1, 15, 1, 0);
        let at = c.not_in_blackout(&p, due);
        assert!(at > due);
        assert!(!b.contains(at), "{at}");
    }

    #[test]
    fn after_run_measures_from_the_start() {
        let c = cadence(minutes(20), None);
        let p = pair("t1", "app");
        let started = utc(2026, 6, 10, 10, 0);
        assert_eq!(c.after_run(&p, started, utc(2026, 6, 10, 10, 5)), utc(2026, 6, 10, 10, 20));
        // A run that takes exactly the interval: the next starts as it ends.
        assert_eq!(c.after_run(&p, started, utc(2026, 6, 10, 10, 20)), utc(2026, 6, 10, 10, 20));
    }

    #[test]
    fn late_run_does_not_overlap_its_successor() {
        let c = cadence(minutes(20), None);
        let p = pair("t1", "app");
        let started = utc(2026, 6, 10, 10, 0);
        let ended = utc(2026, 6, 10, 10, 35);
        assert_eq!(c.after_run(&p, started, ended), ended);
    }

    #[test]
    fn run_ending_inside_the_blackout() {
        let b = berlin();
        let c = cadence(minutes(20), Some(b));
        let p = pair("t1", "app");
        let phase = ms(c.phase(&p));
        let window_end = utc(2026, 1, 15, 2, 0); // 03:00 CET
                                                 // Started 01:00 CET, ran late into the window until 01:40 CET.
        let next = c.after_run(&p, utc(2026, 1, 15, 0, 0), utc(2026, 1, 15, 0, 40));
        assert_eq!(next, window_end + phase);
        // Started 01:15 CET, ended 01:20 CET: next due 01:35, inside.
        let next = c.after_run(&p, utc(2026, 1, 15, 0, 15), utc(2026, 1, 15, 0, 20));
        assert_eq!(next, window_end + phase);
        // Started 01:00, ended 01:05: next due 01:20, before the window.
        let next = c.after_run(&p, utc(2026, 1, 15, 0, 0), utc(2026, 1, 15, 0, 5));
        assert_eq!(next, utc(2026, 1, 15, 0, 20));
    }

    #[test]
    fn huge_durations_saturate() {
        let c = cadence(Duration::MAX, None);
        let p = pair("t1", "app");
        let now = utc(2026, 6, 10, 10, 0);
        assert_eq!(c.after_run(&p, now, now), DateTime::<Utc>::MAX_UTC);
        let _ = c.first_due(&p, now);
        // With a blackout, the saturated time goes through window_at.
        let c = cadence(Duration::MAX, Some(berlin()));
        assert_eq!(c.after_run(&p, now, now), DateTime::<Utc>::MAX_UTC);
        let _ = c.first_due(&p, now);
    }

    #[test]
    fn backoff_caps_grow_and_saturate() {
        let b = Backoff { base: Duration::from_secs(1), max: Duration::from_secs(300) };
        assert_eq!(b.cap(0), Duration::ZERO);
        assert_eq!(b.cap(1), Duration::from_secs(1));
        assert_eq!(b.cap(2), Duration::from_secs(2));
        assert_eq!(b.cap(3), Duration::from_secs(4));
        assert_eq!(b.cap(9), Duration::from_secs(256));
        assert_eq!(b.cap(10), Duration::from_secs(300));
        assert_eq!(b.cap(64), Duration::from_secs(300));
        assert_eq!(b.cap(200), Duration::from_secs(300));
        assert_eq!(b.cap(u32::MAX), Duration::from_secs(300));
        let mut last = Duration::ZERO;
        for f in 0..1000 {
            let cap = b.cap(f);
            assert!(cap >= last && cap <= b.max, "{f}");
            last = cap;
        }
    }

    #[test]
    fn backoff_cap_without_overflow() {
        let huge = Backoff { base: Duration::MAX, max: Duration::MAX };
        assert_eq!(huge.cap(1), Duration::MAX);
        assert_eq!(huge.cap(2), Duration::MAX);
        assert_eq!(huge.cap(u32::MAX), Duration::MAX);
        let tiny = Backoff { base: Duration::from_nanos(1), max: Duration::MAX };
        assert_eq!(tiny.cap(64), Duration::from_nanos(1 << 63));
        assert_eq!(tiny.cap(u32::MAX), Duration::MAX);
        let zero = Backoff { base: Duration::ZERO, max: Duration::from_secs(300) };
        assert_eq!(zero.cap(u32::MAX), Duration::ZERO);
        let no_max = Backoff { base: Duration::from_secs(1), max: Duration::ZERO };
        assert_eq!(no_max.cap(5), Duration::ZERO);
        // max below base: max wins from the first failure.
        let small_max = Backoff { base: Duration::from_secs(10), max: Duration::from_secs(3) };
        assert_eq!(small_max.cap(1), Duration::from_secs(3));
    }

    #[test]
    fn delay_is_full_jitter_within_the_cap() {
        let b = Backoff { base: Duration::from_secs(1), max: Duration::from_secs(300) };
        for failures in 0..40 {
            let cap = b.cap(failures);
            for random in [0, 1, 7, 999, 1000, 1001, 299_999, 300_000, 300_001, u64::MAX / 3, u64::MAX - 1, u64::MAX] {
                let d = b.delay(failures, random);
                assert!(d <= cap, "failures {failures}, random {random}: {d:?} > {cap:?}");
                assert_eq!(d.subsec_nanos() % 1_000_000, 0);
            }
        }
        // cap(3) = 4 s: random modulo 4001 ms.
        assert_eq!(b.delay(3, 0), Duration::ZERO);
        assert_eq!(b.delay(3, 4000), Duration::from_secs(4));
        assert_eq!(b.delay(3, 4001), Duration::ZERO);
        assert_eq!(b.delay(3, 1234), Duration::from_millis(1234));
        // Zero failures: no delay at all.
        assert_eq!(b.delay(0, u64::MAX), Duration::ZERO);
        assert_eq!(b.delay(0, 12_345), Duration::ZERO);
        // A cap under a millisecond gives no delay.
        let sub_ms = Backoff { base: Duration::from_micros(500), max: Duration::from_micros(900) };
        assert_eq!(sub_ms.delay(2, u64::MAX), Duration::ZERO);
        // A huge cap does not overflow.
        let huge = Backoff { base: Duration::MAX, max: Duration::MAX };
        assert_eq!(huge.delay(3, u64::MAX), Duration::from_millis(u64::MAX));
    }

    #[test]
    fn delay_covers_the_whole_range() {
        // Uniform randomness fills [0, cap]: both halves get hits.
        let b = Backoff { base: Duration::from_secs(1), max: Duration::from_secs(60) };
        let cap = b.cap(4); // 8 s
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let (mut low, mut high) = (0, 0);
        for _ in 0..1000 {
            // xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let d = b.delay(4, x);
            assert!(d <= cap);
            if d < cap / 2 {
                low += 1;
            } else {
                high += 1;
            }
        }
        assert!(low > 400 && high > 400, "{low} / {high}");
    }
}
