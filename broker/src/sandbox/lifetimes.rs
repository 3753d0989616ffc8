//! Sandboxes over time: running ones past their idle or total lifetime are
//! stopped (`[lifecycle]`, per-namespace overrides), stopped definitions are
//! forgotten after the retention, and a namespace keeps at most
//! `max_definitions_per_namespace` definitions. Also the operator's view
//! (`moat sandbox ls|rm`). Everything here is logged with its reason.

use std::sync::Arc;
use std::time::Duration;

use moat_proto::broker::SandboxSummary;
use tokio::sync::Mutex as AsyncMutex;

use super::{stop_entry, Entry, SandboxKey, Sandboxes};
use crate::error::BrokerError;

impl Sandboxes {
    /// Every entry, by key (a snapshot of the map).
    fn snapshot(&self) -> Vec<(SandboxKey, Arc<AsyncMutex<Entry>>)> {
        let map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<_> = map.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// One pass of the lifetime rules; returns how many sandboxes it
    /// stopped and how many definitions it forgot.
    pub async fn enforce_lifetimes(&self) -> (usize, usize) {
        if self.check_open().is_err() {
            return (0, 0);
        }
        let lc = &self.ctx.config.lifecycle;
        let max_calls = self.ctx.config.limits.max_calls_per_sandbox;
        let now = crate::state::now_ms();
        let since = |ms: u64| Duration::from_millis(now.saturating_sub(ms));
        let (mut stopped, mut forgotten) = (0, 0);
        for (key, entry) in self.snapshot() {
            // A sandbox in the middle of a start or stop is left alone.
            let Ok(mut e) = entry.try_lock() else {
                continue;
            };
            if let Some(vm) = &e.vm {
                let started_ms = vm
                    .started_at
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(now);
                let reason = match (
                    lc.max_lifetime(&key.namespace),
                    lc.idle_timeout(&key.namespace),
                ) {
                    (Some(max), _) if since(started_ms) > max => Some(format!(
                        "it reached its maximum lifetime of {}s (lifecycle.max_lifetime_secs)",
                        max.as_secs()
                    )),
                    (_, Some(idle))
                        if !vm.has_calls_in_flight(max_calls)
                            && since(vm.last_used_ms()) > idle =>
                    {
                        Some(format!(
                            "it was idle for {}s (lifecycle.idle_timeout_secs)",
                            idle.as_secs()
                        ))
                    }
                    _ => None,
                };
                let Some(reason) = reason else {
                    continue;
                };
                match stop_entry(&self.ctx, &key, &mut e, Some(reason.clone())).await {
                    Ok(()) => {
                        tracing::info!(sandbox = %key, %reason, "sandbox stopped");
                        stopped += 1;
                    }
                    Err(err) => {
                        tracing::error!(sandbox = %key, %reason, error = %err, "stopping a sandbox past its lifetime")
                    }
                }
                continue;
            }
            let expired = match (lc.stopped_retention(), &e.record) {
                (Some(keep), Some(r)) => {
                    let last = if r.stopped_at_ms > 0 {
                        r.stopped_at_ms
                    } else {
                        r.defined_at_ms
                    };
                    since(last) > keep
                }
                _ => false,
            };
            if expired {
                self.forget(&key, &mut e);
                tracing::info!(sandbox = %key, "definition forgotten: stopped longer than lifecycle.stopped_retention_secs");
                forgotten += 1;
            }
        }
        self.prune_empty_entries();
        (stopped, forgotten)
    }

    /// Drops a stopped sandbox's definition, here and on disk.
    pub(super) fn forget(&self, key: &SandboxKey, e: &mut Entry) {
        if let Err(err) = self.ctx.state.remove(&key.namespace, &key.name) {
            tracing::error!(sandbox = %key, error = %err, "cannot remove its record");
        }
        e.definition = None;
        e.record = None;
        self.dependencies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// Removes map entries nobody holds and that hold nothing (their Arc is
    /// cloned only under the map lock, so a count of 1 cannot change here).
    fn prune_empty_entries(&self) {
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, entry| {
            Arc::strong_count(entry) > 1
                || entry
                    .try_lock()
                    .map_or(true, |e| e.definition.is_some() || e.vm.is_some())
        });
    }

    /// Before defining `key` anew: when its namespace is at
    /// `max_definitions_per_namespace`, forgets the definition stopped
    /// longest ago; refuses when every one is running or busy.
    pub(super) fn make_room_for(&self, key: &SandboxKey) -> Result<(), BrokerError> {
        let max = self.ctx.config.lifecycle.max_definitions_per_namespace as usize;
        let same_ns: Vec<(SandboxKey, Arc<AsyncMutex<Entry>>)> = self
            .snapshot()
            .into_iter()
            .filter(|(k, _)| k.namespace == key.namespace && k != key)
            .collect();
        let mut defined = 0;
        let mut oldest: Option<(u64, SandboxKey, Arc<AsyncMutex<Entry>>)> = None;
        for (k, entry) in same_ns {
            let Ok(e) = entry.try_lock() else {
                defined += 1;
                continue;
            };
            let Some(r) = &e.record else {
                continue;
            };
            defined += 1;
            if e.vm.is_none() {
                let last = r.stopped_at_ms.max(r.defined_at_ms);
                if oldest.as_ref().is_none_or(|(t, _, _)| last < *t) {
                    drop(e);
                    oldest = Some((last, k, entry.clone()));
                }
            }
        }
        if defined < max {
            return Ok(());
        }
        let Some((_, victim, entry)) = oldest else {
            return Err(BrokerError::Busy(format!(
                "namespace {} already keeps {max} sandbox definitions (lifecycle.max_definitions_per_namespace) and none is stopped; stop one, or ask the operator to remove some",
                key.namespace
            )));
        };
        if let Ok(mut e) = entry.try_lock() {
            if e.vm.is_none() {
                self.forget(&victim, &mut e);
                tracing::info!(sandbox = %victim, for_sandbox = %key, "definition forgotten to make room (lifecycle.max_definitions_per_namespace)");
                return Ok(());
            }
        }
        Err(BrokerError::Busy(format!(
            "namespace {} is at its limit of {max} sandbox definitions; retry in a few seconds",
            key.namespace
        )))
    }

    /// The operator's list (`moat sandbox ls`).
    pub async fn list(&self, namespace: Option<&str>) -> Vec<SandboxSummary> {
        let mut out = Vec::new();
        for (key, entry) in self.snapshot() {
            if namespace.is_some_and(|ns| ns != key.namespace) {
                continue;
            }
            let e = entry.lock().await;
            let Some(r) = &e.record else {
                continue;
            };
            let mut s = SandboxSummary {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                image: e
                    .definition
                    .as_ref()
                    .map(|d| d.image_name.clone())
                    .unwrap_or_default(),
                defined_at_ms: r.defined_at_ms,
                stopped_at_ms: r.stopped_at_ms,
                stop_reason: r.stop_reason.clone(),
                owner_key_id: r.owner_key_id.clone(),
                ..Default::default()
            };
            if let Some(vm) = &e.vm {
                s.running = vm.is_alive();
                s.pid = vm.pid.unwrap_or_default();
                s.last_used_ms = vm.last_used_ms();
                s.started_at_ms = vm
                    .started_at
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or_default();
            }
            out.push(s);
        }
        out
    }

    /// The operator's removal (`moat sandbox rm`): forgets the definition,
    /// stopping the sandbox first only when `stop` is set. Returns whether
    /// it was running.
    pub async fn remove(&self, key: &SandboxKey, stop: bool) -> Result<bool, BrokerError> {
        let entry = self.existing(key).ok_or_else(|| super::not_defined(key))?;
        let mut e = entry.lock().await;
        if e.record.is_none() {
            return Err(super::not_defined(key));
        }
        let was_running = e.vm.is_some();
        if was_running {
            if !stop {
                return Err(BrokerError::InvalidArgument(format!(
                    "sandbox {key} is running; stop it first, or pass --stop"
                )));
            }
            stop_entry(
                &self.ctx,
                key,
                &mut e,
                Some("removed by the operator".into()),
            )
            .await?;
        }
        self.forget(key, &mut e);
        tracing::info!(sandbox = %key, was_running, "definition removed by the operator");
        Ok(was_running)
    }
}
