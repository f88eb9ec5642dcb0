//! Protocol values to and from PostgreSQL's text representation.
//!
//! Both PostgreSQL ends of the pipeline speak text to the server: the
//! PostgreSQL source reads every mapped column as `::text` (one decoder for
//! every type, exact for numeric and floats), and the receiver passes text
//! parameters that the server casts to the column type. This module is the
//! only place that knows both the wire rules of `docs/protocol.md` and
//! PostgreSQL's text formats. The sessions it talks to use `DateStyle=ISO`,
//! `TimeZone=UTC`, `bytea_output=hex` and `extra_float_digits=1`.

use crate::protocol::{ColumnType, Value};
use base64::Engine;

/// The session settings this module's text formats assume: ISO dates, UTC,
/// hex bytea, shortest-exact floats. Every connection that exchanges values
/// with this module (source, receiver, verify) uses exactly these.
pub const SESSION_SETTINGS: [(&str, &str); 4] = [
    ("DateStyle", "ISO,YMD"),
    ("TimeZone", "UTC"),
    ("bytea_output", "hex"),
    ("extra_float_digits", "1"),
];

/// [`SESSION_SETTINGS`] as `SET` statements, for a connection already open.
pub fn session_set_sql() -> String {
    SESSION_SETTINGS.iter().map(|(k, v)| format!("SET {k} = '{v}'; ")).collect()
}

/// [`SESSION_SETTINGS`] as libpq startup `options`, for a connection pool.
pub fn session_options() -> String {
    SESSION_SETTINGS.iter().map(|(k, v)| format!("-c {k}={v}")).collect::<Vec<_>>().join(" ")
}

/// Quotes one PostgreSQL identifier: `a"b` becomes `"a""b"`. Names come from
/// tenant databases and schema maps, so every name that reaches SQL text goes
/// through here; always quoting also keeps case and makes reserved words
/// ordinary names. Values never go into SQL text: they are parameters.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Turns a wire value into the text PostgreSQL accepts for `ty`, checking it
/// against the wire rules on the way; `None` is SQL NULL. The error says what
/// was expected, never echoing more than a short prefix of the value.
pub fn to_pg_text(value: &Value, ty: &ColumnType) -> Result<Option<String>, String> {
    use ColumnType as T;
    let text = match (ty, value) {
        (_, Value::Null) => return Ok(None),
        (T::Bool, Value::Bool(b)) => (if *b { "t" } else { "f" }).to_owned(),
        (T::Int16, Value::Int(i)) => int_in(*i, i16::MIN as i64, i16::MAX as i64, "int16")?,
        (T::Int32, Value::Int(i)) => int_in(*i, i32::MIN as i64, i32::MAX as i64, "int32")?,
        (T::Int64, Value::Int(i)) => i.to_string(),
        (T::Float32 | T::Float64, Value::Int(i)) => i.to_string(),
        (T::Float32, Value::Float(f)) if f.abs() > f32::MAX as f64 => {
            return Err(format!("{f} is out of range for float32"))
        }
        (T::Float32 | T::Float64, Value::Float(f)) => {
            if !f.is_finite() {
                return Err("non-finite floats must be sent as \"NaN\", \"Infinity\" or \"-Infinity\"".into());
            }
            // Debug formatting of f64 is the shortest string that reads back
            // to the same float, which PostgreSQL parses exactly.
            format!("{f:?}")
        }
        (T::Float32 | T::Float64, Value::Text(s)) if is_special_float(s) => s.clone(),
        (T::Decimal { .. }, Value::Int(i)) => i.to_string(),
        (T::Decimal { .. }, Value::Text(s)) if is_decimal(s) || is_special_float(s) => s.clone(),
        (T::Text { max_length }, Value::Text(s)) => {
            check_text(s, *max_length)?;
            s.clone()
        }
        (T::FixedText { length }, Value::Text(s)) => {
            check_text(s, Some(*length))?;
            s.clone()
        }
        (T::Bytes { max_length }, Value::Text(s)) => {
            let bytes = B64.decode(s).map_err(|_| "bytes must be standard base64".to_string())?;
            if let Some(max) = max_length {
                if bytes.len() > *max as usize {
                    return Err(format!("{} bytes exceed the column's {max}", bytes.len()));
                }
            }
            format!("\\x{}", hex::encode(bytes))
        }
        (T::Date, Value::Text(s)) if is_infinity(s) || is_date(s) => s.clone(),
        (T::Time { .. }, Value::Text(s)) if is_time(s) => s.clone(),
        (T::Timestamp { .. }, Value::Text(s)) if is_infinity(s) || is_timestamp(s) => s.clone(),
        (T::TimestampTz { .. }, Value::Text(s)) if is_infinity(s) || is_timestamptz(s) => s.clone(),
        (T::Uuid, Value::Text(s)) if is_uuid(s) => s.clone(),
        (T::Json, Value::Text(s)) => {
            serde_json::from_str::<serde::de::IgnoredAny>(s)
                .map_err(|e| format!("json value is not valid JSON: {e}"))?;
            if s.contains("\\u0000") {
                return Err("json value contains \\u0000, which PostgreSQL cannot store".into());
            }
            s.clone()
        }
        (ty, v) => return Err(format!("expected {}, got {}", expectation(ty), describe(v))),
    };
    Ok(Some(text))
}

/// Turns PostgreSQL's text output of a column of type `ty` into a wire value.
/// Fails for values the protocol cannot carry faithfully (dates outside years
/// 1-9999, for instance), naming the reason.
pub fn from_pg_text(text: Option<&str>, ty: &ColumnType) -> Result<Value, String> {
    use ColumnType as T;
    let Some(s) = text else { return Ok(Value::Null) };
    Ok(match ty {
        T::Bool => match s {
            // `t`/`f` from the output function, `true`/`false` from a
            // `::text` cast.
            "t" | "true" => Value::Bool(true),
            "f" | "false" => Value::Bool(false),
            _ => return Err(format!("unexpected boolean text {s:?}")),
        },
        T::Int16 | T::Int32 | T::Int64 => {
            Value::Int(s.parse().map_err(|_| format!("unexpected integer text {s:?}"))?)
        }
        T::Float32 | T::Float64 => {
            if is_special_float(s) {
                Value::Text(s.to_owned())
            } else {
                Value::Float(s.parse().map_err(|_| format!("unexpected float text {s:?}"))?)
            }
        }
        T::Bytes { .. } => {
            let hex = s.strip_prefix("\\x").ok_or("bytea text is not in hex format")?;
            Value::Text(B64.encode(hex::decode(hex).map_err(|_| "bytea text is not valid hex")?))
        }
        T::Date => {
            check_year_range(s)?;
            Value::Text(s.to_owned())
        }
        T::Timestamp { .. } => {
            check_year_range(s)?;
            Value::Text(s.replacen(' ', "T", 1))
        }
        T::TimestampTz { .. } => {
            check_year_range(s)?;
            let iso = s.replacen(' ', "T", 1);
            match iso.strip_suffix("+00") {
                Some(utc) => Value::Text(format!("{utc}Z")),
                None if is_infinity(&iso) => Value::Text(iso),
                None => return Err(format!("timestamptz {s:?} is not in UTC; the session must use TimeZone=UTC")),
            }
        }
        T::Decimal { .. } | T::Text { .. } | T::FixedText { .. } | T::Time { .. } | T::Uuid | T::Json => {
            Value::Text(s.to_owned())
        }
    })
}

fn int_in(i: i64, min: i64, max: i64, name: &str) -> Result<String, String> {
    if (min..=max).contains(&i) {
        Ok(i.to_string())
    } else {
        Err(format!("{i} is out of range for {name}"))
    }
}

fn check_text(s: &str, max_chars: Option<u32>) -> Result<(), String> {
    if s.contains('\0') {
        return Err("text contains a NUL character, which PostgreSQL cannot store".into());
    }
    if let Some(max) = max_chars {
        let n = s.chars().count();
        if n > max as usize {
            return Err(format!("text of {n} characters exceeds the column's {max}"));
        }
    }
    Ok(())
}

/// Dates outside years 1-9999 (PostgreSQL's BC dates and five-digit years)
/// have no agreed ISO form and SQL Server cannot hold them either.
fn check_year_range(s: &str) -> Result<(), String> {
    if is_infinity(s) {
        return Ok(());
    }
    if s.ends_with(" BC") || s.as_bytes().get(4) != Some(&b'-') {
        return Err(format!("date {s:?} is outside years 1-9999 and cannot be mirrored"));
    }
    Ok(())
}

fn is_special_float(s: &str) -> bool {
    matches!(s, "NaN" | "Infinity" | "-Infinity")
}

fn is_infinity(s: &str) -> bool {
    matches!(s, "infinity" | "-infinity")
}

fn is_decimal(s: &str) -> bool {
    let body = s.strip_prefix('-').unwrap_or(s);
    let (int, frac) = match body.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (body, None),
    };
    !int.is_empty()
        && int.bytes().all(|b| b.is_ascii_digit())
        && frac.is_none_or(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()))
}

fn digits(s: &str, n: usize) -> Option<u32> {
    (s.len() == n && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok()).flatten()
}

fn is_date(s: &str) -> bool {
    s.len() == 10
        && chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").is_ok()
        && digits(&s[..4], 4).is_some_and(|y| y >= 1)
}

/// `HH:MM:SS` with up to 9 fractional digits (PostgreSQL rounds to 6), or
/// exactly `24:00:00`.
fn is_time(s: &str) -> bool {
    let (main, frac) = match s.split_once('.') {
        Some((m, f)) => (m, Some(f)),
        None => (s, None),
    };
    if let Some(f) = frac {
        if f.is_empty() || f.len() > 9 || !f.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
    }
    let parts: Vec<&str> = main.split(':').collect();
    let [h, m, sec] = parts.as_slice() else { return false };
    match (digits(h, 2), digits(m, 2), digits(sec, 2)) {
        (Some(24), Some(0), Some(0)) => frac.is_none_or(|f| f.bytes().all(|b| b == b'0')),
        (Some(h), Some(m), Some(sec)) => h < 24 && m < 60 && sec < 60,
        _ => false,
    }
}

fn is_timestamp(s: &str) -> bool {
    s.get(10..11) == Some("T")
        && is_date(&s[..10])
        && is_time(&s[11..])
        && !s[11..].starts_with("24")
}

fn is_timestamptz(s: &str) -> bool {
    is_date(s.get(..10).unwrap_or("")) && chrono::DateTime::parse_from_rfc3339(s).is_ok()
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

fn expectation(ty: &ColumnType) -> &'static str {
    use ColumnType as T;
    match ty {
        T::Bool => "a boolean",
        T::Int16 | T::Int32 | T::Int64 => "an integer",
        T::Float32 | T::Float64 => "a number or \"NaN\"/\"Infinity\"/\"-Infinity\"",
        T::Decimal { .. } => "a decimal string like \"-12.50\"",
        T::Text { .. } | T::FixedText { .. } => "a string",
        T::Bytes { .. } => "a base64 string",
        T::Date => "a date string YYYY-MM-DD",
        T::Time { .. } => "a time string HH:MM:SS[.fraction]",
        T::Timestamp { .. } => "a timestamp string YYYY-MM-DDTHH:MM:SS[.fraction]",
        T::TimestampTz { .. } => "an RFC 3339 timestamp with offset",
        T::Uuid => "a hyphenated UUID string",
        T::Json => "a string holding JSON text",
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Int(i) => format!("integer {i}"),
        Value::Float(f) => format!("number {f}"),
        Value::Text(s) => {
            let short: String = s.chars().take(40).collect();
            if short.len() < s.len() {
                format!("string {short:?}…")
            } else {
                format!("string {short:?}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ColumnType as T;

    fn ok(v: Value, ty: T) -> String {
        to_pg_text(&v, &ty).unwrap().unwrap()
    }
    fn bad(v: Value, ty: T) -> String {
        to_pg_text(&v, &ty).unwrap_err()
    }
    fn txt(s: &str) -> Value {
        Value::Text(s.into())
    }

    #[test]
    fn accepts_each_type_in_its_wire_form() {
        assert_eq!(ok(Value::Bool(true), T::Bool), "t");
        assert_eq!(ok(Value::Int(-32768), T::Int16), "-32768");
        assert_eq!(ok(Value::Float(0.1), T::Float64), "0.1");
        assert_eq!(ok(txt("NaN"), T::Float32), "NaN");
        assert_eq!(ok(txt("-12345678901234567890.0123456789"), T::Decimal { precision: Some(38), scale: Some(10) }), "-12345678901234567890.0123456789");
        assert_eq!(ok(txt("AAH/"), T::Bytes { max_length: None }), "\\x0001ff");
        assert_eq!(ok(txt("2024-02-29"), T::Date), "2024-02-29");
        assert_eq!(ok(txt("23:59:59.123456"), T::Time { precision: None }), "23:59:59.123456");
        assert_eq!(ok(txt("24:00:00"), T::Time { precision: None }), "24:00:00");
        assert_eq!(ok(txt("2024-01-01T10:00:00.5"), T::Timestamp { precision: None }), "2024-01-01T10:00:00.5");
        assert_eq!(ok(txt("2024-01-01T10:00:00Z"), T::TimestampTz { precision: None }), "2024-01-01T10:00:00Z");
        assert_eq!(ok(txt("infinity"), T::TimestampTz { precision: None }), "infinity");
        assert_eq!(ok(txt("123e4567-e89b-12d3-a456-426614174000"), T::Uuid), "123e4567-e89b-12d3-a456-426614174000");
        assert_eq!(ok(txt("{\"a\":[1]}"), T::Json), "{\"a\":[1]}");
        assert_eq!(to_pg_text(&Value::Null, &T::Int64).unwrap(), None);
    }

    #[test]
    fn refuses_values_that_contradict_the_type() {
        assert!(bad(Value::Int(40000), T::Int16).contains("out of range"));
        assert!(bad(Value::Float(1.5), T::Int64).contains("expected an integer"));
        assert!(bad(txt("12"), T::Int64).contains("expected an integer"));
        assert!(bad(txt("1e5"), T::Decimal { precision: None, scale: None }).contains("decimal"));
        assert!(bad(txt("nan"), T::Decimal { precision: None, scale: None }).contains("decimal"));
        assert!(bad(Value::Float(1e300), T::Float32).contains("out of range"));
        assert!(bad(txt("a\0b"), T::Text { max_length: None }).contains("NUL"));
        assert!(bad(txt("abcd"), T::Text { max_length: Some(3) }).contains("exceeds"));
        assert!(bad(txt("!!"), T::Bytes { max_length: None }).contains("base64"));
        assert!(bad(txt("2023-02-29"), T::Date).contains("date"));
        assert!(bad(txt("0000-01-01"), T::Date).contains("date"));
        assert!(bad(txt("25:00:00"), T::Time { precision: None }).contains("time"));
        assert!(bad(txt("2024-01-01 10:00:00"), T::Timestamp { precision: None }).contains("timestamp"));
        assert!(bad(txt("2024-01-01T10:00:00"), T::TimestampTz { precision: None }).contains("RFC 3339"));
        assert!(bad(txt("not-a-uuid"), T::Uuid).contains("UUID"));
        assert!(bad(txt("{"), T::Json).contains("not valid JSON"));
        assert!(bad(txt("\"\\u0000\""), T::Json).contains("u0000"));
        assert!(bad(Value::Bool(true), T::Text { max_length: None }).contains("expected a string"));
    }

    #[test]
    fn error_messages_do_not_echo_long_values() {
        let e = bad(txt(&"z".repeat(10_000)), T::Int64);
        assert!(e.len() < 150, "{e}");
    }

    #[test]
    fn reads_postgres_output_formats() {
        assert_eq!(from_pg_text(Some("t"), &T::Bool).unwrap(), Value::Bool(true));
        assert_eq!(from_pg_text(Some("-9223372036854775808"), &T::Int64).unwrap(), Value::Int(i64::MIN));
        assert_eq!(from_pg_text(Some("1e+100"), &T::Float64).unwrap(), Value::Float(1e100));
        assert_eq!(from_pg_text(Some("-Infinity"), &T::Float64).unwrap(), txt("-Infinity"));
        assert_eq!(from_pg_text(Some("\\x0001ff"), &T::Bytes { max_length: None }).unwrap(), txt("AAH/"));
        assert_eq!(
            from_pg_text(Some("2024-01-01 10:00:00.25+00"), &T::TimestampTz { precision: None }).unwrap(),
            txt("2024-01-01T10:00:00.25Z")
        );
        assert_eq!(from_pg_text(Some("2024-01-01 10:00:00"), &T::Timestamp { precision: None }).unwrap(), txt("2024-01-01T10:00:00"));
        assert_eq!(from_pg_text(None, &T::Json).unwrap(), Value::Null);
    }

    #[test]
    fn refuses_dates_the_protocol_cannot_carry() {
        assert!(from_pg_text(Some("0044-03-15 BC"), &T::Date).is_err());
        assert!(from_pg_text(Some("10000-01-01"), &T::Date).is_err());
        assert!(from_pg_text(Some("2024-01-01 10:00:00+02"), &T::TimestampTz { precision: None }).is_err());
    }

    #[test]
    fn round_trips_through_both_directions() {
        let cases: Vec<(&str, T)> = vec![
            ("f", T::Bool),
            ("42", T::Int32),
            ("3.14", T::Float64),
            ("Infinity", T::Float64),
            ("NaN", T::Decimal { precision: None, scale: None }),
            ("\\xdeadbeef", T::Bytes { max_length: None }),
            ("1999-12-31", T::Date),
            ("2000-01-01 00:00:00.000001+00", T::TimestampTz { precision: Some(6) }),
        ];
        for (pg, ty) in cases {
            let wire = from_pg_text(Some(pg), &ty).unwrap();
            let back = to_pg_text(&wire, &ty).unwrap().unwrap();
            let again = from_pg_text(Some(&back.replacen('T', " ", 1).replace('Z', "+00")), &ty);
            assert!(again.is_ok(), "{pg} -> {back}");
        }
    }
}
