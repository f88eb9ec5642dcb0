//! The Advance call: move many idle tables' cursors in one transaction.
//!
//! Each move follows the RowData rules for a batch without rows (same
//! schema, compare-and-set on `from`, a re-sent move is acknowledged), but
//! only within the change stream: the batch that ends a full load also
//! swaps a reloaded table in, and goes through RowData. A table whose move
//! is refused is answered with the reason; the others still move.

use super::error::{ErrorKind, ReceiverError};
use super::store;
use crate::ids::TenantId;
use crate::protocol::{Advance, AdvanceRequest, AdvanceResponse, AdvanceResult, Cursor};

/// More tables than any schema map holds; a larger request is refused.
const MAX_TABLES: usize = 10_000;

pub async fn apply(
    client: &mut tokio_postgres::Client,
    tenant: &TenantId,
    req: &AdvanceRequest,
) -> Result<AdvanceResponse, ReceiverError> {
    if req.tables.len() > MAX_TABLES {
        return Err(ReceiverError::bad_request(format!("at most {MAX_TABLES} tables per Advance call")));
    }
    let mut names: Vec<&str> = req.tables.iter().map(|a| a.table.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(ReceiverError::bad_request(format!("table {:?} appears twice", w[0])));
    }
    let tx = client.transaction().await?;
    // All the tenant's rows in one query, locked in name order as every
    // call that locks several does, so concurrent calls cannot deadlock.
    let rows: std::collections::HashMap<String, store::TableRow> =
        store::lock_all(&tx, tenant).await?.into_iter().map(|r| (r.name.clone(), r)).collect();
    let mut moves = Vec::new();
    let mut answers = Vec::with_capacity(req.tables.len());
    let mut moved = 0;
    for a in &req.tables {
        let held = rows.get(a.table.as_str()).and_then(|r| r.cursor.clone());
        let result = match rows.get(a.table.as_str()) {
            None => Err(ReceiverError::new(
                ErrorKind::UnknownTable,
                format!("table {:?} is not in the mirror; send its schema first", a.table),
            )),
            Some(row) => check(a, row),
        };
        let answer = match result {
            Ok(true) => {
                moves.push((a.table.as_str(), &a.to));
                moved += 1;
                AdvanceResult { table: a.table.clone(), cursor: Some(a.to.clone()), applied: true, error: None }
            }
            Ok(false) => AdvanceResult { table: a.table.clone(), cursor: held, applied: false, error: None },
            Err(e) => {
                let e = e.with_table(&a.table).with_cursor(held.clone());
                AdvanceResult { table: a.table.clone(), cursor: held, applied: false, error: Some(e.body().error) }
            }
        };
        answers.push(answer);
    }
    store::set_cursors(&tx, tenant, &moves).await?;
    tx.commit().await?;
    tracing::info!(tables = req.tables.len(), moved, "cursors advanced");
    Ok(AdvanceResponse { tables: answers })
}

/// `Ok(true)` to move, `Ok(false)` when already there.
fn check(a: &Advance, row: &store::TableRow) -> Result<bool, ReceiverError> {
    let table = &a.table;
    if !matches!(a.from, Cursor::Changes { .. }) || !matches!(a.to, Cursor::Changes { after_key: None, .. }) {
        return Err(ReceiverError::bad_request(format!(
            "table {table:?}: Advance moves within the change stream only (from {} to {})",
            a.from, a.to
        )));
    }
    if row.reloading {
        return Err(ReceiverError::new(
            ErrorKind::Conflict,
            format!("table {table:?} is reloading; its load ends through RowData"),
        ));
    }
    if row.schema_hash != a.schema_hash {
        return Err(ReceiverError::new(
            ErrorKind::SchemaMismatch,
            format!("table {table:?} has schema {}, not {}", row.schema_hash, a.schema_hash),
        ));
    }
    if row.cursor.as_ref() == Some(&a.to) {
        return Ok(false);
    }
    if row.cursor.as_ref() != Some(&a.from) {
        return Err(ReceiverError::new(
            ErrorKind::Conflict,
            format!(
                "table {table:?}: the move starts at {}, but the mirror holds {}",
                a.from,
                row.cursor.as_ref().map_or_else(|| "no cursor".to_owned(), Cursor::to_string)
            ),
        ));
    }
    Cursor::may_advance(Some(&a.from), &a.to)
        .map_err(|e| ReceiverError::bad_request(format!("table {table:?}: {e}")))?;
    Ok(true)
}
