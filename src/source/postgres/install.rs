//! The `ctmirror_ct` schema: registry of tracked tables, the installation
//! id behind [`identity`], the version clock and retention requests used
//! for retention, the readers of each table, and the SQL functions the
//! capture and the reads share.

use super::errors::pg_error;
use crate::source::SourceError;
use tokio_postgres::Client;

/// Advisory lock key ("ctmirror" in ASCII) serializing every change to
/// `ctmirror_ct` across agents, so two agents installing at once neither
/// fail on `CREATE ... IF NOT EXISTS` races nor both enable one table.
pub(crate) const INSTALL_LOCK: i64 = 0x6374_6d69_7272_6f72;

/// The layout [`INSTALL_SQL`] creates. An installation reporting an older
/// one (or none) gets the script again; the script is idempotent.
pub(crate) const LAYOUT: i32 = 2;

const GRANT: &str = "CREATE on the database (to create schema ctmirror_ct), or create the schema \
                     ctmirror_ct owned by the agent's role";

/// SQLSTATE raised by [`READABLE_SQL`] when the changes a read needs were
/// removed by retention.
pub(crate) const EXPIRED_STATE: &str = "CM001";
/// SQLSTATE raised by [`READABLE_SQL`] when the table's tracking is not the
/// one the reader started with (reinstalled, or removed).
pub(crate) const REPLACED_STATE: &str = "CM002";

const INSTALL_SQL: &str = "
CREATE SCHEMA IF NOT EXISTS ctmirror_ct;
CREATE TABLE IF NOT EXISTS ctmirror_ct.tracked (
    table_oid oid PRIMARY KEY,
    schema_name text NOT NULL,
    table_name text NOT NULL,
    side_table text NOT NULL,
    enabled_version bigint NOT NULL,
    min_valid_version bigint NOT NULL,
    enabled_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    capture_fingerprint text
);
-- Columns of later layouts, for registries made before them. Each is
-- checked first, so a role that does not own the table can still run this
-- once they are there.
DO $ctmirror$
DECLARE
    c record;
BEGIN
    FOR c IN SELECT * FROM (VALUES
            ('capture_fingerprint', 'text'),
            -- One tracking lifetime: replaced whenever tracking is
            -- reinstalled, so cursors of an earlier lifetime are recognised.
            ('generation', 'uuid NOT NULL DEFAULT pg_catalog.gen_random_uuid()'),
            -- What the capture was installed on: storage (relation ->
            -- filenode, every member of a partition tree) and columns
            -- (attnum -> name, enum labels).
            ('storage', 'jsonb'),
            ('columns', 'jsonb'),
            -- Every trigger the capture installed, as relation oid, name and
            -- the tgenabled state it must keep.
            ('triggers', 'jsonb'),
            -- Why this lifetime began when it replaced a damaged one.
            ('installed_because', 'text')) AS v(name, definition)
    LOOP
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_attribute
                        WHERE attrelid = 'ctmirror_ct.tracked'::pg_catalog.regclass
                          AND attname = c.name AND NOT attisdropped) THEN
            EXECUTE pg_catalog.format('ALTER TABLE ctmirror_ct.tracked ADD COLUMN %I %s', c.name, c.definition);
        END IF;
    END LOOP;
END
$ctmirror$;
CREATE TABLE IF NOT EXISTS ctmirror_ct.installation (
    id uuid PRIMARY KEY DEFAULT pg_catalog.gen_random_uuid(),
    installed_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);
INSERT INTO ctmirror_ct.installation (id)
    SELECT pg_catalog.gen_random_uuid()
    WHERE NOT EXISTS (SELECT 1 FROM ctmirror_ct.installation);
CREATE TABLE IF NOT EXISTS ctmirror_ct.version_clock (
    version bigint NOT NULL,
    recorded_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS version_clock_recorded_at ON ctmirror_ct.version_clock (recorded_at);
-- The retention each agent asked for, by length: the longest request still
-- renewed within its own length wins, so no agent's retention is cut short
-- by another's.
CREATE TABLE IF NOT EXISTS ctmirror_ct.retention_requests (
    retention_secs bigint PRIMARY KEY,
    last_requested timestamptz NOT NULL
);
-- Which application reads which tracked table, renewed every cycle: a table
-- no application reads any more is untracked.
CREATE TABLE IF NOT EXISTS ctmirror_ct.readers (
    table_oid oid NOT NULL,
    application text NOT NULL,
    last_read timestamptz NOT NULL,
    PRIMARY KEY (table_oid, application)
);

-- The storage of a tracked table: the table and each member of its
-- partition tree (which lists nothing for a plain table) with its filenode. A rewrite (ALTER COLUMN TYPE ... USING,
-- VACUUM FULL), an ATTACH, DETACH or DROP of a partition changes it; a
-- TRUNCATE changes it too, and the capture records the new value itself.
CREATE OR REPLACE FUNCTION ctmirror_ct.storage_of(rel oid) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $ctmirror$
    SELECT jsonb_object_agg(m.relid::oid::text, pg_relation_filenode(m.relid))
      FROM (SELECT rel AS relid UNION SELECT p.relid::oid FROM pg_partition_tree(rel) AS p) AS m
$ctmirror$;

-- The columns of a table: attnum -> name and, for enum columns, the labels
-- in order. Types are left out: a type change that keeps the storage (a
-- longer varchar, a wider numeric) keeps every value, and one that does not
-- rewrites the table, which the storage shows.
CREATE OR REPLACE FUNCTION ctmirror_ct.columns_of(rel oid) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $ctmirror$
    SELECT coalesce(jsonb_object_agg(a.attnum::text, jsonb_build_array(
               a.attname::text,
               (SELECT array_agg(e.enumlabel::text ORDER BY e.enumsortorder)
                  FROM pg_enum e WHERE e.enumtypid = a.atttypid))), '{}'::jsonb)
      FROM pg_attribute a
     WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped
$ctmirror$;

-- Why the tracking of a table can no longer be trusted, or NULL when it can.
-- A trigger of the capture missing or not firing as installed, a side table
-- whose key is no longer the primary key, a rewritten table or partition
-- tree, a column whose name or enum labels changed, or a name that now
-- belongs to another column: each means changes went uncaptured (or
-- values changed without a write), so the table must reload.
CREATE OR REPLACE FUNCTION ctmirror_ct.damage(rel oid) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $ctmirror$
DECLARE
    r ctmirror_ct.tracked;
    side regclass;
    culprit text;
BEGIN
    SELECT * INTO r FROM ctmirror_ct.tracked WHERE table_oid = rel;
    IF NOT FOUND THEN
        RETURN 'not tracked';
    END IF;
    IF r.triggers IS NULL OR r.storage IS NULL OR r.columns IS NULL THEN
        RETURN 'installed by an older ctmirror';
    END IF;
    -- A member that is gone took its rows along without a trigger seeing
    -- them; one whose filenode changed was rewritten. A member attached
    -- or detached is not damage: ensure_tracking adopts it (see
    -- members_moved).
    SELECT m.key INTO culprit
      FROM jsonb_each(r.storage) AS m
     WHERE NOT EXISTS (SELECT FROM pg_class c WHERE c.oid = m.key::oid)
     LIMIT 1;
    IF culprit IS NOT NULL THEN
        RETURN 'a partition of the table was dropped';
    END IF;
    SELECT m.key INTO culprit
      FROM jsonb_each(r.storage) AS m
      JOIN jsonb_each(ctmirror_ct.storage_of(rel)) AS c ON c.key = m.key AND c.value IS DISTINCT FROM m.value
     LIMIT 1;
    IF culprit IS NOT NULL THEN
        RETURN 'the table was rewritten (' || culprit::oid::regclass::text || ' has new storage)';
    END IF;
    side := to_regclass('ctmirror_ct.' || quote_ident(r.side_table));
    IF side IS NULL THEN
        RETURN 'its side table is missing';
    END IF;
    SELECT t.value->>'name' || ' on ' || (t.value->>'rel')::oid::regclass::text INTO culprit
      FROM jsonb_array_elements(r.triggers) AS t
     WHERE NOT EXISTS (SELECT FROM pg_trigger g
                        WHERE g.tgrelid = (t.value->>'rel')::oid AND g.tgname = t.value->>'name'
                          AND g.tgenabled::text = t.value->>'enabled')
       -- A detached partition's triggers no longer matter (members_moved).
       AND ctmirror_ct.storage_of(rel) ? (t.value->>'rel')
     LIMIT 1;
    IF culprit IS NOT NULL THEN
        RETURN 'trigger ' || culprit || ' is missing, disabled or no longer enabled as installed';
    END IF;
    IF ARRAY(SELECT ROW(a.attname::text, a.atttypid, a.atttypmod, a.attcollation)::text
               FROM pg_attribute a
              WHERE a.attrelid = side
                AND a.attnum > 0 AND NOT a.attisdropped
                AND a.attname NOT IN ('ctmirror_version', 'ctmirror_deleted')
              ORDER BY a.attnum)
       IS DISTINCT FROM
       ARRAY(SELECT ROW(a.attname::text, a.atttypid, a.atttypmod, a.attcollation)::text
               FROM pg_index i
              CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
              WHERE i.indrelid = rel AND i.indisprimary
              ORDER BY k.ord) THEN
        RETURN 'the primary key changed';
    END IF;
    SELECT s.value->>0 INTO culprit
      FROM jsonb_each(r.columns) AS s
      JOIN jsonb_each(ctmirror_ct.columns_of(rel)) AS c
        ON (c.key = s.key AND c.value IS DISTINCT FROM s.value)
        OR (c.key <> s.key AND c.value->>0 = s.value->>0)
     LIMIT 1;
    IF culprit IS NOT NULL THEN
        RETURN 'column ' || quote_ident(culprit) || ' was renamed, dropped and re-added, or its enum labels changed';
    END IF;
    RETURN NULL;
END
$ctmirror$;

-- Whether partitions were attached to or detached from the table since its
-- storage was recorded.
CREATE OR REPLACE FUNCTION ctmirror_ct.members_moved(rel oid) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $ctmirror$
    SELECT ARRAY(SELECT k FROM jsonb_object_keys((SELECT storage FROM ctmirror_ct.tracked WHERE table_oid = rel)) AS k ORDER BY k)
           IS DISTINCT FROM ARRAY(SELECT k FROM jsonb_object_keys(ctmirror_ct.storage_of(rel)) AS k ORDER BY k)
$ctmirror$;

-- Called by every change read, in its own snapshot: raises instead of
-- letting the read return less than the changes after its cursor.
-- `inside` is true when the cursor stands inside version `after` (a key
-- follows it): then the rest of that version must still exist as well.
CREATE OR REPLACE FUNCTION ctmirror_ct.readable(rel oid, expected uuid, after bigint, inside boolean)
RETURNS boolean
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $ctmirror$
DECLARE
    r ctmirror_ct.tracked;
BEGIN
    SELECT * INTO r FROM ctmirror_ct.tracked WHERE table_oid = rel;
    IF NOT FOUND OR r.generation IS DISTINCT FROM expected THEN
        RAISE EXCEPTION USING ERRCODE = 'CM002',
            MESSAGE = 'change tracking of ' || rel::regclass::text || ' was reinstalled while it was read';
    END IF;
    IF r.min_valid_version > after OR (r.min_valid_version = after AND inside) THEN
        RAISE EXCEPTION USING ERRCODE = 'CM001',
            MESSAGE = 'the changes of ' || rel::regclass::text || ' after version ' || after
                      || ' were removed by retention (oldest kept: ' || r.min_valid_version || ')';
    END IF;
    RETURN true;
END
$ctmirror$;
";

/// Creates the schema, registry tables and functions when missing or of an
/// older layout. Idempotent and safe when several agents run it at once
/// (advisory transaction lock).
pub(crate) async fn install(client: &mut Client) -> Result<(), SourceError> {
    let doing = "installing the ctmirror_ct schema";
    if current_layout(client).await == Some(LAYOUT) {
        return Ok(());
    }
    let tx = client.transaction().await.map_err(|e| pg_error(e, doing, GRANT))?;
    tx.execute("SELECT pg_catalog.pg_advisory_xact_lock($1)", &[&INSTALL_LOCK])
        .await
        .map_err(|e| pg_error(e, doing, GRANT))?;
    tx.batch_execute(INSTALL_SQL).await.map_err(|e| pg_error(e, doing, GRANT))?;
    // Last: an installation that reports this layout has all of the above.
    tx.batch_execute(&format!(
        "CREATE OR REPLACE FUNCTION ctmirror_ct.layout() RETURNS integer LANGUAGE sql IMMUTABLE AS 'SELECT {LAYOUT}'"
    ))
    .await
    .map_err(|e| pg_error(e, doing, GRANT))?;
    tx.commit().await.map_err(|e| pg_error(e, doing, GRANT))
}

/// The layout of the installed schema; `None` when there is none (or it
/// cannot be read, which the install then reports).
async fn current_layout(client: &Client) -> Option<i32> {
    let exists = client
        .query_one("SELECT pg_catalog.to_regprocedure('ctmirror_ct.layout()') IS NOT NULL", &[])
        .await
        .ok()?;
    if !exists.try_get::<_, bool>(0).ok()? {
        return None;
    }
    client.query_one("SELECT ctmirror_ct.layout()", &[]).await.ok()?.try_get(0).ok()
}

/// `<system identifier>.<timeline>:<database oid>:<installation id>`.
///
/// Each part changes with the history the mirror followed:
/// - the system identifier when the database is restored into another
///   cluster (a dump restored there keeps database oid and installation id,
///   since a fresh cluster's first database gets the same oid);
/// - the timeline when a standby is promoted or a point-in-time restore
///   ends: transaction ids (versions) after the fork are handed out again
///   for other transactions, so no cursor of the old timeline can be
///   trusted. Read from the current WAL file name, which changes at once
///   on promotion;
/// - the database oid when the database is restored into a new database;
/// - the installation id when `ctmirror_ct` is dropped and reinstalled.
///
/// The database name is left out: renaming a database changes nothing.
pub(crate) async fn identity(client: &Client) -> Result<String, SourceError> {
    let doing = "reading the source identity";
    let row = client
        .query_one(
            "SELECT s.system_identifier::text || '.'
                    || pg_catalog.substr(pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_lsn()), 1, 8)
                    || ':' || d.oid::text || ':' || i.id::text
               FROM pg_catalog.pg_database d, ctmirror_ct.installation i, pg_catalog.pg_control_system() s
              WHERE d.datname = pg_catalog.current_database()
              ORDER BY i.installed_at, i.id
              LIMIT 1",
            &[],
        )
        .await
        .map_err(|e| pg_error(e, doing, "USAGE and SELECT on schema ctmirror_ct"))?;
    row.try_get(0).map_err(|e| pg_error(e, doing, ""))
}
