//! The state of every table of a cycle in two queries: each table's min
//! valid version, and whether any change waits past its cursor.
//!
//! Without it a cycle asks per table, and an idle table still pays for
//! planning and running a change read that finds nothing; with many idle
//! tables that is most of a cycle.

use super::catalog::schema_of;
use super::errors::pg_error;
use super::sql::{qualified, quote_ident, CT_SCHEMA, VERSION_COL};
use super::statements::Statements;
use crate::protocol::Version;
use crate::source::{OldestTransaction, SourceError, SourceTable, TableSurvey};
use std::collections::HashMap;
use tokio_postgres::Client;

pub(crate) async fn survey(
    client: &Client,
    stmts: &Statements,
    generations: &HashMap<SourceTable, String>,
    tables: &[(SourceTable, Option<Version>)],
    upper: Version,
) -> Result<Vec<TableSurvey>, SourceError> {
    const REGISTRY: &str = "SELECT u.i, r.table_oid, r.side_table, r.min_valid_version, r.generation::text
                              FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS u(schema_name, table_name, i)
                              JOIN pg_catalog.pg_namespace n ON n.nspname = u.schema_name
                              JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = u.table_name
                              JOIN ctmirror_ct.tracked r ON r.table_oid = c.oid";
    let doing = "surveying the tracked tables";
    let grant = "USAGE and SELECT on schema ctmirror_ct";
    let schemas: Vec<&str> = tables.iter().map(|(t, _)| schema_of(t)).collect();
    let names: Vec<&str> = tables.iter().map(|(t, _)| t.name.as_str()).collect();
    let statement = stmts.get(client, REGISTRY).await.map_err(|e| pg_error(e, doing, grant))?;
    let rows = client.query(&statement, &[&schemas, &names]).await.map_err(|e| pg_error(e, doing, grant))?;
    let mut found: Vec<Option<Registered>> = (0..tables.len()).map(|_| None).collect();
    for row in &rows {
        let get = |e| pg_error(e, doing, "");
        let i: i64 = row.try_get(0).map_err(get)?;
        let registered = Registered {
            oid: row.try_get(1).map_err(get)?,
            side: row.try_get(2).map_err(get)?,
            min_valid: row.try_get(3).map_err(get)?,
            generation: row.try_get(4).map_err(get)?,
        };
        // A lifetime other than the one the cycle enabled: the table's
        // own read finds out and reloads.
        let expected = generations.get(&tables[(i - 1) as usize].0);
        if expected.is_none_or(|g| *g == registered.generation) {
            found[(i - 1) as usize] = Some(registered);
        }
    }
    // For each table with a cursor, in one statement (one snapshot): its
    // min valid version and whether any change waits past the cursor. Read
    // apart, a retention cleanup committing between the two could delete
    // the changes after the cursor, and the table would look idle.
    let probes: Vec<String> = tables
        .iter()
        .zip(&found)
        .enumerate()
        .filter_map(|(i, ((_, after), reg))| {
            let reg = reg.as_ref()?;
            let after = (*after)?;
            Some(format!(
                "SELECT {i}, (SELECT r.min_valid_version FROM ctmirror_ct.tracked AS r WHERE r.table_oid = {}::oid), \
                        EXISTS (SELECT 1 FROM {} WHERE {v} > {} AND {v} <= {})",
                reg.oid,
                qualified(CT_SCHEMA, &reg.side),
                after.0,
                upper.0,
                v = quote_ident(VERSION_COL)
            ))
        })
        .collect();
    let mut pending = vec![true; tables.len()];
    if !probes.is_empty() {
        let rows = client.simple_query(&probes.join(" UNION ALL ")).await.map_err(|e| pg_error(e, doing, grant))?;
        for msg in rows {
            if let tokio_postgres::SimpleQueryMessage::Row(r) = msg {
                let i: usize = r.get(0).and_then(|v| v.parse().ok()).unwrap_or(usize::MAX);
                let Some(Some(reg)) = found.get_mut(i) else { continue };
                match r.get(1).and_then(|v| v.parse().ok()) {
                    Some(min_valid) => reg.min_valid = min_valid,
                    // Untracked since: the table's own read reports it.
                    None => {
                        found[i] = None;
                        continue;
                    }
                }
                pending[i] = r.get(2) != Some("f");
            }
        }
    }
    Ok(found
        .into_iter()
        .zip(pending)
        .map(|(reg, may_have_changes)| match reg {
            Some(reg) => TableSurvey { min_valid: Some(Version(reg.min_valid)), may_have_changes },
            None => TableSurvey::UNKNOWN,
        })
        .collect())
}

struct Registered {
    oid: u32,
    side: String,
    min_valid: i64,
    generation: String,
}

/// The oldest transaction holding back `pg_snapshot_xmin`: the running
/// transaction with the oldest transaction id, in any database of the
/// server, or a prepared transaction. Its database and pid show where the
/// role may see other sessions (`pg_read_all_stats`); its age is always
/// known for prepared transactions and the agent's own database.
pub(crate) async fn oldest_transaction(client: &Client) -> Result<Option<OldestTransaction>, SourceError> {
    let doing = "looking for the oldest running transaction";
    let row = client
        .query_opt(
            "SELECT age_secs, database, pid, state FROM (
                 SELECT pg_catalog.age(a.backend_xid) AS xid_age,
                        extract(epoch FROM pg_catalog.now() - a.xact_start)::float8 AS age_secs,
                        a.datname::text AS database, a.pid, a.state
                   FROM pg_catalog.pg_stat_activity a
                  WHERE a.backend_xid IS NOT NULL
                 UNION ALL
                 SELECT pg_catalog.age(p.transaction),
                        extract(epoch FROM pg_catalog.now() - p.prepared)::float8,
                        p.database::text, NULL::int, 'prepared as ' || p.gid
                   FROM pg_catalog.pg_prepared_xacts p) AS x
              ORDER BY xid_age DESC
              LIMIT 1",
            &[],
        )
        .await
        .map_err(|e| pg_error(e, doing, "pg_read_all_stats, to see other sessions"))?;
    let Some(row) = row else { return Ok(None) };
    let get = |e| pg_error(e, doing, "");
    Ok(Some(OldestTransaction {
        age_secs: row.try_get::<_, Option<f64>>(0).map_err(get)?.unwrap_or(0.0),
        database: row.try_get(1).map_err(get)?,
        pid: row.try_get(2).map_err(get)?,
        state: row.try_get(3).map_err(get)?,
    }))
}
