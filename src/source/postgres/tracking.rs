//! Turning change tracking on for a table, and the registry reads that
//! depend on it (min valid version, the side table of a tracked table).

use super::catalog::{
    display, find_table, no_primary_key, primary_key, primary_key_is_deferrable, schema_of, KeyColumn, TableRef,
};
use super::statements::Statements;
use super::errors::pg_error;
use super::install::INSTALL_LOCK;
use super::sql::{quote_ident, DELETED_COL, VERSION_COL};
use super::triggers::{drop_sql, side_table_name, Capture, Trigger};
use crate::protocol::Version;
use crate::source::{SourceError, SourceTable, TrackingState};
use tokio_postgres::{Client, GenericClient, Transaction};

/// Enables tracking (idempotent) and answers the tracking lifetime
/// (generation) the table is in.
///
/// An already tracked table whose capture is damaged (see
/// `ctmirror_ct.damage`: a trigger missing or reset, the key changed, the
/// table rewritten or its partitions changed, a column replaced) has missed
/// changes or holds values no write announced: it is reinstalled with a new
/// generation and reported as newly enabled, so every application reloads
/// it. A healthy table whose capture was installed by an older version of
/// ctmirror (or before its key became deferrable) gets the current
/// functions and triggers in place, in this transaction, keeping its side
/// table and generation: nothing was missed, nothing reloads.
pub(crate) async fn ensure_tracking(
    client: &mut Client,
    stmts: &Statements,
    table: &SourceTable,
) -> Result<TrackingState, SourceError> {
    if let Some((generation, installed_because)) = tracked_and_healthy(client, stmts, table).await {
        return Ok(TrackingState { newly_enabled: false, generation: Some(generation), installed_because });
    }
    let shown = display(table);
    let doing = format!("enabling change tracking on table {shown}");
    let grant =
        format!("ownership of table {shown} (creating triggers needs it) and CREATE on schema ctmirror_ct");
    let err = |e| pg_error(e, &doing, &grant);
    let tx = client.transaction().await.map_err(err)?;
    // Creating triggers waits for the table's writers; give up rather than
    // queue every later writer behind us forever.
    tx.batch_execute("SET LOCAL lock_timeout = '30s'").await.map_err(err)?;
    tx.execute("SELECT pg_catalog.pg_advisory_xact_lock($1)", &[&INSTALL_LOCK]).await.map_err(err)?;
    let tref = find_table(&tx, stmts, table).await?;
    let key = primary_key(&tx, stmts, &tref).await?;
    if key.is_empty() {
        return Err(no_primary_key(&tref));
    }
    if let Some(k) = key.iter().find(|k| k.name == VERSION_COL || k.name == DELETED_COL) {
        return Err(SourceError::config(format!(
            "primary key column {} of table {shown} collides with ctmirror's side-table column of \
             that name; change tracking cannot be enabled",
            k.name
        )));
    }
    let deferrable = primary_key_is_deferrable(&tx, stmts, &tref).await?;
    refuse_partition(&tx, &tref).await?;
    let partitions = partition_members(&tx, &tref).await?;
    let capture = Capture { table: &tref, key: &key, deferrable, partitions: &partitions };
    let fingerprint = capture.fingerprint();
    let mut reinstalled_because = None;
    let registered = tx
        .query_opt(
            "SELECT side_table, capture_fingerprint, triggers IS NULL, ctmirror_ct.damage(table_oid),
                    generation::text, columns IS DISTINCT FROM ctmirror_ct.columns_of(table_oid), installed_because
               FROM ctmirror_ct.tracked WHERE table_oid = $1",
            &[&tref.oid],
        )
        .await
        .map_err(err)?;
    if let Some(row) = registered {
        let side: String = row.try_get(0).map_err(err)?;
        let installed: Option<String> = row.try_get(1).map_err(err)?;
        let legacy: bool = row.try_get(2).map_err(err)?;
        let damage: Option<String> = row.try_get(3).map_err(err)?;
        let generation: String = row.try_get(4).map_err(err)?;
        let columns_moved: bool = row.try_get(5).map_err(err)?;
        let installed_because: Option<String> = row.try_get(6).map_err(err)?;
        let current = installed.as_deref() == Some(fingerprint.as_str());
        // A registry row made before layout 2 has no record of its triggers
        // or shape: it is judged by the triggers its layout had, and its
        // shape is recorded from now on.
        let healthy = if legacy {
            let expected = match (installed.is_some(), tref.partitioned) {
                (true, false) => Trigger::SECOND_GENERATION_PLAIN.to_vec(),
                _ => Trigger::FIRST_GENERATION.to_vec(),
            };
            is_healthy(&tx, &tref, &side, &key, &expected).await.map_err(err)?
        } else {
            damage.is_none()
        };
        if healthy {
            if !legacy && members_moved(&tx, tref.oid).await.map_err(err)? {
                adopt_members(&tx, &capture).await.map_err(err)?;
                tracing::info!(table = %shown, "partitions were attached or detached; their rows are recorded as changes");
            }
            if !current || legacy {
                for statement in capture.upgrade_sql() {
                    tx.batch_execute(&statement).await.map_err(err)?;
                }
                tracing::info!(table = %shown, "upgraded the change-tracking triggers to this version's");
            }
            // A renamed table keeps its oid, side table, triggers and
            // generation. Columns added since are recorded, so that a later
            // drop and re-add of one of them is noticed.
            tx.execute(
                "UPDATE ctmirror_ct.tracked SET schema_name = $2, table_name = $3, capture_fingerprint = $4
                  WHERE table_oid = $1
                    AND (schema_name, table_name, capture_fingerprint) IS DISTINCT FROM ($2, $3, $4)",
                &[&tref.oid, &tref.schema, &tref.name, &fingerprint],
            )
            .await
            .map_err(err)?;
            if !current || legacy || columns_moved {
                record_shape(&tx, &tref, legacy).await.map_err(err)?;
            }
            tx.commit().await.map_err(err)?;
            return Ok(TrackingState { newly_enabled: false, generation: Some(generation), installed_because });
        }
        let why = damage.unwrap_or_else(|| "a trigger is missing or disabled, or the key changed".into());
        reinstalled_because = Some(why.clone());
        tracing::warn!(table = %shown, reason = %why, "change tracking was damaged; reinstalling, the table reloads");
        for statement in drop_sql(tref.oid, Some(&tref)) {
            tx.batch_execute(&statement).await.map_err(err)?;
        }
        tx.execute("DELETE FROM ctmirror_ct.tracked WHERE table_oid = $1", &[&tref.oid])
            .await
            .map_err(err)?;
    }
    // Our triggers on a table we do not know are leftovers: a restore from
    // a dump recreates the table (a new oid) with triggers that still feed
    // the old side table. They are replaced.
    // The table first: dropping its row triggers drops their clones on the
    // partitions too.
    for member in std::iter::once(&tref).chain(&partitions) {
        let ours = Trigger::ALL.into_iter().filter(|t| member.oid == tref.oid || t.on_partitions());
        for trigger in ours {
            tx.batch_execute(&format!(
                "DROP TRIGGER IF EXISTS {} ON {}",
                quote_ident(&trigger.name()),
                member.sql_name()
            ))
            .await
            .map_err(err)?;
        }
    }
    for statement in capture.install_sql() {
        tx.batch_execute(&statement).await.map_err(err)?;
    }
    // The first valid version is the readable version (oldest running xid
    // minus one) taken now, after the triggers exist and their lock is held:
    // a writer that touched the table before the triggers had to finish
    // before we got the lock, so every transaction still running (xid above
    // this) either has not written the table yet or will fire the triggers.
    // Using the enabling transaction's own xid instead would put min_valid
    // above the snapshot version of a full load that starts right after
    // (that version is xmin - 1 and an older transaction elsewhere can hold
    // xmin down), and the load would look expired. Cursors of an earlier
    // lifetime are told apart by the new generation instead.
    let row = tx
        .query_one(
            "INSERT INTO ctmirror_ct.tracked
                    (table_oid, schema_name, table_name, side_table, enabled_version, min_valid_version,
                     capture_fingerprint, installed_because)
             SELECT $1, $2, $3, $4, v, v, $5, $6
               FROM (SELECT pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot())::text::bigint - 1 AS v) AS x
             RETURNING generation::text",
            &[&tref.oid, &tref.schema, &tref.name, &side_table_name(tref.oid), &fingerprint, &reinstalled_because],
        )
        .await
        .map_err(err)?;
    let generation: String = row.try_get(0).map_err(err)?;
    record_shape(&tx, &tref, true).await.map_err(err)?;
    tx.commit().await.map_err(err)?;
    Ok(TrackingState { newly_enabled: true, generation: Some(generation), installed_because: reinstalled_because })
}

/// Records the triggers the capture installed (on the table and every
/// member of its partition tree) and, when `storage` is set, the table's
/// storage; always its columns. Storage is recorded only when the capture
/// is new (or of an older layout): recording it for a healthy table would
/// hide a rewrite, since damage is judged against it.
async fn record_shape(tx: &Transaction<'_>, table: &TableRef, storage: bool) -> Result<(), tokio_postgres::Error> {
    let names: Vec<String> = Trigger::ALL.iter().map(|t| t.name()).collect();
    tx.execute(
        "UPDATE ctmirror_ct.tracked
            SET triggers = (SELECT coalesce(jsonb_agg(jsonb_build_object(
                                       'rel', g.tgrelid, 'name', g.tgname::text, 'enabled', g.tgenabled::text)
                                       ORDER BY g.tgrelid, g.tgname), '[]'::jsonb)
                              FROM pg_catalog.pg_trigger g
                             WHERE (g.tgrelid = $1 OR g.tgrelid IN (SELECT p.relid FROM pg_catalog.pg_partition_tree($1::oid) AS p))
                               AND g.tgname::text = ANY($2::text[])),
                columns = ctmirror_ct.columns_of($1),
                storage = CASE WHEN $3 THEN ctmirror_ct.storage_of($1) ELSE storage END
          WHERE table_oid = $1",
        &[&table.oid, &names, &storage],
    )
    .await?;
    Ok(())
}

async fn members_moved(tx: &Transaction<'_>, oid: u32) -> Result<bool, tokio_postgres::Error> {
    tx.query_one("SELECT ctmirror_ct.members_moved($1)", &[&oid]).await?.try_get(0)
}

/// Partitions attached since the storage was recorded get the capture's
/// statement triggers, and every row they brought along is recorded as
/// changed; partitions detached since lose the triggers, and every row
/// they took away is recorded as changed too (the reader then finds no
/// live row and sends a delete). Creating the triggers locks out each
/// member's writers until this transaction ends, so no write slips between
/// the rows recorded and the triggers. A dropped partition cannot be
/// listed any more: that is damage, and the table reloads instead.
async fn adopt_members(tx: &Transaction<'_>, capture: &Capture<'_>) -> Result<(), tokio_postgres::Error> {
    let root = capture.table.oid;
    let stored: Vec<u32> = tx
        .query(
            "SELECT k::oid FROM pg_catalog.jsonb_object_keys(
                 (SELECT storage FROM ctmirror_ct.tracked WHERE table_oid = $1)) AS k",
            &[&root],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect::<Vec<u32>>();
    // Only the statement triggers: the row triggers on a partition are the
    // server's clones of the table's, attached and detached with it.
    let statement_triggers: Vec<Trigger> = Trigger::ALL.into_iter().filter(|t| t.on_partitions()).collect();
    for member in capture.partitions.iter().filter(|m| !stored.contains(&m.oid)) {
        for &trigger in &statement_triggers {
            tx.batch_execute(&format!("DROP TRIGGER IF EXISTS {} ON {}", quote_ident(&trigger.name()), member.sql_name()))
                .await?;
        }
        for statement in capture.partition_sql(member) {
            tx.batch_execute(&statement).await?;
        }
        if !member.partitioned {
            tx.batch_execute(&capture.mark_sql(member, false)).await?;
        }
    }
    for &oid in stored.iter().filter(|&&o| o != root && !capture.partitions.iter().any(|m| m.oid == o)) {
        let row = tx
            .query_one(
                "SELECT n.nspname::text, c.relname::text, c.relkind::text
                   FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.oid = $1",
                &[&oid],
            )
            .await?;
        let relkind: String = row.get(2);
        let detached = TableRef { oid, schema: row.get(0), name: row.get(1), partitioned: relkind == "p" };
        for &trigger in &statement_triggers {
            tx.batch_execute(&format!("DROP TRIGGER IF EXISTS {} ON {}", quote_ident(&trigger.name()), detached.sql_name()))
                .await?;
        }
        if relkind == "r" {
            tx.batch_execute(&capture.mark_sql(&detached, true)).await?;
        }
    }
    // Members kept keep their recorded filenodes (a rewrite must stay
    // visible); members attached are recorded as they are now.
    tx.execute(
        "UPDATE ctmirror_ct.tracked
            SET storage = (SELECT coalesce(jsonb_object_agg(s.key, s.value), '{}'::jsonb)
                             FROM jsonb_each(storage) AS s
                            WHERE s.key::oid IN (SELECT $1::oid UNION SELECT p.relid::oid FROM pg_partition_tree($1::oid) AS p))
                          || (SELECT coalesce(jsonb_object_agg(p.relid::oid::text, pg_relation_filenode(p.relid)), '{}'::jsonb)
                                FROM pg_partition_tree($1::oid) AS p
                               WHERE NOT storage ? p.relid::oid::text)
          WHERE table_oid = $1",
        &[&root],
    )
    .await?;
    record_shape(tx, capture.table, false).await
}

/// A partition is tracked through its partitioned table: the capture puts
/// the same triggers on every partition, and a second capture on one of
/// them would collide with them.
async fn refuse_partition(tx: &Transaction<'_>, table: &TableRef) -> Result<(), SourceError> {
    let parent: Option<String> = tx
        .query_one(
            "SELECT (SELECT i.inhparent::regclass::text FROM pg_catalog.pg_inherits i WHERE i.inhrelid = c.oid)
               FROM pg_catalog.pg_class c WHERE c.oid = $1 AND c.relispartition",
            &[&table.oid],
        )
        .await
        .ok()
        .and_then(|r| r.try_get(0).ok())
        .flatten();
    match parent {
        Some(parent) => Err(SourceError::config(format!(
            "table {} is a partition of {parent}; map {parent} instead (its partitions are tracked with it)",
            table.display()
        ))),
        None => Ok(()),
    }
}

/// Every member of a partitioned table's tree below it; empty for a plain
/// table. A foreign-table partition cannot carry the capture's triggers.
pub(crate) async fn partition_members<C: GenericClient + Sync>(
    client: &C,
    table: &TableRef,
) -> Result<Vec<TableRef>, SourceError> {
    if !table.partitioned {
        return Ok(Vec::new());
    }
    let doing = format!("listing the partitions of table {}", table.display());
    let rows = client
        .query(
            "SELECT c.oid, n.nspname::text, c.relname::text, c.relkind::text
               FROM pg_catalog.pg_partition_tree($1::oid) AS p
               JOIN pg_catalog.pg_class c ON c.oid = p.relid
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              WHERE p.level > 0
              ORDER BY p.level, c.oid",
            &[&table.oid],
        )
        .await
        .map_err(|e| pg_error(e, &doing, ""))?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let relkind: String = r.try_get(3).map_err(|e| pg_error(e, &doing, ""))?;
        let member = TableRef {
            oid: r.try_get(0).map_err(|e| pg_error(e, &doing, ""))?,
            schema: r.try_get(1).map_err(|e| pg_error(e, &doing, ""))?,
            name: r.try_get(2).map_err(|e| pg_error(e, &doing, ""))?,
            partitioned: relkind == "p",
        };
        if relkind != "r" && relkind != "p" {
            return Err(SourceError::config(format!(
                "partition {} of table {} is not a table (relkind {relkind}); its writes cannot be captured, \
                 so the table cannot be change-tracked",
                member.display(),
                table.display()
            )));
        }
        out.push(member);
    }
    Ok(out)
}

/// The common case in a few prepared queries, without a transaction or the
/// install lock: the table is registered under its current name with this
/// version's capture (same fingerprint), nothing about it is damaged and
/// its columns are as recorded. Answers its generation; anything else (or
/// any error) answers `None` and the full check under the lock decides
/// (and upgrades or reinstalls).
async fn tracked_and_healthy(
    client: &Client,
    stmts: &Statements,
    table: &SourceTable,
) -> Option<(String, Option<String>)> {
    let tref = find_table(client, stmts, table).await.ok()?;
    let key = primary_key(client, stmts, &tref).await.ok()?;
    if key.is_empty() {
        return None;
    }
    let deferrable = primary_key_is_deferrable(client, stmts, &tref).await.ok()?;
    let capture = Capture { table: &tref, key: &key, deferrable, partitions: &[] };
    const SQL: &str = "
        SELECT r.generation::text, r.installed_because,
               (r.schema_name, r.table_name) = ($2::text, $3::text)
               AND r.capture_fingerprint = $4
               AND ctmirror_ct.damage(r.table_oid) IS NULL
               AND NOT ctmirror_ct.members_moved(r.table_oid)
               AND r.columns = ctmirror_ct.columns_of(r.table_oid)
          FROM ctmirror_ct.tracked r
         WHERE r.table_oid = $1";
    let fingerprint = capture.fingerprint();
    let statement = stmts.get(client, SQL).await.ok()?;
    let schema = schema_of(table);
    let row = client.query_opt(&statement, &[&tref.oid, &schema, &table.name, &fingerprint]).await.ok()??;
    let healthy: Option<bool> = row.try_get(2).ok()?;
    match healthy {
        Some(true) => Some((row.try_get(0).ok()?, row.try_get(1).ok()?)),
        _ => None,
    }
}

/// For registry rows of older layouts: whether the side table's key
/// columns still equal the table's primary key (names, types, typmods,
/// collations, order) and the `expected` triggers exist and fire always
/// (`ENABLE TRIGGER ALL` resets them to fire for origin writers only, and
/// replica writers then go uncaptured).
async fn is_healthy(
    tx: &Transaction<'_>,
    table: &TableRef,
    side: &str,
    key: &[KeyColumn],
    expected: &[Trigger],
) -> Result<bool, tokio_postgres::Error> {
    let rows = tx
        .query(
            "SELECT a.attname::text, a.atttypid, a.atttypmod, a.attcollation
               FROM pg_catalog.pg_attribute a
               JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = 'ctmirror_ct' AND c.relname = $1
                AND a.attnum > 0 AND NOT a.attisdropped
                AND a.attname::text NOT IN ($2::text, $3::text)
              ORDER BY a.attnum",
            &[&side, &VERSION_COL, &DELETED_COL],
        )
        .await?;
    let mut side_key = Vec::with_capacity(rows.len());
    for r in &rows {
        side_key.push((
            r.try_get::<_, String>(0)?,
            r.try_get::<_, u32>(1)?,
            r.try_get::<_, i32>(2)?,
            r.try_get::<_, u32>(3)?,
        ));
    }
    let source_key: Vec<_> =
        key.iter().map(|k| (k.name.clone(), k.type_oid, k.typmod, k.collation)).collect();
    if side_key != source_key {
        return Ok(false);
    }
    let names: Vec<String> = expected.iter().map(|t| t.name()).collect();
    let firing: i64 = tx
        .query_one(
            "SELECT count(*) FROM pg_catalog.pg_trigger
              WHERE tgrelid = $1 AND tgname::text = ANY($2::text[]) AND tgenabled::text = 'A'",
            &[&table.oid, &names],
        )
        .await?
        .try_get(0)?;
    Ok(firing == names.len() as i64)
}

/// A tracked table's registry entry.
pub(crate) struct Tracked {
    pub table_oid: u32,
    pub side_table: String,
    pub min_valid_version: Version,
    /// The tracking lifetime now registered.
    pub generation: String,
}

impl Tracked {
    fn from_row(row: &tokio_postgres::Row, shown: &str) -> Result<Tracked, SourceError> {
        let get_err = |e| pg_error(e, shown, "");
        Ok(Tracked {
            table_oid: row.try_get(0).map_err(get_err)?,
            side_table: row.try_get(1).map_err(get_err)?,
            min_valid_version: Version(row.try_get(2).map_err(get_err)?),
            generation: row.try_get(3).map_err(get_err)?,
        })
    }
}

/// Looks a table up in the registry; not tracked is a configuration error
/// (the cycle enables tracking before reading).
pub(crate) async fn tracked<C: GenericClient + Sync>(
    client: &C,
    stmts: &Statements,
    table: &SourceTable,
) -> Result<Tracked, SourceError> {
    // By name in one query; only when that finds nothing does the slower
    // path below say whether the table is missing or just not tracked.
    const BY_NAME: &str = "SELECT r.table_oid, r.side_table, r.min_valid_version, r.generation::text
                             FROM pg_catalog.pg_class c
                             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                             JOIN ctmirror_ct.tracked r ON r.table_oid = c.oid
                            WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')";
    const SQL: &str = "SELECT table_oid, side_table, min_valid_version, generation::text
                         FROM ctmirror_ct.tracked WHERE table_oid = $1";
    let shown = display(table);
    let by_name_err = |e| {
        pg_error(
            e,
            &format!("reading the change-tracking registry for table {shown}"),
            "USAGE and SELECT on schema ctmirror_ct",
        )
    };
    let statement = stmts.get(client, BY_NAME).await.map_err(by_name_err)?;
    if let Some(row) = client.query_opt(&statement, &[&schema_of(table), &table.name]).await.map_err(by_name_err)? {
        return Tracked::from_row(&row, &shown);
    }
    let tref = find_table(client, stmts, table).await?;
    let shown = tref.display();
    let err = |e| {
        pg_error(
            e,
            &format!("reading the change-tracking registry for table {shown}"),
            "USAGE and SELECT on schema ctmirror_ct",
        )
    };
    let statement = stmts.get(client, SQL).await.map_err(err)?;
    let row = client.query_opt(&statement, &[&tref.oid]).await.map_err(err)?;
    let Some(row) = row else {
        return Err(SourceError::config(format!("change tracking is not enabled on table {shown}")));
    };
    Tracked::from_row(&row, &shown)
}
