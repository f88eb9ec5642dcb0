//! Tenant isolation by database roles (`[receiver.tenant_roles]`,
//! docs/receiver.md "Tenant isolation").
//!
//! With the feature on, every request's database work runs on a connection
//! that *logged in* as the tenant's own role `ctmirror_t_<tenant>`. That
//! role owns the tenant's two schemas (`mirror_<tenant>`,
//! `ctmirror_load_<tenant>`) and, through the group role
//! `ctmirror_tenants`, may use the bookkeeping tables, where row-level
//! security shows it its own rows only. Whatever SQL such a session runs, it
//! cannot read or write another tenant's tables or cursors. Logging in as the
//! role, rather than `SET ROLE` on a shared login, is the point: a session
//! can always `RESET ROLE` back to its login, and this login has nowhere
//! further to go.
//!
//! This module does two things. *Provisioning*, on the receiver's own login
//! (`database_url`), once per tenant and process: make the roles, schemas,
//! grants and policies exist, or check that a DBA made them. Every step looks
//! before it acts, so a set-up that is complete costs queries only (and the
//! password, when a secret is set). *Connections*: one small pool per tenant
//! whose sessions log in as the tenant role.

use super::error::{ErrorKind, ReceiverError};
use super::sql::quote_ident;
use crate::config::{resolve_secret, TenantRolesConfig};
use crate::ids::TenantId;
use deadpool_postgres::{Object, Pool};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio_postgres::Transaction;

/// The group every tenant role belongs to; grants on the bookkeeping tables
/// and the row-level security policy name it. It does not start with
/// [`TENANT_ROLE_PREFIX`], so no tenant's rows can ever match it.
pub const TENANT_GROUP_ROLE: &str = "ctmirror_tenants";

/// Tenant roles are this prefix plus the tenant id: at most 11 + 48 = 59
/// bytes, within PostgreSQL's 63, and plain (ids are `[a-z0-9_]`).
pub const TENANT_ROLE_PREFIX: &str = "ctmirror_t_";

/// Connections per tenant at most. A tenant's cycle has a batch or two in
/// flight; the shared pool stays for provisioning.
const TENANT_POOL_SIZE: usize = 4;

/// Idle tenant connections are closed after this long, so a receiver that
/// served many tenants does not keep four connections open for each.
const IDLE_CLOSE: Duration = Duration::from_secs(60);

/// Provisioning of one database takes turns under this advisory lock, so two
/// receivers (or two requests) never create the same role or policy at once.
const PROVISION_LOCK: &str = "ctmirror.tenant_roles";

/// Receivers on *other* databases of the same cluster share the roles (roles
/// are cluster-wide) but not the advisory lock: a collision with one of them
/// fails a statement, and provisioning starts over, at most this often.
const PROVISION_ATTEMPTS: u32 = 5;

/// The row-level security policy on `ctmirror.tables` and
/// `ctmirror.completions`.
const POLICY: &str = "ctmirror_tenant_rows";

/// The condition of [`POLICY`]: the row's tenant is the one whose role the
/// session runs as.
const POLICY_CONDITION: &str = "('ctmirror_t_' || tenant) = current_user::text";

/// The bookkeeping tables tenant roles write (their own rows of).
const BOOKKEEPING_TABLES: [&str; 2] = ["ctmirror.tables", "ctmirror.completions"];

/// Iterations of the SCRAM verifier set as a tenant role's password
/// (PostgreSQL's own default).
const SCRAM_ITERATIONS: u32 = 4096;

/// The role a tenant's work runs as.
pub fn tenant_role_name(tenant: &TenantId) -> String {
    format!("{TENANT_ROLE_PREFIX}{tenant}")
}

/// A tenant role's password: hex HMAC-SHA256 of the tenant under the
/// configured secret. Derived rather than stored, so every receiver
/// instance with the same secret sets and uses the same password, and a DBA
/// can compute it too (docs/receiver.md shows an `openssl` line).
pub fn tenant_role_password(secret: &str, tenant: &TenantId) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let tag = ring::hmac::sign(&key, format!("ctmirror tenant role password v1:{tenant}").as_bytes());
    hex::encode(tag.as_ref())
}

/// Provisioning and per-tenant pools; lives in the receiver's `Inner`.
pub(crate) struct TenantRoles {
    /// The resolved `password_secret`.
    secret: Option<String>,
    readers: Vec<String>,
    /// The receiver's own pool (its login provisions).
    admin: Pool,
    /// `database_url` with the receiver's session options; tenant pools
    /// replace user and password.
    session: tokio_postgres::Config,
    tenants: Arc<Mutex<HashMap<TenantId, Arc<Tenant>>>>,
}

struct Tenant {
    pool: Pool,
    /// Whether this process provisioned the tenant. A tokio mutex: the
    /// first request provisions while later ones wait for it.
    provisioned: tokio::sync::Mutex<bool>,
}

impl TenantRoles {
    /// Checks the configuration, sets up what all tenants share (group
    /// role, bookkeeping grants, row-level security) and starts closing idle
    /// tenant connections. Fails at start rather than on the first request
    /// when the receiver's login cannot do its part.
    pub async fn start(
        cfg: &TenantRolesConfig,
        admin: Pool,
        session: tokio_postgres::Config,
    ) -> Result<Self, ReceiverError> {
        cfg.validate().map_err(|e| ReceiverError::startup(format!("receiver.tenant_roles: {e}")))?;
        let secret = cfg
            .password_secret
            .as_deref()
            .map(resolve_secret)
            .transpose()
            .map_err(|e| ReceiverError::startup(format!("receiver.tenant_roles.password_secret: {e}")))?;
        let roles = Self { secret, readers: cfg.grant_read_to.clone(), admin, session, tenants: Arc::default() };
        roles
            .with_retries(Step::Shared)
            .await
            .map_err(|e| ReceiverError::startup(e.describe("tenant isolation").message))?;
        spawn_idle_closer(Arc::downgrade(&roles.tenants));
        tracing::info!(readers = ?roles.readers, password = roles.secret.is_some(), "tenant isolation by roles is on");
        Ok(roles)
    }

    /// A connection logged in as the tenant's role, the tenant provisioned
    /// first if this process has not done so yet.
    pub async fn client(&self, tenant: &TenantId) -> Result<Object, ReceiverError> {
        let entry = self.entry(tenant)?;
        {
            let mut done = entry.provisioned.lock().await;
            if !*done {
                self.provision(tenant).await?;
                *done = true;
            }
        }
        let client = entry.pool.get().await.map_err(|e| login_error(e, tenant))?;
        if !session_ready(&client, tenant).await? {
            // The partner dropped a tenant schema (or gave it to another
            // owner) since this process provisioned the tenant: the tenant
            // role may not create schemas, so its login does it again.
            tracing::warn!(%tenant, "a tenant schema is missing or not owned by the tenant role; provisioning again");
            let _turn = entry.provisioned.lock().await;
            self.provision(tenant).await?;
        }
        Ok(client)
    }

    fn entry(&self, tenant: &TenantId) -> Result<Arc<Tenant>, ReceiverError> {
        let mut tenants = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = tenants.get(tenant) {
            return Ok(t.clone());
        }
        let mut login = self.session.clone();
        login.user(tenant_role_name(tenant));
        // Never the receiver's own password under another name. Without a
        // secret an empty one: pg_hba.conf must not ask tenant roles for one.
        login.password(self.secret.as_deref().map(|s| tenant_role_password(s, tenant)).unwrap_or_default());
        let pool = super::pool_for(login, TENANT_POOL_SIZE)?;
        let t = Arc::new(Tenant { pool, provisioned: tokio::sync::Mutex::new(false) });
        tenants.insert(tenant.clone(), t.clone());
        Ok(t)
    }

    async fn provision(&self, tenant: &TenantId) -> Result<(), ReceiverError> {
        let done = self
            .with_retries(Step::Tenant(tenant))
            .await
            .map_err(|e| e.describe(&format!("tenant isolation for tenant {tenant}")))?;
        match done.is_empty() {
            true => tracing::debug!(%tenant, "tenant role in place"),
            false => {
                tracing::info!(%tenant, role = %tenant_role_name(tenant), done = %done.join("; "), "tenant role provisioned")
            }
        }
        Ok(())
    }

    /// Runs one provisioning step in its own transaction on the receiver's
    /// login, under the provisioning lock; starts over when it collided with
    /// a receiver on another database of the cluster.
    async fn with_retries(&self, step: Step<'_>) -> Result<Vec<String>, Failure> {
        let mut attempt = 1;
        loop {
            match self.attempt(step).await {
                Err(e) if e.is_collision() && attempt < PROVISION_ATTEMPTS => {
                    tracing::debug!(attempt, error = %e.describe("provisioning").message, "provisioning collided; starting over");
                    let jitter = u64::from(rand_byte()) % 100;
                    tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt) + jitter)).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// One provisioning transaction; answers what it changed.
    async fn attempt(&self, step: Step<'_>) -> Result<Vec<String>, Failure> {
        let mut client = self.admin.get().await.map_err(|e| Failure::Pool(e.into()))?;
        let client: &mut tokio_postgres::Client = &mut client;
        let tx = client.transaction().await.map_err(Failure::db("beginning a transaction"))?;
        tx.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", &[&PROVISION_LOCK])
            .await
            .map_err(Failure::db("waiting for the provisioning lock"))?;
        let me = Me::load(&tx).await?;
        let mut p =
            Provisioner { tx: &tx, me, readers: &self.readers, secret: self.secret.as_deref(), done: Vec::new() };
        match step {
            Step::Shared => p.shared().await?,
            Step::Tenant(tenant) => p.tenant(tenant).await?,
        }
        let done = std::mem::take(&mut p.done);
        tx.commit().await.map_err(Failure::db("committing"))?;
        Ok(done)
    }
}

/// What one provisioning transaction sets up.
#[derive(Clone, Copy)]
enum Step<'a> {
    /// What all tenants share (at start).
    Shared,
    /// One tenant, with the shared part checked again.
    Tenant(&'a TenantId),
}

/// One round trip at every checkout: puts back what a statement could have
/// changed in the session (a `SET ROLE` to the group, session advisory
/// locks), and tells whether both tenant schemas still exist and belong to
/// the role.
async fn session_ready(client: &Object, tenant: &TenantId) -> Result<bool, ReceiverError> {
    let sql = format!(
        "RESET ROLE; SELECT pg_catalog.pg_advisory_unlock_all(); \
         SELECT count(*) FROM pg_catalog.pg_namespace WHERE nspname IN ({}, {}) \
            AND nspowner = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = current_user)",
        literal(&tenant.mirror_schema()),
        literal(&tenant.load_schema())
    );
    let messages = client.simple_query(&sql).await?;
    let owned = messages.iter().rev().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
        _ => None,
    });
    Ok(owned.as_deref() == Some("2"))
}

/// A tenant pool could not log in: say which role and where to look, since
/// the usual cause is pg_hba.conf or a password that does not match.
fn login_error(e: deadpool_postgres::PoolError, tenant: &TenantId) -> ReceiverError {
    let mut err = ReceiverError::from(e);
    err.message = format!(
        "cannot connect as tenant role {}: {} (see docs/receiver.md, \"Tenant isolation\": pg_hba.conf and \
         password_secret)",
        tenant_role_name(tenant),
        err.message
    );
    err
}

/// Closes idle tenant connections every [`IDLE_CLOSE`]; ends with the
/// receiver (when the map it watches is gone).
fn spawn_idle_closer(tenants: Weak<Mutex<HashMap<TenantId, Arc<Tenant>>>>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(IDLE_CLOSE);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(tenants) = tenants.upgrade() else { return };
            let pools: Vec<Pool> =
                tenants.lock().unwrap_or_else(|p| p.into_inner()).values().map(|t| t.pool.clone()).collect();
            for pool in pools {
                pool.retain(|_, metrics| metrics.last_used() < IDLE_CLOSE);
            }
        }
    });
}

fn rand_byte() -> u8 {
    let mut b = [0u8; 1];
    getrandom::fill(&mut b).ok();
    b[0]
}

/// A SQL string literal of a name that is already known to be plain.
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// What the receiver's login may do.
struct Me {
    name: String,
    superuser: bool,
    createrole: bool,
}

impl Me {
    async fn load(tx: &Transaction<'_>) -> Result<Me, Failure> {
        let row = tx
            .query_one(
                "SELECT current_user::text, rolsuper, rolcreaterole FROM pg_catalog.pg_roles WHERE rolname = current_user",
                &[],
            )
            .await
            .map_err(Failure::db("reading the receiver's own role"))?;
        Ok(Me { name: row.get(0), superuser: row.get(1), createrole: row.get(2) })
    }

    fn manages_roles(&self) -> bool {
        self.superuser || self.createrole
    }
}

/// One provisioning transaction.
struct Provisioner<'t> {
    tx: &'t Transaction<'t>,
    me: Me,
    readers: &'t [String],
    secret: Option<&'t str>,
    /// What was changed, for the log.
    done: Vec<String>,
}

impl Provisioner<'_> {
    async fn run(&mut self, what: &str, sql: &str) -> Result<(), Failure> {
        self.tx.batch_execute(sql).await.map_err(Failure::db(what))?;
        self.done.push(what.to_owned());
        Ok(())
    }

    async fn flag(
        &self,
        what: &'static str,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<bool, Failure> {
        let row = self.tx.query_one(sql, params).await.map_err(Failure::db(what))?;
        Ok(row.get(0))
    }

    /// What every tenant shares: the group role, its access to the
    /// bookkeeping tables, and the row-level security that limits that
    /// access to each tenant's own rows. The tables' owner (the receiver's
    /// login) is not subject to the policy.
    async fn shared(&mut self) -> Result<(), Failure> {
        self.ensure_role(TENANT_GROUP_ROLE, "NOLOGIN").await?;
        self.check_confined(TENANT_GROUP_ROLE).await?;
        let group = quote_ident(TENANT_GROUP_ROLE);
        // Granted to PUBLIC by default; a partner who revoked them must
        // give them back to tenant roles (staging tables are temporary).
        let can_use_db = self
            .flag(
                "checking CONNECT and TEMPORARY on the database",
                "SELECT has_database_privilege($1::name, current_database()::text, 'CONNECT')
                    AND has_database_privilege($1::name, current_database()::text, 'TEMPORARY')",
                &[&TENANT_GROUP_ROLE],
            )
            .await?;
        if !can_use_db {
            let db: String = self
                .tx
                .query_one("SELECT current_database()::text", &[])
                .await
                .map_err(Failure::db("reading the database name"))?
                .get(0);
            self.run(
                "granting CONNECT and TEMPORARY on the database",
                &format!("GRANT CONNECT, TEMPORARY ON DATABASE {} TO {group}", quote_ident(&db)),
            )
            .await?;
        }
        if !self
            .flag(
                "checking USAGE on schema ctmirror",
                "SELECT has_schema_privilege($1::name, 'ctmirror', 'USAGE')",
                &[&TENANT_GROUP_ROLE],
            )
            .await?
        {
            self.run("granting USAGE on schema ctmirror", &format!("GRANT USAGE ON SCHEMA ctmirror TO {group}"))
                .await?;
        }
        for table in BOOKKEEPING_TABLES {
            let granted = self
                .flag(
                    "checking privileges on the bookkeeping tables",
                    "SELECT bool_and(has_table_privilege($1::name, $2::text::regclass::oid, p)) FROM unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE']) AS p",
                    &[&TENANT_GROUP_ROLE, &table],
                )
                .await?;
            if !granted {
                self.run(
                    &format!("granting SELECT, INSERT, UPDATE, DELETE on {table}"),
                    &format!("GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO {group}"),
                )
                .await?;
            }
        }
        let sequence_granted = self
            .flag(
                "checking USAGE on the completions id sequence",
                "SELECT has_sequence_privilege($1::name, pg_get_serial_sequence('ctmirror.completions', 'id'), 'USAGE')",
                &[&TENANT_GROUP_ROLE],
            )
            .await?;
        if !sequence_granted {
            let seq: String = self
                .tx
                .query_one("SELECT pg_get_serial_sequence('ctmirror.completions', 'id')", &[])
                .await
                .map_err(Failure::db("finding the completions id sequence"))?
                .get(0);
            // pg_get_serial_sequence answers a quoted, qualified name.
            self.run(
                "granting USAGE on the completions id sequence",
                &format!("GRANT USAGE ON SEQUENCE {seq} TO {group}"),
            )
            .await?;
        }
        for table in BOOKKEEPING_TABLES {
            self.ensure_row_security(table).await?;
        }
        for reader in self.readers {
            let exists = self
                .flag(
                    "looking up a grant_read_to role",
                    "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1)",
                    &[reader],
                )
                .await?;
            if !exists {
                return Err(Failure::Refused(format!("grant_read_to names role {reader:?}, which does not exist")));
            }
        }
        Ok(())
    }

    /// Row-level security on a bookkeeping table with [`POLICY`], and no
    /// other permissive policy that could widen what tenant roles see
    /// (permissive policies are OR-ed).
    async fn ensure_row_security(&mut self, table: &str) -> Result<(), Failure> {
        let enabled = self
            .flag(
                "checking row-level security",
                "SELECT relrowsecurity FROM pg_catalog.pg_class WHERE oid = $1::text::regclass",
                &[&table],
            )
            .await?;
        if !enabled {
            self.run(
                &format!("enabling row-level security on {table}"),
                &format!("ALTER TABLE {table} ENABLE ROW LEVEL SECURITY"),
            )
            .await?;
        }
        let has_policy = self
            .flag(
                "checking the tenant policy",
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_policy WHERE polrelid = $1::text::regclass AND polname = $2)",
                &[&table, &POLICY],
            )
            .await?;
        if !has_policy {
            self.run(
                &format!("creating policy {POLICY} on {table}"),
                &format!(
                    "CREATE POLICY {POLICY} ON {table} AS PERMISSIVE FOR ALL TO {} USING ({POLICY_CONDITION}) WITH CHECK ({POLICY_CONDITION})",
                    quote_ident(TENANT_GROUP_ROLE)
                ),
            )
            .await?;
        }
        let others: Vec<String> = self
            .tx
            .query(
                "SELECT p.polname::text FROM pg_catalog.pg_policy p
                  WHERE p.polrelid = $1::text::regclass AND p.polname <> $2 AND p.polpermissive
                    AND (0::oid = ANY (p.polroles) OR EXISTS (
                          SELECT 1 FROM pg_catalog.pg_roles r WHERE r.oid = ANY (p.polroles)
                             AND (r.rolname = $3 OR starts_with(r.rolname::text, $4))))",
                &[&table, &POLICY, &TENANT_GROUP_ROLE, &TENANT_ROLE_PREFIX],
            )
            .await
            .map_err(Failure::db("checking for other policies"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if !others.is_empty() {
            return Err(Failure::Refused(format!(
                "{table} has other permissive policies that apply to tenant roles ({}); they would let a tenant \
                 see or change other tenants' rows: drop them",
                others.join(", ")
            )));
        }
        Ok(())
    }

    /// Everything of one tenant: its role (and password), its two schemas
    /// owned by it, and read access for `grant_read_to`.
    async fn tenant(&mut self, tenant: &TenantId) -> Result<(), Failure> {
        // Shared parts first: a partner may have dropped a policy since start.
        self.shared().await?;
        let role = tenant_role_name(tenant);
        let attributes = format!(
            "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS IN ROLE {}",
            quote_ident(TENANT_GROUP_ROLE)
        );
        self.ensure_role(&role, &attributes).await?;
        self.ensure_in_group(&role).await?;
        self.check_confined(&role).await?;
        if let Some(secret) = self.secret {
            if self.me.manages_roles() {
                // A SCRAM verifier, not the password: the statement text may
                // reach the server log.
                let verifier = scram_verifier(&tenant_role_password(secret, tenant));
                self.run(
                    &format!("setting the password of {role}"),
                    &format!("ALTER ROLE {} PASSWORD {}", quote_ident(&role), literal(&verifier)),
                )
                .await?;
            }
        }
        for schema in [tenant.mirror_schema(), tenant.load_schema()] {
            self.ensure_schema_owned(&schema, &role).await?;
        }
        for reader in self.readers {
            self.grant_read(reader, &role, &tenant.mirror_schema(), &tenant.load_schema()).await?;
        }
        Ok(())
    }

    async fn ensure_role(&mut self, role: &str, attributes: &str) -> Result<(), Failure> {
        let exists = self
            .flag("looking up a role", "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1)", &[&role])
            .await?;
        if exists {
            return Ok(());
        }
        if !self.me.manages_roles() {
            return Err(Failure::Refused(format!(
                "role {role} does not exist, and the receiver's login {} may not create roles (no CREATEROLE); \
                 create it as docs/receiver.md (\"Tenant isolation\") shows",
                self.me.name
            )));
        }
        self.run(&format!("creating role {role}"), &format!("CREATE ROLE {} {attributes}", quote_ident(role))).await
    }

    async fn ensure_in_group(&mut self, role: &str) -> Result<(), Failure> {
        let member = self
            .flag(
                "checking group membership",
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_auth_members m
                    JOIN pg_catalog.pg_roles g ON g.oid = m.roleid JOIN pg_catalog.pg_roles r ON r.oid = m.member
                   WHERE g.rolname = $1 AND r.rolname = $2)",
                &[&TENANT_GROUP_ROLE, &role],
            )
            .await?;
        if !member {
            let group = quote_ident(TENANT_GROUP_ROLE);
            self.run(
                &format!("adding {role} to {TENANT_GROUP_ROLE}"),
                &format!("GRANT {group} TO {}", quote_ident(role)),
            )
            .await?;
        }
        Ok(())
    }

    /// Refuses a tenant role (or the group) that could reach beyond the
    /// tenant's schemas: an attribute that bypasses privileges or row
    /// security, or membership in any other role. Made by the receiver, it
    /// has none; made by a DBA, this is where a slip shows.
    async fn check_confined(&self, role: &str) -> Result<(), Failure> {
        let row = self
            .tx
            .query_one(
                "SELECT r.rolsuper, r.rolcreaterole, r.rolcreatedb, r.rolreplication, r.rolbypassrls,
                        ARRAY(SELECT g.rolname::text FROM pg_catalog.pg_auth_members m
                                JOIN pg_catalog.pg_roles g ON g.oid = m.roleid
                               WHERE m.member = r.oid AND g.rolname <> $2 ORDER BY 1)
                   FROM pg_catalog.pg_roles r WHERE r.rolname = $1",
                &[&role, &TENANT_GROUP_ROLE],
            )
            .await
            .map_err(Failure::db("checking the role's attributes"))?;
        let names = ["SUPERUSER", "CREATEROLE", "CREATEDB", "REPLICATION", "BYPASSRLS"];
        let set: Vec<&str> =
            names.iter().enumerate().filter(|(i, _)| row.get::<_, bool>(*i)).map(|(_, n)| *n).collect();
        if !set.is_empty() {
            return Err(Failure::Refused(format!(
                "role {role} has {}, which would let a tenant session reach other tenants' data; remove it",
                set.join(", ")
            )));
        }
        let groups: Vec<String> = row.get(5);
        if !groups.is_empty() {
            return Err(Failure::Refused(format!(
                "role {role} is a member of {}; a tenant role may belong to {TENANT_GROUP_ROLE} only, since it \
                 gets the privileges of every role it belongs to",
                groups.join(", ")
            )));
        }
        Ok(())
    }

    /// Creating an object for the tenant role, or handing one over, needs
    /// the receiver's login to be able to act as that role (PostgreSQL's
    /// rule for ownership). A superuser can; another login grants itself
    /// the tenant role (it created it; from PostgreSQL 16 that needs ADMIN
    /// on the role, which its creator has).
    async fn act_as(&mut self, role: &str) -> Result<(), Failure> {
        if self.me.superuser {
            return Ok(());
        }
        let can = self
            .flag(
                "checking membership in the tenant role",
                "SELECT pg_has_role(current_user, $1::name, 'USAGE')
                    AND CASE WHEN current_setting('server_version_num')::int < 160000 THEN true
                             ELSE pg_has_role(current_user, $1::name, 'SET') END",
                &[&role],
            )
            .await?;
        if !can {
            self.run(
                &format!("granting {role} to the receiver's login"),
                &format!("GRANT {} TO CURRENT_USER", quote_ident(role)),
            )
            .await?;
        }
        Ok(())
    }

    /// The schema exists and belongs to `role`, with every table, view and
    /// sequence in it that the receiver's login may give away (what it
    /// created before the feature was on). Objects of other owners (a
    /// partner's views, say) keep their owner; the tenant role can still
    /// drop tables in its own schema.
    async fn ensure_schema_owned(&mut self, schema: &str, role: &str) -> Result<(), Failure> {
        let owned: Option<bool> = self
            .tx
            .query_opt(
                "SELECT n.nspowner = r.oid FROM pg_catalog.pg_namespace n, pg_catalog.pg_roles r
                  WHERE n.nspname = $1 AND r.rolname = $2",
                &[&schema, &role],
            )
            .await
            .map_err(Failure::db("looking up a tenant schema"))?
            .map(|r| r.get(0));
        match owned {
            Some(true) => {}
            Some(false) => {
                self.act_as(role).await?;
                self.run(
                    &format!("handing schema {schema} to {role}"),
                    &format!("ALTER SCHEMA {} OWNER TO {}", quote_ident(schema), quote_ident(role)),
                )
                .await?;
            }
            None => {
                self.act_as(role).await?;
                self.run(
                    &format!("creating schema {schema}"),
                    &format!("CREATE SCHEMA {} AUTHORIZATION {}", quote_ident(schema), quote_ident(role)),
                )
                .await?;
            }
        }
        // Sequences that belong to a column move with their table.
        let relations = self
            .tx
            .query(
                "SELECT c.relname::text, c.relkind::text FROM pg_catalog.pg_class c
                   JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                  WHERE n.nspname = $1 AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
                    AND c.relowner <> (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = $2)
                    AND pg_has_role(current_user, c.relowner, 'USAGE')
                    AND NOT (c.relkind = 'S' AND EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                          WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = c.oid AND d.deptype IN ('a', 'i')))
                  ORDER BY 1",
                &[&schema, &role],
            )
            .await
            .map_err(Failure::db("listing objects to hand over"))?;
        if !relations.is_empty() {
            let mut sql = String::new();
            for r in &relations {
                let kind = match r.get::<_, String>(1).as_str() {
                    "v" => "VIEW",
                    "m" => "MATERIALIZED VIEW",
                    "f" => "FOREIGN TABLE",
                    "S" => "SEQUENCE",
                    _ => "TABLE",
                };
                let name: String = r.get(0);
                sql.push_str(&format!(
                    "ALTER {kind} {}.{} OWNER TO {};\n",
                    quote_ident(schema),
                    quote_ident(&name),
                    quote_ident(role)
                ));
            }
            self.act_as(role).await?;
            self.run(&format!("handing {} objects in {schema} to {role}", relations.len()), &sql).await?;
        }
        Ok(())
    }

    /// `reader` may use the mirror schema and read its tables, now and
    /// later: default privileges of the tenant role cover tables it creates
    /// in the mirror schema and in the load schema (a reload's shadow keeps
    /// its grants when it moves into the mirror schema).
    async fn grant_read(&mut self, reader: &str, role: &str, mirror: &str, load: &str) -> Result<(), Failure> {
        let reader_q = quote_ident(reader);
        if !self
            .flag(
                "checking a reader's USAGE",
                "SELECT has_schema_privilege($1::name, $2::text, 'USAGE')",
                &[&reader, &mirror],
            )
            .await?
        {
            self.act_as(role).await?;
            self.run(
                &format!("granting USAGE on {mirror} to {reader}"),
                &format!("GRANT USAGE ON SCHEMA {} TO {reader_q}", quote_ident(mirror)),
            )
            .await?;
        }
        for schema in [mirror, load] {
            // Shadows too: they keep their grants when they move into the
            // mirror schema, and without USAGE on the load schema the reader
            // cannot see them before.
            let unreadable = self
                .flag(
                    "checking a reader's SELECT",
                    "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                      WHERE n.nspname = $2 AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
                        AND NOT has_table_privilege($1::name, c.oid, 'SELECT'))",
                    &[&reader, &schema],
                )
                .await?;
            if unreadable {
                self.act_as(role).await?;
                self.run(
                    &format!("granting SELECT on the tables of {schema} to {reader}"),
                    &format!("GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {reader_q}", quote_ident(schema)),
                )
                .await?;
            }
            let has_default = self
                .flag(
                    "checking default privileges",
                    "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_default_acl d
                       JOIN pg_catalog.pg_namespace n ON n.oid = d.defaclnamespace
                       JOIN pg_catalog.pg_roles o ON o.oid = d.defaclrole
                      WHERE n.nspname = $1 AND o.rolname = $2 AND d.defaclobjtype = 'r'
                        AND aclcontains(d.defaclacl, makeaclitem((SELECT oid FROM pg_catalog.pg_roles WHERE rolname = $3), o.oid, 'SELECT', false)))",
                    &[&schema, &role, &reader],
                )
                .await?;
            if !has_default {
                self.act_as(role).await?;
                self.run(
                    &format!("default SELECT for {reader} on tables {role} creates in {schema}"),
                    &format!(
                        "ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA {} GRANT SELECT ON TABLES TO {reader_q}",
                        quote_ident(role),
                        quote_ident(schema)
                    ),
                )
                .await?;
            }
        }
        Ok(())
    }
}

/// A SCRAM-SHA-256 verifier of `password` in the form PostgreSQL stores
/// (`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, RFC 5802
/// and 7677). PostgreSQL stores such a string as it is, so the password
/// itself never travels in a statement. Hex passwords are unchanged by the
/// SASLprep PostgreSQL applies first.
fn scram_verifier(password: &str) -> String {
    use base64::Engine;
    use ring::{digest, hmac, pbkdf2};
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).expect("operating system random source");
    let mut salted = [0u8; 32];
    let iterations = std::num::NonZeroU32::new(SCRAM_ITERATIONS).expect("non-zero");
    pbkdf2::derive(pbkdf2::PBKDF2_HMAC_SHA256, iterations, &salt, password.as_bytes(), &mut salted);
    let key = hmac::Key::new(hmac::HMAC_SHA256, &salted);
    let client_key = hmac::sign(&key, b"Client Key");
    let stored_key = digest::digest(&digest::SHA256, client_key.as_ref());
    let server_key = hmac::sign(&key, b"Server Key");
    format!(
        "SCRAM-SHA-256${SCRAM_ITERATIONS}:{}${}:{}",
        b64.encode(salt),
        b64.encode(stored_key.as_ref()),
        b64.encode(server_key.as_ref())
    )
}

/// Why provisioning stopped.
enum Failure {
    /// No connection from the receiver's own pool.
    Pool(ReceiverError),
    /// A statement failed; `what` names the step.
    Db { what: String, error: tokio_postgres::Error },
    /// The set-up is wrong in a way the receiver will not fix by itself.
    Refused(String),
}

impl Failure {
    fn db(what: &str) -> impl FnOnce(tokio_postgres::Error) -> Failure + '_ {
        move |error| Failure::Db { what: what.to_owned(), error }
    }

    /// Another receiver (on another database of the cluster, beyond the
    /// advisory lock) changed the same role at the same moment.
    fn is_collision(&self) -> bool {
        let Failure::Db { error, .. } = self else { return false };
        let Some(db) = error.as_db_error() else { return false };
        match db.code().code() {
            // unique_violation, duplicate_object, serialization_failure, deadlock_detected
            "23505" | "42710" | "40001" | "40P01" => true,
            // "tuple concurrently updated" / "tuple concurrently deleted"
            "XX000" => db.message().contains("concurrently"),
            _ => false,
        }
    }

    fn describe(self, context: &str) -> ReceiverError {
        match self {
            Failure::Pool(e) => e,
            Failure::Db { what, error } => {
                let denied = error.code().is_some_and(|c| c.code() == "42501");
                let mut e = ReceiverError::from(error);
                // Whatever the SQLSTATE (a collision is a unique violation,
                // class 23), the request was fine: the agent retries later.
                if e.kind != ErrorKind::Unavailable {
                    e.kind = ErrorKind::Internal;
                }
                e.message = format!("{context}: {what} failed: {}", e.message);
                if denied {
                    e.message.push_str(
                        "; the receiver's login lacks a privilege this needs (docs/receiver.md, \"Tenant isolation\", \
                         lists them)",
                    );
                }
                e
            }
            Failure::Refused(message) => ReceiverError::internal(format!("{context}: {message}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_deterministic_per_secret_and_tenant() {
        let a = TenantId::new("a").unwrap();
        let b = TenantId::new("b").unwrap();
        assert_eq!(tenant_role_password("s", &a), tenant_role_password("s", &a));
        assert_ne!(tenant_role_password("s", &a), tenant_role_password("s", &b));
        assert_ne!(tenant_role_password("s", &a), tenant_role_password("t", &a));
        assert_eq!(tenant_role_password("s", &a).len(), 64);
    }

    /// The derivation is part of the set-up partners rely on (several
    /// receivers, a DBA's `openssl` line in docs/receiver.md): pinned.
    #[test]
    fn the_password_derivation_is_stable() {
        let acme = TenantId::new("acme").unwrap();
        assert_eq!(
            tenant_role_password("demo secret", &acme),
            "66ab71c147f283595ec6f24078751ba33ba18755b65747a9cddc4104953d8b28"
        );
    }

    #[test]
    fn the_longest_tenant_role_fits_a_postgres_name() {
        let t = TenantId::new("x".repeat(48)).unwrap();
        assert!(tenant_role_name(&t).len() <= 63);
        assert!(!TENANT_GROUP_ROLE.starts_with(TENANT_ROLE_PREFIX));
    }

    #[test]
    fn scram_verifier_has_postgres_form() {
        let v = scram_verifier("secret");
        let (head, keys) = v.split_once('$').unwrap().1.split_once('$').unwrap();
        assert!(v.starts_with("SCRAM-SHA-256$4096:"), "{v}");
        assert!(head.starts_with("4096:"));
        assert_eq!(keys.split(':').count(), 2);
        assert_ne!(scram_verifier("secret"), v, "fresh salt every time");
    }
}
