//! Customers' settings in the tenants bucket ([`Tenant`]: weight and
//! concurrency cap), one key per customer (its tag). Operators write them
//! (`fanjet tenants`); managers watch them for the fair share.

use async_nats::jetstream::{kv, Context};
use futures::StreamExt;
use thiserror::Error;

use std::collections::BTreeMap;

use crate::protocol::{
    now_ms, parse_share_key, tenant_key, CustomerUsage, Demand, Tenant, DEMAND_TTL_MS,
    SHARES_BUCKET, TENANTS_BUCKET,
};

#[derive(Debug, Error)]
pub enum TenantsError {
    /// NATS could not be read or written (try again).
    #[error("{TENANTS_BUCKET}: {0}")]
    Nats(String),
    #[error("{TENANTS_BUCKET}: the entry {key} is unreadable: {message}")]
    Decode { key: String, message: String },
}

async fn bucket(js: &Context) -> Result<kv::Store, TenantsError> {
    js.get_key_value(TENANTS_BUCKET)
        .await
        .map_err(|e| TenantsError::Nats(e.to_string()))
}

/// Every customer's settings, by customer.
pub async fn list(js: &Context) -> Result<Vec<Tenant>, TenantsError> {
    let store = bucket(js).await?;
    let mut keys = store
        .keys()
        .await
        .map_err(|e| TenantsError::Nats(e.to_string()))?;
    let mut out = Vec::new();
    while let Some(key) = keys.next().await {
        let key = key.map_err(|e| TenantsError::Nats(e.to_string()))?;
        if let Some(t) = read(&store, &key).await? {
            out.push(t);
        }
    }
    out.sort_by(|a, b| a.customer.cmp(&b.customer));
    Ok(out)
}

/// One customer's settings, if any are stored.
pub async fn get(js: &Context, customer: &str) -> Result<Option<Tenant>, TenantsError> {
    read(&bucket(js).await?, &tenant_key(customer)).await
}

async fn read(store: &kv::Store, key: &str) -> Result<Option<Tenant>, TenantsError> {
    let Some(bytes) = store
        .get(key)
        .await
        .map_err(|e| TenantsError::Nats(e.to_string()))?
    else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| TenantsError::Decode {
            key: key.to_string(),
            message: e.to_string(),
        })
}

/// Stores a customer's settings.
pub async fn put(js: &Context, tenant: &Tenant) -> Result<(), TenantsError> {
    let body = serde_json::to_vec(tenant).map_err(|e| TenantsError::Nats(e.to_string()))?;
    bucket(js)
        .await?
        .put(tenant_key(&tenant.customer), body.into())
        .await
        .map(|_| ())
        .map_err(|e| TenantsError::Nats(e.to_string()))
}

/// Forgets a customer's settings (it goes back to the defaults).
pub async fn remove(js: &Context, customer: &str) -> Result<(), TenantsError> {
    bucket(js)
        .await?
        .delete(tenant_key(customer))
        .await
        .map_err(|e| TenantsError::Nats(e.to_string()))
}

/// Every customer's use of the workers now (its running fanouts, their
/// subjobs dispatched and not yet), from the partitions' demands, with its
/// settings; the busiest first.
pub async fn usage(js: &Context) -> Result<Vec<CustomerUsage>, TenantsError> {
    let shares = js
        .get_key_value(SHARES_BUCKET)
        .await
        .map_err(|e| TenantsError::Nats(format!("{SHARES_BUCKET}: {e}")))?;
    let mut keys = shares
        .keys()
        .await
        .map_err(|e| TenantsError::Nats(e.to_string()))?;
    let mut demand_keys = Vec::new();
    while let Some(key) = keys.next().await {
        let key = key.map_err(|e| TenantsError::Nats(e.to_string()))?;
        if parse_share_key(&key).is_some() {
            demand_keys.push(key);
        }
    }
    let now = now_ms();
    let mut by: BTreeMap<String, CustomerUsage> = BTreeMap::new();
    for key in demand_keys {
        let Some(bytes) = shares
            .get(&key)
            .await
            .map_err(|e| TenantsError::Nats(e.to_string()))?
        else {
            continue;
        };
        let Ok(demand) = serde_json::from_slice::<Demand>(&bytes) else {
            continue;
        };
        if now.saturating_sub(demand.at) > DEMAND_TTL_MS {
            continue;
        }
        for j in demand.jobs {
            let c = j.customer.unwrap_or_else(|| "-".into());
            let u = by.entry(c.clone()).or_insert_with(|| CustomerUsage {
                customer: c,
                weight: 1,
                ..CustomerUsage::default()
            });
            u.jobs += 1;
            u.running += j.holds;
            u.queued += j.unfinished.saturating_sub(j.holds);
        }
    }
    for t in list(js).await? {
        let u = by
            .entry(t.customer.clone())
            .or_insert_with(|| CustomerUsage {
                customer: t.customer.clone(),
                ..CustomerUsage::default()
            });
        u.weight = t.weight;
        u.max_concurrency = t.max_concurrency;
    }
    let mut out: Vec<CustomerUsage> = by.into_values().collect();
    out.sort_by(|a, b| {
        (b.running + b.queued, &a.customer).cmp(&(a.running + a.queued, &b.customer))
    });
    Ok(out)
}
