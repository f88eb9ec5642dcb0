//! The DDL of one tracked table: its side table and its statement-level
//! capture triggers. Pure text generation, so the exact SQL is testable
//! without a server.
//!
//! Triggers are `FOR EACH STATEMENT` with transition tables: a 100k-row
//! UPDATE costs one trigger call and a few set-based statements, not 100k
//! calls. Each writes one side row per key (the net change): the writing
//! transaction's 64-bit id as version and whether the key is gone.

use super::catalog::{KeyColumn, TableRef};
use super::sql::{column_list, dollar_quote, qualified, quote_ident, CT_SCHEMA, DELETED_COL, VERSION_COL};

/// The side table of a tracked table, named by oid so renames of the
/// source table never need a rename here.
pub(crate) fn side_table_name(oid: u32) -> String {
    format!("changes_{oid}")
}

/// Trigger names on the source table, with the event each captures.
pub(crate) const TRIGGERS: [(&str, Event); 4] = [
    ("ctmirror_ct_insert", Event::Insert),
    ("ctmirror_ct_update", Event::Update),
    ("ctmirror_ct_delete", Event::Delete),
    ("ctmirror_ct_truncate", Event::Truncate),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    Insert,
    Update,
    Delete,
    Truncate,
}

impl Event {
    fn word(self) -> &'static str {
        match self {
            Event::Insert => "insert",
            Event::Update => "update",
            Event::Delete => "delete",
            Event::Truncate => "truncate",
        }
    }

    /// When the trigger fires and which transition tables it sees. TRUNCATE
    /// has no transition table, but in a BEFORE trigger the rows are still
    /// readable, so every key can be marked deleted.
    fn timing(self) -> &'static str {
        match self {
            Event::Insert => "AFTER INSERT",
            Event::Update => "AFTER UPDATE",
            Event::Delete => "AFTER DELETE",
            Event::Truncate => "BEFORE TRUNCATE",
        }
    }

    fn referencing(self) -> &'static str {
        match self {
            Event::Insert => " REFERENCING NEW TABLE AS ctmirror_new",
            Event::Update => " REFERENCING OLD TABLE AS ctmirror_old NEW TABLE AS ctmirror_new",
            Event::Delete => " REFERENCING OLD TABLE AS ctmirror_old",
            Event::Truncate => "",
        }
    }
}

fn function_name(oid: u32, event: Event) -> String {
    qualified(CT_SCHEMA, &format!("capture_{oid}_{}", event.word()))
}

/// Creates the side table, its version index, the capture functions and
/// the triggers (enabled ALWAYS, so rows applied by logical replication in
/// replica mode are tracked too).
pub(crate) fn install_sql(table: &TableRef, key: &[KeyColumn]) -> Vec<String> {
    let side = qualified(CT_SCHEMA, &side_table_name(table.oid));
    let names: Vec<String> = key.iter().map(|k| k.name.clone()).collect();
    let keys = column_list(None, &names);
    let column_defs: Vec<String> = key
        .iter()
        .map(|k| {
            // The source column's collation, so the side table's key order
            // (and the reader's row comparisons) match the source's PK index.
            let collate = k.collation_sql.as_ref().map(|c| format!(" COLLATE {c}")).unwrap_or_default();
            format!("{} {}{collate} NOT NULL", quote_ident(&k.name), k.native_type)
        })
        .collect();
    let mut out = vec![
        format!(
            "CREATE TABLE {side} ({}, {} bigint NOT NULL, {} boolean NOT NULL, PRIMARY KEY ({keys}))",
            column_defs.join(", "),
            quote_ident(VERSION_COL),
            quote_ident(DELETED_COL),
        ),
        format!(
            "CREATE INDEX {} ON {side} ({}, {keys})",
            quote_ident(&format!("changes_{}_version", table.oid)),
            quote_ident(VERSION_COL),
        ),
    ];
    for (trigger, event) in TRIGGERS {
        out.push(function_sql(table, &names, event));
        out.push(format!(
            "CREATE TRIGGER {} {} ON {}{} FOR EACH STATEMENT EXECUTE FUNCTION {}()",
            quote_ident(trigger),
            event.timing(),
            table.sql_name(),
            event.referencing(),
            function_name(table.oid, event),
        ));
        out.push(format!("ALTER TABLE {} ENABLE ALWAYS TRIGGER {}", table.sql_name(), quote_ident(trigger)));
    }
    out
}

/// Removes everything [`install_sql`] created. `table` is `None` when the
/// source table is gone (its triggers went with it).
pub(crate) fn drop_sql(oid: u32, table: Option<&TableRef>) -> Vec<String> {
    let mut out = Vec::new();
    for (trigger, event) in TRIGGERS {
        if let Some(t) = table {
            out.push(format!("DROP TRIGGER IF EXISTS {} ON {}", quote_ident(trigger), t.sql_name()));
        }
        // CASCADE: after a restore from a dump, triggers on the recreated
        // table (a new oid) still call the functions of the old oid. Those
        // triggers are ours and stale; nothing else can depend on a
        // capture function.
        out.push(format!("DROP FUNCTION IF EXISTS {}() CASCADE", function_name(oid, event)));
    }
    out.push(format!("DROP TABLE IF EXISTS {}", qualified(CT_SCHEMA, &side_table_name(oid))));
    out
}

/// The plpgsql capture function for one event. SECURITY DEFINER so the
/// tenant's application roles need no rights on `ctmirror_ct`; a fixed
/// search path so nothing in their schemas can hijack it. Columns are
/// always alias-qualified and `use_column` settles any clash with plpgsql's
/// own variables (a key column named `tg_op`, say).
fn function_sql(table: &TableRef, key: &[String], event: Event) -> String {
    let statements = match event {
        Event::Insert => vec![upsert(table, key, &distinct_keys(key, "ctmirror_new"), false)],
        // Keys in OLD but not NEW left through a primary-key update. Two
        // statements because ON CONFLICT cannot touch a row twice in one.
        Event::Update => vec![
            upsert(
                table,
                key,
                &format!(
                    "SELECT {} FROM ctmirror_old AS o EXCEPT SELECT {} FROM ctmirror_new AS n",
                    column_list(Some("o"), key),
                    column_list(Some("n"), key)
                ),
                true,
            ),
            upsert(table, key, &distinct_keys(key, "ctmirror_new"), false),
        ],
        Event::Delete => vec![upsert(table, key, &distinct_keys(key, "ctmirror_old"), true)],
        Event::Truncate => vec![upsert(
            table,
            key,
            &format!("SELECT {} FROM {} AS t", column_list(Some("t"), key), table.sql_name()),
            true,
        )],
    };
    let body = format!(
        "\n#variable_conflict use_column\nBEGIN\n{}\nRETURN NULL;\nEND\n",
        statements.iter().map(|s| format!("{s};")).collect::<Vec<_>>().join("\n")
    );
    format!(
        "CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER \
         SET search_path = pg_catalog, pg_temp AS {}",
        function_name(table.oid, event),
        dollar_quote(&body)
    )
}

fn distinct_keys(key: &[String], transition: &str) -> String {
    format!("SELECT DISTINCT {} FROM {transition} AS r", column_list(Some("r"), key))
}

/// Upserts the keys `source` yields with this transaction's id as version:
/// the side row always takes the newest writer's version and flag.
fn upsert(table: &TableRef, key: &[String], source: &str, deleted: bool) -> String {
    let side = qualified(CT_SCHEMA, &side_table_name(table.oid));
    let keys = column_list(None, key);
    let version = quote_ident(VERSION_COL);
    let flag = quote_ident(DELETED_COL);
    format!(
        "INSERT INTO {side} AS s ({keys}, {version}, {flag}) \
         SELECT {}, pg_catalog.pg_current_xact_id()::text::bigint, {deleted} FROM ({source}) AS c \
         ON CONFLICT ({keys}) DO UPDATE SET {version} = EXCLUDED.{version}, {flag} = EXCLUDED.{flag}",
        column_list(Some("c"), key),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> (TableRef, Vec<KeyColumn>) {
        let t = TableRef { oid: 42, schema: "my schema".into(), name: "Order \"Lines\"".into() };
        let k = vec![KeyColumn {
            name: "select".into(),
            type_oid: 25,
            typmod: -1,
            collation: 100,
            native_type: "text".into(),
            collation_sql: Some("\"pg_catalog\".\"default\"".into()),
        }];
        (t, k)
    }

    #[test]
    fn triggers_are_statement_level_with_transition_tables() {
        let (t, k) = table();
        let sql = install_sql(&t, &k);
        let triggers: Vec<&String> = sql.iter().filter(|s| s.starts_with("CREATE TRIGGER")).collect();
        assert_eq!(triggers.len(), 4);
        assert!(triggers.iter().all(|s| s.contains("FOR EACH STATEMENT")));
        assert!(triggers[1].contains("REFERENCING OLD TABLE AS ctmirror_old NEW TABLE AS ctmirror_new"));
        assert!(triggers[3].contains("BEFORE TRUNCATE"));
    }

    #[test]
    fn side_table_copies_key_collation_and_quotes_names() {
        let (t, k) = table();
        let sql = install_sql(&t, &k);
        assert!(sql[0].starts_with("CREATE TABLE \"ctmirror_ct\".\"changes_42\" (\"select\" text COLLATE \"pg_catalog\".\"default\" NOT NULL"));
        assert!(sql.iter().any(|s| s.contains("ON \"my schema\".\"Order \"\"Lines\"\"\"")));
    }

    #[test]
    fn capture_functions_are_security_definer_with_fixed_search_path() {
        let (t, k) = table();
        for f in install_sql(&t, &k).iter().filter(|s| s.starts_with("CREATE OR REPLACE FUNCTION")) {
            assert!(f.contains("SECURITY DEFINER SET search_path = pg_catalog, pg_temp"), "{f}");
            assert!(f.contains("pg_catalog.pg_current_xact_id()::text::bigint"), "{f}");
        }
    }
}
