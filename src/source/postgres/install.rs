//! The `ctmirror_ct` schema: registry of tracked tables, the installation
//! id behind [`identity`], and the version clock used for retention.

use super::errors::pg_error;
use crate::source::SourceError;
use tokio_postgres::Client;

/// Advisory lock key ("ctmirror" in ASCII) serializing every change to
/// `ctmirror_ct` across agents, so two agents installing at once neither
/// fail on `CREATE ... IF NOT EXISTS` races nor both enable one table.
pub(crate) const INSTALL_LOCK: i64 = 0x6374_6d69_7272_6f72;

const GRANT: &str = "CREATE on the database (to create schema ctmirror_ct), or create the schema \
                     ctmirror_ct owned by the agent's role";

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
-- Registries made before capture fingerprints existed. Checked first, so a
-- role that does not own the table can still run this once it is there.
DO $ctmirror$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_attribute
                    WHERE attrelid = 'ctmirror_ct.tracked'::pg_catalog.regclass
                      AND attname = 'capture_fingerprint' AND NOT attisdropped) THEN
        ALTER TABLE ctmirror_ct.tracked ADD COLUMN capture_fingerprint text;
    END IF;
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
";

/// Creates the schema and registry tables if missing. Idempotent and safe
/// when several agents run it at once (advisory transaction lock).
pub(crate) async fn install(client: &mut Client) -> Result<(), SourceError> {
    let doing = "installing the ctmirror_ct schema";
    let tx = client.transaction().await.map_err(|e| pg_error(e, doing, GRANT))?;
    tx.execute("SELECT pg_catalog.pg_advisory_xact_lock($1)", &[&INSTALL_LOCK])
        .await
        .map_err(|e| pg_error(e, doing, GRANT))?;
    tx.batch_execute(INSTALL_SQL).await.map_err(|e| pg_error(e, doing, GRANT))?;
    tx.commit().await.map_err(|e| pg_error(e, doing, GRANT))
}

/// `<database oid>:<installation id>`. A restore into a new database gets a
/// new oid; dropping and reinstalling `ctmirror_ct` (whose side tables are
/// then gone, so cursors are worthless) gets a new installation id. Either
/// way the receiver sees a different identity and rebuilds. The database
/// name is deliberately left out: renaming a database changes nothing.
pub(crate) async fn identity(client: &Client) -> Result<String, SourceError> {
    let doing = "reading the source identity";
    let row = client
        .query_one(
            "SELECT d.oid::text || ':' || i.id::text
               FROM pg_catalog.pg_database d, ctmirror_ct.installation i
              WHERE d.datname = pg_catalog.current_database()
              ORDER BY i.installed_at, i.id
              LIMIT 1",
            &[],
        )
        .await
        .map_err(|e| pg_error(e, doing, "USAGE and SELECT on schema ctmirror_ct"))?;
    row.try_get(0).map_err(|e| pg_error(e, doing, ""))
}
