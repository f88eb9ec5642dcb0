//! Full-load batches through `COPY … FROM STDIN`.
//!
//! A batch of the snapshot phase only adds rows the table cannot hold yet:
//! the keyset scan sends keys past the cursor, and the table holds exactly
//! the rows up to the cursor (batch and cursor commit together). So it
//! needs no conflict handling, and COPY (one streamed statement, no
//! per-row planning, no unnest arrays) is the cheapest way in. COPY applies
//! each column's input function with its type modifier, so a value too long
//! or too precise is refused exactly as an assignment would refuse it.

use super::sql::{ident_list, qualified};
use crate::protocol::TableSchema;
use bytes::Bytes;
use futures_util::SinkExt;
use tokio_postgres::Transaction;

/// The rows of `columns` (one array per column, one element per row) in
/// COPY's text format: tab-separated, `\N` for NULL, and backslash, tab,
/// newline and carriage return escaped.
pub fn encode(columns: &[Vec<Option<String>>]) -> Vec<u8> {
    let rows = columns.first().map_or(0, Vec::len);
    let width: usize = columns.iter().flat_map(|c| c.iter()).map(|v| v.as_ref().map_or(2, String::len) + 1).sum();
    let mut out = Vec::with_capacity(width + width / 16);
    for r in 0..rows {
        for (i, column) in columns.iter().enumerate() {
            if i > 0 {
                out.push(b'\t');
            }
            match &column[r] {
                None => out.extend_from_slice(b"\\N"),
                Some(text) => escape_into(&mut out, text),
            }
        }
        out.push(b'\n');
    }
    out
}

fn escape_into(out: &mut Vec<u8>, text: &str) {
    for &b in text.as_bytes() {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => out.push(b),
        }
    }
}

pub fn copy_sql(target_schema: &str, schema: &TableSchema) -> String {
    format!(
        "COPY {} ({}) FROM STDIN",
        qualified(target_schema, &schema.name),
        ident_list(schema.columns.iter().map(|c| c.name.as_str()))
    )
}

/// Streams the rows into the table; returns how many went in.
pub async fn copy_in(
    tx: &Transaction<'_>,
    target_schema: &str,
    schema: &TableSchema,
    columns: &[Vec<Option<String>>],
) -> Result<u64, tokio_postgres::Error> {
    let sink = tx.copy_in(&copy_sql(target_schema, schema)).await?;
    futures_util::pin_mut!(sink);
    sink.send(Bytes::from(encode(columns))).await?;
    sink.finish().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_tab_separated_with_nulls_and_escapes() {
        let cols = vec![
            vec![Some("1".to_owned()), Some("2".to_owned())],
            vec![Some("a\tb\nc\\d\re".to_owned()), None],
            vec![Some("\\x00ff".to_owned()), Some(String::new())],
        ];
        assert_eq!(
            String::from_utf8(encode(&cols)).unwrap(),
            "1\ta\\tb\\nc\\\\d\\re\t\\\\x00ff\n2\t\\N\t\n"
        );
        assert!(encode(&[]).is_empty());
    }

    #[test]
    fn copy_names_every_column_quoted() {
        let schema = TableSchema {
            name: "a\"b".into(),
            columns: vec![crate::protocol::ColumnSchema {
                name: "select".into(),
                data_type: crate::protocol::ColumnType::Int32,
                nullable: false,
            }],
            primary_key: vec!["select".into()],
        };
        assert_eq!(copy_sql("m", &schema), "COPY \"m\".\"a\"\"b\" (\"select\") FROM STDIN");
    }
}
