//! Per-tenant concurrency caps: each tenant may have a few requests in
//! flight, so one tenant (or one misbehaving agent) cannot take every
//! database connection of the receiver from the others.

use crate::ids::TenantId;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct TenantSlots {
    per_tenant: usize,
    /// One semaphore per tenant seen. Entries are made only after a token
    /// verified, so only the agent's own tenants ever get one.
    tenants: Mutex<HashMap<TenantId, Arc<Semaphore>>>,
}

impl TenantSlots {
    pub fn new(per_tenant: usize) -> Self {
        Self { per_tenant, tenants: Mutex::default() }
    }

    /// A slot for one request of `tenant`, or `None` when all are taken.
    /// Never waits: a request beyond the cap is answered 429 at once rather
    /// than queued while holding its connection and body in memory.
    pub fn try_acquire(&self, tenant: &TenantId) -> Option<OwnedSemaphorePermit> {
        let semaphore = {
            let mut tenants = self.tenants.lock().expect("tenant slots lock");
            tenants.entry(tenant.clone()).or_insert_with(|| Arc::new(Semaphore::new(self.per_tenant))).clone()
        };
        semaphore.try_acquire_owned().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_tenant_has_its_own_cap() {
        let slots = TenantSlots::new(2);
        let a = TenantId::new("a").unwrap();
        let b = TenantId::new("b").unwrap();
        let first = slots.try_acquire(&a).unwrap();
        let _second = slots.try_acquire(&a).unwrap();
        assert!(slots.try_acquire(&a).is_none(), "a third request of a is refused");
        assert!(slots.try_acquire(&b).is_some(), "b is not affected by a");
        drop(first);
        assert!(slots.try_acquire(&a).is_some(), "a slot is free again when a request ends");
    }
}
