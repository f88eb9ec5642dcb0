//! Rate limits shared by every cycle of one agent process (governor).
//!
//! A partner's receiver gets at most so many requests and bytes per second
//! from us, however many of its tenants run at once; a source database server
//! gives at most so many rows per second to all the cycles reading from it,
//! so a busy server hosting many tenants is not crushed. Limits are per
//! process: with several agent processes the effective limit is the sum.

use governor::{DefaultDirectRateLimiter, Quota};
use std::num::NonZeroU32;
use std::sync::Arc;

/// A token bucket refilled at `per_second`, holding one second's worth.
#[derive(Clone)]
pub struct RateLimit {
    limiter: Arc<DefaultDirectRateLimiter>,
    burst: u32,
}

impl RateLimit {
    /// None when `per_second` is 0 (unlimited).
    pub fn per_second(per_second: u32) -> Option<Self> {
        let rate = NonZeroU32::new(per_second)?;
        let limiter = Arc::new(DefaultDirectRateLimiter::direct(Quota::per_second(rate)));
        Some(Self { limiter, burst: per_second })
    }

    /// Waits until `n` units may pass. Amounts larger than the bucket (one
    /// second's worth) pass in bucket-sized steps instead of failing.
    pub async fn take(&self, n: u64) {
        let mut left = n;
        while left > 0 {
            let step = left.min(u64::from(self.burst)) as u32;
            let step = NonZeroU32::new(step).expect("step is positive");
            if self.limiter.until_n_ready(step).await.is_err() {
                // Cannot happen (step <= burst); never spin if it does.
                return;
            }
            left -= u64::from(step.get());
        }
    }
}

/// A partner's limits, applied before every request to its receiver.
#[derive(Clone, Default)]
pub struct PartnerLimits {
    pub requests: Option<RateLimit>,
    pub bytes: Option<RateLimit>,
}

impl PartnerLimits {
    pub async fn before_request(&self, body_len: usize) {
        if let Some(r) = &self.requests {
            r.take(1).await;
        }
        if let Some(b) = &self.bytes {
            b.take(body_len as u64).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn zero_means_unlimited() {
        assert!(RateLimit::per_second(0).is_none());
    }

    #[tokio::test]
    async fn amounts_beyond_one_second_pass_in_steps_at_the_rate() {
        let limit = RateLimit::per_second(1000).unwrap();
        let started = Instant::now();
        // The first 1000 pass from the full bucket, the next 1500 take about
        // 1.5 s to refill.
        limit.take(2500).await;
        let took = started.elapsed().as_secs_f64();
        assert!(took >= 1.3, "took {took}s");
    }
}
