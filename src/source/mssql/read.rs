//! Reading chunks: keyset snapshot pages and net-change pages, each in one
//! SNAPSHOT transaction, streamed row by row so a chunk of wide rows stops
//! at its byte bound instead of filling memory.

use super::catalog::ms_column;
use super::client::{Flow, MsClient, SqlParam, SqlValue};
use super::decode::{decode, key_param};
use super::sql::{self, display, qualified, MsColumn};
use crate::protocol::{Key, Value, Version};
use crate::source::{
    ChangePosition, ChangeRow, ChunkLimits, RowOp, SourceError, SourceErrorKind, SourceSchema,
};

struct Plan {
    shown: String,
    columns: Vec<MsColumn>,
    key_positions: Vec<usize>,
}

impl Plan {
    fn new(schema: &SourceSchema) -> Plan {
        Plan {
            shown: display(&schema.table),
            columns: schema.columns.iter().map(ms_column).collect(),
            key_positions: schema.key_positions(),
        }
    }
    fn keys(&self) -> Vec<&MsColumn> {
        self.key_positions.iter().map(|&i| &self.columns[i]).collect()
    }
    fn all(&self) -> Vec<&MsColumn> {
        self.columns.iter().collect()
    }
    fn key_params(&self, key: &Key) -> Result<Vec<SqlParam>, SourceError> {
        let keys = self.keys();
        if key.0.len() != keys.len() {
            return Err(SourceError::new(
                SourceErrorKind::Fatal,
                format!("a cursor key of table {} has {} values for {} key columns", self.shown, key.0.len(), keys.len()),
            ));
        }
        key.0
            .iter()
            .zip(keys)
            .map(|(v, c)| {
                key_param(v, &c.ty.protocol).map_err(|m| {
                    SourceError::new(SourceErrorKind::Fatal, format!("cursor key of table {}: {m}", self.shown))
                })
            })
            .collect()
    }
    /// Decodes `cells` as `columns`, naming column and key on failure.
    fn decode_all(&self, cells: impl Iterator<Item = SqlValue>, columns: &[&MsColumn]) -> Result<Vec<Value>, String> {
        cells
            .zip(columns)
            .map(|(cell, c)| decode(cell, &c.ty.protocol).map_err(|m| format!("column {}: {m}", c.name)))
            .collect()
    }
    fn data_error(&self, m: String, key: Option<&Key>) -> SourceError {
        let at = key.map(|k| format!(" (key {k})")).unwrap_or_default();
        SourceError::new(SourceErrorKind::Data, format!("table {}{at}: {m}", self.shown))
    }
}

/// Rows in primary-key order strictly after `after`, values in schema order.
pub async fn snapshot_chunk(
    client: &mut MsClient,
    schema: &SourceSchema,
    after: Option<&Key>,
    limits: ChunkLimits,
) -> Result<Vec<Vec<Value>>, SourceError> {
    let plan = Plan::new(schema);
    let mut params = match after {
        Some(k) => plan.key_params(k)?,
        None => Vec::new(),
    };
    params.push(SqlParam::Int(limits.max_rows.max(1) as i64));
    let text = sql::snapshot_chunk(&schema.table, &plan.all(), &plan.keys(), after.is_some());
    let doing = format!("reading a snapshot chunk of table {}", plan.shown);
    let grant = format!("SELECT on table {}", plan.shown);

    let all = plan.all();
    let mut rows = Vec::new();
    let mut bytes = 0usize;
    let mut tx = client.snapshot_transaction(&doing).await?;
    tx.client()
        .query_each(&text, &params, &doing, &grant, |cells| {
            let values = plan.decode_all(cells.into_iter(), &all).map_err(|m| plan.data_error(m, None))?;
            bytes += values.iter().map(Value::wire_size).sum::<usize>();
            rows.push(values);
            Ok(if bytes >= limits.max_bytes { Flow::Stop } else { Flow::Continue })
        })
        .await?;
    tx.commit().await?;
    Ok(rows)
}

/// Net changes after `after` up to `upper`, ordered by (version, key).
pub async fn changes_chunk(
    client: &mut MsClient,
    schema: &SourceSchema,
    after: &ChangePosition,
    upper: Version,
    limits: ChunkLimits,
) -> Result<Vec<ChangeRow>, SourceError> {
    let plan = Plan::new(schema);
    // CHANGETABLE returns changes after its baseline. A cursor inside
    // version v has consumed part of v, so the baseline is v - 1.
    let baseline = match after.after_key {
        Some(_) => after.version.0 - 1,
        None => after.version.0,
    };
    let mut params = vec![SqlParam::Int(baseline), SqlParam::Int(upper.0)];
    if let Some(k) = &after.after_key {
        params.push(SqlParam::Int(after.version.0));
        params.extend(plan.key_params(k)?);
    }
    params.push(SqlParam::Int(limits.max_rows.max(1) as i64));
    let keys = plan.keys();
    let text = sql::changes_chunk(&schema.table, &plan.all(), &keys, after.after_key.is_some());
    let doing = format!("reading changes of table {}", plan.shown);
    let grant = format!("SELECT and VIEW CHANGE TRACKING on table {}", plan.shown);

    let mut tx = client.snapshot_transaction(&doing).await?;
    // Checked inside the snapshot, as Microsoft advises: cleanup between
    // the agent's check and this read would otherwise go unnoticed.
    let min_valid = tx
        .client()
        .query(sql::MIN_VALID_VERSION, &[SqlParam::Text(qualified(&schema.table))], &doing, &grant)
        .await?;
    match min_valid.first().and_then(|r| r.first()) {
        Some(SqlValue::Int(min)) if baseline >= *min => {}
        Some(SqlValue::Int(min)) => {
            return Err(SourceError::new(
                SourceErrorKind::Expired,
                format!(
                    "the changes of table {} after version {baseline} were cleaned up (min valid version {min}); \
                     the table needs a full reload",
                    plan.shown
                ),
            ))
        }
        _ => return Err(SourceError::config(format!("change tracking is not enabled on table {}", plan.shown))),
    }

    let n_keys = keys.len();
    let all = plan.all();
    let mut rows = Vec::new();
    let mut bytes = 0usize;
    tx.client()
        .query_each(&text, &params, &doing, &grant, |cells| {
            let mut it = cells.into_iter();
            let version = match it.next() {
                Some(SqlValue::Int(v)) => Version(v),
                other => return Err(plan.data_error(format!("unexpected change version {other:?}"), None)),
            };
            let deleted = matches!(it.next(), Some(SqlValue::Text(op)) if op == "D");
            let present = matches!(it.next(), Some(SqlValue::Int(1)));
            let key = Key(plan.decode_all(it.by_ref().take(n_keys), &keys).map_err(|m| plan.data_error(m, None))?);
            let op = if present && !deleted {
                RowOp::Upsert(plan.decode_all(it, &all).map_err(|m| plan.data_error(m, Some(&key)))?)
            } else {
                RowOp::Delete
            };
            let change = ChangeRow { version, key, op };
            bytes += change.wire_size();
            rows.push(change);
            Ok(if bytes >= limits.max_bytes { Flow::Stop } else { Flow::Continue })
        })
        .await?;
    tx.commit().await?;
    Ok(rows)
}
