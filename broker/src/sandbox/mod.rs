//! The sandbox registry: definitions and running VMs by (namespace, name),
//! and the lifecycle operations on them. One async lock per sandbox makes
//! starts and stops of one name strictly sequential, so concurrent starts
//! never produce two VMs; commands only borrow the agent channel and run
//! without holding that lock.

mod exec;
mod identity;
mod image;
mod journal;
mod lifetimes;
mod pool;
mod process;
pub mod spec;
mod vm;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moat_proto::broker::{
    RunCommandReply, RunReplReply, SandboxConfig, SandboxMetrics, SandboxRef,
};
use moat_proto::state::SandboxRecord;
use tokio::sync::Mutex as AsyncMutex;

use crate::error::BrokerError;
pub use exec::{CommandRequest, ReplRequest};
pub use spec::SandboxSpec;
pub use vm::{LaunchContext, RunningVm};

use journal::Journal;

/// Records taken over at once at broker start.
const RECOVERY_CONCURRENCY: usize = 16;

/// How long a metrics request waits for a sandbox's lock.
const METRICS_LOCK_WAIT: Duration = Duration::from_millis(200);

/// Deepest `depends_on` chain a start follows.
const MAX_DEPENDENCY_DEPTH: usize = 16;

/// Sandboxes are keyed by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SandboxKey {
    pub namespace: String,
    pub name: String,
}

impl SandboxKey {
    /// Checks both names against the contract's rules.
    pub fn from_ref(r: Option<&SandboxRef>) -> Result<Self, BrokerError> {
        let r =
            r.ok_or_else(|| BrokerError::InvalidArgument("sandbox reference missing".into()))?;
        let bad = |e: moat_proto::names::NameError| BrokerError::InvalidArgument(e.to_string());
        moat_proto::names::validate_name("namespace", &r.namespace).map_err(bad)?;
        moat_proto::names::validate_name("sandbox name", &r.name).map_err(bad)?;
        Ok(Self {
            namespace: r.namespace.clone(),
            name: r.name.clone(),
        })
    }
}

impl std::fmt::Display for SandboxKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Which sandboxes a metrics request covers.
#[derive(Debug, Clone)]
pub struct MetricsFilter {
    /// `None`: every namespace.
    pub namespaces: Option<Vec<String>>,
    pub sandbox: Option<String>,
}

impl MetricsFilter {
    fn selects(&self, key: &SandboxKey) -> bool {
        self.namespaces
            .as_ref()
            .is_none_or(|ns| ns.contains(&key.namespace))
            && self.sandbox.as_ref().is_none_or(|s| *s == key.name)
    }
}

#[derive(Debug, Default)]
struct Entry {
    definition: Option<SandboxSpec>,
    /// The durable record (present with a definition).
    record: Option<SandboxRecord>,
    vm: Option<RunningVm>,
}

/// All sandboxes this broker knows.
#[derive(Debug)]
pub struct Sandboxes {
    ctx: Arc<LaunchContext>,
    pool: Arc<pool::Pool>,
    entries: Mutex<HashMap<SandboxKey, Arc<AsyncMutex<Entry>>>>,
    /// Each definition's `depends_on`, readable without the entry locks
    /// (for ordering and cycle checks).
    dependencies: Mutex<HashMap<SandboxKey, Vec<String>>>,
    /// Starts in progress (`limits.max_starts_in_progress`).
    starting: Arc<tokio::sync::Semaphore>,
    shutting_down: AtomicBool,
}

impl Sandboxes {
    pub fn new(ctx: LaunchContext) -> Self {
        let starts = ctx.config.limits.max_starts_in_progress as usize;
        let ctx = Arc::new(ctx);
        Self {
            starting: Arc::new(tokio::sync::Semaphore::new(starts)),
            pool: Arc::new(pool::Pool::new(ctx.clone())),
            ctx,
            entries: Mutex::new(HashMap::new()),
            dependencies: Mutex::new(HashMap::new()),
            shutting_down: AtomicBool::new(false),
        }
    }

    pub fn context(&self) -> &LaunchContext {
        &self.ctx
    }

    /// Starts filling the warm pools (after the start-up sweep).
    pub fn start_pool(&self) {
        self.pool.start();
    }

    /// The warm pools' state and counters.
    pub fn pool_status(&self) -> Vec<moat_proto::broker::PoolStatus> {
        self.pool.status()
    }

    fn entry(&self, key: &SandboxKey) -> Arc<AsyncMutex<Entry>> {
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(key.clone()).or_default().clone()
    }

    fn existing(&self, key: &SandboxKey) -> Option<Arc<AsyncMutex<Entry>>> {
        let map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key).cloned()
    }

    fn check_open(&self) -> Result<(), BrokerError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            Err(BrokerError::ShuttingDown)
        } else {
            Ok(())
        }
    }

    /// Number of running VMs.
    pub fn running(&self) -> u32 {
        let limit = self.ctx.config.limits.max_sandboxes as usize;
        (limit - self.ctx.running.available_permits().min(limit)) as u32
    }

    /// Defines (when `config` is set) and starts a sandbox, after the
    /// sandboxes it depends on (each ready before the next). Returns false
    /// when it was already running with the same definition.
    pub async fn start(
        &self,
        key: &SandboxKey,
        config: Option<&SandboxConfig>,
        caller_key_id: &str,
    ) -> Result<bool, BrokerError> {
        self.check_open()?;
        let cfg = &self.ctx.config;
        let _start_permit = self.starting.clone().try_acquire_owned().map_err(|_| {
            BrokerError::Busy(format!(
                "{} sandbox starts are already in progress, the server's limit (limits.max_starts_in_progress); retry in a few seconds",
                cfg.limits.max_starts_in_progress
            ))
        })?;
        let wanted = match config {
            Some(c) => {
                if c.volumes.iter().any(|v| !v.starts_with('/')) {
                    crate::volumes::prepare_namespace_dir(&cfg.volumes, &key.namespace, &c.volumes)
                        .map_err(|e| BrokerError::InvalidArgument(e.to_string()))?;
                }
                Some((
                    self.checked_spec(c, &key.namespace)
                        .map_err(|e| BrokerError::InvalidArgument(e.to_string()))?,
                    c.clone(),
                ))
            }
            None => None,
        };
        let deps = match &wanted {
            Some((w, _)) => w.depends_on.clone(),
            None => self
                .stored_dependencies(key)
                .ok_or_else(|| not_defined(key))?,
        };
        for dep in self.dependency_order(key, &deps)? {
            self.start_one(&dep, None, caller_key_id)
                .await
                .map_err(|e| {
                    let why = format!(
                        "dependency {} of sandbox {} failed to start: {e}",
                        dep.name, key.name
                    );
                    match e {
                        BrokerError::InvalidArgument(_) => BrokerError::InvalidArgument(why),
                        BrokerError::NotFound(_) => BrokerError::InvalidArgument(why),
                        BrokerError::Busy(_) => BrokerError::Busy(why),
                        _ => BrokerError::Failed(why),
                    }
                })?;
        }
        self.start_one(key, wanted, caller_key_id).await
    }

    /// `config` checked against the operator's limits.
    fn checked_spec(
        &self,
        config: &SandboxConfig,
        namespace: &str,
    ) -> Result<SandboxSpec, spec::SpecError> {
        SandboxSpec::from_config(config, namespace, spec::SpecLimits::of(&self.ctx.config))
    }

    fn stored_dependencies(&self, key: &SandboxKey) -> Option<Vec<String>> {
        let deps = self.dependencies.lock().unwrap_or_else(|p| p.into_inner());
        deps.get(key).cloned()
    }

    /// The sandboxes to start before `key` (whose dependencies are `deps`),
    /// dependencies first. Unknown names and cycles are the caller's error.
    fn dependency_order(
        &self,
        key: &SandboxKey,
        deps: &[String],
    ) -> Result<Vec<SandboxKey>, BrokerError> {
        let stored = self.dependencies.lock().unwrap_or_else(|p| p.into_inner());
        let edges = |k: &SandboxKey| -> Option<Vec<String>> {
            if k == key {
                Some(deps.to_vec())
            } else {
                stored.get(k).cloned()
            }
        };
        let mut order = Vec::new();
        let mut done = std::collections::HashSet::new();
        // Depth-first, iteratively: (node, its dependencies, next index).
        let mut path: Vec<(SandboxKey, Vec<String>, usize)> = vec![(key.clone(), deps.to_vec(), 0)];
        while let Some((node, node_deps, next)) = path.last_mut() {
            if let Some(name) = node_deps.get(*next).cloned() {
                *next += 1;
                let dep = SandboxKey {
                    namespace: key.namespace.clone(),
                    name,
                };
                if done.contains(&dep) {
                    continue;
                }
                if let Some(at) = path.iter().position(|(k, _, _)| *k == dep) {
                    let cycle: Vec<&str> = path[at..]
                        .iter()
                        .map(|(k, _, _)| k.name.as_str())
                        .chain(std::iter::once(dep.name.as_str()))
                        .collect();
                    return Err(BrokerError::InvalidArgument(format!(
                        "depends_on forms a cycle ({}); remove one of these dependencies",
                        cycle.join(" -> ")
                    )));
                }
                if path.len() >= MAX_DEPENDENCY_DEPTH {
                    return Err(BrokerError::InvalidArgument(format!(
                        "depends_on chains are limited to {MAX_DEPENDENCY_DEPTH} levels; shorten the chain through {}",
                        dep.name
                    )));
                }
                let Some(next_deps) = edges(&dep) else {
                    return Err(BrokerError::InvalidArgument(format!(
                        "depends_on names {}, which is not defined in namespace {}; start it with a config first",
                        dep.name, dep.namespace
                    )));
                };
                path.push((dep, next_deps, 0));
            } else {
                let finished = node.clone();
                path.pop();
                if finished != *key {
                    done.insert(finished.clone());
                    order.push(finished);
                }
            }
        }
        Ok(order)
    }

    /// Starts one sandbox (no dependencies).
    async fn start_one(
        &self,
        key: &SandboxKey,
        wanted: Option<(SandboxSpec, SandboxConfig)>,
        caller_key_id: &str,
    ) -> Result<bool, BrokerError> {
        let entry = match (&wanted, self.existing(key)) {
            (None, None) => return Err(not_defined(key)),
            (_, Some(e)) => e,
            (Some(_), None) => self.entry(key),
        };
        let mut e = entry.lock().await;
        self.check_open()?;
        if let Some(vm) = &e.vm {
            return match &wanted {
                Some((w, _)) if *w != vm.spec => Err(BrokerError::InvalidArgument(format!(
                    "sandbox {key} is already running with a different config; stop it first, then start it with the new config"
                ))),
                _ => Ok(false),
            };
        }
        // The definition is durable before anything runs for it.
        let base = match (wanted, &e.record) {
            (Some((w, config)), old) => {
                if old.is_none() {
                    self.make_room_for(key)?;
                }
                let mut record = old.clone().unwrap_or_else(|| SandboxRecord {
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                    ..Default::default()
                });
                record.config = Some(config);
                record.defined_at_ms = crate::state::now_ms();
                record.vm = None;
                let mut journal = Journal::new(self.ctx.state.clone(), record);
                journal.save(|_| {}).await?;
                self.dependencies
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key.clone(), w.depends_on.clone());
                e.definition = Some(w);
                journal.into_record()
            }
            (None, Some(record)) => record.clone(),
            (None, None) => return Err(not_defined(key)),
        };
        let spec = e.definition.clone().ok_or_else(|| not_defined(key))?;
        let mut journal = Journal::new(self.ctx.state.clone(), base);
        journal.stage(|r| {
            r.owner_key_id = caller_key_id.to_owned();
            r.stop_reason.clear();
        });
        let launched = vm::launch(
            &self.ctx,
            Some(&self.pool),
            &key.namespace,
            &key.name,
            spec,
            &mut journal,
        )
        .await;
        e.record = Some(journal.into_record());
        let vm = launched?;
        tracing::info!(
            sandbox = %key,
            scope = %vm.spec.scope,
            ports = ?vm.spec.ports.iter().map(|p| format!("{}:{}", p.host, p.container)).collect::<Vec<_>>(),
            volumes = ?vm.spec.volume_strings,
            depends_on = ?vm.spec.depends_on,
            "sandbox started"
        );
        e.vm = Some(vm);
        Ok(true)
    }

    /// Stops a running sandbox and releases everything it held; the
    /// definition stays.
    pub async fn stop(&self, key: &SandboxKey) -> Result<(), BrokerError> {
        let entry = self.existing(key).ok_or_else(|| not_running(key))?;
        let mut e = entry.lock().await;
        stop_entry(&self.ctx, key, &mut e, None).await
    }

    /// What a call into a running sandbox needs, holding one of its call
    /// slots (released when dropped).
    async fn call_handle(&self, key: &SandboxKey) -> Result<vm::CallHandle, BrokerError> {
        self.check_open()?;
        let entry = self.existing(key).ok_or_else(|| not_running(key))?;
        let e = entry.lock().await;
        let vm = e.vm.as_ref().ok_or_else(|| not_running(key))?;
        vm.call_handle().ok_or_else(|| {
            BrokerError::Busy(format!(
                "sandbox {key} is already running {} calls, the server's limit; wait for one to finish",
                self.ctx.config.limits.max_calls_per_sandbox
            ))
        })
    }

    /// Runs one command in a running sandbox.
    pub async fn run_command(
        &self,
        key: &SandboxKey,
        req: CommandRequest,
    ) -> Result<RunCommandReply, BrokerError> {
        let h = self.call_handle(key).await?;
        exec::run(&self.ctx.config.limits, &h.agent, &h.spec, &h.exit, req).await
    }

    /// Runs one REPL cell in a running sandbox.
    pub async fn run_repl(
        &self,
        key: &SandboxKey,
        req: ReplRequest,
    ) -> Result<RunReplReply, BrokerError> {
        let h = self.call_handle(key).await?;
        exec::run_repl(
            &self.ctx.config.limits,
            &h.agent,
            &h.spec,
            &h.exit,
            &h.repl_sessions,
            req,
        )
        .await
    }

    /// Metrics of every known sandbox (running or defined) that `filter`
    /// selects, sorted by namespace and name.
    pub async fn metrics(&self, filter: &MetricsFilter) -> Vec<SandboxMetrics> {
        let mut entries: Vec<(SandboxKey, Arc<AsyncMutex<Entry>>)> = {
            let map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            map.iter()
                .filter(|(k, _)| filter.selects(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        // A call holds a sandbox's lock for a moment (to take a handle), a
        // start or stop for seconds: wait briefly for each (all at once),
        // and report one still locked as not running rather than wait.
        let locked =
            futures_util::future::join_all(entries.into_iter().map(|(key, entry)| async move {
                let guard = tokio::time::timeout(METRICS_LOCK_WAIT, entry.lock_owned())
                    .await
                    .ok();
                (key, guard)
            }))
            .await;
        let mut out = Vec::with_capacity(locked.len());
        for (key, guard) in locked {
            let Some(e) = guard else {
                out.push(SandboxMetrics {
                    namespace: key.namespace,
                    name: key.name,
                    ..Default::default()
                });
                continue;
            };
            if e.definition.is_none() && e.vm.is_none() {
                continue;
            }
            let defined = |spec: &SandboxSpec| SandboxMetrics {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                scope: spec.scope.to_string(),
                ports: spec
                    .ports
                    .iter()
                    .map(|p| format!("{}:{}", p.host, p.container))
                    .collect(),
                volumes: spec.volume_strings.clone(),
                ..Default::default()
            };
            let m = match (&e.vm, &e.definition) {
                (Some(vm), _) => SandboxMetrics {
                    running: vm.is_alive(),
                    cpu_usage: vm.cpu_percent(),
                    memory_usage_mib: vm
                        .cgroup_memory_bytes()
                        .map(|b| b as f64 / (1024.0 * 1024.0)),
                    disk_usage_bytes: vm.disk_usage_bytes(),
                    started_at_ms: vm
                        .started_at
                        .duration_since(std::time::UNIX_EPOCH)
                        .ok()
                        .map(|d| d.as_millis() as u64),
                    address: vm.guest_address(),
                    ..defined(&vm.spec)
                },
                (None, Some(def)) => defined(def),
                (None, None) => continue,
            };
            out.push(m);
        }
        out
    }

    /// Takes over what an earlier broker left, before serving: every stored
    /// definition (checked again against this config) and every VM that can
    /// be re-adopted. What cannot is left to the sweep that follows (which
    /// kills and releases what no re-adopted VM uses); each case is logged.
    /// Returns the slots now in use.
    pub async fn recover(&self, records: Vec<SandboxRecord>) -> Vec<u32> {
        use futures_util::StreamExt;
        futures_util::stream::iter(records)
            .map(|record| self.recover_one(record))
            .buffer_unordered(RECOVERY_CONCURRENCY)
            .filter_map(|slot| async move { slot })
            .collect()
            .await
    }

    /// Takes over one record; returns the slot of a re-adopted VM.
    async fn recover_one(&self, mut record: SandboxRecord) -> Option<u32> {
        let key = SandboxKey {
            namespace: record.namespace.clone(),
            name: record.name.clone(),
        };
        let spec = record
            .config
            .as_ref()
            .map(|c| self.checked_spec(c, &key.namespace));
        let spec = match spec {
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                tracing::error!(sandbox = %key, error = %e, "stored definition is not valid under this config: forgotten (a VM it had is stopped)");
                let _ = self.ctx.state.remove(&key.namespace, &key.name);
                return None;
            }
            None => return None,
        };
        let vm = match record.vm.clone() {
            Some(v) if v.phase == moat_proto::state::vm_record::Phase::Running as i32 => {
                match vm::adopt(&self.ctx, &key.namespace, &key.name, spec.clone(), &v).await {
                    Ok(vm) => {
                        tracing::info!(sandbox = %key, pid = v.pid, slot = v.slot, "re-adopted a running sandbox");
                        Some(vm)
                    }
                    Err(why) => {
                        tracing::warn!(sandbox = %key, slot = v.slot, %why, "cannot re-adopt its VM: the sweep stops and cleans what it left");
                        None
                    }
                }
            }
            Some(v) if v.phase == moat_proto::state::vm_record::Phase::Stopping as i32 => {
                tracing::warn!(sandbox = %key, slot = v.slot, "its stop was interrupted by a broker exit: finished");
                None
            }
            Some(v) => {
                tracing::warn!(sandbox = %key, slot = v.slot, "its start was interrupted by a broker exit: cleaned");
                None
            }
            None => None,
        };
        let adopted_slot = vm.as_ref().and(record.vm.as_ref()).map(|v| v.slot);
        if vm.is_none() && record.vm.is_some() {
            record.vm = None;
            record.stopped_at_ms = crate::state::now_ms();
            if let Err(e) = self.ctx.state.save(&record) {
                tracing::error!(sandbox = %key, error = %e, "cannot record that its VM is gone");
            }
        }
        self.dependencies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone(), spec.depends_on.clone());
        let entry = self.entry(&key);
        let mut e = entry.lock().await;
        e.definition = Some(spec);
        e.record = Some(record);
        e.vm = vm;
        adopted_slot
    }

    /// From now on, new starts and calls fail with "shutting down".
    pub fn refuse_new_work(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Broker shutdown: refuses new work, then either stops every sandbox
    /// (`stop_vms`) or leaves the VMs, their firewall rules and forwarding
    /// as they are for the next broker to re-adopt. With no VM left to
    /// leave, the firewall table and forwarding go as at any shutdown: the
    /// host is left as the broker found it.
    pub async fn shutdown(&self, stop_vms: bool) {
        self.shutting_down.store(true, Ordering::SeqCst);
        // Pool VMs are nobody's sandbox: never left running.
        self.pool.shutdown().await;
        if !stop_vms {
            let running = self.running();
            if running > 0 {
                tracing::info!(
                    running,
                    "leaving the running sandboxes for the next broker (lifecycle.stop_sandboxes_on_shutdown = false)"
                );
            } else {
                tracing::info!("no sandbox is running: removing the firewall table and forwarding");
                self.ctx.network.shutdown();
            }
            return;
        }
        let entries: Vec<(SandboxKey, Arc<AsyncMutex<Entry>>)> = {
            let map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        // Each stop says whether it failed (a panicked one did).
        let stops = entries.into_iter().map(|(key, entry)| {
            let ctx = self.ctx.clone();
            async move {
                let mut e = entry.lock().await;
                if e.vm.is_none() {
                    return false;
                }
                let reason = "the broker shut down (lifecycle.stop_sandboxes_on_shutdown)";
                match stop_entry(&ctx, &key, &mut e, Some(reason.into())).await {
                    Ok(()) => {
                        tracing::info!(sandbox = %key, "stopped at shutdown");
                        false
                    }
                    Err(err) => {
                        tracing::error!(sandbox = %key, error = %err, "stop at shutdown");
                        true
                    }
                }
            }
        });
        let outcomes = spawn_join_all(stops).await;
        if outcomes.iter().any(|failed| !matches!(failed, Ok(false))) {
            // A VM that did not stop may still have a tap: keep it filtered.
            tracing::error!("a sandbox did not stop: the firewall table and forwarding stay");
        } else {
            self.ctx.network.shutdown();
        }
    }
}

/// Stops an entry's VM: `STOPPING` recorded first, so a broker killed during
/// the stop finishes it (a stop goes on when that cannot be written, e.g. a
/// full state disk: a restart then re-adopts the VM if it still runs), then
/// the stop, then the record says stopped, with `reason` when the broker
/// decided it.
async fn stop_entry(
    ctx: &LaunchContext,
    key: &SandboxKey,
    e: &mut Entry,
    reason: Option<String>,
) -> Result<(), BrokerError> {
    let Some(vm) = e.vm.take() else {
        return Err(not_running(key));
    };
    if let Some(record) = e.record.clone() {
        let mut journal = Journal::new(ctx.state.clone(), record);
        let stopping = journal
            .save(|r| {
                if let Some(vm) = r.vm.as_mut() {
                    vm.phase = moat_proto::state::vm_record::Phase::Stopping as i32;
                }
            })
            .await;
        if let Err(err) = stopping {
            tracing::warn!(sandbox = %key, error = %err, "stopping without a durable record of it");
        }
        e.record = Some(journal.into_record());
    }
    let grace = Duration::from_secs(u64::from(ctx.config.limits.stop_timeout_secs));
    vm.stop(ctx, grace).await?;
    record_stopped(ctx, e, reason).await;
    Ok(())
}

/// Records that the sandbox's VM is gone (everything was released). A failed
/// write is logged: the next broker start finds the VM gone and cleans the
/// record then.
async fn record_stopped(ctx: &LaunchContext, e: &mut Entry, reason: Option<String>) {
    let Some(record) = e.record.take() else {
        return;
    };
    let mut journal = Journal::new(ctx.state.clone(), record);
    if let Err(err) = journal
        .save(|r| {
            r.vm = None;
            r.stopped_at_ms = crate::state::now_ms();
            r.stop_reason = reason.unwrap_or_default();
        })
        .await
    {
        let r = journal.record();
        tracing::error!(sandbox = %format!("{}/{}", r.namespace, r.name), error = %err, "stopped, but not recorded");
    }
    e.record = Some(journal.into_record());
}

/// Runs futures concurrently, each on its own task (so each finishes even
/// if the caller is dropped); their outputs (`Err` for one that panicked).
async fn spawn_join_all<T: Send + 'static, F: std::future::Future<Output = T> + Send + 'static>(
    futs: impl Iterator<Item = F>,
) -> Vec<Result<T, tokio::task::JoinError>> {
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await);
    }
    out
}

fn not_defined(key: &SandboxKey) -> BrokerError {
    BrokerError::NotFound(format!(
        "sandbox {} is not defined in namespace {}; start it with a config first",
        key.name, key.namespace
    ))
}

fn not_running(key: &SandboxKey) -> BrokerError {
    BrokerError::NotFound(format!(
        "sandbox {} in namespace {} is not running; start it first",
        key.name, key.namespace
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_validates_both_names() {
        let r = |ns: &str, n: &str| SandboxRef {
            namespace: ns.into(),
            name: n.into(),
        };
        assert!(SandboxKey::from_ref(Some(&r("default", "a-1"))).is_ok());
        assert!(
            matches!(SandboxKey::from_ref(Some(&r("", "a"))), Err(BrokerError::InvalidArgument(m)) if m.contains("namespace"))
        );
        assert!(
            matches!(SandboxKey::from_ref(Some(&r("d", "../x"))), Err(BrokerError::InvalidArgument(m)) if m.contains("sandbox name"))
        );
        assert!(matches!(
            SandboxKey::from_ref(Some(&r("*", "x"))),
            Err(BrokerError::InvalidArgument(_))
        ));
        assert!(SandboxKey::from_ref(None).is_err());
    }
}
