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
use crate::source::{SourceError, SourceTable, TableSurvey};
use tokio_postgres::Client;

pub(crate) async fn survey(
    client: &Client,
    stmts: &Statements,
    tables: &[(SourceTable, Option<Version>)],
    upper: Version,
) -> Result<Vec<TableSurvey>, SourceError> {
    const REGISTRY: &str = "SELECT u.i, r.side_table, r.min_valid_version
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
    let mut found: Vec<Option<(String, i64)>> = vec![None; tables.len()];
    for row in &rows {
        let i: i64 = row.try_get(0).map_err(|e| pg_error(e, doing, ""))?;
        found[(i - 1) as usize] = Some((row.try_get(1).map_err(|e| pg_error(e, doing, ""))?, row.try_get(2).map_err(|e| pg_error(e, doing, ""))?));
    }
    // One EXISTS per table with a cursor, in one statement.
    let probes: Vec<String> = tables
        .iter()
        .zip(&found)
        .enumerate()
        .filter_map(|(i, ((_, after), reg))| {
            let (side, _) = reg.as_ref()?;
            let after = (*after)?;
            Some(format!(
                "SELECT {i}, EXISTS (SELECT 1 FROM {} WHERE {v} > {} AND {v} <= {})",
                qualified(CT_SCHEMA, side),
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
                if let Some(p) = pending.get_mut(i) {
                    *p = r.get(1) != Some("f");
                }
            }
        }
    }
    Ok(found
        .into_iter()
        .zip(pending)
        .map(|(reg, may_have_changes)| match reg {
            Some((_, min_valid)) => TableSurvey { min_valid: Some(Version(min_valid)), may_have_changes },
            None => TableSurvey::UNKNOWN,
        })
        .collect())
}
