//! Verification: does a mirror equal its source projection?
//!
//! Compares, per mapped table, the row count and an MD5 over the sorted text
//! form of every row's mapped columns, computed inside each database. Both
//! sessions use the same text settings, so equal data gives equal text;
//! JSON is compared as `jsonb` because the mirror stores it that way. Used by
//! `ctmirror verify`, the demo and the tests. Works where the agent's host
//! can reach both databases. [`compare_postgres`] checksums inside both
//! PostgreSQL databases; [`compare_through_source`] reads any source
//! through the [`Source`] trait (SQL Server tenants).

use crate::ids::TenantId;
use crate::pgtext::{from_pg_text, quote_ident};
use crate::protocol::{ColumnType, Value};
use crate::schema_map::SchemaMap;
use crate::source::postgres::PostgresSource;
use crate::source::{ChunkLimits, Source, SourceTable};
use tokio_postgres::{Client, NoTls};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableComparison {
    pub table: String,
    pub source_rows: i64,
    pub mirror_rows: i64,
    pub source_md5: String,
    pub mirror_md5: String,
}

impl TableComparison {
    pub fn equal(&self) -> bool {
        self.source_rows == self.mirror_rows && self.source_md5 == self.mirror_md5
    }
}

#[derive(Debug, thiserror::Error)]
#[error("verify: {0}")]
pub struct VerifyError(String);

async fn connect(url: &str) -> Result<Client, VerifyError> {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|e| VerifyError(format!("cannot connect: {e}")))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
        .batch_execute(&crate::pgtext::session_set_sql())
        .await
        .map_err(|e| VerifyError(e.to_string()))?;
    Ok(client)
}

async fn checksum(c: &Client, table: &str, row_expr: &str) -> Result<(i64, String), VerifyError> {
    let sql = format!(
        "SELECT count(*), coalesce(md5(string_agg(r, E'\\n' ORDER BY r COLLATE \"C\")), '') \
         FROM (SELECT {row_expr} AS r FROM {table}) s"
    );
    let row = c.query_one(&sql, &[]).await.map_err(|e| VerifyError(format!("{table}: {e}")))?;
    Ok((row.get(0), row.get(1)))
}

/// Compares every table of `map` between a PostgreSQL source and the
/// receiver's database.
pub async fn compare_postgres(
    source_url: &str,
    mirror_url: &str,
    tenant: &TenantId,
    map: &SchemaMap,
) -> Result<Vec<TableComparison>, VerifyError> {
    let mut source = PostgresSource::connect(source_url, std::time::Duration::from_secs(3600))
        .await
        .map_err(|e| VerifyError(e.to_string()))?;
    let src = connect(source_url).await?;
    let dst = connect(mirror_url).await?;
    let mut out = Vec::new();
    for t in &map.tables {
        let table = SourceTable { schema: t.schema.clone(), name: t.table.clone() };
        let schema = source.read_schema(&table, &t.columns).await.map_err(|e| VerifyError(e.to_string()))?;
        let exprs: Vec<String> = schema
            .columns
            .iter()
            .map(|c| match c.column.data_type {
                ColumnType::Json => format!("{}::jsonb::text", quote_ident(&c.column.name)),
                _ => format!("{}::text", quote_ident(&c.column.name)),
            })
            .collect();
        let row_expr = format!("ROW({})::text", exprs.join(", "));
        let src_name = format!("{}.{}", quote_ident(t.schema.as_deref().unwrap_or("public")), quote_ident(&t.table));
        let dst_name = format!("{}.{}", quote_ident(&tenant.mirror_schema()), quote_ident(t.mirror_name()));
        let (source_rows, source_md5) = checksum(&src, &src_name, &row_expr).await?;
        let (mirror_rows, mirror_md5) = checksum(&dst, &dst_name, &row_expr).await?;
        out.push(TableComparison { table: t.mirror_name().to_owned(), source_rows, mirror_rows, source_md5, mirror_md5 });
    }
    Ok(out)
}

/// Rows per chunk when a source is read through the [`Source`] trait.
const VERIFY_CHUNK: ChunkLimits = ChunkLimits { max_rows: 5000, max_bytes: 8 << 20 };

/// An order-free digest of a multiset of rows: the wrapping sum of each
/// row's SHA-256 (first 16 bytes) over its canonical JSON. The source and
/// the mirror sort strings differently (SQL Server collations, PostgreSQL's
/// locale), so neither side's order can be used, and memory stays flat.
#[derive(Default)]
struct RowDigest {
    rows: i64,
    sum: u128,
}

impl RowDigest {
    fn add(&mut self, values: &[Value], types: &[ColumnType]) {
        use sha2::Digest;
        let canonical: Vec<serde_json::Value> = values
            .iter()
            .zip(types)
            .map(|(v, ty)| match (v, ty) {
                // JSON documents compare by content: the mirror's jsonb
                // reorders keys and whitespace.
                (Value::Text(s), ColumnType::Json) => {
                    serde_json::from_str(s).unwrap_or_else(|_| serde_json::Value::String(s.clone()))
                }
                _ => serde_json::to_value(v).unwrap_or(serde_json::Value::Null),
            })
            .collect();
        let bytes = serde_json::to_vec(&canonical).unwrap_or_default();
        let hash = sha2::Sha256::digest(&bytes);
        let mut first = [0u8; 16];
        first.copy_from_slice(&hash[..16]);
        self.sum = self.sum.wrapping_add(u128::from_be_bytes(first));
        self.rows += 1;
    }
    fn hex(&self) -> String {
        format!("{:032x}", self.sum)
    }
}

/// Compares every table of `map` by reading the source through the
/// [`Source`] trait (so it works for SQL Server tenants) and the mirror
/// through PostgreSQL, both decoded to wire values. Slower than
/// [`compare_postgres`], which checksums inside each database.
pub async fn compare_through_source<S: Source>(
    source: &mut S,
    mirror_url: &str,
    tenant: &TenantId,
    map: &SchemaMap,
) -> Result<Vec<TableComparison>, VerifyError> {
    use futures_util::TryStreamExt;
    let dst = connect(mirror_url).await?;
    let mut out = Vec::new();
    for t in &map.tables {
        let table = SourceTable { schema: t.schema.clone(), name: t.table.clone() };
        let schema = source.read_schema(&table, &t.columns).await.map_err(|e| VerifyError(e.to_string()))?;
        let types: Vec<ColumnType> = schema.columns.iter().map(|c| c.column.data_type.clone()).collect();

        let mut src = RowDigest::default();
        let mut after = None;
        loop {
            let rows =
                source.snapshot_chunk(&schema, after.as_ref(), VERIFY_CHUNK).await.map_err(|e| VerifyError(e.to_string()))?;
            let Some(last) = rows.last() else { break };
            after = Some(schema.key_of(last));
            for r in &rows {
                src.add(r, &types);
            }
        }

        let cols: Vec<String> = schema.columns.iter().map(|c| format!("{}::text", quote_ident(&c.column.name))).collect();
        let dst_name = format!("{}.{}", quote_ident(&tenant.mirror_schema()), quote_ident(t.mirror_name()));
        let sql = format!("SELECT {} FROM {dst_name}", cols.join(", "));
        let failed = |e: tokio_postgres::Error| VerifyError(format!("{dst_name}: {e}"));
        let stream = dst.query_raw(&sql, std::iter::empty::<&str>()).await.map_err(failed)?;
        futures_util::pin_mut!(stream);
        let mut mirror = RowDigest::default();
        while let Some(row) = stream.try_next().await.map_err(failed)? {
            let mut values = Vec::with_capacity(types.len());
            for (i, ty) in types.iter().enumerate() {
                let text: Option<&str> = row.get(i);
                values.push(from_pg_text(text, ty).map_err(|m| VerifyError(format!("{dst_name}: {m}")))?);
            }
            mirror.add(&values, &types);
        }
        out.push(TableComparison {
            table: t.mirror_name().to_owned(),
            source_rows: src.rows,
            mirror_rows: mirror.rows,
            source_md5: src.hex(),
            mirror_md5: mirror.hex(),
        });
    }
    Ok(out)
}
