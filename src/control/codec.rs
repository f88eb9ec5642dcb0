//! Conversions between the store's Rust types and control-database columns.
//!
//! tokio-postgres is built without its chrono integration, so times travel
//! as [`SystemTime`] (timestamptz, microsecond precision); cursors travel as
//! JSON text cast to jsonb, the same encoding the receiver uses; counters are
//! `u64` in Rust and `bigint` in PostgreSQL.

use super::errors::corrupt;
use crate::ids::{AppId, TenantId};
use crate::protocol::Cursor;
use crate::schedule::store::{PairKey, StoreError};
use chrono::{DateTime, Utc};
use std::time::SystemTime;

pub(crate) fn ts(t: DateTime<Utc>) -> SystemTime {
    SystemTime::from(t)
}

pub(crate) fn from_ts(t: SystemTime) -> DateTime<Utc> {
    DateTime::<Utc>::from(t)
}

pub(crate) fn opt_ts(t: Option<SystemTime>) -> Option<DateTime<Utc>> {
    t.map(from_ts)
}

/// Counters beyond `i64::MAX` cannot happen in practice; saturate rather
/// than fail a finish over it.
pub(crate) fn big(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Negative counts are impossible unless edited by hand: read them as 0.
pub(crate) fn count(n: Option<i64>) -> u64 {
    n.map_or(0, |n| u64::try_from(n).unwrap_or(0))
}

pub(crate) fn cursor_json(c: &Option<Cursor>) -> Option<String> {
    c.as_ref().map(|c| serde_json::to_string(c).expect("a cursor always serializes"))
}

pub(crate) fn parse_cursor(json: Option<String>, whose: &str) -> Result<Option<Cursor>, StoreError> {
    json.map(|j| serde_json::from_str(&j).map_err(|e| corrupt(format!("cursor of {whose}: {e}: {j}")))).transpose()
}

pub(crate) fn key(tenant: String, app: String) -> Result<PairKey, StoreError> {
    Ok(PairKey { tenant: TenantId::new(tenant).map_err(corrupt)?, app: AppId::new(app).map_err(corrupt)? })
}

/// The keys as two parallel arrays, joined in SQL with
/// `unnest($1::text[], $2::text[])`: the key list never becomes SQL text.
pub(crate) fn key_arrays(keys: &[PairKey]) -> (Vec<&str>, Vec<&str>) {
    keys.iter().map(|k| (k.tenant.as_str(), k.app.as_str())).unzip()
}
