//! `ctmirror resync`: which pairs and tables an operator's request covers.
//!
//! Checked against the configuration before anything is written, so a typo
//! in a tenant, application or table name is an error naming what exists,
//! not a request that silently never matches.

use crate::config::AgentConfig;
use crate::ids::{AppId, TenantId};
use crate::schedule::PairKey;
use crate::schema_map::SchemaMap;

/// One request to write: a pair and a mirror table (None: every table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResyncTarget {
    pub pair: PairKey,
    pub table: Option<String>,
}

/// Expands `--tenant T [--app A] [--table X]` into one target per pair.
/// Without `--app`, every application the tenant approved is covered (with
/// `--table`, those whose map has that table).
pub fn plan(
    cfg: &AgentConfig,
    tenant: &TenantId,
    app: Option<&AppId>,
    table: Option<&str>,
) -> Result<Vec<ResyncTarget>, String> {
    if cfg.tenant(tenant).is_none() {
        return Err(format!("tenant {tenant} is not configured"));
    }
    let apps: Vec<_> = match app {
        Some(a) => {
            let app_cfg = cfg.application(a).ok_or_else(|| format!("application {a} is not configured"))?;
            if !app_cfg.tenants.contains(tenant) {
                return Err(format!("tenant {tenant} has not approved application {a}"));
            }
            vec![app_cfg]
        }
        None => cfg.applications.iter().filter(|a| a.tenants.contains(tenant)).collect(),
    };
    if apps.is_empty() {
        return Err(format!("tenant {tenant} has approved no application"));
    }
    let mut targets = Vec::new();
    let mut known = Vec::new();
    for a in apps {
        let pair = PairKey { tenant: tenant.clone(), app: a.id.clone() };
        let Some(table) = table else {
            targets.push(ResyncTarget { pair, table: None });
            continue;
        };
        let map = SchemaMap::load(&a.schema_map).map_err(|e| e.to_string())?;
        let names: Vec<&str> = map.tables.iter().map(|t| t.mirror_name()).collect();
        if names.contains(&table) {
            targets.push(ResyncTarget { pair, table: Some(table.to_owned()) });
        }
        known.extend(names.iter().map(|n| format!("{}.{n}", a.id)));
    }
    if targets.is_empty() {
        known.sort();
        return Err(format!(
            "no schema map of tenant {tenant}'s applications has a table {:?}; mapped tables: {}",
            table.unwrap_or_default().chars().take(100).collect::<String>(),
            if known.is_empty() { "none".to_owned() } else { known.join(", ") }
        ));
    }
    Ok(targets)
}
