//! Row batches in PostgreSQL's own COPY format.
//!
//! The JSON [`RowBatch`](super::RowBatch) turns every value into a JSON
//! scalar and back, which costs more CPU than the databases spend on the
//! rows. A COPY batch carries the rows the way both PostgreSQL ends already
//! speak: the PostgreSQL source emits them with `COPY … TO STDOUT (FORMAT
//! binary)`, cast to the mirror column types, and the receiver streams them
//! into `COPY … FROM STDIN` unchanged. The server's receive functions (with
//! the column's length, precision and NOT NULL) are then the validation, so
//! a bad value is refused by PostgreSQL and rolls the batch back.
//!
//! Body: a 4-byte big-endian length, that many bytes of JSON
//! [`CopyBatchHeader`], then the rows: binary COPY tuples without the file
//! header and trailer, or text COPY lines. The layout of a row follows the
//! batch's `to` cursor ([`Layout`]). Sources that do not read PostgreSQL
//! (SQL Server) send the text format, built by [`TextRows`].

use super::cursor::Cursor;
use super::schema::TableSchema;
use super::value::Value;
use crate::pgtext::to_pg_text;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// The `Content-Type` of a COPY batch on the RowData path.
pub const CONTENT_TYPE: &str = "application/vnd.ctmirror.copy";

/// The binary COPY file header: signature, flags (no OIDs), no extension.
pub const BINARY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// The binary COPY trailer: a tuple with field count -1.
pub const BINARY_TRAILER: &[u8] = &[0xff, 0xff];

/// Largest header accepted; a header is a table name, a hash and two cursors.
const MAX_HEADER: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyFormat {
    /// PostgreSQL binary COPY tuples, each value in the receive format of
    /// the mirror column's type (`docs/protocol.md` lists the types).
    Binary,
    /// COPY text lines: tab-separated, `\N` for NULL, backslash escapes.
    Text,
}

impl CopyFormat {
    /// The `COPY` option naming the format.
    pub fn sql(self) -> &'static str {
        match self {
            CopyFormat::Binary => "binary",
            CopyFormat::Text => "text",
        }
    }
}

/// What one row of a batch holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// A batch of a full load (`to` is a snapshot cursor): the mapped
    /// columns in schema order, nothing else.
    Rows,
    /// A batch of changes (`to` is a changes cursor): the change's version
    /// (int64), whether the key is deleted (bool), then the mapped columns;
    /// a deleted row's non-key columns are NULL and ignored.
    Changes,
}

impl Layout {
    pub fn of(to: &Cursor) -> Layout {
        if to.is_snapshot() {
            Layout::Rows
        } else {
            Layout::Changes
        }
    }

    /// Fields per row for a table of `columns` columns.
    pub fn fields(self, columns: usize) -> usize {
        match self {
            Layout::Rows => columns,
            Layout::Changes => columns + 2,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopyBatchHeader {
    pub table: String,
    /// The schema the rows follow; must equal the receiver's.
    pub schema_hash: String,
    /// Compare-and-set, as in [`RowBatch`](super::RowBatch).
    pub from: Option<Cursor>,
    pub to: Cursor,
    pub format: CopyFormat,
    /// How many rows follow; the receiver refuses a batch whose payload
    /// holds another number.
    pub rows: u64,
}

/// A decoded COPY batch: the header and the rows, still encoded.
#[derive(Debug, Clone, PartialEq)]
pub struct CopyBatch {
    pub header: CopyBatchHeader,
    pub payload: Bytes,
}

impl CopyBatch {
    pub fn layout(&self) -> Layout {
        Layout::of(&self.header.to)
    }

    /// The body as two parts, the header part and the rows: sent one after
    /// the other, the rows are never copied into a body buffer.
    pub fn encode_parts(&self) -> [Bytes; 2] {
        let header = serde_json::to_vec(&self.header).expect("header serializes");
        let mut head = Vec::with_capacity(4 + header.len());
        head.extend_from_slice(&(header.len() as u32).to_be_bytes());
        head.extend_from_slice(&header);
        [Bytes::from(head), self.payload.clone()]
    }

    /// The body in one buffer.
    pub fn encode(&self) -> Vec<u8> {
        self.encode_parts().concat()
    }

    /// Splits a body into header and rows. The rows are not looked at here:
    /// the receiver's COPY parses and checks them.
    pub fn decode(body: Bytes) -> Result<CopyBatch, String> {
        if body.len() < 4 {
            return Err(format!("a COPY batch starts with a 4-byte header length; the body has {} bytes", body.len()));
        }
        let len = u32::from_be_bytes([body[0], body[1], body[2], body[3]]) as usize;
        if len > MAX_HEADER || 4 + len > body.len() {
            return Err(format!(
                "COPY batch header length {len} does not fit the body of {} bytes (at most {MAX_HEADER})",
                body.len()
            ));
        }
        let header: CopyBatchHeader =
            serde_json::from_slice(&body[4..4 + len]).map_err(|e| format!("invalid COPY batch header: {e}"))?;
        let payload = body.slice(4 + len..);
        if header.rows == 0 && !payload.is_empty() {
            return Err(format!("the header announces no rows but {} bytes of rows follow", payload.len()));
        }
        Ok(CopyBatch { header, payload })
    }
}

/// Builds text-format rows from protocol values, checking each value
/// against its column type on the way (the same rules as JSON batches).
#[derive(Debug, Default)]
pub struct TextRows {
    buf: Vec<u8>,
    rows: u64,
}

impl TextRows {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    /// A full row of a load (layout [`Layout::Rows`]).
    pub fn push_row(&mut self, schema: &TableSchema, values: &[Value]) -> Result<(), String> {
        self.push_values(schema, values)?;
        self.end_row();
        Ok(())
    }

    /// A present row of a changes batch.
    pub fn push_upsert(&mut self, schema: &TableSchema, version: i64, values: &[Value]) -> Result<(), String> {
        self.push_text(Some(&version.to_string()));
        self.buf.push(b'\t');
        self.push_text(Some("f"));
        self.buf.push(b'\t');
        self.push_row(schema, values)
    }

    /// A deleted key of a changes batch: the key values at the key
    /// columns' places, NULL elsewhere.
    pub fn push_delete(&mut self, schema: &TableSchema, version: i64, key: &[Value]) -> Result<(), String> {
        let positions = schema.key_positions();
        if key.len() != positions.len() {
            return Err(format!("expected a key of {} values, got {}", positions.len(), key.len()));
        }
        let mut values = vec![Value::Null; schema.columns.len()];
        for (&p, v) in positions.iter().zip(key) {
            if matches!(v, Value::Null) {
                return Err(format!("key column {:?} is null", schema.columns[p].name));
            }
            values[p] = v.clone();
        }
        self.push_text(Some(&version.to_string()));
        self.buf.push(b'\t');
        self.push_text(Some("t"));
        self.buf.push(b'\t');
        // Key columns only: a delete's other columns are NULL whatever
        // their nullability.
        self.push_fields(schema, &values, false)?;
        self.end_row();
        Ok(())
    }

    fn push_values(&mut self, schema: &TableSchema, values: &[Value]) -> Result<(), String> {
        if values.len() != schema.columns.len() {
            return Err(format!("expected {} values, one per column, got {}", schema.columns.len(), values.len()));
        }
        self.push_fields(schema, values, true)
    }

    /// One field per column, tab-separated; NULL in a NOT NULL column is
    /// refused when `check_nulls`.
    fn push_fields(&mut self, schema: &TableSchema, values: &[Value], check_nulls: bool) -> Result<(), String> {
        for (i, (col, value)) in schema.columns.iter().zip(values).enumerate() {
            if i > 0 {
                self.buf.push(b'\t');
            }
            let text = to_pg_text(value, &col.data_type).map_err(|e| format!("column {:?}: {e}", col.name))?;
            if check_nulls && text.is_none() && !col.nullable {
                return Err(format!("column {:?} is not nullable but the value is null", col.name));
            }
            self.push_text(text.as_deref());
        }
        Ok(())
    }

    fn end_row(&mut self) {
        self.buf.push(b'\n');
        self.rows += 1;
    }

    fn push_text(&mut self, text: Option<&str>) {
        match text {
            None => self.buf.extend_from_slice(b"\\N"),
            Some(t) => escape_text(&mut self.buf, t),
        }
    }
}

/// COPY text escaping: backslash, tab, newline and carriage return are the
/// characters that would end a field or a row.
pub fn escape_text(out: &mut Vec<u8>, text: &str) {
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

/// Reads binary COPY tuples one at a time, keeping where each field of the
/// last one lies. The field list is reused from tuple to tuple: splitting a
/// million rows allocates nothing per row.
#[derive(Debug, Default)]
pub struct TupleReader {
    /// Per field of the last tuple read: the value's range in the data
    /// given to [`TupleReader::read`], or `None` for NULL.
    pub fields: Vec<Option<std::ops::Range<usize>>>,
}

impl TupleReader {
    /// Reads one tuple at the start of `data` and returns its length.
    /// `Ok(None)` means `data` holds only part of a tuple; the trailer reads
    /// as a tuple of no fields and 2 bytes.
    pub fn read(&mut self, data: &[u8]) -> Result<Option<usize>, String> {
        self.fields.clear();
        if data.len() < 2 {
            return Ok(None);
        }
        let count = i16::from_be_bytes([data[0], data[1]]);
        if count == -1 {
            return Ok(Some(2));
        }
        if count < 0 {
            return Err(format!("binary COPY tuple with field count {count}"));
        }
        let mut pos = 2;
        for _ in 0..count {
            if data.len() < pos + 4 {
                return Ok(None);
            }
            let len = i32::from_be_bytes([data[pos], data[pos + 1], data[pos + 2], data[pos + 3]]);
            pos += 4;
            if len == -1 {
                self.fields.push(None);
                continue;
            }
            if len < 0 {
                return Err(format!("binary COPY field with length {len}"));
            }
            let end = pos + len as usize;
            if data.len() < end {
                return Ok(None);
            }
            self.fields.push(Some(pos..end));
            pos = end;
        }
        Ok(Some(pos))
    }

    /// Field `i` of the last tuple, in the data it was read from.
    pub fn field<'d>(&self, data: &'d [u8], i: usize) -> Option<&'d [u8]> {
        self.fields[i].clone().map(|r| &data[r])
    }

    /// The bytes of the field count and the first `n` fields, which is a
    /// valid tuple once its count is rewritten to `n`.
    pub fn prefix_end(&self, n: usize) -> usize {
        let mut end = 2;
        for f in &self.fields[..n] {
            end = match f {
                Some(r) => r.end,
                None => end + 4,
            };
        }
        end
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ColumnSchema, ColumnType, Key, Version};

    fn schema() -> TableSchema {
        TableSchema {
            name: "t".into(),
            columns: vec![
                ColumnSchema { name: "id".into(), data_type: ColumnType::Int32, nullable: false },
                ColumnSchema { name: "v".into(), data_type: ColumnType::Text { max_length: None }, nullable: false },
            ],
            primary_key: vec!["id".into()],
        }
    }

    fn header(rows: u64) -> CopyBatchHeader {
        CopyBatchHeader {
            table: "t".into(),
            schema_hash: "h".into(),
            from: None,
            to: Cursor::Snapshot { version: Version(3), after_key: Some(Key(vec![Value::Int(2)])) },
            format: CopyFormat::Binary,
            rows,
        }
    }

    #[test]
    fn batches_round_trip() {
        let b = CopyBatch { header: header(1), payload: Bytes::from_static(b"\x00\x00") };
        let back = CopyBatch::decode(Bytes::from(b.encode())).unwrap();
        assert_eq!(back, b);
        assert_eq!(back.layout(), Layout::Rows);
    }

    #[test]
    fn garbage_bodies_are_refused_with_a_reason() {
        let good = CopyBatch { header: header(0), payload: Bytes::new() }.encode();
        let mut huge_len = good.clone();
        huge_len[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        let mut rows_without_count = CopyBatch { header: header(0), payload: Bytes::new() }.encode();
        rows_without_count.extend_from_slice(b"1\tx\n");
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![], "4-byte header length"),
            (vec![0, 0], "4-byte header length"),
            (huge_len, "does not fit"),
            (vec![0, 0, 0, 2, b'{', b'}'], "invalid COPY batch header"),
            (vec![0, 0, 0, 1, 0xff], "invalid COPY batch header"),
            ([&[0u8, 0, 0, 9][..], b"{\"x\":1}  "].concat(), "invalid COPY batch header"),
            (rows_without_count, "announces no rows"),
        ];
        for (body, expected) in cases {
            let e = CopyBatch::decode(Bytes::from(body.clone())).unwrap_err();
            assert!(e.contains(expected), "{body:?}: {e}");
        }
        assert!(CopyBatch::decode(Bytes::from(good)).is_ok());
    }

    #[test]
    fn text_rows_escape_and_check_values() {
        let s = schema();
        let mut rows = TextRows::new();
        rows.push_row(&s, &[Value::Int(1), Value::Text("a\tb\nc\\d\re".into())]).unwrap();
        rows.push_upsert(&s, 7, &[Value::Int(2), Value::Text(String::new())]).unwrap();
        rows.push_delete(&s, 8, &[Value::Int(3)]).unwrap();
        assert_eq!(rows.rows(), 3);
        assert_eq!(
            String::from_utf8(rows.into_bytes()).unwrap(),
            "1\ta\\tb\\nc\\\\d\\re\n7\tf\t2\t\n8\tt\t3\t\\N\n"
        );
        let mut rows = TextRows::new();
        assert!(rows.push_row(&s, &[Value::Int(1)]).unwrap_err().contains("expected 2 values"));
        assert!(rows.push_row(&s, &[Value::Int(1), Value::Null]).unwrap_err().contains("not nullable"));
        assert!(rows.push_row(&s, &[Value::Text("x".into()), Value::Null]).unwrap_err().contains("\"id\""));
        assert!(rows.push_delete(&s, 1, &[]).unwrap_err().contains("key of 1 values"));
        assert!(rows.push_delete(&s, 1, &[Value::Null]).unwrap_err().contains("null"));
    }

    #[test]
    fn binary_tuples_split_at_field_boundaries() {
        // (int4 5, NULL, text "ab") then the trailer.
        let data = [
            &[0u8, 3][..],
            &[0, 0, 0, 4, 0, 0, 0, 5],
            &[0xff, 0xff, 0xff, 0xff],
            &[0, 0, 0, 2, b'a', b'b'],
            BINARY_TRAILER,
        ]
        .concat();
        let mut t = TupleReader::default();
        assert_eq!(t.read(&data).unwrap(), Some(20));
        assert_eq!(t.field(&data, 0), Some(&[0u8, 0, 0, 5][..]));
        assert_eq!(t.field(&data, 1), None);
        assert_eq!(t.field(&data, 2), Some(&b"ab"[..]));
        assert_eq!(t.prefix_end(0), 2);
        assert_eq!(t.prefix_end(1), 10);
        assert_eq!(t.prefix_end(2), 14);
        assert_eq!(t.read(&data[20..]).unwrap(), Some(2));
        assert!(t.fields.is_empty());
        for cut in 0..20 {
            assert!(t.read(&data[..cut]).unwrap().is_none(), "cut at {cut}");
        }
        assert!(t.read(&[0xff, 0xfe]).is_err());
        assert!(t.read(&[0, 1, 0xff, 0xff, 0xff, 0xfe]).is_err());
    }
}
