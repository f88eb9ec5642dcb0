//! Cell values as SQL Server sends them, in our own types.
//!
//! tiberius's [`ColumnData`] is converted here and nowhere else, so the
//! backend's decoding rules ([`super::super::decode`]) can be written and
//! tested without naming a tiberius type. The conversion keeps every value
//! exact: decimals as mantissa and scale, times as whole nanoseconds,
//! `datetime` as SQL Server's own 1/300-second ticks rounded the way SQL
//! Server displays them.

use std::borrow::Cow;
use tiberius::time::{DateTime, SmallDateTime, Time};
use tiberius::ColumnData;

/// Days from 0001-01-01 to 1900-01-01, the epoch of `datetime` and
/// `smalldatetime` (`date` and `datetime2` count from 0001-01-01).
pub const DAYS_TO_1900: i64 = 693_595;

const NANOS_PER_DAY: u64 = 86_400 * 1_000_000_000;

/// One cell.
#[derive(Debug, Clone, PartialEq)]
pub enum SqlValue {
    Null,
    Bool(bool),
    /// tinyint, smallint, int and bigint.
    Int(i64),
    F32(f32),
    F64(f64),
    /// `mantissa / 10^scale`, exact (decimal, numeric, and money cast to
    /// decimal by the reading statement).
    Decimal { mantissa: i128, scale: u8 },
    Text(String),
    Bytes(Vec<u8>),
    /// In the textual order SQL Server displays (tiberius already undid the
    /// wire's mixed-endian byte order).
    Uuid([u8; 16]),
    /// Days since 0001-01-01.
    Date(i64),
    /// Nanoseconds since midnight.
    Time(u64),
    /// Days since 0001-01-01 and nanoseconds since that midnight. `datetime`,
    /// `smalldatetime` and `datetime2` all arrive as this.
    DateTime { days: i64, nanos: u64 },
    /// The wall-clock time at `offset_minutes` from UTC. Reading statements
    /// turn `datetimeoffset` columns into UTC `datetime2` first, so this
    /// only appears for values read without that cast.
    DateTimeOffset { days: i64, nanos: u64, offset_minutes: i16 },
}

impl SqlValue {
    /// Converts one tiberius cell. Fails only for values outside what SQL
    /// Server itself can hold (a malformed server answer).
    pub fn from_column(data: ColumnData<'_>) -> Result<SqlValue, String> {
        use ColumnData as C;
        Ok(match data {
            C::U8(v) => v.map_or(SqlValue::Null, |v| SqlValue::Int(v.into())),
            C::I16(v) => v.map_or(SqlValue::Null, |v| SqlValue::Int(v.into())),
            C::I32(v) => v.map_or(SqlValue::Null, |v| SqlValue::Int(v.into())),
            C::I64(v) => v.map_or(SqlValue::Null, SqlValue::Int),
            C::F32(v) => v.map_or(SqlValue::Null, SqlValue::F32),
            C::F64(v) => v.map_or(SqlValue::Null, SqlValue::F64),
            C::Bit(v) => v.map_or(SqlValue::Null, SqlValue::Bool),
            C::String(v) => v.map_or(SqlValue::Null, |s| SqlValue::Text(s.into_owned())),
            C::Guid(v) => v.map_or(SqlValue::Null, |g| SqlValue::Uuid(*g.as_bytes())),
            C::Binary(v) => v.map_or(SqlValue::Null, |b| SqlValue::Bytes(b.into_owned())),
            C::Numeric(v) => v.map_or(SqlValue::Null, |n| SqlValue::Decimal { mantissa: n.value(), scale: n.scale() }),
            C::Xml(v) => v.map_or(SqlValue::Null, |x| SqlValue::Text(x.as_ref().to_string())),
            C::DateTime(v) => match v {
                None => SqlValue::Null,
                Some(dt) => datetime(dt)?,
            },
            C::SmallDateTime(v) => match v {
                None => SqlValue::Null,
                Some(dt) => small_datetime(dt)?,
            },
            C::Time(v) => match v {
                None => SqlValue::Null,
                Some(t) => SqlValue::Time(time_nanos(t)?),
            },
            C::Date(v) => v.map_or(SqlValue::Null, |d| SqlValue::Date(d.days() as i64)),
            C::DateTime2(v) => match v {
                None => SqlValue::Null,
                Some(dt) => SqlValue::DateTime { days: dt.date().days() as i64, nanos: time_nanos(dt.time())? },
            },
            C::DateTimeOffset(v) => match v {
                None => SqlValue::Null,
                Some(dto) => {
                    let dt = dto.datetime2();
                    SqlValue::DateTimeOffset {
                        days: dt.date().days() as i64,
                        nanos: time_nanos(dt.time())?,
                        offset_minutes: dto.offset(),
                    }
                }
            },
        })
    }
}

/// `datetime` counts 1/300 s ticks; SQL Server shows them rounded to whole
/// milliseconds (.000, .003, .007), and that displayed value is what the
/// mirror must hold.
fn datetime(dt: DateTime) -> Result<SqlValue, String> {
    let ticks = dt.seconds_fragments() as u64;
    if ticks >= 300 * 86_400 {
        return Err(format!("datetime tick count {ticks} is beyond one day"));
    }
    let millis = (ticks * 10 + 1) / 3;
    Ok(SqlValue::DateTime { days: dt.days() as i64 + DAYS_TO_1900, nanos: millis * 1_000_000 })
}

/// `smalldatetime` counts whole minutes since midnight.
fn small_datetime(dt: SmallDateTime) -> Result<SqlValue, String> {
    let minutes = dt.seconds_fragments() as u64;
    if minutes >= 24 * 60 {
        return Err(format!("smalldatetime minute count {minutes} is beyond one day"));
    }
    Ok(SqlValue::DateTime { days: dt.days() as i64 + DAYS_TO_1900, nanos: minutes * 60 * 1_000_000_000 })
}

fn time_nanos(t: Time) -> Result<u64, String> {
    if t.scale() > 7 {
        return Err(format!("time scale {} is above 7", t.scale()));
    }
    let nanos = t.increments() * 10u64.pow(9 - t.scale() as u32);
    if nanos >= NANOS_PER_DAY {
        return Err(format!("time of {nanos} ns is beyond one day"));
    }
    Ok(nanos)
}

/// A statement parameter. Key values are bound in one of these three
/// forms and cast to the column's declared type in the statement text,
/// so comparisons use the column's own type and collation.
#[derive(Debug, Clone, PartialEq)]
pub enum SqlParam {
    Int(i64),
    Text(String),
    Bytes(Vec<u8>),
}

impl SqlParam {
    pub(super) fn to_column(&self) -> ColumnData<'_> {
        match self {
            SqlParam::Int(i) => ColumnData::I64(Some(*i)),
            SqlParam::Text(s) => ColumnData::String(Some(Cow::Borrowed(s.as_str()))),
            SqlParam::Bytes(b) => ColumnData::Binary(Some(Cow::Borrowed(b.as_slice()))),
        }
    }
}

/// Builders of tiberius cells for tests of the conversion; they live here
/// so that tests elsewhere never name tiberius types either.
#[cfg(test)]
pub mod cells {
    use super::*;
    use tiberius::numeric::Numeric;
    use tiberius::time::{Date, DateTime2, DateTimeOffset};

    pub fn numeric(mantissa: i128, scale: u8) -> Result<SqlValue, String> {
        SqlValue::from_column(ColumnData::Numeric(Some(Numeric::new_with_scale(mantissa, scale))))
    }
    pub fn datetime(days_since_1900: i32, ticks: u32) -> Result<SqlValue, String> {
        SqlValue::from_column(ColumnData::DateTime(Some(DateTime::new(days_since_1900, ticks))))
    }
    pub fn small_datetime(days_since_1900: u16, minutes: u16) -> Result<SqlValue, String> {
        SqlValue::from_column(ColumnData::SmallDateTime(Some(SmallDateTime::new(days_since_1900, minutes))))
    }
    pub fn datetime2(days: u32, increments: u64, scale: u8) -> Result<SqlValue, String> {
        SqlValue::from_column(ColumnData::DateTime2(Some(DateTime2::new(Date::new(days), Time::new(increments, scale)))))
    }
    pub fn datetimeoffset(days: u32, increments: u64, scale: u8, offset: i16) -> Result<SqlValue, String> {
        let dt2 = DateTime2::new(Date::new(days), Time::new(increments, scale));
        SqlValue::from_column(ColumnData::DateTimeOffset(Some(DateTimeOffset::new(dt2, offset))))
    }
    pub fn time(increments: u64, scale: u8) -> Result<SqlValue, String> {
        SqlValue::from_column(ColumnData::Time(Some(Time::new(increments, scale))))
    }
    pub fn date(days: u32) -> Result<SqlValue, String> {
        SqlValue::from_column(ColumnData::Date(Some(Date::new(days))))
    }
    pub fn guid(text: &str) -> Result<SqlValue, String> {
        SqlValue::from_column(ColumnData::Guid(Some(text.parse().unwrap())))
    }
    pub fn text(s: &str) -> Result<SqlValue, String> {
        SqlValue::from_column(ColumnData::String(Some(Cow::Owned(s.to_owned()))))
    }
    pub fn bytes(b: &[u8]) -> Result<SqlValue, String> {
        SqlValue::from_column(ColumnData::Binary(Some(Cow::Owned(b.to_vec()))))
    }
    /// NULL in every shape SQL Server sends it.
    pub fn nulls() -> Vec<Result<SqlValue, String>> {
        [
            ColumnData::U8(None),
            ColumnData::I16(None),
            ColumnData::I32(None),
            ColumnData::I64(None),
            ColumnData::F32(None),
            ColumnData::F64(None),
            ColumnData::Bit(None),
            ColumnData::String(None),
            ColumnData::Guid(None),
            ColumnData::Binary(None),
            ColumnData::Numeric(None),
            ColumnData::Xml(None),
            ColumnData::DateTime(None),
            ColumnData::SmallDateTime(None),
            ColumnData::Time(None),
            ColumnData::Date(None),
            ColumnData::DateTime2(None),
            ColumnData::DateTimeOffset(None),
        ]
        .into_iter()
        .map(SqlValue::from_column)
        .collect()
    }
    pub fn ints() -> Vec<(Result<SqlValue, String>, i64)> {
        [
            (ColumnData::U8(Some(255)), 255),
            (ColumnData::I16(Some(i16::MIN)), i16::MIN as i64),
            (ColumnData::I32(Some(i32::MAX)), i32::MAX as i64),
            (ColumnData::I64(Some(i64::MIN)), i64::MIN),
        ]
        .into_iter()
        .map(|(c, i)| (SqlValue::from_column(c), i))
        .collect()
    }
    pub fn bit(b: bool) -> Result<SqlValue, String> {
        SqlValue::from_column(ColumnData::Bit(Some(b)))
    }
    pub fn f32(v: f32) -> Result<SqlValue, String> {
        SqlValue::from_column(ColumnData::F32(Some(v)))
    }
    pub fn f64(v: f64) -> Result<SqlValue, String> {
        SqlValue::from_column(ColumnData::F64(Some(v)))
    }
}

#[cfg(test)]
mod tests {
    use super::cells;
    use super::*;

    #[test]
    fn null_of_every_type_is_null() {
        for cell in cells::nulls() {
            assert_eq!(cell.unwrap(), SqlValue::Null);
        }
    }

    #[test]
    fn integers_of_every_width_widen_to_i64() {
        for (cell, expected) in cells::ints() {
            assert_eq!(cell.unwrap(), SqlValue::Int(expected));
        }
    }

    #[test]
    fn datetime_ticks_round_to_the_milliseconds_sql_server_shows() {
        // 1900-01-01 00:00:00.003 and .007 and 23:59:59.997 of 1753-01-01.
        let got = |days, ticks| cells::datetime(days, ticks).unwrap();
        assert_eq!(got(0, 1), SqlValue::DateTime { days: DAYS_TO_1900, nanos: 3_000_000 });
        assert_eq!(got(0, 2), SqlValue::DateTime { days: DAYS_TO_1900, nanos: 7_000_000 });
        assert_eq!(
            got(-53690, 25_919_999),
            SqlValue::DateTime { days: DAYS_TO_1900 - 53690, nanos: 86_399_997_000_000 }
        );
        assert!(cells::datetime(0, 300 * 86_400).is_err());
    }

    #[test]
    fn smalldatetime_counts_minutes() {
        let v = cells::small_datetime(1, 61).unwrap();
        assert_eq!(v, SqlValue::DateTime { days: DAYS_TO_1900 + 1, nanos: 3_660_000_000_000 });
        assert!(cells::small_datetime(1, 1440).is_err());
    }

    #[test]
    fn time_increments_scale_to_nanoseconds() {
        assert_eq!(cells::time(1, 7).unwrap(), SqlValue::Time(100));
        assert_eq!(cells::time(5, 1).unwrap(), SqlValue::Time(500_000_000));
        assert_eq!(cells::time(863_999_999_999, 7).unwrap(), SqlValue::Time(86_399_999_999_900));
        assert!(cells::time(864_000_000_000, 7).is_err());
    }

    #[test]
    fn datetimeoffset_keeps_wall_clock_and_offset() {
        let v = cells::datetimeoffset(10, 36_000_000_000, 7, -90).unwrap();
        assert_eq!(v, SqlValue::DateTimeOffset { days: 10, nanos: 3_600_000_000_000, offset_minutes: -90 });
    }

    #[test]
    fn uniqueidentifier_keeps_its_displayed_byte_order() {
        let v = cells::guid("6f9619ff-8b86-d011-b42d-00c04fc964ff").unwrap();
        assert_eq!(
            v,
            SqlValue::Uuid([
                0x6f, 0x96, 0x19, 0xff, 0x8b, 0x86, 0xd0, 0x11, 0xb4, 0x2d, 0x00, 0xc0, 0x4f, 0xc9, 0x64, 0xff
            ])
        );
    }

    #[test]
    fn decimal_38_keeps_every_digit() {
        let m = 99_999_999_999_999_999_999_999_999_999_999_999_999i128;
        assert_eq!(
            cells::numeric(m, 38).unwrap(),
            SqlValue::Decimal { mantissa: m, scale: 38 }
        );
    }

    #[test]
    fn params_bind_as_bigint_nvarchar_and_varbinary() {
        assert_eq!(SqlParam::Int(7).to_column(), ColumnData::I64(Some(7)));
        assert_eq!(SqlParam::Text("a".into()).to_column(), ColumnData::String(Some(Cow::Borrowed("a"))));
        assert_eq!(SqlParam::Bytes(vec![1]).to_column(), ColumnData::Binary(Some(Cow::Borrowed(&[1u8][..]))));
    }
}
