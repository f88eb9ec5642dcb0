//! The agent: drives mirroring cycles from a tenant database to a partner's
//! receiver.

pub mod client;
pub mod cycle;
pub mod error;
pub mod hosted;
pub mod limits;
pub mod report;
pub mod service;
pub mod stop;
mod table_sync;
pub mod trust;

pub use client::PartnerClient;
pub use cycle::{run_controlled_cycle, run_cycle, CycleControl, CycleSettings, ProgressFn, Reload};
pub use error::{AgentError, AgentErrorKind};
pub use report::{CycleReport, TableOutcome};
pub use trust::TlsTrust;

use crate::auth::{Keypair, PublicKey, RequestSigner};
use crate::config::{AgentConfig, SourceKind};
use crate::ids::{AppId, TenantId};
use crate::schema_map::SchemaMap;
use crate::source::mssql::SqlServerSource;
use crate::source::postgres::PostgresSource;
use crate::source::ChunkLimits;
use limits::PartnerLimits;
use std::time::Duration;
use tracing::Instrument;

/// One cycle for one configured tenant and application: what `ctmirror sync`
/// runs.
pub async fn sync_once(cfg: &AgentConfig, tenant: &TenantId, app: &AppId) -> Result<CycleReport, AgentError> {
    sync_pair(cfg, tenant, app, &CycleControl::default(), PartnerLimits::default()).await
}

/// One cycle for one configured pair under the scheduler's control.
pub async fn sync_pair(
    cfg: &AgentConfig,
    tenant: &TenantId,
    app: &AppId,
    control: &CycleControl,
    partner_limits: PartnerLimits,
) -> Result<CycleReport, AgentError> {
    let config_err = |m: String| AgentError::new(AgentErrorKind::Config, m);
    let tenant_cfg = cfg.tenant(tenant).ok_or_else(|| config_err(format!("tenant {tenant} is not configured")))?;
    let app_cfg = cfg.application(app).ok_or_else(|| config_err(format!("application {app} is not configured")))?;
    if !app_cfg.tenants.contains(tenant) {
        return Err(config_err(format!("tenant {tenant} has not approved application {app}")));
    }
    let map = SchemaMap::load(&app_cfg.schema_map).map_err(|e| config_err(e.to_string()))?;
    if &map.application != app {
        return Err(config_err(format!(
            "schema map {} is for application {}, not {app}",
            app_cfg.schema_map.display(),
            map.application
        )));
    }
    let key = Keypair::load(&cfg.private_key).map_err(|e| config_err(e.to_string()))?;
    let partner_key = PublicKey::load(&app_cfg.partner_public_key).map_err(|e| config_err(e.to_string()))?;
    let partner_next = app_cfg
        .partner_next_public_key
        .as_deref()
        .map(PublicKey::load)
        .transpose()
        .map_err(|e| config_err(format!("partner_next_public_key: {e}")))?;
    let signer = RequestSigner { key, tenant: tenant.clone(), app: app.clone() };
    let client = PartnerClient::new(
        &app_cfg.receiver_url,
        signer,
        partner_key,
        Duration::from_secs(cfg.request_timeout_secs),
        &TlsTrust::for_application(app_cfg),
    )?
    .with_next_partner_key(partner_next)
    .with_limits(partner_limits);
    let settings = CycleSettings { limits: ChunkLimits { max_rows: cfg.batch_rows, max_bytes: cfg.batch_bytes } };
    let url = tenant_cfg.url.resolve().map_err(|e| config_err(e.to_string()))?;
    let span = tracing::info_span!("cycle", tenant = %tenant, app = %app);
    async {
        let retention = Duration::from_secs(u64::from(cfg.change_retention_hours) * 3600);
        let t = tenant.as_str();
        match tenant_cfg.source {
            SourceKind::Postgres => {
                let mut source = PostgresSource::connect(&url, retention).await?;
                run_controlled_cycle(&mut source, &client, &map, t, settings, control).await
            }
            SourceKind::Sqlserver => {
                let mut source = SqlServerSource::connect(&url, retention).await?;
                run_controlled_cycle(&mut source, &client, &map, t, settings, control).await
            }
        }
    }
    .instrument(span)
    .await
}
