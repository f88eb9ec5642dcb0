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

/// Enables tracking (idempotent). An already tracked table whose side table
/// no longer matches its primary key, or whose triggers were dropped or
/// disabled, has missed changes: it is reinstalled and reported as newly
/// enabled so the agent reloads it. A healthy table whose capture was
/// installed by an older version of ctmirror (or before its key became
/// deferrable) gets the current functions and triggers in place, in this
/// transaction, keeping its side table: nothing was missed, nothing reloads.
pub(crate) async fn ensure_tracking(
    client: &mut Client,
    stmts: &Statements,
    table: &SourceTable,
) -> Result<TrackingState, SourceError> {
    if is_tracked_and_healthy(client, stmts, table).await {
        return Ok(TrackingState { newly_enabled: false });
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
    let capture = Capture { table: &tref, key: &key, deferrable };
    let fingerprint = capture.fingerprint();
    let registered = tx
        .query_opt(
            "SELECT side_table, capture_fingerprint FROM ctmirror_ct.tracked WHERE table_oid = $1",
            &[&tref.oid],
        )
        .await
        .map_err(err)?;
    if let Some(row) = registered {
        let side: String = row.try_get(0).map_err(err)?;
        let installed: Option<String> = row.try_get(1).map_err(err)?;
        let current = installed.as_deref() == Some(fingerprint.as_str());
        // An installation from before fingerprints is judged by the triggers
        // it had; it lacks the row-level key trigger.
        let expected = match installed {
            None => Trigger::FIRST_GENERATION.to_vec(),
            Some(_) => capture.triggers(),
        };
        if is_healthy(&tx, &tref, &side, &key, &expected).await.map_err(err)? {
            if !current {
                for statement in capture.upgrade_sql() {
                    tx.batch_execute(&statement).await.map_err(err)?;
                }
                tracing::info!(table = %shown, "upgraded the change-tracking triggers to this version's");
            }
            // A renamed table keeps its oid, side table and triggers.
            tx.execute(
                "UPDATE ctmirror_ct.tracked SET schema_name = $2, table_name = $3, capture_fingerprint = $4
                  WHERE table_oid = $1
                    AND (schema_name, table_name, capture_fingerprint) IS DISTINCT FROM ($2, $3, $4)",
                &[&tref.oid, &tref.schema, &tref.name, &fingerprint],
            )
            .await
            .map_err(err)?;
            tx.commit().await.map_err(err)?;
            return Ok(TrackingState { newly_enabled: false });
        }
        tracing::warn!(table = %shown, "change tracking was damaged (key changed or triggers missing); reinstalling");
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
    for trigger in Trigger::ALL {
        tx.batch_execute(&format!(
            "DROP TRIGGER IF EXISTS {} ON {}",
            quote_ident(&trigger.name()),
            tref.sql_name()
        ))
        .await
        .map_err(err)?;
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
    // xmin down), and the load would look expired.
    tx.execute(
        "INSERT INTO ctmirror_ct.tracked
                (table_oid, schema_name, table_name, side_table, enabled_version, min_valid_version,
                 capture_fingerprint)
         SELECT $1, $2, $3, $4, v, v, $5
           FROM (SELECT pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot())::text::bigint - 1 AS v) AS x",
        &[&tref.oid, &tref.schema, &tref.name, &side_table_name(tref.oid), &fingerprint],
    )
    .await
    .map_err(err)?;
    tx.commit().await.map_err(err)?;
    Ok(TrackingState { newly_enabled: true })
}

/// The common case in a few prepared queries, without a transaction or the
/// install lock: the table is registered under its current name with this
/// version's capture (same fingerprint), its side table's key equals its
/// primary key and all its triggers fire. Anything else (or any error)
/// answers `false` and the full check under the lock decides (and upgrades
/// or reinstalls).
async fn is_tracked_and_healthy(client: &Client, stmts: &Statements, table: &SourceTable) -> bool {
    let Ok(tref) = find_table(client, stmts, table).await else { return false };
    let Ok(key) = primary_key(client, stmts, &tref).await else { return false };
    if key.is_empty() {
        return false;
    }
    let Ok(deferrable) = primary_key_is_deferrable(client, stmts, &tref).await else { return false };
    let capture = Capture { table: &tref, key: &key, deferrable };
    const SQL: &str = "
        WITH t AS (
            SELECT c.oid, r.side_table, (r.schema_name, r.table_name) = ($1::text, $2::text) AS same_name
              FROM pg_catalog.pg_class c
              JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              JOIN ctmirror_ct.tracked r ON r.table_oid = c.oid
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')
               AND r.capture_fingerprint = $6)
        SELECT t.same_name
           AND (SELECT count(*) FROM pg_catalog.pg_trigger
                 WHERE tgrelid = t.oid AND tgname::text = ANY($3::text[]) AND tgenabled::text IN ('O', 'A'))
               = pg_catalog.cardinality($3::text[])
           AND ARRAY(SELECT ROW(a.attname::text, a.atttypid, a.atttypmod, a.attcollation)::text
                       FROM pg_catalog.pg_attribute a
                       JOIN pg_catalog.pg_class sc ON sc.oid = a.attrelid
                       JOIN pg_catalog.pg_namespace sn ON sn.oid = sc.relnamespace
                      WHERE sn.nspname = 'ctmirror_ct' AND sc.relname = t.side_table
                        AND a.attnum > 0 AND NOT a.attisdropped
                        AND a.attname::text NOT IN ($4::text, $5::text)
                      ORDER BY a.attnum)
             = ARRAY(SELECT ROW(a.attname::text, a.atttypid, a.atttypmod, a.attcollation)::text
                       FROM pg_catalog.pg_index i
                      CROSS JOIN LATERAL pg_catalog.unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
                       JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                      WHERE i.indrelid = t.oid AND i.indisprimary
                      ORDER BY k.ord)
          FROM t";
    let names: Vec<String> = capture.triggers().iter().map(|t| t.name()).collect();
    let fingerprint = capture.fingerprint();
    let Ok(statement) = stmts.get(client, SQL).await else { return false };
    let schema = schema_of(table);
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] =
        [&schema, &table.name, &names, &VERSION_COL, &DELETED_COL, &fingerprint];
    match client.query_opt(&statement, &params).await {
        Ok(Some(row)) => row.try_get::<_, Option<bool>>(0).ok().flatten().unwrap_or(false),
        _ => false,
    }
}

/// Whether the side table's key columns still equal the table's primary key
/// (names, types, typmods, collations, order) and the `expected` triggers
/// exist and fire.
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
              WHERE tgrelid = $1 AND tgname::text = ANY($2::text[]) AND tgenabled::text IN ('O', 'A')",
            &[&table.oid, &names],
        )
        .await?
        .try_get(0)?;
    Ok(firing == names.len() as i64)
}

/// A tracked table's registry entry.
pub(crate) struct Tracked {
    pub side_table: String,
    pub min_valid_version: Version,
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
    const BY_NAME: &str = "SELECT r.side_table, r.min_valid_version
                             FROM pg_catalog.pg_class c
                             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                             JOIN ctmirror_ct.tracked r ON r.table_oid = c.oid
                            WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')";
    const SQL: &str = "SELECT side_table, min_valid_version FROM ctmirror_ct.tracked WHERE table_oid = $1";
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
        let side_table: String = row.try_get(0).map_err(|e| pg_error(e, &shown, ""))?;
        let min_valid: i64 = row.try_get(1).map_err(|e| pg_error(e, &shown, ""))?;
        return Ok(Tracked { side_table, min_valid_version: Version(min_valid) });
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
    let side_table: String = row.try_get(0).map_err(|e| pg_error(e, &shown, ""))?;
    let min_valid: i64 = row.try_get(1).map_err(|e| pg_error(e, &shown, ""))?;
    Ok(Tracked { side_table, min_valid_version: Version(min_valid) })
}
