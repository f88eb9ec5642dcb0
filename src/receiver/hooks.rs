//! The ReplicationCompleted call: record the cycle's report, then run the
//! partner's completion hooks (ANALYZE, NOTIFY, extra SQL).
//!
//! The data of the cycle is already committed when this call arrives, so a
//! failing hook must not fail the call (the agent would only retry a cycle
//! that succeeded): it is logged and reported in the answer instead.

use super::error::ReceiverError;
use super::sql::{qualified, quote_ident};
use super::store;
use crate::config::HookConfig;
use crate::ids::TenantId;
use crate::protocol::{CompletedRequest, CompletedResponse, SyncMode, TableReport};

/// PostgreSQL refuses NOTIFY payloads of 8000 bytes or more.
const MAX_NOTIFY_PAYLOAD: usize = 7900;

pub async fn apply(
    client: &mut tokio_postgres::Client,
    hooks: &HookConfig,
    tenant: &TenantId,
    req: &CompletedRequest,
) -> Result<CompletedResponse, ReceiverError> {
    let completion_id = store::record_completion(&*client, tenant, req).await?;
    let mirror = tenant.mirror_schema();
    let mut done = Vec::new();

    let changed: Vec<&TableReport> = req.tables.iter().filter(|t| !t.counts.is_empty()).collect();
    if hooks.analyze && !changed.is_empty() {
        let estimates = row_estimates(&*client, &mirror).await?;
        for t in changed {
            let name = t.name.as_str();
            let Some(&estimate) = estimates.get(name) else {
                done.push(report(format!("analyze {}", quote_ident(name)), Err("no such mirror table".into())));
                continue;
            };
            if !worth_analyzing(t, estimate) {
                continue;
            }
            let r = client.batch_execute(&format!("ANALYZE {}", qualified(&mirror, name))).await;
            done.push(report(format!("analyze {}", quote_ident(name)), r.map_err(db_message)));
        }
    }

    if let Some(channel) = &hooks.notify_channel {
        let payload = summary(tenant, completion_id, req);
        let r = client.execute("SELECT pg_notify($1, $2)", &[channel, &payload]).await;
        done.push(report(format!("notify {channel}"), r.map(|_| ()).map_err(db_message)));
    }

    for (i, sql) in hooks.sql.iter().enumerate() {
        let r = run_sql_hook(client, &mirror, sql).await;
        done.push(report(format!("sql hook {}", i + 1), r.map_err(db_message)));
    }
    Ok(CompletedResponse { hooks: done })
}

/// How many rows must change in a cycle before the hook analyzes a table:
/// autovacuum's own defaults (`autovacuum_analyze_threshold` plus
/// `autovacuum_analyze_scale_factor` of the rows).
const ANALYZE_THRESHOLD: f64 = 50.0;
const ANALYZE_SHARE: f64 = 0.1;

/// After a full load (or reload) the table's statistics are wrong or absent
/// and partners query it at once: analyze. A table never analyzed: analyze.
/// A cycle of ordinary changes is analyzed only when it changed more than
/// autovacuum's threshold (50 rows and a tenth of the table); below that, ANALYZE (which samples 30,000 rows of a large
/// table, hundreds of milliseconds) would run every cycle for statistics
/// that barely move, and autovacuum covers the rest.
fn worth_analyzing(t: &TableReport, estimated_rows: f64) -> bool {
    let changed = (t.counts.inserted + t.counts.updated + t.counts.deleted) as f64;
    t.mode == SyncMode::Full || estimated_rows < 0.0 || changed > ANALYZE_THRESHOLD + ANALYZE_SHARE * estimated_rows
}

/// `pg_class.reltuples` of the schema's tables (-1 when never analyzed).
async fn row_estimates(
    client: &tokio_postgres::Client,
    schema: &str,
) -> Result<std::collections::HashMap<String, f64>, ReceiverError> {
    let rows = client
        .query(
            "SELECT c.relname::text, c.reltuples::float8 FROM pg_catalog.pg_class c
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relkind IN ('r', 'p')",
            &[&schema],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// One configured statement, in its own transaction with the tenant's
/// mirror schema first on the search path, so hooks can name tables plainly.
async fn run_sql_hook(
    client: &mut tokio_postgres::Client,
    mirror: &str,
    sql: &str,
) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.batch_execute(&format!("SET LOCAL search_path TO {}, public", quote_ident(mirror))).await?;
    tx.batch_execute(sql).await?;
    tx.commit().await
}

fn report(what: String, result: Result<(), String>) -> String {
    match result {
        Ok(()) => format!("{what}: ok"),
        Err(e) => {
            tracing::warn!(hook = %what, error = %e, "completion hook failed");
            format!("{what}: failed: {e}")
        }
    }
}

fn db_message(e: tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} [SQLSTATE {}]", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// The NOTIFY payload: totals and the changed tables, the list dropped if
/// it would not fit PostgreSQL's payload limit.
pub fn summary(tenant: &TenantId, completion_id: i64, req: &CompletedRequest) -> String {
    let mut total = crate::protocol::ChangeCounts::default();
    for t in &req.tables {
        total.add(t.counts);
    }
    let changed: Vec<&str> = req.changed_tables();
    let failed: Vec<&str> = req.tables.iter().filter(|t| t.error.is_some()).map(|t| t.name.as_str()).collect();
    let mut json = serde_json::json!({
        "tenant": tenant.as_str(),
        "completion_id": completion_id,
        "tables": req.tables.len(),
        "inserted": total.inserted,
        "updated": total.updated,
        "deleted": total.deleted,
        "changed": changed,
        "failed": failed,
    });
    let text = json.to_string();
    if text.len() <= MAX_NOTIFY_PAYLOAD {
        return text;
    }
    json["changed"] = serde_json::Value::Null;
    json["failed"] = serde_json::Value::Null;
    json["truncated"] = serde_json::Value::Bool(true);
    json.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ChangeCounts, SyncMode, TableReport};

    #[test]
    fn summary_stays_within_the_notify_limit() {
        let t = TenantId::new("acme").unwrap();
        let tables: Vec<TableReport> = (0..2000)
            .map(|i| TableReport {
                name: format!("table_number_{i}"),
                mode: SyncMode::Incremental,
                counts: ChangeCounts { inserted: 1, updated: 0, deleted: 0 },
                error: None,
            })
            .collect();
        let s = summary(&t, 1, &CompletedRequest { tables });
        assert!(s.len() < 8000);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["inserted"], 2000);
        assert_eq!(v["truncated"], true);
    }
}
