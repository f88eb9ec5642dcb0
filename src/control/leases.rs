//! Who runs which pair: registration, claims, renewals and releases.
//!
//! # Why leases are rows, not advisory locks
//!
//! A lease is a row of `pairs` with an owner, an expiry and a fencing token,
//! taken by `SELECT … FOR UPDATE SKIP LOCKED` and held by renewing the
//! expiry. PostgreSQL advisory locks would look simpler but are tied to a
//! session: each running pair would pin a control-database connection for
//! the whole cycle; a dropped control connection silently frees the lock
//! while the cycle still runs, so another process starts the same pair (a
//! double run); and they are invisible to `ctmirror status`. A row with an
//! expiry survives connection blips (any pooled connection can renew it),
//! lets the lease timeout be configured, shows in status who runs what, and
//! its token — incremented by every claim — makes a process whose lease was
//! taken over unable to renew, finish or release it any more.
//!
//! A lease "matches" while owner and token are those of the claim, even past
//! its expiry: until another process claims the pair, the late owner is
//! still the only one that ran it.

use super::codec::{from_ts, key, key_arrays, ts};
use super::errors::pg;
use crate::schedule::store::{Claim, Lease, PairKey, PairRegistration, StoreResult};
use chrono::{DateTime, Utc};
use std::time::{Duration, SystemTime};
use tokio_postgres::Client;

/// Inserts unknown pairs (due at `first_due`) and updates the server of
/// known ones, in one statement; schedule state is never touched.
pub(crate) async fn register(client: &Client, pairs: &[PairRegistration]) -> StoreResult<()> {
    if pairs.is_empty() {
        return Ok(());
    }
    let tenants: Vec<&str> = pairs.iter().map(|p| p.key.tenant.as_str()).collect();
    let apps: Vec<&str> = pairs.iter().map(|p| p.key.app.as_str()).collect();
    let servers: Vec<&str> = pairs.iter().map(|p| p.server.as_str()).collect();
    let first_due: Vec<SystemTime> = pairs.iter().map(|p| ts(p.first_due)).collect();
    client
        .execute(
            // DISTINCT ON: a pair listed twice must not make ON CONFLICT
            // touch the same row twice.
            "INSERT INTO ctmirror_control.pairs AS p (tenant, app, server, next_due)
             SELECT DISTINCT ON (tenant, app) tenant, app, server, first_due
             FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[])
                  WITH ORDINALITY AS r(tenant, app, server, first_due, n)
             ORDER BY tenant, app, n DESC
             ON CONFLICT (tenant, app) DO UPDATE SET server = EXCLUDED.server
             WHERE p.server IS DISTINCT FROM EXCLUDED.server",
            &[&tenants, &apps, &servers, &first_due],
        )
        .await
        .map_err(pg)?;
    Ok(())
}

/// Leases up to `limit` due pairs among `among`, oldest due first, in one
/// statement (see the module docs). A run still marked running under the
/// previous owner — who stopped renewing — is closed as `lease_lost` in the
/// same statement, ended at its lease's expiry; it does not count as a
/// failure of the pair.
pub(crate) async fn claim(
    client: &Client,
    owner: &str,
    among: &[PairKey],
    now: DateTime<Utc>,
    lease_for: Duration,
    limit: usize,
    busy_servers: &[String],
) -> StoreResult<Vec<Claim>> {
    let (tenants, apps) = key_arrays(among);
    let now_ts = ts(now);
    let expires = now_ts + lease_for;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = client
        .query(
            "WITH due AS (
                 SELECT p.tenant, p.app, p.lease_owner AS old_owner,
                        p.lease_expires AS old_expires, p.current_run
                 FROM ctmirror_control.pairs p
                 JOIN unnest($2::text[], $3::text[]) AS w(tenant, app)
                   ON w.tenant = p.tenant AND w.app = p.app
                 WHERE p.next_due <= $4
                   AND (p.lease_owner IS NULL OR p.lease_expires <= $4)
                   AND p.server <> ALL($6::text[])
                 ORDER BY p.next_due, p.tenant, p.app
                 LIMIT $7
                 FOR UPDATE OF p SKIP LOCKED
             ), claimed AS (
                 UPDATE ctmirror_control.pairs p
                 SET lease_owner = $1, lease_token = p.lease_token + 1,
                     lease_expires = $5, current_run = NULL
                 FROM due
                 WHERE p.tenant = due.tenant AND p.app = due.app
                 RETURNING p.tenant, p.app, p.server, p.next_due, p.failures, p.lease_token
             ), closed AS (
                 UPDATE ctmirror_control.runs r
                 SET outcome = 'failed', error_kind = 'lease_lost',
                     error_message = 'agent process ' || due.old_owner || ' stopped renewing its lease',
                     ended = greatest(r.started, coalesce(due.old_expires, $4))
                 FROM due
                 WHERE r.id = due.current_run AND r.outcome = 'running'
                 RETURNING r.id
             )
             SELECT tenant, app, server, next_due, failures, lease_token FROM claimed
             ORDER BY next_due, tenant, app",
            &[&owner, &tenants, &apps, &now_ts, &expires, &busy_servers, &limit],
        )
        .await
        .map_err(pg)?;
    rows.into_iter()
        .map(|row| {
            let key = key(row.get(0), row.get(1))?;
            let failures: i32 = row.get(4);
            Ok(Claim {
                lease: Lease { key, owner: owner.to_owned(), token: row.get(5) },
                server: row.get(2),
                due: from_ts(row.get(3)),
                failures: u32::try_from(failures).unwrap_or(0),
            })
        })
        .collect()
}

/// The earliest instant a claim could take one of the keys: its due time,
/// or for a pair under a live lease, no sooner than the lease's expiry.
pub(crate) async fn next_due(
    client: &Client,
    among: &[PairKey],
    now: DateTime<Utc>,
) -> StoreResult<Option<DateTime<Utc>>> {
    let (tenants, apps) = key_arrays(among);
    let row = client
        .query_one(
            "SELECT min(CASE WHEN p.lease_owner IS NOT NULL AND p.lease_expires > $3
                             THEN greatest(p.next_due, p.lease_expires)
                             ELSE p.next_due END)
               FROM ctmirror_control.pairs p
               JOIN unnest($1::text[], $2::text[]) AS w(tenant, app)
                 ON w.tenant = p.tenant AND w.app = p.app",
            &[&tenants, &apps, &ts(now)],
        )
        .await
        .map_err(pg)?;
    Ok(row.get::<_, Option<SystemTime>>(0).map(from_ts))
}

/// Extends the lease to `now + lease_for` if it is still ours.
pub(crate) async fn renew(
    client: &Client,
    lease: &Lease,
    now: DateTime<Utc>,
    lease_for: Duration,
) -> StoreResult<bool> {
    let expires = ts(now) + lease_for;
    let n = client
        .execute(
            "UPDATE ctmirror_control.pairs SET lease_expires = $5
             WHERE tenant = $1 AND app = $2 AND lease_owner = $3 AND lease_token = $4",
            &[&lease.key.tenant.as_str(), &lease.key.app.as_str(), &lease.owner, &lease.token, &expires],
        )
        .await
        .map_err(pg)?;
    Ok(n == 1)
}

/// Gives the pair back, due at `next_due`, if the lease is still ours.
/// A run started under this lease and not finished (a caller's slip) is
/// closed as interrupted; we are not told when it stopped, so it ends when
/// it started.
pub(crate) async fn release(client: &Client, lease: &Lease, next_due: DateTime<Utc>) -> StoreResult<()> {
    client
        .execute(
            "WITH mine AS (
                 SELECT tenant, app, current_run FROM ctmirror_control.pairs
                 WHERE tenant = $1 AND app = $2 AND lease_owner = $3::text AND lease_token = $4
                 FOR UPDATE
             ), released AS (
                 UPDATE ctmirror_control.pairs p
                 SET lease_owner = NULL, lease_expires = NULL, current_run = NULL, next_due = $5
                 FROM mine WHERE p.tenant = mine.tenant AND p.app = mine.app
                 RETURNING 1
             ), closed AS (
                 UPDATE ctmirror_control.runs r
                 SET outcome = 'interrupted', error_kind = 'released',
                     error_message = 'released by ' || $3::text || ' without finishing', ended = r.started
                 FROM mine WHERE r.id = mine.current_run AND r.outcome = 'running'
                 RETURNING 1
             )
             SELECT (SELECT count(*) FROM released), (SELECT count(*) FROM closed)",
            &[&lease.key.tenant.as_str(), &lease.key.app.as_str(), &lease.owner, &lease.token, &ts(next_due)],
        )
        .await
        .map_err(pg)?;
    Ok(())
}
