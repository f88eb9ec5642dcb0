//! Protocol column types as PostgreSQL types, and the `CREATE TABLE` of a
//! mirror table (the mapping is documented in `docs/receiver.md`).

use super::sql::{ident_list, qualified, quote_ident};
use crate::protocol::{ColumnType, TableSchema};

/// The column's declared PostgreSQL type, with its length, precision or
/// scale. Schema validation has already bounded every modifier.
pub fn pg_type(ty: &ColumnType) -> String {
    use ColumnType as T;
    fn with_precision(base: &str, p: &Option<u8>) -> String {
        match p {
            Some(p) => format!("{base}({p})"),
            None => base.to_owned(),
        }
    }
    match ty {
        T::Bool => "boolean".into(),
        T::Int16 => "smallint".into(),
        T::Int32 => "integer".into(),
        T::Int64 => "bigint".into(),
        T::Float32 => "real".into(),
        T::Float64 => "double precision".into(),
        T::Decimal { precision: Some(p), scale } => format!("numeric({p},{})", scale.unwrap_or(0)),
        T::Decimal { precision: None, .. } => "numeric".into(),
        T::Text { max_length: Some(n) } => format!("varchar({n})"),
        T::Text { max_length: None } => "text".into(),
        T::FixedText { length } => format!("char({length})"),
        T::Bytes { .. } => "bytea".into(),
        T::Date => "date".into(),
        T::Time { precision } => with_precision("time", precision),
        T::Timestamp { precision } => with_precision("timestamp", precision),
        T::TimestampTz { precision } => with_precision("timestamptz", precision),
        T::Uuid => "uuid".into(),
        T::Json => "jsonb".into(),
    }
}

/// The type staged values have before they are *assigned* to the column:
/// the declared type without its modifier, so that the assignment (not a
/// silently truncating cast) judges length and precision.
pub fn input_type(ty: &ColumnType) -> &'static str {
    ty.postgres_base_type()
}

/// `CREATE TABLE` for a validated schema: every column with its type and
/// `NOT NULL` where the source has it, and the source's primary key (which
/// the upserts' `ON CONFLICT` relies on).
pub fn create_table(mirror_schema: &str, table: &TableSchema) -> String {
    let mut parts: Vec<String> = table
        .columns
        .iter()
        .map(|c| {
            let not_null = if c.nullable { "" } else { " NOT NULL" };
            format!("{} {}{not_null}", quote_ident(&c.name), pg_type(&c.data_type))
        })
        .collect();
    parts.push(format!("PRIMARY KEY ({})", ident_list(table.primary_key.iter().map(String::as_str))));
    format!("CREATE TABLE {} ({})", qualified(mirror_schema, &table.name), parts.join(", "))
}

pub fn drop_table(mirror_schema: &str, table: &str) -> String {
    format!("DROP TABLE IF EXISTS {}", qualified(mirror_schema, table))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ColumnSchema;

    fn col(name: &str, data_type: ColumnType, nullable: bool) -> ColumnSchema {
        ColumnSchema { name: name.into(), data_type, nullable }
    }

    #[test]
    fn every_type_maps_with_its_modifiers() {
        use ColumnType as T;
        assert_eq!(pg_type(&T::Decimal { precision: Some(10), scale: Some(2) }), "numeric(10,2)");
        assert_eq!(pg_type(&T::Decimal { precision: Some(10), scale: None }), "numeric(10,0)");
        assert_eq!(pg_type(&T::Decimal { precision: None, scale: None }), "numeric");
        assert_eq!(pg_type(&T::Text { max_length: Some(5) }), "varchar(5)");
        assert_eq!(pg_type(&T::FixedText { length: 3 }), "char(3)");
        assert_eq!(pg_type(&T::Time { precision: Some(0) }), "time(0)");
        assert_eq!(pg_type(&T::TimestampTz { precision: None }), "timestamptz");
        assert_eq!(input_type(&T::FixedText { length: 3 }), "text");
    }

    #[test]
    fn create_table_quotes_every_name() {
        let t = TableSchema {
            name: "a\"b".into(),
            columns: vec![col("select", ColumnType::Int32, false), col("x y", ColumnType::Json, true)],
            primary_key: vec!["select".into()],
        };
        assert_eq!(
            create_table("mirror_t", &t),
            "CREATE TABLE \"mirror_t\".\"a\"\"b\" (\"select\" integer NOT NULL, \"x y\" jsonb, PRIMARY KEY (\"select\"))"
        );
    }
}
