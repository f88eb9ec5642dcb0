//! Chunks read with `COPY (SELECT …) TO STDOUT (FORMAT binary)`, ready for
//! the wire.
//!
//! The query casts every mapped column to its mirror column's base type
//! ([`ColumnType::postgres_base_type`]), so the server's binary output is
//! exactly what the receiver's `COPY … FROM STDIN (FORMAT binary)` takes:
//! the agent forwards each row's bytes without decoding a value. Each row
//! also carries its key as text at the end, which the agent reads (for the
//! cursor) and strips before the row goes on the wire.
//!
//! COPY takes no parameters, so the cursor's key and versions are written
//! into the statement as literals ([`quote_literal`]), checked against the
//! key's types first. A chunk stops at the row bound (`LIMIT`) or the byte
//! bound; the `LIMIT` is sized from the rows seen so far so that the
//! server rarely produces rows past the byte bound, and any it does are
//! discarded as they arrive, never buffered.

use super::catalog::{display, schema_of};
use super::errors::pg_error;
use super::read::{guard_sql, key_texts, text_exprs, SideJoin};
use super::sql::{column_list, qualified, quote_ident, quote_literal, DELETED_COL};
use super::tracking::tracked;
use crate::pgtext::from_pg_text;
use crate::protocol::copy::{CopyFormat, Layout, TupleReader, BINARY_HEADER};
use crate::protocol::{Key, Version};
use crate::source::{ChangePosition, ChunkLimits, CopyChunk, SourceColumn, SourceError, SourceErrorKind, SourceSchema};
use futures_util::StreamExt;
use tokio_postgres::Client;

/// Rows in a table's first chunk at most, before any row width is known
/// (rows may be megabytes wide).
const FIRST_LIMIT: usize = 256;

/// Remembers the average row width per table across chunks, to size the
/// next chunk's `LIMIT`.
#[derive(Debug, Default)]
pub(crate) struct RowWidths(std::collections::HashMap<String, usize>);

impl RowWidths {
    fn limit(&self, table: &str, limits: ChunkLimits) -> usize {
        let max_rows = limits.max_rows.max(1);
        match self.0.get(table) {
            // A little over the estimate: most chunks then end at the byte
            // bound with few rows to discard, rather than one row short.
            Some(&w) => (limits.max_bytes / w.max(1) + limits.max_bytes / w.max(1) / 16 + 1).clamp(1, max_rows),
            None => FIRST_LIMIT.min(max_rows),
        }
    }

    fn record(&mut self, table: &str, chunk: &CopyChunk) {
        if chunk.rows > 0 {
            self.0.insert(table.to_owned(), (chunk.payload.len() / chunk.rows as usize).max(1));
        }
    }
}

pub(crate) async fn snapshot_copy(
    client: &mut Client,
    widths: &mut RowWidths,
    schema: &SourceSchema,
    after: Option<&Key>,
    limits: ChunkLimits,
) -> Result<CopyChunk, SourceError> {
    let shown = display(&schema.table);
    let doing = format!("reading a snapshot chunk of table {shown}");
    let grant = format!("SELECT on table {shown}");
    let key_cols = schema.key_columns();
    let after_texts = match after {
        Some(k) => Some(key_texts(&shown, &key_cols, k)?),
        None => None,
    };
    let limit = widths.limit(&shown, limits);
    // One statement with its own snapshot: no transaction needed.
    let sql = snapshot_sql(schema, &key_cols, after_texts.as_deref(), limit);
    let stream = client.copy_out(&sql).await.map_err(|e| pg_error(e, &doing, &grant))?;
    let chunk = read_chunk(stream, schema, Layout::Rows, limits, (&doing, &grant)).await?;
    widths.record(&shown, &chunk);
    Ok(chunk)
}

#[allow(clippy::too_many_arguments)] // the read's parts, each borrowed from the source
pub(crate) async fn changes_copy(
    client: &mut Client,
    stmts: &super::statements::Statements,
    widths: &mut RowWidths,
    schema: &SourceSchema,
    expected: Option<&str>,
    after: &ChangePosition,
    upper: Version,
    limits: ChunkLimits,
) -> Result<CopyChunk, SourceError> {
    let shown = display(&schema.table);
    let doing = format!("reading changes of table {shown}");
    let grant = format!("SELECT on table {shown}, USAGE on schema ctmirror_ct and SELECT on its tables");
    let key_cols = schema.key_columns();
    let after_texts = match &after.after_key {
        Some(k) => Some(key_texts(&shown, &key_cols, k)?),
        None => None,
    };
    let limit = widths.limit(&format!("{shown} changes"), limits);
    // One statement, so no transaction: the side table a table's registry
    // names changes only when tracking is reinstalled, which the statement's
    // guard notices (and the table reloads).
    let registry = tracked(&*client, stmts, &schema.table).await?;
    let guard = guard_sql(&registry, expected, after);
    let sql = changes_sql(
        schema,
        &key_cols,
        &registry.side_table,
        after.version,
        after_texts.as_deref(),
        upper,
        limit,
        &guard,
    );
    let stream = client.copy_out(&sql).await.map_err(|e| pg_error(e, &doing, &grant))?;
    let chunk = read_chunk(stream, schema, Layout::Changes, limits, (&doing, &grant)).await?;
    widths.record(&format!("{shown} changes"), &chunk);
    Ok(chunk)
}

/// Each mapped column cast to its mirror base type; key columns come from
/// `key_alias` (the side table, for changes: its key is there even when the
/// row is gone).
fn wire_exprs(schema: &SourceSchema, key_alias: &str) -> String {
    schema
        .columns
        .iter()
        .map(|c| {
            let alias = if schema.primary_key.contains(&c.column.name) { key_alias } else { "t" };
            format!("{alias}.{}::{}", quote_ident(&c.column.name), c.column.data_type.postgres_base_type())
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `'text'::text::<type>, …` for a cursor key: the literal is cast to the
/// column's own type so comparisons use its operators and collation.
fn key_literals(key_cols: &[&SourceColumn], texts: &[Option<String>]) -> String {
    key_cols
        .iter()
        .zip(texts)
        .map(|(c, t)| format!("{}::text::{}", quote_literal(t.as_deref().unwrap_or_default()), c.native_type))
        .collect::<Vec<_>>()
        .join(", ")
}

fn snapshot_sql(
    schema: &SourceSchema,
    key_cols: &[&SourceColumn],
    after: Option<&[Option<String>]>,
    limit: usize,
) -> String {
    let table = qualified(schema_of(&schema.table), &schema.table.name);
    let key_names: Vec<String> = key_cols.iter().map(|c| c.column.name.clone()).collect();
    let keys = column_list(Some("t"), &key_names);
    let filter = match after {
        Some(texts) => format!(" WHERE ({keys}) > ({})", key_literals(key_cols, texts)),
        None => String::new(),
    };
    format!(
        "COPY (SELECT {}, {} FROM {table} AS t{filter} ORDER BY {keys} LIMIT {limit}) TO STDOUT (FORMAT binary)",
        wire_exprs(schema, "t"),
        text_exprs("t", key_cols),
    )
}

#[allow(clippy::too_many_arguments)] // one statement's text from its parts
fn changes_sql(
    schema: &SourceSchema,
    key_cols: &[&SourceColumn],
    side_table: &str,
    after_version: Version,
    after_key: Option<&[Option<String>]>,
    upper: Version,
    limit: usize,
    guard: &str,
) -> String {
    let SideJoin { table, side, version, key_names, side_keys, join } = SideJoin::new(schema, key_cols, side_table);
    let lower = match after_key {
        Some(texts) => format!("({version}, {side_keys}) > ({}::bigint, {})", after_version.0, key_literals(key_cols, texts)),
        None => format!("{version} > {}::bigint", after_version.0),
    };
    // As in `read::changes_sql`: the LIMIT sits on the side table's
    // (version, key) range scan, and the live table is probed by key for
    // those rows only.
    format!(
        "COPY (SELECT {version}, s.{deleted} OR t.{first} IS NULL, {}, {} \
                 FROM (SELECT * FROM {side} AS s \
                        WHERE {lower} AND {version} <= {}::bigint \
                        ORDER BY {version}, {side_keys} LIMIT {limit}) AS s \
                 LEFT JOIN {table} AS t ON {join} \
                WHERE {guard} \
                ORDER BY {version}, {side_keys}) TO STDOUT (FORMAT binary)",
        wire_exprs(schema, "s"),
        text_exprs("s", key_cols),
        upper.0,
        deleted = quote_ident(DELETED_COL),
        first = quote_ident(&key_names[0]),
    )
}

/// Runs the COPY and turns its tuples into a chunk: each row's wire fields
/// are copied out, its trailing key texts kept for the cursor.
async fn read_chunk(
    stream: tokio_postgres::CopyOutStream,
    schema: &SourceSchema,
    layout: Layout,
    limits: ChunkLimits,
    (doing, grant): (&str, &str),
) -> Result<CopyChunk, SourceError> {
    futures_util::pin_mut!(stream);
    let mut splitter = Splitter::new(schema, layout, limits);
    while let Some(data) = stream.next().await {
        let data = data.map_err(|e| pg_error(e, doing, grant))?;
        if splitter.feed(&data).map_err(|e| protocol_error(doing, e))? {
            // Bound reached: the rest of the stream is discarded as it
            // arrives (dropping it lets the connection skip it).
            break;
        }
    }
    splitter.finish(schema).map_err(|e| protocol_error(doing, e))
}

fn protocol_error(doing: &str, e: String) -> SourceError {
    SourceError::new(SourceErrorKind::Fatal, format!("{doing}: unexpected COPY output: {e}"))
}

/// Splits binary COPY output into rows, keeping the wire part of each.
struct Splitter {
    /// Fields per row as read: wire fields, then one text per key column.
    fields: usize,
    wire: usize,
    keys: usize,
    layout: Layout,
    limits: ChunkLimits,
    header_seen: bool,
    /// Bytes of an incomplete tuple carried to the next message.
    carry: Vec<u8>,
    out: Vec<u8>,
    rows: u64,
    last_key: Vec<Option<Vec<u8>>>,
    last_version: Option<i64>,
    done: bool,
    tuple: TupleReader,
}

impl Splitter {
    fn new(schema: &SourceSchema, layout: Layout, limits: ChunkLimits) -> Self {
        let wire = layout.fields(schema.columns.len());
        let keys = schema.primary_key.len();
        Splitter {
            fields: wire + keys,
            wire,
            keys,
            layout,
            limits,
            header_seen: false,
            carry: Vec::new(),
            // The whole bound at once: growing by doubling would reserve up
            // to twice it. Pages never written cost nothing.
            out: Vec::with_capacity(limits.max_bytes.min(256 << 20) + (64 << 10)),
            rows: 0,
            last_key: vec![None; keys],
            last_version: None,
            done: false,
            tuple: TupleReader::default(),
        }
    }

    /// Takes one message of COPY data; `true` once the chunk is full.
    fn feed(&mut self, data: &[u8]) -> Result<bool, String> {
        if self.carry.is_empty() {
            let used = self.consume(data)?;
            self.carry.extend_from_slice(&data[used..]);
        } else {
            let mut buf = std::mem::take(&mut self.carry);
            buf.extend_from_slice(data);
            let used = self.consume(&buf)?;
            buf.drain(..used);
            self.carry = buf;
        }
        Ok(self.done)
    }

    /// Takes as many whole tuples from `data` as it holds; returns the
    /// bytes used.
    fn consume(&mut self, data: &[u8]) -> Result<usize, String> {
        let mut pos = 0;
        if !self.header_seen {
            // Signature, flags, then an extension area of the given length.
            if data.len() < BINARY_HEADER.len() {
                return Ok(0);
            }
            if data[..11] != BINARY_HEADER[..11] {
                return Err("not a binary COPY stream".into());
            }
            let ext = u32::from_be_bytes([data[15], data[16], data[17], data[18]]) as usize;
            if data.len() < 19 + ext {
                return Ok(0);
            }
            pos = 19 + ext;
            self.header_seen = true;
        }
        while !self.done {
            let rest = &data[pos..];
            let Some(len) = self.tuple.read(rest)? else { break };
            pos += len;
            let tuple = &self.tuple;
            if tuple.fields.is_empty() {
                self.done = true;
                break;
            }
            if tuple.fields.len() != self.fields {
                return Err(format!("a row has {} fields, expected {}", tuple.fields.len(), self.fields));
            }
            let end = tuple.prefix_end(self.wire);
            if self.rows > 0 && self.out.len() + end > self.limits.max_bytes {
                self.done = true;
                break;
            }
            self.out.extend_from_slice(&(self.wire as u16).to_be_bytes());
            self.out.extend_from_slice(&rest[2..end]);
            self.rows += 1;
            for (i, slot) in self.last_key.iter_mut().enumerate() {
                match (tuple.field(rest, self.wire + i), slot) {
                    (Some(b), Some(v)) => {
                        v.clear();
                        v.extend_from_slice(b);
                    }
                    (Some(b), slot) => *slot = Some(b.to_vec()),
                    (None, slot) => *slot = None,
                }
            }
            if self.layout == Layout::Changes {
                let v = tuple.field(rest, 0).ok_or("a change without a version")?;
                let bytes: [u8; 8] = v.try_into().map_err(|_| "a version that is not a bigint")?;
                self.last_version = Some(i64::from_be_bytes(bytes));
            }
            if self.rows as usize >= self.limits.max_rows.max(1) || self.out.len() >= self.limits.max_bytes {
                self.done = true;
            }
        }
        Ok(pos)
    }

    fn finish(self, schema: &SourceSchema) -> Result<CopyChunk, String> {
        let last_key = if self.rows == 0 {
            None
        } else {
            let key_cols = schema.key_columns();
            let values = self
                .last_key
                .iter()
                .zip(&key_cols)
                .map(|(bytes, col)| {
                    let text = bytes.as_deref().map(std::str::from_utf8).transpose().map_err(|e| e.to_string())?;
                    from_pg_text(text, &col.column.data_type)
                        .map_err(|e| format!("key column {}: {e}", quote_ident(&col.column.name)))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Some(Key(values))
        };
        debug_assert_eq!(self.keys, schema.primary_key.len());
        Ok(CopyChunk {
            format: CopyFormat::Binary,
            payload: self.out,
            rows: self.rows,
            last_key,
            last_version: self.last_version.map(Version),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ColumnSchema, ColumnType, Value};
    use crate::source::SourceTable;

    fn schema() -> SourceSchema {
        let col = |name: &str, data_type, native: &str| SourceColumn {
            column: ColumnSchema { name: name.into(), data_type, nullable: true },
            native_type: native.into(),
        };
        SourceSchema {
            table: SourceTable { schema: Some("s p".into()), name: "Order\"s".into() },
            columns: vec![
                col("id", ColumnType::Int32, "integer"),
                col("name", ColumnType::Text { max_length: Some(20) }, "character varying(20)"),
            ],
            primary_key: vec!["id".into()],
        }
    }

    fn limits(max_rows: usize, max_bytes: usize) -> ChunkLimits {
        ChunkLimits { max_rows, max_bytes }
    }

    #[test]
    fn snapshot_statement_casts_to_mirror_types_and_quotes_the_cursor_key() {
        let s = schema();
        let keys = s.key_columns();
        assert_eq!(
            snapshot_sql(&s, &keys, None, 10),
            "COPY (SELECT t.\"id\"::integer, t.\"name\"::text, t.\"id\"::text FROM \"s p\".\"Order\"\"s\" AS t \
             ORDER BY t.\"id\" LIMIT 10) TO STDOUT (FORMAT binary)"
        );
        let sql = snapshot_sql(&s, &keys, Some(&[Some("1'; DROP TABLE x; --\\".into())]), 5);
        assert!(sql.contains("WHERE (t.\"id\") > (E'1''; DROP TABLE x; --\\\\'::text::integer)"), "{sql}");
    }

    #[test]
    fn changes_statement_takes_keys_from_the_side_table_and_limits_the_range_scan() {
        let s = schema();
        let keys = s.key_columns();
        let sql = changes_sql(&s, &keys, "changes_42", Version(7), Some(&[Some("3".into())]), Version(9), 100, "g()");
        assert!(sql.starts_with("COPY (SELECT s.\"ctmirror_version\", s.\"ctmirror_deleted\" OR t.\"id\" IS NULL, s.\"id\"::integer, t.\"name\"::text, s.\"id\"::text"), "{sql}");
        assert!(sql.contains("WHERE (s.\"ctmirror_version\", s.\"id\") > (7::bigint, '3'::text::integer) AND s.\"ctmirror_version\" <= 9::bigint ORDER BY s.\"ctmirror_version\", s.\"id\" LIMIT 100) AS s"), "{sql}");
    }

    /// A binary COPY stream of (int4 id, text name, text id) rows.
    fn stream(rows: &[(i32, Option<&str>)]) -> Vec<u8> {
        let mut out = BINARY_HEADER.to_vec();
        for (id, name) in rows {
            out.extend_from_slice(&3i16.to_be_bytes());
            out.extend_from_slice(&4i32.to_be_bytes());
            out.extend_from_slice(&id.to_be_bytes());
            match name {
                Some(n) => {
                    out.extend_from_slice(&(n.len() as i32).to_be_bytes());
                    out.extend_from_slice(n.as_bytes());
                }
                None => out.extend_from_slice(&(-1i32).to_be_bytes()),
            }
            let t = id.to_string();
            out.extend_from_slice(&(t.len() as i32).to_be_bytes());
            out.extend_from_slice(t.as_bytes());
        }
        out.extend_from_slice(&(-1i16).to_be_bytes());
        out
    }

    #[test]
    fn rows_lose_their_key_texts_and_the_last_key_becomes_the_cursor() {
        let data = stream(&[(1, Some("a")), (2, None)]);
        // Fed in every possible split, the result is the same.
        for cut in 0..data.len() {
            let mut sp = Splitter::new(&schema(), Layout::Rows, limits(100, 1 << 20));
            assert!(!sp.feed(&data[..cut]).unwrap() || cut == data.len());
            sp.feed(&data[cut..]).unwrap();
            let chunk = sp.finish(&schema()).unwrap();
            assert_eq!(chunk.rows, 2);
            assert_eq!(chunk.last_key, Some(Key(vec![Value::Int(2)])));
            assert_eq!(
                chunk.payload,
                [&[0u8, 2, 0, 0, 0, 4, 0, 0, 0, 1, 0, 0, 0, 1, b'a'][..], &[0, 2, 0, 0, 0, 4, 0, 0, 0, 2, 0xff, 0xff, 0xff, 0xff]].concat()
            );
        }
    }

    #[test]
    fn chunks_stop_at_the_row_and_byte_bounds_but_hold_at_least_one_row() {
        let data = stream(&[(1, Some("aaaa")), (2, Some("bbbb")), (3, Some("cccc"))]);
        let mut sp = Splitter::new(&schema(), Layout::Rows, limits(2, 1 << 20));
        assert!(sp.feed(&data).unwrap());
        assert_eq!(sp.finish(&schema()).unwrap().last_key, Some(Key(vec![Value::Int(2)])));
        let mut sp = Splitter::new(&schema(), Layout::Rows, limits(100, 1));
        assert!(sp.feed(&data).unwrap());
        let one = sp.finish(&schema()).unwrap();
        assert_eq!((one.rows, one.last_key), (1, Some(Key(vec![Value::Int(1)]))));
        let mut sp = Splitter::new(&schema(), Layout::Rows, limits(100, 40));
        sp.feed(&data).unwrap();
        assert_eq!(sp.finish(&schema()).unwrap().rows, 2);
    }

    #[test]
    fn malformed_copy_output_is_an_error() {
        let mut sp = Splitter::new(&schema(), Layout::Rows, limits(100, 1 << 20));
        assert!(sp.feed(b"PGCOPX\n\xff\r\n\0\0\0\0\0\0\0\0\0").is_err());
        let mut sp = Splitter::new(&schema(), Layout::Changes, limits(100, 1 << 20));
        assert!(sp.feed(&stream(&[(1, None)])).unwrap_err().contains("3 fields, expected 5"));
    }

    #[test]
    fn the_limit_follows_the_row_width_seen() {
        let mut w = RowWidths::default();
        assert_eq!(w.limit("t", limits(5000, 1 << 20)), FIRST_LIMIT);
        assert_eq!(w.limit("t", limits(10, 1 << 20)), 10);
        let chunk = CopyChunk { format: CopyFormat::Binary, payload: vec![0; 1000], rows: 10, last_key: None, last_version: None };
        w.record("t", &chunk);
        assert_eq!(w.limit("t", limits(100_000, 10_000)), 107);
        assert_eq!(w.limit("t", limits(50, 10_000)), 50);
    }
}
