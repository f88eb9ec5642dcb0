//! Replay protection: the nonces of accepted tokens, remembered for as long
//! as their tokens could still pass the clock check.
//!
//! A token is valid from `ts - skew` to `ts + skew` on this receiver's clock,
//! so its nonce is kept until `ts + skew` and then forgotten: by then the
//! clock check refuses the token anyway. Memory is bounded by a fixed number
//! of entries. When the cache is full the receiver answers 503 instead of
//! evicting a live nonce, because an evicted nonce could be replayed; a full
//! cache means far more requests than any agent sends (the default holds a
//! ten-minute window at more than 300 requests a second).
//!
//! The cache is per process. Receivers behind a load balancer each keep
//! their own, so a token captured on the way to one instance could be
//! replayed to another within the window; docs/security.md says why that
//! replay still cannot write anything (batches are compare-and-set on the
//! cursor, and TLS keeps tokens from being captured in the first place).

use crate::auth::{nonce_bytes, AuthError, Claims, NONCE_BYTES};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Mutex;

type Nonce = [u8; NONCE_BYTES];

/// Why a token's nonce was not admitted.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The token (or its nonce) was seen before.
    Replayed(AuthError),
    /// The nonce is not a nonce.
    Malformed(AuthError),
    /// Too many live nonces to remember one more.
    Full,
}

pub struct ReplayGuard {
    capacity: usize,
    max_skew_secs: i64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Live nonce → the second after which it may be forgotten.
    live: HashMap<Nonce, i64>,
    /// The same entries ordered by expiry, earliest first.
    expiry: BinaryHeap<Reverse<(i64, Nonce)>>,
}

impl ReplayGuard {
    pub fn new(capacity: usize, max_skew_secs: i64) -> Self {
        Self { capacity, max_skew_secs, state: Mutex::default() }
    }

    /// Records the nonce of a token that passed every other check; refuses
    /// it if it is already recorded. Call only after the signature has been
    /// verified, or anyone could fill the cache with made-up nonces.
    pub fn admit(&self, claims: &Claims, now: i64) -> Result<(), Refusal> {
        let nonce = nonce_bytes(&claims.nonce).map_err(Refusal::Malformed)?;
        let forget_after = claims.ts.saturating_add(self.max_skew_secs);
        let mut state = self.state.lock().expect("replay cache lock");
        state.forget_expired(now);
        if state.live.contains_key(&nonce) {
            return Err(Refusal::Replayed(AuthError::Replayed));
        }
        if state.live.len() >= self.capacity {
            return Err(Refusal::Full);
        }
        state.live.insert(nonce, forget_after);
        state.expiry.push(Reverse((forget_after, nonce)));
        Ok(())
    }

    /// Nonces remembered right now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.state.lock().expect("replay cache lock").live.len()
    }
}

impl State {
    fn forget_expired(&mut self, now: i64) {
        while let Some(Reverse((at, nonce))) = self.expiry.peek().copied() {
            if at >= now {
                break;
            }
            self.expiry.pop();
            self.live.remove(&nonce);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{new_nonce, Role};
    use crate::ids::{AppId, TenantId};

    fn claims(ts: i64) -> Claims {
        Claims {
            role: Role::Agent,
            tenant: TenantId::new("acme").unwrap(),
            app: AppId::new("crm").unwrap(),
            ts,
            nonce: new_nonce(),
            method: "POST".into(),
            path: "/v1/tenants/acme/rows".into(),
            body_sha256: String::new(),
            status: None,
        }
    }

    #[test]
    fn a_nonce_is_admitted_once() {
        let g = ReplayGuard::new(1000, 300);
        let c = claims(1000);
        assert_eq!(g.admit(&c, 1000), Ok(()));
        assert_eq!(g.admit(&c, 1001), Err(Refusal::Replayed(AuthError::Replayed)));
        let mut other_body = c.clone();
        other_body.body_sha256 = "other".into();
        assert!(matches!(g.admit(&other_body, 1001), Err(Refusal::Replayed(_))), "the nonce alone decides");
    }

    #[test]
    fn nonces_are_forgotten_once_their_token_is_out_of_the_window() {
        let g = ReplayGuard::new(1000, 300);
        let c = claims(1000);
        g.admit(&c, 1000).unwrap();
        assert!(g.admit(&c, 1300).is_err(), "still inside the window at ts + skew");
        for i in 0..10 {
            g.admit(&claims(1400 + i), 1301).unwrap();
        }
        assert_eq!(g.len(), 10, "the first nonce expired at ts + skew");
    }

    #[test]
    fn a_full_cache_refuses_instead_of_forgetting_live_nonces() {
        let g = ReplayGuard::new(3, 300);
        let first = claims(1000);
        g.admit(&first, 1000).unwrap();
        g.admit(&claims(1000), 1000).unwrap();
        g.admit(&claims(1000), 1000).unwrap();
        assert_eq!(g.admit(&claims(1000), 1000), Err(Refusal::Full));
        assert!(matches!(g.admit(&first, 1000), Err(Refusal::Replayed(_))));
        assert_eq!(g.admit(&claims(1400), 1301), Ok(()), "room again once the window passed");
    }

    #[test]
    fn memory_stays_bounded_under_a_long_stream_of_requests() {
        let g = ReplayGuard::new(1000, 300);
        for second in 0..20_000i64 {
            g.admit(&claims(second), second).unwrap();
        }
        assert!(g.len() <= 302, "{} nonces kept", g.len());
    }

    #[test]
    fn a_malformed_nonce_is_refused_not_stored() {
        let g = ReplayGuard::new(1000, 300);
        let mut c = claims(1000);
        c.nonce = "x".into();
        assert!(matches!(g.admit(&c, 1000), Err(Refusal::Malformed(_))));
        assert_eq!(g.len(), 0);
    }
}
