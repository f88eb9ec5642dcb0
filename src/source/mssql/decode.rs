//! SQL Server cells to wire values, and wire key values back to statement
//! parameters.
//!
//! The text forms are the ones `docs/protocol.md` fixes and PostgreSQL
//! prints (ISO dates, `T` between date and time, `Z` for UTC, fractional
//! seconds without trailing zeros), so a value read from SQL Server and the
//! same value read back from the mirror compare equal.

use super::client::{SqlParam, SqlValue};
use crate::protocol::{ColumnType, Value};
use base64::Engine;
use chrono::NaiveDate;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// One cell of a column of protocol type `ty`. The error names what is
/// wrong with the value; the caller adds table, column and key.
pub fn decode(value: SqlValue, ty: &ColumnType) -> Result<Value, String> {
    use ColumnType as T;
    Ok(match (value, ty) {
        (SqlValue::Null, _) => Value::Null,
        (SqlValue::Bool(b), T::Bool) => Value::Bool(b),
        (SqlValue::Int(i), T::Int16 | T::Int32 | T::Int64) => Value::Int(i),
        // Shortest text of the f32, read as f64: 0.1 stays 0.1, not
        // 0.10000000149011612.
        (SqlValue::F32(f), T::Float32 | T::Float64) => {
            Value::Float(f.to_string().parse().map_err(|_| format!("unreadable real {f}"))?)
        }
        (SqlValue::F64(f), T::Float32 | T::Float64) => Value::Float(f),
        (SqlValue::Decimal { mantissa, scale }, T::Decimal { .. }) => Value::Text(decimal_text(mantissa, scale)),
        (SqlValue::Text(s), T::Text { .. } | T::FixedText { .. } | T::Json) => {
            if s.contains('\0') {
                return Err("text contains a NUL character, which PostgreSQL cannot store".into());
            }
            Value::Text(s)
        }
        (SqlValue::Bytes(b), T::Bytes { .. }) => Value::Text(B64.encode(b)),
        (SqlValue::Uuid(u), T::Uuid) => Value::Text(uuid::Uuid::from_bytes(u).hyphenated().to_string()),
        (SqlValue::Date(days), T::Date) => Value::Text(date_text(days)?),
        (SqlValue::Time(nanos), T::Time { precision }) => Value::Text(time_text(nanos, *precision)),
        (SqlValue::DateTime { days, nanos }, T::Timestamp { precision }) => {
            Value::Text(format!("{}T{}", date_text(days)?, time_text(nanos, *precision)))
        }
        // Read through the UTC cast: the wall clock is already UTC.
        (SqlValue::DateTime { days, nanos }, T::TimestampTz { precision }) => {
            Value::Text(format!("{}T{}Z", date_text(days)?, time_text(nanos, *precision)))
        }
        (SqlValue::DateTimeOffset { days, nanos, offset_minutes }, T::TimestampTz { precision }) => {
            let (days, nanos) = to_utc(days, nanos, offset_minutes);
            Value::Text(format!("{}T{}Z", date_text(days)?, time_text(nanos, *precision)))
        }
        (v, ty) => return Err(format!("a {} value arrived for a column of protocol type {ty:?}", kind(&v))),
    })
}

fn kind(v: &SqlValue) -> &'static str {
    match v {
        SqlValue::Null => "NULL",
        SqlValue::Bool(_) => "bit",
        SqlValue::Int(_) => "integer",
        SqlValue::F32(_) | SqlValue::F64(_) => "float",
        SqlValue::Decimal { .. } => "decimal",
        SqlValue::Text(_) => "text",
        SqlValue::Bytes(_) => "binary",
        SqlValue::Uuid(_) => "uniqueidentifier",
        SqlValue::Date(_) => "date",
        SqlValue::Time(_) => "time",
        SqlValue::DateTime { .. } => "datetime",
        SqlValue::DateTimeOffset { .. } => "datetimeoffset",
    }
}

/// `mantissa / 10^scale` with exactly `scale` fractional digits, as
/// PostgreSQL prints `numeric(p, scale)`.
pub fn decimal_text(mantissa: i128, scale: u8) -> String {
    let digits = mantissa.unsigned_abs().to_string();
    let scale = scale as usize;
    let sign = if mantissa < 0 { "-" } else { "" };
    if scale == 0 {
        return format!("{sign}{digits}");
    }
    let padded = if digits.len() <= scale { format!("{}{digits}", "0".repeat(scale + 1 - digits.len())) } else { digits };
    let (int, frac) = padded.split_at(padded.len() - scale);
    format!("{sign}{int}.{frac}")
}

fn date_text(days_since_0001: i64) -> Result<String, String> {
    let days = i32::try_from(days_since_0001 + 1).map_err(|_| format!("day {days_since_0001} is out of range"))?;
    let date = NaiveDate::from_num_days_from_ce_opt(days).ok_or_else(|| format!("day {days_since_0001} is out of range"))?;
    Ok(date.format("%Y-%m-%d").to_string())
}

/// `HH:MM:SS[.f]`, cut (not rounded) to `precision` digits, at most six,
/// trailing zeros dropped.
fn time_text(nanos: u64, precision: Option<u8>) -> String {
    let secs = nanos / 1_000_000_000;
    let digits = precision.unwrap_or(6).min(6) as u32;
    let frac = (nanos % 1_000_000_000) / 10u64.pow(9 - digits);
    let mut s = format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60);
    if frac > 0 {
        let f = format!("{frac:0width$}", width = digits as usize);
        s.push('.');
        s.push_str(f.trim_end_matches('0'));
    }
    s
}

fn to_utc(days: i64, nanos: u64, offset_minutes: i16) -> (i64, u64) {
    const DAY: i128 = 86_400 * 1_000_000_000;
    let total = days as i128 * DAY + nanos as i128 - offset_minutes as i128 * 60 * 1_000_000_000;
    (total.div_euclid(DAY) as i64, total.rem_euclid(DAY) as u64)
}

/// A key value as a statement parameter; the statement casts it to the
/// column's declared type (see [`super::types::MsType::native`]).
pub fn key_param(value: &Value, ty: &ColumnType) -> Result<SqlParam, String> {
    use ColumnType as T;
    Ok(match (value, ty) {
        (Value::Null, _) => return Err("a primary-key value is NULL".into()),
        (Value::Bool(b), T::Bool) => SqlParam::Int(*b as i64),
        (Value::Int(i), _) => SqlParam::Int(*i),
        (Value::Float(f), _) => SqlParam::Text(format!("{f:?}")),
        (Value::Text(s), T::Bytes { .. }) => {
            SqlParam::Bytes(B64.decode(s).map_err(|_| "a binary key value is not base64".to_string())?)
        }
        (Value::Text(s), T::TimestampTz { .. }) => match s.strip_suffix('Z') {
            Some(utc) => SqlParam::Text(format!("{utc}+00:00")),
            None => SqlParam::Text(s.clone()),
        },
        (Value::Text(s), _) => SqlParam::Text(s.clone()),
        (Value::Bool(_), ty) => return Err(format!("a boolean key value for a {ty:?} column")),
    })
}

#[cfg(test)]
mod tests {
    use super::super::client::{cells, SqlValue, DAYS_TO_1900};
    use super::*;
    use ColumnType as T;

    fn via_tiberius(cell: Result<SqlValue, String>, ty: &ColumnType) -> Value {
        decode(cell.unwrap(), ty).unwrap()
    }

    fn text(s: &str) -> Value {
        Value::Text(s.into())
    }

    #[test]
    fn integers_bits_and_floats_decode_exactly() {
        for (cell, i) in cells::ints() {
            assert_eq!(via_tiberius(cell, &T::Int64), Value::Int(i));
        }
        assert_eq!(via_tiberius(cells::bit(true), &T::Bool), Value::Bool(true));
        assert_eq!(via_tiberius(cells::f32(0.1), &T::Float32), Value::Float(0.1));
        assert_eq!(via_tiberius(cells::f64(-1.5e300), &T::Float64), Value::Float(-1.5e300));
    }

    #[test]
    fn decimals_keep_their_scale_and_all_38_digits() {
        let dec = |p, s| T::Decimal { precision: Some(p), scale: Some(s) };
        assert_eq!(via_tiberius(cells::numeric(12345, 2), &dec(12, 2)), text("123.45"));
        assert_eq!(via_tiberius(cells::numeric(-5, 3), &dec(12, 3)), text("-0.005"));
        assert_eq!(via_tiberius(cells::numeric(7, 0), &dec(5, 0)), text("7"));
        let max = 99_999_999_999_999_999_999_999_999_999_999_999_999i128;
        assert_eq!(
            via_tiberius(cells::numeric(max, 38), &dec(38, 38)),
            text("0.99999999999999999999999999999999999999")
        );
        assert_eq!(
            via_tiberius(cells::numeric(-max, 0), &dec(38, 0)),
            text("-99999999999999999999999999999999999999")
        );
    }

    #[test]
    fn money_arrives_as_decimal_19_4() {
        // The reading statement casts money to decimal(19,4): the largest
        // money value survives to the last ten-thousandth.
        let v = via_tiberius(cells::numeric(9_223_372_036_854_775_807, 4), &T::Decimal { precision: Some(19), scale: Some(4) });
        assert_eq!(v, text("922337203685477.5807"));
        let small = via_tiberius(cells::numeric(-2_147_483_648, 4), &T::Decimal { precision: Some(10), scale: Some(4) });
        assert_eq!(small, text("-214748.3648"));
    }

    #[test]
    fn dates_and_times_use_the_protocols_iso_forms() {
        assert_eq!(via_tiberius(cells::date(0), &T::Date), text("0001-01-01"));
        assert_eq!(via_tiberius(cells::date(3_652_058), &T::Date), text("9999-12-31"));
        assert_eq!(via_tiberius(cells::time(123_456_789, 7), &T::Time { precision: Some(6) }), text("00:00:12.345678"));
        assert_eq!(via_tiberius(cells::time(36_000_000_000, 7), &T::Time { precision: Some(6) }), text("01:00:00"));
        assert_eq!(
            via_tiberius(cells::datetime2(738_885, 445_001_234_567, 7), &T::Timestamp { precision: Some(6) }),
            text("2024-01-01T12:21:40.123456")
        );
        assert_eq!(
            via_tiberius(cells::datetime(45_290, 1), &T::Timestamp { precision: Some(3) }),
            text("2024-01-01T00:00:00.003")
        );
        assert_eq!(
            via_tiberius(cells::small_datetime(45_290, 61), &T::Timestamp { precision: Some(0) }),
            text("2024-01-01T01:01:00")
        );
        assert_eq!(
            decode(SqlValue::DateTime { days: DAYS_TO_1900, nanos: 0 }, &T::Timestamp { precision: Some(3) }).unwrap(),
            text("1900-01-01T00:00:00")
        );
    }

    #[test]
    fn datetimeoffset_becomes_the_utc_instant() {
        // 2024-01-01 00:30 at +01:00 is 2023-12-31 23:30 UTC.
        let v = via_tiberius(cells::datetimeoffset(738_885, 18_000_000_000, 7, 60), &T::TimestampTz { precision: Some(6) });
        assert_eq!(v, text("2023-12-31T23:30:00Z"));
        // Read through the UTC cast it arrives as a datetime2.
        let v = via_tiberius(cells::datetime2(738_885, 5, 1), &T::TimestampTz { precision: Some(1) });
        assert_eq!(v, text("2024-01-01T00:00:00.5Z"));
    }

    #[test]
    fn uniqueidentifier_prints_as_sql_server_shows_it() {
        let v = via_tiberius(cells::guid("6F9619FF-8B86-D011-B42D-00C04FC964FF"), &T::Uuid);
        assert_eq!(v, text("6f9619ff-8b86-d011-b42d-00c04fc964ff"));
    }

    #[test]
    fn varbinary_max_travels_as_base64() {
        let big = vec![0xABu8; 100_000];
        let v = via_tiberius(cells::bytes(&big), &T::Bytes { max_length: None });
        let Value::Text(b64) = v else { panic!() };
        assert_eq!(B64.decode(b64).unwrap(), big);
    }

    #[test]
    fn null_of_every_type_decodes_to_null() {
        let types = [
            T::Bool,
            T::Int32,
            T::Float64,
            T::Decimal { precision: Some(38), scale: Some(38) },
            T::Text { max_length: None },
            T::Bytes { max_length: None },
            T::Uuid,
            T::Date,
            T::Time { precision: Some(6) },
            T::Timestamp { precision: Some(6) },
            T::TimestampTz { precision: Some(6) },
        ];
        for cell in cells::nulls() {
            for ty in &types {
                assert_eq!(decode(cell.clone().unwrap(), ty).unwrap(), Value::Null);
            }
        }
    }

    #[test]
    fn nul_characters_and_mismatched_types_are_clear_errors() {
        let err = decode(cells::text("a\0b").unwrap(), &T::Text { max_length: None });
        assert!(err.unwrap_err().contains("NUL"));
        let err = decode(SqlValue::Int(1), &T::Uuid).unwrap_err();
        assert!(err.contains("integer value arrived"), "{err}");
    }

    #[test]
    fn key_values_become_parameters_the_statement_casts() {
        assert_eq!(key_param(&Value::Int(5), &T::Int64).unwrap(), SqlParam::Int(5));
        assert_eq!(key_param(&Value::Bool(true), &T::Bool).unwrap(), SqlParam::Int(1));
        assert_eq!(key_param(&text("AQI="), &T::Bytes { max_length: Some(2) }).unwrap(), SqlParam::Bytes(vec![1, 2]));
        assert_eq!(
            key_param(&text("2024-01-01T00:00:00Z"), &T::TimestampTz { precision: Some(3) }).unwrap(),
            SqlParam::Text("2024-01-01T00:00:00+00:00".into())
        );
        assert_eq!(key_param(&Value::Float(0.1), &T::Float64).unwrap(), SqlParam::Text("0.1".into()));
        assert!(key_param(&Value::Null, &T::Int64).is_err());
        assert!(key_param(&text("***"), &T::Bytes { max_length: None }).is_err());
    }
}
