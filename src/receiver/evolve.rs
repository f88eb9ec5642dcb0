//! Schema evolution: what a changed source schema does to a mirror table.
//!
//! Compatible changes are applied in place and keep the table's cursor:
//! a dropped column is dropped (or kept, nullable, when the partner wants
//! it), a type that only grows is widened, a `NOT NULL` that was lifted is
//! lifted, a reordering only updates the bookkeeping (statements name
//! columns, never positions). Everything else rebuilds the table from a
//! full load into a shadow table.
//!
//! An added column also rebuilds. Change tracking does not mark existing
//! rows as changed, so their values of the new column would never arrive
//! incrementally. A keyed backfill of just that column was the alternative;
//! it needs its own cursor beside the table's, and until it finished the
//! mirror would show NULLs that are not NULL at the source. A reload is
//! correct by construction, reuses the resumable full load, and keeps the
//! old table (without the column) readable until the new one is complete;
//! its price is one table copy, paid rarely.

use super::ddl::pg_type;
use super::sql::{qualified, quote_ident};
use crate::protocol::{ColumnType, TableSchema};

/// What to do with one table whose stored schema differs from the new one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Evolution {
    /// Only statements on the existing table; the cursor stands.
    InPlace(Vec<Step>),
    /// The table must be reloaded; the reason is for logs and the agent.
    Rebuild(String),
}

/// One in-place change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    DropColumn(String),
    /// `keep_dropped_columns`: the column stays for the partner, but later
    /// upserts do not carry it, so it cannot stay `NOT NULL`.
    KeepColumn { name: String, drop_not_null: bool },
    Widen { name: String, from: ColumnType, to: ColumnType },
    DropNotNull(String),
    /// Column order differs; nothing to run.
    Reorder,
}

impl Step {
    /// The statement(s) for `table` in `schema`; empty when the change is
    /// bookkeeping only.
    pub fn sql(&self, schema: &str, table: &str) -> Option<String> {
        let t = qualified(schema, table);
        match self {
            Step::DropColumn(c) => Some(format!("ALTER TABLE {t} DROP COLUMN IF EXISTS {}", quote_ident(c))),
            Step::KeepColumn { name, drop_not_null: true } | Step::DropNotNull(name) => {
                Some(format!("ALTER TABLE {t} ALTER COLUMN {} DROP NOT NULL", quote_ident(name)))
            }
            Step::KeepColumn { drop_not_null: false, .. } | Step::Reorder => None,
            Step::Widen { name, from, to } => {
                // bytea has no length in PostgreSQL: a longer limit is
                // bookkeeping only.
                if pg_type(from) == pg_type(to) {
                    return None;
                }
                Some(format!("ALTER TABLE {t} ALTER COLUMN {} TYPE {}", quote_ident(name), pg_type(to)))
            }
        }
    }

    /// For the answer's message and the log.
    pub fn describe(&self) -> String {
        match self {
            Step::DropColumn(c) => format!("column {c:?} dropped"),
            Step::KeepColumn { name, .. } => format!("column {name:?} no longer sent (kept, keep_dropped_columns)"),
            Step::Widen { name, from, to } => format!("column {name:?} widened {} -> {}", pg_type(from), pg_type(to)),
            Step::DropNotNull(c) => format!("column {c:?} is now nullable"),
            Step::Reorder => "columns reordered".into(),
        }
    }
}

/// Classifies the change from `old` to `new` (which differ). Both were
/// validated when they arrived.
pub fn plan(old: &TableSchema, new: &TableSchema, keep_dropped_columns: bool) -> Evolution {
    if old.primary_key != new.primary_key {
        return Evolution::Rebuild(format!("primary key changed {:?} -> {:?}", old.primary_key, new.primary_key));
    }
    let mut steps = Vec::new();
    for c in &new.columns {
        let Some(o) = old.columns.iter().find(|o| o.name == c.name) else {
            return Evolution::Rebuild(format!(
                "column {:?} added; existing rows need its values, so the table is reloaded",
                c.name
            ));
        };
        if o.data_type != c.data_type {
            if !widens(&o.data_type, &c.data_type) {
                return Evolution::Rebuild(format!(
                    "column {:?} changed type {} -> {}, which is not a widening",
                    c.name,
                    pg_type(&o.data_type),
                    pg_type(&c.data_type)
                ));
            }
            steps.push(Step::Widen { name: c.name.clone(), from: o.data_type.clone(), to: c.data_type.clone() });
        }
        match (o.nullable, c.nullable) {
            (false, true) => steps.push(Step::DropNotNull(c.name.clone())),
            (true, false) => {
                return Evolution::Rebuild(format!(
                    "column {:?} became NOT NULL; the mirror may still hold NULLs the source no longer has",
                    c.name
                ))
            }
            _ => {}
        }
    }
    for o in old.columns.iter().filter(|o| !new.columns.iter().any(|c| c.name == o.name)) {
        steps.push(if keep_dropped_columns {
            Step::KeepColumn { name: o.name.clone(), drop_not_null: !o.nullable }
        } else {
            Step::DropColumn(o.name.clone())
        });
    }
    let old_order: Vec<&str> =
        old.columns.iter().map(|c| c.name.as_str()).filter(|n| new.columns.iter().any(|c| c.name == *n)).collect();
    let new_order: Vec<&str> = new.columns.iter().map(|c| c.name.as_str()).collect();
    if old_order != new_order {
        steps.push(Step::Reorder);
    }
    Evolution::InPlace(steps)
}

/// Whether every value of `from` is a value of `to`, unchanged, so the
/// column can be altered without touching its data.
pub fn widens(from: &ColumnType, to: &ColumnType) -> bool {
    use ColumnType as T;
    fn longer(a: Option<u32>, b: Option<u32>) -> bool {
        match (a, b) {
            (_, None) => true,
            (None, Some(_)) => false,
            (Some(a), Some(b)) => b >= a,
        }
    }
    /// Fractional-second precision; none means the default, 6.
    fn finer(a: &Option<u8>, b: &Option<u8>) -> bool {
        b.unwrap_or(6) >= a.unwrap_or(6)
    }
    match (from, to) {
        (a, b) if a == b => true,
        (T::Int16, T::Int32 | T::Int64) | (T::Int32, T::Int64) | (T::Float32, T::Float64) => true,
        (T::Decimal { precision: Some(p1), scale: s1 }, T::Decimal { precision: Some(p2), scale: s2 }) => {
            let (s1, s2) = (s1.unwrap_or(0), s2.unwrap_or(0));
            // Digits left of the point and right of it may only grow.
            s2 >= s1 && p2.saturating_sub(s2) >= p1.saturating_sub(s1)
        }
        (T::Decimal { .. }, T::Decimal { precision: None, .. }) => true,
        (T::Text { max_length: a }, T::Text { max_length: b }) => longer(*a, *b),
        (T::Bytes { max_length: a }, T::Bytes { max_length: b }) => longer(*a, *b),
        // Blank padding grows with the length on both sides (SQL Server
        // pads existing values too), so the values stay equal.
        (T::FixedText { length: a }, T::FixedText { length: b }) => b >= a,
        (T::Time { precision: a }, T::Time { precision: b })
        | (T::Timestamp { precision: a }, T::Timestamp { precision: b })
        | (T::TimestampTz { precision: a }, T::TimestampTz { precision: b }) => finer(a, b),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ColumnSchema;
    use ColumnType as T;

    fn col(name: &str, data_type: ColumnType, nullable: bool) -> ColumnSchema {
        ColumnSchema { name: name.into(), data_type, nullable }
    }

    fn table(columns: Vec<ColumnSchema>) -> TableSchema {
        TableSchema { name: "t".into(), columns, primary_key: vec!["id".into()] }
    }

    fn base() -> TableSchema {
        table(vec![
            col("id", T::Int32, false),
            col("name", T::Text { max_length: Some(50) }, false),
            col("amount", T::Decimal { precision: Some(10), scale: Some(2) }, true),
        ])
    }

    #[test]
    fn widenings_are_recognised() {
        let yes = [
            (T::Text { max_length: Some(50) }, T::Text { max_length: Some(200) }),
            (T::Text { max_length: Some(50) }, T::Text { max_length: None }),
            (T::Int16, T::Int64),
            (T::Int32, T::Int64),
            (T::Float32, T::Float64),
            (T::Decimal { precision: Some(10), scale: Some(2) }, T::Decimal { precision: Some(12), scale: Some(2) }),
            (T::Decimal { precision: Some(10), scale: Some(2) }, T::Decimal { precision: Some(12), scale: Some(4) }),
            (T::Decimal { precision: Some(10), scale: Some(2) }, T::Decimal { precision: None, scale: None }),
            (T::FixedText { length: 3 }, T::FixedText { length: 8 }),
            (T::Timestamp { precision: Some(3) }, T::Timestamp { precision: None }),
            (T::Bytes { max_length: Some(10) }, T::Bytes { max_length: None }),
        ];
        for (a, b) in yes {
            assert!(widens(&a, &b), "{a:?} -> {b:?}");
        }
        let no = [
            (T::Text { max_length: Some(200) }, T::Text { max_length: Some(50) }),
            (T::Text { max_length: None }, T::Text { max_length: Some(50) }),
            (T::Int64, T::Int32),
            (T::Int32, T::Text { max_length: None }),
            (T::Int32, T::Decimal { precision: Some(20), scale: Some(0) }),
            (T::Decimal { precision: Some(10), scale: Some(2) }, T::Decimal { precision: Some(11), scale: Some(4) }),
            (T::Decimal { precision: None, scale: None }, T::Decimal { precision: Some(38), scale: Some(4) }),
            (T::Float64, T::Float32),
            (T::FixedText { length: 3 }, T::Text { max_length: None }),
            (T::Timestamp { precision: None }, T::Timestamp { precision: Some(3) }),
            (T::Timestamp { precision: None }, T::TimestampTz { precision: None }),
        ];
        for (a, b) in no {
            assert!(!widens(&a, &b), "{a:?} -> {b:?}");
        }
    }

    #[test]
    fn compatible_changes_are_altered_in_place() {
        let mut new = base();
        new.columns[1] = col("name", T::Text { max_length: Some(200) }, true);
        new.columns[2] = col("amount", T::Decimal { precision: Some(12), scale: Some(2) }, true);
        new.columns[0].data_type = T::Int64;
        let Evolution::InPlace(steps) = plan(&base(), &new, false) else { panic!() };
        let sql: Vec<String> = steps.iter().filter_map(|s| s.sql("m", "t")).collect();
        assert_eq!(
            sql,
            [
                "ALTER TABLE \"m\".\"t\" ALTER COLUMN \"id\" TYPE bigint",
                "ALTER TABLE \"m\".\"t\" ALTER COLUMN \"name\" TYPE varchar(200)",
                "ALTER TABLE \"m\".\"t\" ALTER COLUMN \"name\" DROP NOT NULL",
                "ALTER TABLE \"m\".\"t\" ALTER COLUMN \"amount\" TYPE numeric(12,2)",
            ]
        );
    }

    #[test]
    fn a_dropped_column_is_dropped_or_kept_nullable() {
        let mut new = base();
        new.columns.remove(1);
        let Evolution::InPlace(steps) = plan(&base(), &new, false) else { panic!() };
        assert_eq!(steps, [Step::DropColumn("name".into())]);
        assert_eq!(steps[0].sql("m", "t").unwrap(), "ALTER TABLE \"m\".\"t\" DROP COLUMN IF EXISTS \"name\"");
        let Evolution::InPlace(steps) = plan(&base(), &new, true) else { panic!() };
        assert_eq!(steps, [Step::KeepColumn { name: "name".into(), drop_not_null: true }]);
        assert!(steps[0].sql("m", "t").unwrap().ends_with("DROP NOT NULL"));
    }

    #[test]
    fn a_reordering_is_bookkeeping_only() {
        let mut new = base();
        new.columns.swap(1, 2);
        let Evolution::InPlace(steps) = plan(&base(), &new, false) else { panic!() };
        assert_eq!(steps, [Step::Reorder]);
        assert!(steps[0].sql("m", "t").is_none());
    }

    #[test]
    fn everything_else_rebuilds() {
        let mut added = base();
        added.columns.push(col("extra", T::Bool, true));
        let mut narrowed = base();
        narrowed.columns[1].data_type = T::Text { max_length: Some(10) };
        let mut family = base();
        family.columns[2].data_type = T::Text { max_length: None };
        let mut tightened = base();
        tightened.columns[2].nullable = false;
        let mut new_key = base();
        new_key.primary_key = vec!["id".into(), "name".into()];
        for (new, why) in [
            (added, "added"),
            (narrowed, "not a widening"),
            (family, "not a widening"),
            (tightened, "NOT NULL"),
            (new_key, "primary key"),
        ] {
            match plan(&base(), &new, false) {
                Evolution::Rebuild(reason) => assert!(reason.contains(why), "{reason}"),
                other => panic!("{why}: {other:?}"),
            }
        }
    }
}
