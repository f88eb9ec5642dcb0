//! Verification: does a mirror equal its source projection?
//!
//! Compares, per mapped table, the row count and an MD5 over the sorted text
//! form of every row's mapped columns, computed inside each database. Both
//! sessions use the same text settings, so equal data gives equal text;
//! JSON is compared as `jsonb` because the mirror stores it that way. Used by
//! `ctmirror verify`, the demo and the tests. Works where the agent's host
//! can reach both databases (PostgreSQL sources).

use crate::ids::TenantId;
use crate::pgtext::quote_ident;
use crate::protocol::ColumnType;
use crate::schema_map::SchemaMap;
use crate::source::postgres::PostgresSource;
use crate::source::{Source, SourceTable};
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
