//! SQL Server column types: which protocol type each becomes, how the
//! reading statement must select it, and how a key value is cast back.
//!
//! Some types are read through a cast so that the value arrives exact and
//! unambiguous: `money` as `decimal(19,4)` (tiberius would hand it over as
//! a float), `datetimeoffset` as a UTC `datetime2` (the mirror keeps the
//! instant, not the original offset), `xml`/`text`/`ntext`/`json` as
//! `nvarchar(max)` and `image` as `varbinary(max)`.
//!
//! PostgreSQL keeps at most microseconds, so `time(7)`, `datetime2(7)` and
//! `datetimeoffset(7)` are mirrored with precision 6 and their 100 ns digit
//! is truncated. As a key column such a type could make two source keys one
//! mirror key, so it is refused there.

use crate::protocol::ColumnType;

/// A column as the catalog describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogColumn {
    pub name: String,
    /// `TYPE_NAME(system_type_id)`: the built-in type under any alias type.
    pub system_type: String,
    /// The declared type's own name (an alias type's name, or the same).
    pub declared_type: String,
    /// CLR types (hierarchyid, geometry, geography, user assemblies).
    pub is_assembly_type: bool,
    /// Bytes; -1 for `(max)`.
    pub max_length: i16,
    pub precision: u8,
    pub scale: u8,
    pub nullable: bool,
    pub is_computed: bool,
    pub default: Option<String>,
    /// Position in the primary key, 1-based.
    pub key_ordinal: Option<u8>,
}

/// How the reading statement selects a column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadAs {
    Plain,
    /// `CAST(col AS <type>)`.
    Cast(String),
    /// `CAST(SWITCHOFFSET(col, '+00:00') AS datetime2(n))`: the UTC instant.
    UtcDateTime2(u8),
}

/// A supported column's mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MsType {
    pub protocol: ColumnType,
    /// The column's type spelled for `CAST(@Pn AS ...)`: key parameters are
    /// cast to exactly the column's type so comparisons follow its order.
    pub native: String,
    pub read_as: ReadAs,
}

/// Maps a column, or says why it cannot be mirrored and what to do.
pub fn map_type(c: &CatalogColumn) -> Result<MsType, String> {
    use ColumnType as T;
    let sys = c.system_type.to_ascii_lowercase();
    let refuse = |why: &str| {
        Err(format!(
            "column {} has type {} which {why}; leave the column out of the schema map",
            c.name, c.declared_type
        ))
    };
    if c.is_assembly_type || matches!(sys.as_str(), "hierarchyid" | "geometry" | "geography") {
        return refuse("is a CLR type that the mirror cannot reproduce faithfully");
    }
    let chars = |bytes_per_char: i16| -> Option<u32> {
        (c.max_length >= 0).then(|| (c.max_length / bytes_per_char) as u32)
    };
    let len_text = |n: Option<u32>| n.map_or("max".to_owned(), |n| n.to_string());
    let sub_micro = |p: u8| p.min(6);
    // The read form follows from the native spelling (`read_as_for`), the
    // one place that knows which types are read through a cast.
    let plain = |protocol: ColumnType, native: String| {
        let read_as = read_as_for(&native);
        Ok(MsType { protocol, native, read_as })
    };
    match sys.as_str() {
        "bit" => plain(T::Bool, "bit".into()),
        "tinyint" => plain(T::Int16, "tinyint".into()),
        "smallint" => plain(T::Int16, "smallint".into()),
        "int" => plain(T::Int32, "int".into()),
        "bigint" => plain(T::Int64, "bigint".into()),
        "decimal" | "numeric" => plain(
            T::Decimal { precision: Some(c.precision.into()), scale: Some(c.scale.into()) },
            format!("{sys}({},{})", c.precision, c.scale),
        ),
        "money" => plain(T::Decimal { precision: Some(19), scale: Some(4) }, "money".into()),
        "smallmoney" => plain(T::Decimal { precision: Some(10), scale: Some(4) }, "smallmoney".into()),
        "real" => plain(T::Float32, "real".into()),
        "float" if c.precision <= 24 => plain(T::Float32, "real".into()),
        "float" => plain(T::Float64, "float".into()),
        "date" => plain(T::Date, "date".into()),
        "time" => plain(T::Time { precision: Some(sub_micro(c.scale)) }, format!("time({})", c.scale)),
        "datetime" => plain(T::Timestamp { precision: Some(3) }, "datetime".into()),
        "smalldatetime" => plain(T::Timestamp { precision: Some(0) }, "smalldatetime".into()),
        "datetime2" => {
            plain(T::Timestamp { precision: Some(sub_micro(c.scale)) }, format!("datetime2({})", c.scale))
        }
        "datetimeoffset" => {
            plain(T::TimestampTz { precision: Some(sub_micro(c.scale)) }, format!("datetimeoffset({})", c.scale))
        }
        "char" => plain(T::FixedText { length: chars(1).unwrap_or(1) }, format!("char({})", len_text(chars(1)))),
        "nchar" => plain(T::FixedText { length: chars(2).unwrap_or(1) }, format!("nchar({})", len_text(chars(2)))),
        "varchar" => plain(T::Text { max_length: chars(1) }, format!("varchar({})", len_text(chars(1)))),
        "nvarchar" => plain(T::Text { max_length: chars(2) }, format!("nvarchar({})", len_text(chars(2)))),
        "text" | "ntext" | "xml" => plain(T::Text { max_length: None }, sys.clone()),
        "json" => plain(T::Json, sys.clone()),
        "binary" => {
            plain(T::Bytes { max_length: chars(1) }, format!("binary({})", len_text(chars(1))))
        }
        "varbinary" => {
            plain(T::Bytes { max_length: chars(1) }, format!("varbinary({})", len_text(chars(1))))
        }
        "image" => plain(T::Bytes { max_length: None }, "image".into()),
        // `timestamp` is the catalog's name for rowversion.
        "timestamp" | "rowversion" => plain(T::Bytes { max_length: Some(8) }, "binary(8)".into()),
        "uniqueidentifier" => plain(T::Uuid, "uniqueidentifier".into()),
        "sql_variant" => refuse("holds values of varying types that one mirror column cannot type"),
        _ => refuse("is not supported by ctmirror"),
    }
}

/// How to read a column whose [`MsType::native`] spelling is `native`;
/// the schema carried between calls keeps only that spelling.
pub fn read_as_for(native: &str) -> ReadAs {
    let base = native.split('(').next().unwrap_or(native);
    match base {
        "money" => ReadAs::Cast("decimal(19,4)".into()),
        "smallmoney" => ReadAs::Cast("decimal(10,4)".into()),
        "text" | "ntext" | "xml" | "json" => ReadAs::Cast("nvarchar(max)".into()),
        "image" => ReadAs::Cast("varbinary(max)".into()),
        "datetimeoffset" => {
            let p = native.trim_start_matches("datetimeoffset(").trim_end_matches(')').parse().unwrap_or(7);
            ReadAs::UtcDateTime2(p)
        }
        _ => ReadAs::Plain,
    }
}

/// Key columns must map one-to-one: a type whose values the mirror rounds
/// could merge two source keys into one mirror key.
pub fn check_key_type(c: &CatalogColumn, ty: &MsType) -> Result<(), String> {
    let sys = c.system_type.to_ascii_lowercase();
    if matches!(sys.as_str(), "time" | "datetime2" | "datetimeoffset") && c.scale > 6 {
        return Err(format!(
            "primary-key column {} has type {}({}) whose 100 ns digit the mirror cannot keep; \
             two keys could collide in the mirror, so the table cannot be mirrored",
            c.name, sys, c.scale
        ));
    }
    if matches!(ty.read_as, ReadAs::Cast(_)) && !matches!(sys.as_str(), "money" | "smallmoney") {
        return Err(format!("primary-key column {} has type {} which cannot be a mirror key", c.name, sys));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn col(system_type: &str, max_length: i16, precision: u8, scale: u8) -> CatalogColumn {
        CatalogColumn {
            name: "c".into(),
            system_type: system_type.into(),
            declared_type: system_type.into(),
            is_assembly_type: false,
            max_length,
            precision,
            scale,
            nullable: true,
            is_computed: false,
            default: None,
            key_ordinal: None,
        }
    }

    fn protocol(system_type: &str, max_length: i16, precision: u8, scale: u8) -> ColumnType {
        map_type(&col(system_type, max_length, precision, scale)).unwrap().protocol
    }

    #[test]
    fn every_supported_type_has_a_protocol_type() {
        use ColumnType as T;
        let cases: Vec<(&str, i16, u8, u8, ColumnType)> = vec![
            ("bit", 1, 1, 0, T::Bool),
            ("tinyint", 1, 3, 0, T::Int16),
            ("smallint", 2, 5, 0, T::Int16),
            ("int", 4, 10, 0, T::Int32),
            ("bigint", 8, 19, 0, T::Int64),
            ("decimal", 17, 38, 38, T::Decimal { precision: Some(38), scale: Some(38) }),
            ("numeric", 9, 12, 2, T::Decimal { precision: Some(12), scale: Some(2) }),
            ("money", 8, 19, 4, T::Decimal { precision: Some(19), scale: Some(4) }),
            ("smallmoney", 4, 10, 4, T::Decimal { precision: Some(10), scale: Some(4) }),
            ("real", 4, 24, 0, T::Float32),
            ("float", 8, 53, 0, T::Float64),
            ("float", 4, 24, 0, T::Float32),
            ("date", 3, 10, 0, T::Date),
            ("time", 5, 16, 7, T::Time { precision: Some(6) }),
            ("time", 3, 8, 0, T::Time { precision: Some(0) }),
            ("datetime", 8, 23, 3, T::Timestamp { precision: Some(3) }),
            ("datetime2", 8, 27, 7, T::Timestamp { precision: Some(6) }),
            ("datetime2", 6, 22, 2, T::Timestamp { precision: Some(2) }),
            ("smalldatetime", 4, 16, 0, T::Timestamp { precision: Some(0) }),
            ("datetimeoffset", 10, 34, 7, T::TimestampTz { precision: Some(6) }),
            ("char", 10, 0, 0, T::FixedText { length: 10 }),
            ("nchar", 20, 0, 0, T::FixedText { length: 10 }),
            ("varchar", 50, 0, 0, T::Text { max_length: Some(50) }),
            ("varchar", -1, 0, 0, T::Text { max_length: None }),
            ("nvarchar", 100, 0, 0, T::Text { max_length: Some(50) }),
            ("nvarchar", -1, 0, 0, T::Text { max_length: None }),
            ("text", 16, 0, 0, T::Text { max_length: None }),
            ("ntext", 16, 0, 0, T::Text { max_length: None }),
            ("xml", -1, 0, 0, T::Text { max_length: None }),
            ("binary", 16, 0, 0, T::Bytes { max_length: Some(16) }),
            ("varbinary", 100, 0, 0, T::Bytes { max_length: Some(100) }),
            ("varbinary", -1, 0, 0, T::Bytes { max_length: None }),
            ("image", 16, 0, 0, T::Bytes { max_length: None }),
            ("uniqueidentifier", 16, 0, 0, T::Uuid),
            ("timestamp", 8, 0, 0, T::Bytes { max_length: Some(8) }),
        ];
        for (sys, len, p, s, expected) in cases {
            let got = protocol(sys, len, p, s);
            assert_eq!(got, expected, "{sys}({len},{p},{s})");
            let schema_check =
                crate::protocol::ColumnSchema { name: "c".into(), data_type: got, nullable: false };
            let t = crate::protocol::TableSchema {
                name: "t".into(),
                columns: vec![schema_check],
                primary_key: vec!["c".into()],
            };
            let valid = t.validate();
            assert!(valid.is_ok(), "{sys} maps to an invalid protocol type: {valid:?}");
        }
    }

    #[test]
    fn lossy_or_awkward_types_are_read_through_a_cast() {
        let read = |sys: &str, len: i16, s: u8| map_type(&col(sys, len, 0, s)).unwrap().read_as;
        assert_eq!(read("money", 8, 4), ReadAs::Cast("decimal(19,4)".into()));
        assert_eq!(read("smallmoney", 4, 4), ReadAs::Cast("decimal(10,4)".into()));
        assert_eq!(read("xml", -1, 0), ReadAs::Cast("nvarchar(max)".into()));
        assert_eq!(read("ntext", 16, 0), ReadAs::Cast("nvarchar(max)".into()));
        assert_eq!(read("image", 16, 0), ReadAs::Cast("varbinary(max)".into()));
        assert_eq!(read("datetimeoffset", 10, 7), ReadAs::UtcDateTime2(7));
        assert_eq!(read("int", 4, 0), ReadAs::Plain);
    }

    #[test]
    fn the_read_form_follows_from_the_native_spelling() {
        for (sys, len, p, s) in [
            ("money", 8, 19, 4),
            ("smallmoney", 4, 10, 4),
            ("xml", -1, 0, 0),
            ("text", 16, 0, 0),
            ("image", 16, 0, 0),
            ("datetimeoffset", 10, 34, 3),
            ("int", 4, 10, 0),
            ("timestamp", 8, 0, 0),
            ("nvarchar", -1, 0, 0),
        ] {
            let t = map_type(&col(sys, len, p, s)).unwrap();
            assert_eq!(read_as_for(&t.native), t.read_as, "{sys}");
        }
    }

    #[test]
    fn key_casts_use_the_columns_exact_type() {
        let native = |sys: &str, len: i16, p: u8, s: u8| map_type(&col(sys, len, p, s)).unwrap().native;
        assert_eq!(native("nvarchar", 100, 0, 0), "nvarchar(50)");
        assert_eq!(native("varchar", -1, 0, 0), "varchar(max)");
        assert_eq!(native("decimal", 9, 12, 2), "decimal(12,2)");
        assert_eq!(native("datetime2", 8, 27, 7), "datetime2(7)");
        assert_eq!(native("nchar", 20, 0, 0), "nchar(10)");
    }

    #[test]
    fn unmirrorable_types_are_refused_with_advice() {
        for sys in ["sql_variant", "hierarchyid", "geography", "geometry", "cursor", "vector"] {
            let err = map_type(&col(sys, 8, 0, 0)).unwrap_err();
            assert!(err.contains("leave the column out of the schema map"), "{sys}: {err}");
        }
        let mut clr = col("varbinary", -1, 0, 0);
        clr.is_assembly_type = true;
        clr.declared_type = "MyPoint".into();
        assert!(map_type(&clr).unwrap_err().contains("MyPoint"));
    }

    #[test]
    fn alias_types_map_by_their_base_type() {
        let mut c = col("nvarchar", 256, 0, 0);
        c.declared_type = "sysname".into();
        assert_eq!(map_type(&c).unwrap().protocol, ColumnType::Text { max_length: Some(128) });
    }

    #[test]
    fn hundred_nanosecond_keys_are_refused() {
        let c = col("datetime2", 8, 27, 7);
        let t = map_type(&c).unwrap();
        assert!(check_key_type(&c, &t).unwrap_err().contains("100 ns"));
        let c3 = col("datetime2", 7, 23, 3);
        assert!(check_key_type(&c3, &map_type(&c3).unwrap()).is_ok());
    }
}
