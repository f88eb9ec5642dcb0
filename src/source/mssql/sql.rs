//! Every statement the SQL Server backend sends, built as text here so the
//! exact SQL is unit-tested.
//!
//! Identifiers go through [`quote`] (brackets, `]` doubled); values are
//! always `@Pn` parameters. The only numbers spliced into text are the
//! retention hours of `ALTER DATABASE` (an integer from the configuration;
//! DDL takes no parameters).
//!
//! T-SQL has no row-value comparison, so a keyset position over a
//! composite key is spelled out: `(a > @p1) OR (a = @p1 AND b > @p2) ...`.
//! Every key parameter is cast to the key column's own type, so the
//! comparison uses the column's collation and order, the same order as
//! `ORDER BY`: the cursor compares in SQL, never in Rust.

use super::types::{MsType, ReadAs};
use crate::source::SourceTable;

/// A mapped column with its SQL Server mapping.
#[derive(Debug, Clone)]
pub struct MsColumn {
    pub name: String,
    pub ty: MsType,
}

/// Brackets an identifier, doubling `]`.
pub fn quote(name: &str) -> String {
    format!("[{}]", name.replace(']', "]]"))
}

/// The schema a [`SourceTable`] lives in (`dbo` when unspecified).
pub fn schema_of(table: &SourceTable) -> &str {
    table.schema.as_deref().unwrap_or("dbo")
}

pub fn qualified(table: &SourceTable) -> String {
    format!("{}.{}", quote(schema_of(table)), quote(&table.name))
}

/// `schema.name` for messages.
pub fn display(table: &SourceTable) -> String {
    format!("{}.{}", schema_of(table), table.name)
}

pub const CURRENT_VERSION: &str = "SELECT CHANGE_TRACKING_CURRENT_VERSION()";

/// @P1: the table's quoted two-part name (a value: OBJECT_ID parses it).
pub const MIN_VALID_VERSION: &str = "SELECT CHANGE_TRACKING_MIN_VALID_VERSION(OBJECT_ID(@P1))";

/// The identity of this copy of the database: `database_guid` changes when
/// a backup is restored as a new database (or copied and attached),
/// `recovery_fork_guid` whenever a restore starts a new recovery fork,
/// including `RESTORE ... WITH REPLACE` over the same database.
pub const IDENTITY: &str = "SELECT CONVERT(nvarchar(36), database_guid), CONVERT(nvarchar(36), recovery_fork_guid) \
                            FROM sys.database_recovery_status WHERE database_id = DB_ID()";

pub const DATABASE_TRACKING: &str = "SELECT retention_period, retention_period_units_desc, is_auto_cleanup_on \
                                     FROM sys.change_tracking_databases WHERE database_id = DB_ID()";

pub const SNAPSHOT_STATE: &str =
    "SELECT snapshot_isolation_state_desc FROM sys.databases WHERE database_id = DB_ID()";

pub const ENABLE_SNAPSHOT: &str = "ALTER DATABASE CURRENT SET ALLOW_SNAPSHOT_ISOLATION ON";

pub fn enable_database(retention_hours: u64) -> String {
    format!(
        "ALTER DATABASE CURRENT SET CHANGE_TRACKING = ON (CHANGE_RETENTION = {retention_hours} HOURS, AUTO_CLEANUP = ON)"
    )
}

/// @P1 schema, @P2 table. Answers the table's object id, whether it is
/// tracked, and whether it has a primary key.
pub const FIND_TABLE: &str = "SELECT t.object_id, \
        CASE WHEN ct.object_id IS NULL THEN 0 ELSE 1 END, \
        CASE WHEN EXISTS (SELECT 1 FROM sys.indexes i WHERE i.object_id = t.object_id AND i.is_primary_key = 1) \
             THEN 1 ELSE 0 END \
   FROM sys.tables AS t \
   JOIN sys.schemas AS s ON s.schema_id = t.schema_id \
   LEFT JOIN sys.change_tracking_tables AS ct ON ct.object_id = t.object_id \
  WHERE s.name = @P1 AND t.name = @P2";

pub fn enable_table(table: &SourceTable) -> String {
    format!("ALTER TABLE {} ENABLE CHANGE_TRACKING WITH (TRACK_COLUMNS_UPDATED = OFF)", qualified(table))
}

/// @P1 schema, @P2 table. One row per column in column order: name,
/// built-in type, declared type, CLR flag, max_length, precision, scale,
/// nullability, computed flag, default definition, primary-key ordinal.
pub const COLUMNS: &str = "SELECT c.name, TYPE_NAME(c.system_type_id), ty.name, \
        CONVERT(int, ty.is_assembly_type), CONVERT(int, c.max_length), CONVERT(int, c.precision), \
        CONVERT(int, c.scale), CONVERT(int, c.is_nullable), CONVERT(int, c.is_computed), \
        dc.definition, CONVERT(int, ic.key_ordinal) \
   FROM sys.columns AS c \
   JOIN sys.tables AS t ON t.object_id = c.object_id \
   JOIN sys.schemas AS s ON s.schema_id = t.schema_id \
   JOIN sys.types AS ty ON ty.user_type_id = c.user_type_id \
   LEFT JOIN sys.default_constraints AS dc ON dc.object_id = c.default_object_id \
   LEFT JOIN sys.indexes AS i ON i.object_id = c.object_id AND i.is_primary_key = 1 \
   LEFT JOIN sys.index_columns AS ic \
          ON ic.object_id = i.object_id AND ic.index_id = i.index_id AND ic.column_id = c.column_id \
  WHERE s.name = @P1 AND t.name = @P2 \
  ORDER BY c.column_id";

/// How a column is selected from alias `alias`.
pub fn select_expr(alias: &str, c: &MsColumn) -> String {
    let col = format!("{alias}.{}", quote(&c.name));
    match &c.ty.read_as {
        ReadAs::Plain => col,
        ReadAs::Cast(to) => format!("CAST({col} AS {to})"),
        ReadAs::UtcDateTime2(p) => format!("CAST(SWITCHOFFSET({col}, '+00:00') AS datetime2({p}))"),
    }
}

fn select_list(alias: &str, columns: &[&MsColumn]) -> String {
    columns.iter().map(|c| select_expr(alias, c)).collect::<Vec<_>>().join(", ")
}

fn order_by(alias: &str, keys: &[&MsColumn]) -> String {
    keys.iter().map(|k| format!("{alias}.{}", quote(&k.name))).collect::<Vec<_>>().join(", ")
}

/// `(a > @p1) OR (a = @p1 AND b > @p2) OR ...` for keys compared from
/// parameter number `first` on.
pub fn keyset_after(alias: &str, keys: &[&MsColumn], first: usize) -> String {
    let param = |i: usize| format!("CAST(@P{} AS {})", first + i, keys[i].ty.native);
    let col = |i: usize| format!("{alias}.{}", quote(&keys[i].name));
    (0..keys.len())
        .map(|n| {
            let mut terms: Vec<String> = (0..n).map(|i| format!("{} = {}", col(i), param(i))).collect();
            terms.push(format!("{} > {}", col(n), param(n)));
            format!("({})", terms.join(" AND "))
        })
        .collect::<Vec<_>>()
        .join(" OR ")
}

/// A snapshot page: rows after the key position (@P1..@Pk when `has_after`)
/// in key order, at most `@P{k+1}` (or `@P1`) rows.
pub fn snapshot_chunk(table: &SourceTable, columns: &[&MsColumn], keys: &[&MsColumn], has_after: bool) -> String {
    let (filter, limit) = if has_after {
        (format!(" WHERE {}", keyset_after("t", keys, 1)), keys.len() + 1)
    } else {
        (String::new(), 1)
    };
    format!(
        "SELECT TOP (@P{limit}) {} FROM {} AS t{filter} ORDER BY {}",
        select_list("t", columns),
        qualified(table),
        order_by("t", keys)
    )
}

/// A change page. Parameters: @P1 the last version fully consumed (the
/// CHANGETABLE baseline), @P2 the cycle's upper version; with `has_after`,
/// @P3 the version the cursor stands inside and @P4.. its key; then the
/// row limit. Columns: version, operation, whether the row exists, the key
/// (from the change table, so deleted keys have values), then the row's
/// mapped columns (NULL when it is gone).
pub fn changes_chunk(table: &SourceTable, columns: &[&MsColumn], keys: &[&MsColumn], has_after: bool) -> String {
    let join = keys
        .iter()
        .map(|k| format!("t.{q} = ct.{q}", q = quote(&k.name)))
        .collect::<Vec<_>>()
        .join(" AND ");
    let present = format!("CASE WHEN t.{} IS NULL THEN 0 ELSE 1 END", quote(&keys[0].name));
    let (position, limit) = if has_after {
        (
            format!(
                " AND (ct.SYS_CHANGE_VERSION > @P3 OR (ct.SYS_CHANGE_VERSION = @P3 AND ({})))",
                keyset_after("ct", keys, 4)
            ),
            keys.len() + 4,
        )
    } else {
        (String::new(), 3)
    };
    format!(
        "SELECT TOP (@P{limit}) ct.SYS_CHANGE_VERSION, ct.SYS_CHANGE_OPERATION, {present}, {}, {} \
         FROM CHANGETABLE(CHANGES {table}, @P1) AS ct LEFT JOIN {table} AS t ON {join} \
         WHERE ct.SYS_CHANGE_VERSION <= @P2{position} \
         ORDER BY ct.SYS_CHANGE_VERSION, {}",
        select_list("ct", keys),
        select_list("t", columns),
        order_by("ct", keys),
        table = qualified(table),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ColumnType;

    fn column(name: &str, native: &str, read_as: ReadAs) -> MsColumn {
        MsColumn { name: name.into(), ty: MsType { protocol: ColumnType::Int64, native: native.into(), read_as } }
    }

    fn hostile_table() -> SourceTable {
        SourceTable { schema: Some("sales]; DROP TABLE x;--".into()), name: "Order [Lines]".into() }
    }

    #[test]
    fn brackets_are_doubled_so_names_cannot_escape() {
        assert_eq!(quote("a]b"), "[a]]b]");
        assert_eq!(quote("[x]"), "[[x]]]");
        assert_eq!(qualified(&hostile_table()), "[sales]]; DROP TABLE x;--].[Order [Lines]]]");
        assert_eq!(qualified(&SourceTable { schema: None, name: "t".into() }), "[dbo].[t]");
    }

    #[test]
    fn enabling_statements_are_exact() {
        assert_eq!(
            enable_database(168),
            "ALTER DATABASE CURRENT SET CHANGE_TRACKING = ON (CHANGE_RETENTION = 168 HOURS, AUTO_CLEANUP = ON)"
        );
        assert_eq!(
            enable_table(&hostile_table()),
            "ALTER TABLE [sales]]; DROP TABLE x;--].[Order [Lines]]] ENABLE CHANGE_TRACKING WITH (TRACK_COLUMNS_UPDATED = OFF)"
        );
        assert_eq!(ENABLE_SNAPSHOT, "ALTER DATABASE CURRENT SET ALLOW_SNAPSHOT_ISOLATION ON");
    }

    #[test]
    fn version_and_catalog_statements_take_names_as_parameters() {
        assert_eq!(CURRENT_VERSION, "SELECT CHANGE_TRACKING_CURRENT_VERSION()");
        assert!(MIN_VALID_VERSION.contains("OBJECT_ID(@P1)"));
        assert!(FIND_TABLE.contains("s.name = @P1 AND t.name = @P2"));
        assert!(COLUMNS.contains("s.name = @P1 AND t.name = @P2"));
        assert!(COLUMNS.contains("ORDER BY c.column_id"));
        assert!(IDENTITY.contains("recovery_fork_guid"));
    }

    #[test]
    fn first_snapshot_page_has_no_position() {
        let id = column("id", "bigint", ReadAs::Plain);
        let name = column("name", "nvarchar(50)", ReadAs::Plain);
        let sql = snapshot_chunk(&SourceTable { schema: None, name: "customer".into() }, &[&id, &name], &[&id], false);
        assert_eq!(sql, "SELECT TOP (@P1) t.[id], t.[name] FROM [dbo].[customer] AS t ORDER BY t.[id]");
    }

    #[test]
    fn composite_keys_expand_to_an_or_chain_with_typed_casts() {
        let a = column("tenant]id", "int", ReadAs::Plain);
        let b = column("code", "varchar(20)", ReadAs::Plain);
        let c = column("at", "datetime2(3)", ReadAs::Plain);
        let price = column("price", "money", ReadAs::Cast("decimal(19,4)".into()));
        let sql = snapshot_chunk(&hostile_table(), &[&a, &b, &c, &price], &[&a, &b, &c], true);
        assert_eq!(
            sql,
            "SELECT TOP (@P4) t.[tenant]]id], t.[code], t.[at], CAST(t.[price] AS decimal(19,4)) \
             FROM [sales]]; DROP TABLE x;--].[Order [Lines]]] AS t \
             WHERE (t.[tenant]]id] > CAST(@P1 AS int)) \
             OR (t.[tenant]]id] = CAST(@P1 AS int) AND t.[code] > CAST(@P2 AS varchar(20))) \
             OR (t.[tenant]]id] = CAST(@P1 AS int) AND t.[code] = CAST(@P2 AS varchar(20)) AND t.[at] > CAST(@P3 AS datetime2(3))) \
             ORDER BY t.[tenant]]id], t.[code], t.[at]"
        );
    }

    #[test]
    fn change_page_from_a_whole_version() {
        let id = column("id", "bigint", ReadAs::Plain);
        let at = column("at", "datetimeoffset(7)", ReadAs::UtcDateTime2(7));
        let sql = changes_chunk(&SourceTable { schema: Some("s".into()), name: "t".into() }, &[&id, &at], &[&id], false);
        assert_eq!(
            sql,
            "SELECT TOP (@P3) ct.SYS_CHANGE_VERSION, ct.SYS_CHANGE_OPERATION, CASE WHEN t.[id] IS NULL THEN 0 ELSE 1 END, \
             ct.[id], t.[id], CAST(SWITCHOFFSET(t.[at], '+00:00') AS datetime2(7)) \
             FROM CHANGETABLE(CHANGES [s].[t], @P1) AS ct LEFT JOIN [s].[t] AS t ON t.[id] = ct.[id] \
             WHERE ct.SYS_CHANGE_VERSION <= @P2 \
             ORDER BY ct.SYS_CHANGE_VERSION, ct.[id]"
        );
    }

    #[test]
    fn change_page_from_inside_a_version_with_a_composite_key() {
        let a = column("a", "int", ReadAs::Plain);
        let b = column("b", "nchar(4)", ReadAs::Plain);
        let sql = changes_chunk(&SourceTable { schema: None, name: "t".into() }, &[&a, &b], &[&a, &b], true);
        assert_eq!(
            sql,
            "SELECT TOP (@P6) ct.SYS_CHANGE_VERSION, ct.SYS_CHANGE_OPERATION, CASE WHEN t.[a] IS NULL THEN 0 ELSE 1 END, \
             ct.[a], ct.[b], t.[a], t.[b] \
             FROM CHANGETABLE(CHANGES [dbo].[t], @P1) AS ct LEFT JOIN [dbo].[t] AS t ON t.[a] = ct.[a] AND t.[b] = ct.[b] \
             WHERE ct.SYS_CHANGE_VERSION <= @P2 AND (ct.SYS_CHANGE_VERSION > @P3 OR (ct.SYS_CHANGE_VERSION = @P3 AND \
             ((ct.[a] > CAST(@P4 AS int)) OR (ct.[a] = CAST(@P4 AS int) AND ct.[b] > CAST(@P5 AS nchar(4)))))) \
             ORDER BY ct.SYS_CHANGE_VERSION, ct.[a], ct.[b]"
        );
    }
}
