//! The DDL of one tracked table: its side table and its capture triggers.
//! Pure text generation, so the exact SQL is testable without a server.
//!
//! Each capture writes one side row per key (the net change): the writing
//! transaction's 64-bit id as version and whether the key is gone. Inserts,
//! updates and deletes are captured by `FOR EACH STATEMENT` triggers with
//! transition tables, so a 100k-row UPDATE costs one trigger call and one
//! set-based upsert, not 100k calls.
//!
//! Writers pay for every statement the capture runs, so each trigger runs
//! exactly one. Measured with callgrind on the benchmark's single-row
//! UPDATE (about 185k instructions untracked, commit included), the first
//! release's two-statement UPDATE capture with DISTINCT, EXCEPT and a
//! `SET search_path` added about 170k; this layout adds about 95k, and a
//! trigger whose function does nothing already costs about 20k. What it
//! takes apart:
//!
//! - On a plain table the UPDATE trigger only upserts the new keys, from
//!   its NEW TABLE alone. A primary-key change is caught by a separate
//!   row-level trigger whose `WHEN` clause compares the old and new key, so
//!   the usual update (key untouched) never calls it, no OLD TABLE is kept,
//!   and no EXCEPT runs. Row-level AFTER triggers fire before statement-level
//!   ones, so when keys trade places within one statement (1 -> 2, 2 -> 1)
//!   the statement trigger's upsert of the new keys wins over the row
//!   trigger's "old key deleted". An `UPDATE OF <key>` column list would
//!   be cheaper still but misses keys changed by a BEFORE trigger, and
//!   PostgreSQL refuses column lists on triggers with transition tables.
//! - On a partitioned table an UPDATE that moves a row to another partition
//!   runs as a DELETE and an INSERT on the partitions and fires no row-level
//!   UPDATE trigger; the parent's statement trigger still sees the move in
//!   its transition tables. There the UPDATE trigger keeps both tables and
//!   marks the keys in OLD but not in NEW deleted, in the same statement as
//!   the new keys (the two sets are disjoint, so ON CONFLICT never meets a
//!   key twice).
//! - DISTINCT only when the primary key is deferrable: otherwise the keys in
//!   a transition table are unique already, and hashing them costs as much
//!   as the upsert of one row. With a deferred key a statement may leave
//!   duplicates that a later statement of the same transaction removes.
//! - No `SET search_path` on the functions: a function with a SET clause
//!   saves and restores the setting on every call (about 13k instructions).
//!   Instead the bodies name nothing that the caller's search path could
//!   redirect: tables and functions are schema-qualified, transition tables
//!   are resolved before any schema, and no type or operator is named.
//! - `txid_current()` rather than `pg_current_xact_id()::text::bigint`: the
//!   same 64-bit id (both are the top transaction's full id), without two
//!   conversions per row.

use super::catalog::{KeyColumn, TableRef};
use super::sql::{column_list, dollar_quote, qualified, quote_ident, CT_SCHEMA, DELETED_COL, VERSION_COL};
use sha2::{Digest, Sha256};

/// The side table of a tracked table, named by oid so renames of the
/// source table never need a rename here.
pub(crate) fn side_table_name(oid: u32) -> String {
    format!("changes_{oid}")
}

/// One capture trigger on the source table, with its function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trigger {
    Insert,
    Update,
    /// Row-level: marks the old key of a primary-key update deleted. On
    /// plain tables it fires always; on partitioned tables, where the
    /// statement trigger sees both transition tables, only for replica
    /// writers.
    UpdateKey,
    Delete,
    Truncate,
    /// After TRUNCATE: records the truncated relation's new filenode, so a
    /// TRUNCATE (captured) is not mistaken for a rewrite (not captured).
    Truncated,
    /// Row-level, enabled for replica writers only: the logical-replication
    /// apply worker fires row triggers and never statement ones. Sessions
    /// with `session_replication_role = replica` fire both; the second
    /// upsert of a key in one transaction changes nothing.
    ReplicaInsert,
    ReplicaUpdate,
    ReplicaDelete,
}

impl Trigger {
    /// Every trigger any layout uses, for dropping.
    pub(crate) const ALL: [Trigger; 9] = [
        Trigger::Insert,
        Trigger::Update,
        Trigger::UpdateKey,
        Trigger::Delete,
        Trigger::Truncate,
        Trigger::Truncated,
        Trigger::ReplicaInsert,
        Trigger::ReplicaUpdate,
        Trigger::ReplicaDelete,
    ];

    /// The triggers of installations made before the registry kept
    /// fingerprints. One that still has them all lost nothing, so it is
    /// upgraded in place rather than reinstalled.
    pub(crate) const FIRST_GENERATION: [Trigger; 4] =
        [Trigger::Insert, Trigger::Update, Trigger::Delete, Trigger::Truncate];

    /// The triggers of installations made before layout 2 (fingerprinted,
    /// without replica or TRUNCATE-recording triggers), on plain tables.
    pub(crate) const SECOND_GENERATION_PLAIN: [Trigger; 5] =
        [Trigger::Insert, Trigger::Update, Trigger::UpdateKey, Trigger::Delete, Trigger::Truncate];

    fn word(self) -> &'static str {
        match self {
            Trigger::Insert => "insert",
            Trigger::Update => "update",
            Trigger::UpdateKey => "update_key",
            Trigger::Delete => "delete",
            Trigger::Truncate => "truncate",
            Trigger::Truncated => "truncated",
            Trigger::ReplicaInsert => "replica_insert",
            Trigger::ReplicaUpdate => "replica_update",
            Trigger::ReplicaDelete => "replica_delete",
        }
    }

    pub(crate) fn name(self) -> String {
        format!("ctmirror_ct_{}", self.word())
    }

    fn function(self, oid: u32) -> String {
        qualified(CT_SCHEMA, &format!("capture_{oid}_{}", self.word()))
    }

    /// Statement-level triggers fire only for statements that name their
    /// table, so each member of a partition tree carries them too; row
    /// triggers on a partitioned table are cloned to its partitions by
    /// PostgreSQL itself.
    pub(crate) fn on_partitions(self) -> bool {
        matches!(self, Trigger::Insert | Trigger::Update | Trigger::Delete | Trigger::Truncate | Trigger::Truncated)
    }
}

/// What a table's capture depends on: its identity, its primary key and
/// the traits that change the SQL.
pub(crate) struct Capture<'a> {
    pub table: &'a TableRef,
    pub key: &'a [KeyColumn],
    /// The primary key is checked at commit (or can be): transition tables
    /// may hold a key twice.
    pub deferrable: bool,
    /// Every member of the table's partition tree below it (partitions and
    /// sub-partitions); empty for a plain table.
    pub partitions: &'a [TableRef],
}

impl Capture<'_> {
    /// The triggers this table carries.
    pub(crate) fn triggers(&self) -> Vec<Trigger> {
        Trigger::ALL.to_vec()
    }

    fn key_names(&self) -> Vec<String> {
        self.key.iter().map(|k| k.name.clone()).collect()
    }

    /// Creates the side table, its version index, the capture functions and
    /// the triggers.
    pub(crate) fn install_sql(&self) -> Vec<String> {
        let mut out = side_table_sql(self.table.oid, self.key);
        out.extend(self.all_capture_sql());
        out
    }

    /// Replaces the functions and triggers of an installed capture, keeping
    /// its side table and the changes in it. Run in one transaction: the
    /// first DROP TRIGGER locks out writers until the new triggers exist,
    /// so no write goes uncaptured.
    pub(crate) fn upgrade_sql(&self) -> Vec<String> {
        let mut out = drop_capture_sql(self.table.oid, Some(self.table));
        out.extend(self.all_capture_sql());
        out
    }

    fn all_capture_sql(&self) -> Vec<String> {
        let mut out = self.capture_sql(&self.table.sql_name());
        for member in self.partitions {
            out.extend(self.partition_sql(member));
        }
        out
    }

    /// The statement triggers of one member of the partition tree, feeding
    /// the table's side table through the table's functions.
    pub(crate) fn partition_sql(&self, member: &TableRef) -> Vec<String> {
        let mut out = Vec::new();
        for trigger in self.triggers().into_iter().filter(|t| t.on_partitions()) {
            out.extend(self.trigger_sql(trigger, &member.sql_name()));
        }
        out
    }

    /// Records every key `member` holds now as changed by this transaction
    /// (present, or gone when `deleted`): the rows a partition brought
    /// along when it was attached, or took away when it was detached.
    pub(crate) fn mark_sql(&self, member: &TableRef, deleted: bool) -> String {
        let key = self.key_names();
        self.upsert(
            &format!("SELECT {} FROM {} AS t", column_list(Some("t"), &key), member.sql_name()),
            if deleted { "true" } else { "false" },
        )
    }

    /// Identifies the capture SQL this version of ctmirror installs for the
    /// table, so an installation made by an older version (or before the
    /// key became deferrable) is noticed and upgraded. The table's name is
    /// left out: a rename changes nothing in what the triggers do. So are
    /// the partitions: a change to them is damage, found by
    /// `ctmirror_ct.damage`.
    pub(crate) fn fingerprint(&self) -> String {
        let mut hash = Sha256::new();
        for statement in self.capture_sql("ctmirror_source_table") {
            hash.update(statement.as_bytes());
            hash.update([0]);
        }
        hex::encode(hash.finalize())
    }

    /// The functions and triggers, with `on` as the table's SQL name.
    fn capture_sql(&self, on: &str) -> Vec<String> {
        let mut out = Vec::new();
        for trigger in self.triggers() {
            out.push(self.function_sql(trigger));
            out.extend(self.trigger_sql(trigger, on));
        }
        out
    }

    /// One trigger on `on`, and the state it fires in: ALWAYS, so rows
    /// written with `session_replication_role = replica` are captured too;
    /// REPLICA for the triggers that exist for the apply worker (and, on
    /// partitioned tables, the key trigger the statement trigger makes
    /// redundant for everyone else).
    fn trigger_sql(&self, trigger: Trigger, on: &str) -> Vec<String> {
        vec![
            format!(
                "CREATE TRIGGER {} {} ON {on}{} EXECUTE FUNCTION {}()",
                quote_ident(&trigger.name()),
                self.timing(trigger),
                self.firing(trigger),
                trigger.function(self.table.oid),
            ),
            format!("ALTER TABLE {on} ENABLE {} TRIGGER {}", self.enabled(trigger), quote_ident(&trigger.name())),
        ]
    }

    fn enabled(&self, trigger: Trigger) -> &'static str {
        match trigger {
            Trigger::ReplicaInsert | Trigger::ReplicaUpdate | Trigger::ReplicaDelete => "REPLICA",
            Trigger::UpdateKey if self.table.partitioned => "REPLICA",
            _ => "ALWAYS",
        }
    }

    /// TRUNCATE has no transition table, but in a BEFORE trigger the rows
    /// are still readable, so every key can be marked deleted.
    fn timing(&self, trigger: Trigger) -> &'static str {
        match trigger {
            Trigger::Insert | Trigger::ReplicaInsert => "AFTER INSERT",
            Trigger::Update | Trigger::UpdateKey | Trigger::ReplicaUpdate => "AFTER UPDATE",
            Trigger::Delete | Trigger::ReplicaDelete => "AFTER DELETE",
            Trigger::Truncate => "BEFORE TRUNCATE",
            Trigger::Truncated => "AFTER TRUNCATE",
        }
    }

    /// Transition tables, level and condition. Only the tables a function
    /// reads are kept: PostgreSQL copies every changed row into each one.
    fn firing(&self, trigger: Trigger) -> String {
        match trigger {
            Trigger::Insert => " REFERENCING NEW TABLE AS ctmirror_new FOR EACH STATEMENT".into(),
            Trigger::Update if self.table.partitioned => {
                " REFERENCING OLD TABLE AS ctmirror_old NEW TABLE AS ctmirror_new FOR EACH STATEMENT".into()
            }
            Trigger::Update => " REFERENCING NEW TABLE AS ctmirror_new FOR EACH STATEMENT".into(),
            // IS DISTINCT FROM compares with the key type's own equality
            // (and collation), as the primary key and the side table do.
            // Parsed here, with this session's search path: the operator
            // is fixed in the trigger, whatever the writer's path says.
            Trigger::UpdateKey => format!(
                " FOR EACH ROW WHEN ({})",
                self.key
                    .iter()
                    .map(|k| format!("OLD.{q} IS DISTINCT FROM NEW.{q}", q = quote_ident(&k.name)))
                    .collect::<Vec<_>>()
                    .join(" OR ")
            ),
            Trigger::Delete => " REFERENCING OLD TABLE AS ctmirror_old FOR EACH STATEMENT".into(),
            Trigger::Truncate | Trigger::Truncated => " FOR EACH STATEMENT".into(),
            Trigger::ReplicaInsert | Trigger::ReplicaUpdate | Trigger::ReplicaDelete => " FOR EACH ROW".into(),
        }
    }

    /// The plpgsql capture function of one trigger: a single statement.
    /// SECURITY DEFINER so the tenant's application roles need no rights on
    /// `ctmirror_ct`. Columns are always alias-qualified and `use_column`
    /// settles any clash with plpgsql's own variables (a key column named
    /// `tg_op`, say).
    fn function_sql(&self, trigger: Trigger) -> String {
        let key = self.key_names();
        let keys = |alias: &str, table: &str| {
            let distinct = if self.deferrable { "DISTINCT " } else { "" };
            format!("SELECT {distinct}{} FROM {table} AS {alias}", column_list(Some(alias), &key))
        };
        let record_key = |record: &str| -> String {
            let cols: Vec<String> = key.iter().map(|k| format!("{record}.{q} AS {q}", q = quote_ident(k))).collect();
            format!("SELECT {}", cols.join(", "))
        };
        let mut settings = "";
        let statement = match trigger {
            Trigger::Insert => self.upsert(&keys("n", "ctmirror_new"), "false"),
            Trigger::Update if self.table.partitioned => self.upsert(
                &format!(
                    "SELECT k.*, false AS {flag} FROM ({}) AS k \
                     UNION ALL SELECT g.*, true FROM \
                     (SELECT {} FROM ctmirror_old AS o EXCEPT SELECT {} FROM ctmirror_new AS n) AS g",
                    keys("n", "ctmirror_new"),
                    column_list(Some("o"), &key),
                    column_list(Some("n"), &key),
                    flag = quote_ident(DELETED_COL),
                ),
                &format!("c.{}", quote_ident(DELETED_COL)),
            ),
            Trigger::Update => self.upsert(&keys("n", "ctmirror_new"), "false"),
            Trigger::UpdateKey | Trigger::ReplicaDelete => self.upsert(&record_key("OLD"), "true"),
            Trigger::ReplicaInsert | Trigger::ReplicaUpdate => self.upsert(&record_key("NEW"), "false"),
            Trigger::Delete => self.upsert(&keys("o", "ctmirror_old"), "true"),
            // Dynamic, with the table's current name: a function body
            // naming the table would break TRUNCATE once it is renamed.
            // NUL marks the table's place: no identifier can hold one.
            Trigger::Truncate => {
                let template = self.upsert(&keys("t", "\0"), "true");
                format!(
                    "EXECUTE pg_catalog.format('{}', TG_TABLE_SCHEMA, TG_TABLE_NAME)",
                    template.replace('\'', "''").replace('%', "%%").replace('\0', "%I.%I")
                )
            }
            // Runs once per TRUNCATE, so it can afford a fixed search path
            // for the jsonb operator it uses.
            Trigger::Truncated => {
                settings = " SET search_path = pg_catalog, pg_temp";
                format!(
                    "UPDATE ctmirror_ct.tracked \
                        SET storage = storage || jsonb_build_object(TG_RELID::text, pg_relation_filenode(TG_RELID)) \
                      WHERE table_oid = {} AND storage ? TG_RELID::text",
                    self.table.oid
                )
            }
        };
        let body = format!("\n#variable_conflict use_column\nBEGIN\n{statement};\nRETURN NULL;\nEND\n");
        format!(
            "CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER{settings} AS {}",
            trigger.function(self.table.oid),
            dollar_quote(&body)
        )
    }

/// Upserts the keys `source` yields with this transaction's id as
    /// version: the side row always takes the newest writer's version and
    /// flag. `deleted` is an expression over the source row `c`.
    fn upsert(&self, source: &str, deleted: &str) -> String {
        let side = qualified(CT_SCHEMA, &side_table_name(self.table.oid));
        let key = self.key_names();
        let keys = column_list(None, &key);
        let version = quote_ident(VERSION_COL);
        let flag = quote_ident(DELETED_COL);
        format!(
            "INSERT INTO {side} AS s ({keys}, {version}, {flag}) \
             SELECT {}, pg_catalog.txid_current(), {deleted} FROM ({source}) AS c \
             ON CONFLICT ({keys}) DO UPDATE SET {version} = EXCLUDED.{version}, {flag} = EXCLUDED.{flag}",
            column_list(Some("c"), &key),
        )
    }
}

/// The side table (one row per changed key; the primary key is what the
/// upserts conflict on) and its (version, key) index, which the reader's
/// chunks and the retention cleanup scan in ranges.
fn side_table_sql(oid: u32, key: &[KeyColumn]) -> Vec<String> {
    let side = qualified(CT_SCHEMA, &side_table_name(oid));
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
    vec![
        format!(
            "CREATE TABLE {side} ({}, {} bigint NOT NULL, {} boolean NOT NULL, PRIMARY KEY ({keys}))",
            column_defs.join(", "),
            quote_ident(VERSION_COL),
            quote_ident(DELETED_COL),
        ),
        format!(
            "CREATE INDEX {} ON {side} ({}, {keys})",
            quote_ident(&format!("changes_{oid}_version")),
            quote_ident(VERSION_COL),
        ),
    ]
}

/// Drops the triggers (when the table still exists) and functions of every
/// layout. CASCADE: after a restore from a dump, triggers on the recreated
/// table (a new oid) still call the functions of the old oid. Those
/// triggers are ours and stale; nothing else can depend on a capture
/// function.
fn drop_capture_sql(oid: u32, table: Option<&TableRef>) -> Vec<String> {
    let mut out = Vec::new();
    for trigger in Trigger::ALL {
        if let Some(t) = table {
            out.push(format!("DROP TRIGGER IF EXISTS {} ON {}", quote_ident(&trigger.name()), t.sql_name()));
        }
        out.push(format!("DROP FUNCTION IF EXISTS {}() CASCADE", trigger.function(oid)));
    }
    out
}

/// Removes everything [`Capture::install_sql`] created. `table` is `None`
/// when the source table is gone (its triggers went with it).
pub(crate) fn drop_sql(oid: u32, table: Option<&TableRef>) -> Vec<String> {
    let mut out = drop_capture_sql(oid, table);
    out.push(format!("DROP TABLE IF EXISTS {}", qualified(CT_SCHEMA, &side_table_name(oid))));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(partitioned: bool) -> (TableRef, Vec<KeyColumn>) {
        let t = TableRef { oid: 42, schema: "my schema".into(), name: "Order \"Lines\"".into(), partitioned };
        let k = vec![
            KeyColumn {
                name: "select".into(),
                type_oid: 25,
                typmod: -1,
                collation: 100,
                native_type: "text".into(),
                collation_sql: Some("\"pg_catalog\".\"default\"".into()),
            },
            KeyColumn {
                name: "100%".into(),
                type_oid: 23,
                typmod: -1,
                collation: 0,
                native_type: "integer".into(),
                collation_sql: None,
            },
        ];
        (t, k)
    }

    fn triggers_of(sql: &[String]) -> Vec<&String> {
        sql.iter().filter(|s| s.starts_with("CREATE TRIGGER")).collect()
    }

    /// The CREATE TRIGGER statements and the state each is enabled in.
    fn states(sql: &[String]) -> Vec<(String, &'static str)> {
        let mut out = Vec::new();
        for s in sql.iter().filter(|s| s.starts_with("ALTER TABLE")) {
            let state = if s.contains(" ENABLE ALWAYS TRIGGER ") { "A" } else if s.contains(" ENABLE REPLICA TRIGGER ") { "R" } else { "?" };
            out.push((s.rsplit(' ').next().unwrap().trim_matches('"').to_owned(), state));
        }
        out
    }

    #[test]
    fn plain_tables_capture_updates_from_new_rows_and_key_changes_by_row() {
        let (t, k) = table(false);
        let sql = Capture { table: &t, key: &k, deferrable: false, partitions: &[] }.install_sql();
        let triggers = triggers_of(&sql);
        assert_eq!(triggers.len(), 9);
        let update = triggers.iter().find(|s| s.contains("\"ctmirror_ct_update\"")).unwrap();
        assert!(update.contains(" REFERENCING NEW TABLE AS ctmirror_new FOR EACH STATEMENT"), "{update}");
        let key = triggers.iter().find(|s| s.contains("\"ctmirror_ct_update_key\"")).unwrap();
        assert!(
            key.contains(
                "AFTER UPDATE ON \"my schema\".\"Order \"\"Lines\"\"\" FOR EACH ROW WHEN \
                 (OLD.\"select\" IS DISTINCT FROM NEW.\"select\" OR OLD.\"100%\" IS DISTINCT FROM NEW.\"100%\")"
            ),
            "{key}"
        );
        let row_level = ["ctmirror_ct_update_key", "ctmirror_ct_replica_insert", "ctmirror_ct_replica_update", "ctmirror_ct_replica_delete"];
        for s in &triggers {
            let is_row = row_level.iter().any(|n| s.contains(&format!("\"{n}\"")));
            assert_eq!(s.contains("FOR EACH ROW"), is_row, "{s}");
        }
        assert!(!sql.iter().any(|s| s.contains("EXCEPT") || s.contains("SELECT DISTINCT")));
        // Origin and replica writers alike; the apply worker (row triggers
        // only) through the replica ones.
        let states = states(&sql);
        assert_eq!(states.iter().filter(|(_, s)| *s == "A").count(), 6, "{states:?}");
        assert!(states.iter().filter(|(n, _)| n.starts_with("ctmirror_ct_replica_")).all(|(_, s)| *s == "R"), "{states:?}");
    }

    #[test]
    fn partitioned_tables_capture_key_changes_from_both_transition_tables_on_every_partition() {
        let (t, k) = table(true);
        let part = |oid, name: &str| TableRef { oid, schema: "my schema".into(), name: name.into(), partitioned: false };
        let partitions = [part(43, "p1"), part(44, "p2")];
        let capture = Capture { table: &t, key: &k, deferrable: false, partitions: &partitions };
        let sql = capture.install_sql();
        let triggers = triggers_of(&sql);
        assert_eq!(triggers.len(), 9 + 2 * 5);
        let update = triggers.iter().find(|s| s.contains("\"ctmirror_ct_update\"")).unwrap();
        assert!(update.contains("REFERENCING OLD TABLE AS ctmirror_old NEW TABLE AS ctmirror_new"), "{update}");
        let function = sql.iter().find(|s| s.contains("capture_42_update\"()") && s.starts_with("CREATE OR")).unwrap();
        assert_eq!(function.matches("INSERT INTO").count(), 1, "{function}");
        assert!(function.contains("EXCEPT"), "{function}");
        // Statement triggers on each partition feed the parent's side table
        // through the parent's functions; row triggers are cloned by the
        // server, so none is created on a partition.
        for p in ["p1", "p2"] {
            let on: Vec<&&String> = triggers.iter().filter(|s| s.contains(&format!(".\"{p}\" "))).collect();
            assert_eq!(on.len(), 5, "{on:?}");
            assert!(on.iter().all(|s| s.contains("FOR EACH STATEMENT") && s.contains("capture_42_")), "{on:?}");
        }
        let key = states(&sql).into_iter().find(|(n, _)| n == "ctmirror_ct_update_key").unwrap();
        assert_eq!(key.1, "R", "the statement trigger sees key changes of origin writers");
    }

    #[test]
    fn deferrable_keys_are_deduplicated() {
        let (t, k) = table(false);
        let sql = Capture { table: &t, key: &k, deferrable: true, partitions: &[] }.install_sql();
        let functions: Vec<&String> = sql.iter().filter(|s| s.starts_with("CREATE OR REPLACE FUNCTION")).collect();
        assert_eq!(functions.iter().filter(|f| f.contains("SELECT DISTINCT")).count(), 4);
        assert_eq!(functions.len(), 9);
    }

    #[test]
    fn side_table_copies_key_collation_and_quotes_names() {
        let (t, k) = table(false);
        let sql = Capture { table: &t, key: &k, deferrable: false, partitions: &[] }.install_sql();
        assert!(sql[0].starts_with("CREATE TABLE \"ctmirror_ct\".\"changes_42\" (\"select\" text COLLATE \"pg_catalog\".\"default\" NOT NULL"));
        assert!(sql.iter().any(|s| s.contains("ON \"my schema\".\"Order \"\"Lines\"\"\"")));
    }

    #[test]
    fn capture_functions_are_security_definer_and_name_nothing_a_search_path_could_redirect() {
        let (t, k) = table(true);
        let sql = Capture { table: &t, key: &k, deferrable: true, partitions: &[] }.install_sql();
        // The one that records a TRUNCATE's new filenode runs once per
        // TRUNCATE and has a fixed search path instead.
        for f in sql.iter().filter(|s| s.starts_with("CREATE OR REPLACE FUNCTION") && !s.contains("_truncated\"()")) {
            assert!(f.contains("LANGUAGE plpgsql SECURITY DEFINER AS"), "{f}");
            assert!(f.contains("INSERT INTO \"ctmirror_ct\".\"changes_42\" AS s"), "{f}");
            assert!(f.contains("pg_catalog.txid_current()"), "{f}");
            assert!(!f.contains("::"), "a cast names a type: {f}");
        }
    }

    #[test]
    fn truncate_names_the_table_at_run_time_with_quotes_and_percents_escaped() {
        let (t, k) = table(false);
        let sql = Capture { table: &t, key: &k, deferrable: false, partitions: &[] }.install_sql();
        let f = sql.iter().find(|s| s.contains("capture_42_truncate\"()") && s.starts_with("CREATE OR")).unwrap();
        assert!(f.contains("EXECUTE pg_catalog.format('INSERT INTO"), "{f}");
        assert!(f.contains("FROM %I.%I AS t) AS c"), "{f}");
        assert!(f.contains("t.\"100%%\""), "{f}");
        assert!(f.contains("', TG_TABLE_SCHEMA, TG_TABLE_NAME)"), "{f}");
        assert!(!f.contains("Order"), "{f}");
    }

    #[test]
    fn fingerprint_ignores_the_table_name_but_not_the_layout() {
        let (t, k) = table(false);
        let renamed = TableRef { name: "renamed".into(), ..t.clone() };
        let plain = Capture { table: &t, key: &k, deferrable: false, partitions: &[] }.fingerprint();
        assert_eq!(plain, Capture { table: &renamed, key: &k, deferrable: false, partitions: &[] }.fingerprint());
        assert_ne!(plain, Capture { table: &t, key: &k, deferrable: true, partitions: &[] }.fingerprint());
        let partitioned = TableRef { partitioned: true, ..t.clone() };
        assert_ne!(plain, Capture { table: &partitioned, key: &k, deferrable: false, partitions: &[] }.fingerprint());
        assert_ne!(plain, Capture { table: &t, key: &k[..1], deferrable: false, partitions: &[] }.fingerprint());
    }

    #[test]
    fn upgrade_drops_every_layouts_triggers_and_keeps_the_side_table() {
        let (t, k) = table(false);
        let sql = Capture { table: &t, key: &k, deferrable: false, partitions: &[] }.upgrade_sql();
        assert_eq!(sql.iter().filter(|s| s.starts_with("DROP TRIGGER IF EXISTS")).count(), 9);
        assert!(!sql.iter().any(|s| s.contains("TABLE \"ctmirror_ct\"")));
        assert_eq!(triggers_of(&sql).len(), 9);
    }
}
