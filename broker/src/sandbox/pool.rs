//! The warm pool: per `[[pool.entries]]`, VMs booted ahead of any request
//! (jailed in their own slot, agent answering, interpreters warmed) that a
//! matching `sandbox.start` claims instead of booting. A VM serves one
//! sandbox and is destroyed at its stop, never recycled. A background task
//! keeps each entry at its target with at most `pool.refill_concurrency`
//! boots at once, replaces VMs that die while waiting (they are never handed
//! out: a claim also checks that the agent still answers), and backs off
//! after failed boots.
//!
//! Pool VMs have no record of their own: a broker that restarts finds their
//! slots claimed by no sandbox record, so its start-up sweep kills them and
//! the pool is refilled. A claimed VM is recorded like any sandbox's at
//! claim, so it is re-adopted like one.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use moat_proto::broker::{PoolStatus, SandboxConfig};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::image::PreparedImage;
use super::spec::SandboxSpec;
use super::vm::{self, LaunchContext, PooledVm};
use crate::config::PoolEntry;

/// How often the refill task looks at every entry without being woken.
const TICK: Duration = Duration::from_secs(1);
/// How long a claim waits for a pool VM's agent to answer a Hello.
const CLAIM_HELLO_WAIT: Duration = Duration::from_secs(1);
/// Longest wait between boot attempts of an entry that keeps failing
/// (unless `pool.retry_secs` is longer).
const MAX_RETRY: Duration = Duration::from_secs(60);
/// How long a broker's shutdown waits for pool boots in progress.
const SHUTDOWN_BOOT_WAIT: Duration = Duration::from_secs(30);

/// Lowers an entry's count of VMs booting when dropped, however the boot
/// task ends (a panic included).
struct Booting(Arc<Entry>);

impl Drop for Booting {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.booting = st.booting.saturating_sub(1);
    }
}

/// One entry: what it serves and its VMs.
#[derive(Debug)]
struct Entry {
    name: String,
    /// The entry as a sandbox definition: image, memory, cpus.
    spec: SandboxSpec,
    warm: Vec<String>,
    target: u32,
    state: Mutex<EntryState>,
}

#[derive(Debug, Default)]
struct EntryState {
    ready: VecDeque<PooledVm>,
    booting: u32,
    hits: u64,
    misses: u64,
    refills: u64,
    refill_ms_total: u64,
    failures: u64,
    /// No boot before this (after a failure).
    retry_at: Option<Instant>,
    backoff: Option<Duration>,
}

/// The warm pools of one broker.
#[derive(Debug)]
pub struct Pool {
    ctx: Arc<LaunchContext>,
    entries: Vec<Arc<Entry>>,
    refills: Arc<Semaphore>,
    wake: Arc<Notify>,
    closed: Arc<AtomicBool>,
    retry: Duration,
}

impl Entry {
    fn lock(&self) -> MutexGuard<'_, EntryState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a sandbox defined as `spec` can run in this entry's VMs:
    /// same image and size, and nothing a pool VM lacks (a NIC, volumes).
    fn serves(&self, spec: &SandboxSpec) -> bool {
        spec.image == self.spec.image
            && spec.memory_mib == self.spec.memory_mib
            && spec.cpus == self.spec.cpus
            && spec.volumes.is_empty()
            && !spec.has_nic()
    }
}

/// The entry's definition, checked like a request's (so an entry can only
/// ask for what a caller could).
fn entry_spec(ctx: &LaunchContext, e: &PoolEntry) -> Result<SandboxSpec, String> {
    let config = SandboxConfig {
        image: e.image.clone(),
        memory_mib: e.memory_mib,
        cpus: e.cpus,
        scope: Some("none".into()),
        ..SandboxConfig::default()
    };
    SandboxSpec::from_config(&config, "pool", super::spec::SpecLimits::of(&ctx.config))
        .map_err(|e| e.to_string())
}

impl Pool {
    /// The pools `[pool]` configures (none when it has no entries). An
    /// entry that cannot be turned into a definition is logged and left out.
    pub fn new(ctx: Arc<LaunchContext>) -> Self {
        let cfg = &ctx.config.pool;
        let mut entries = Vec::new();
        for e in &cfg.entries {
            match entry_spec(&ctx, e) {
                Ok(spec) => {
                    let name = format!(
                        "{} {}MiB {}cpu",
                        spec.image_name, spec.memory_mib, spec.cpus
                    );
                    entries.push(Arc::new(Entry {
                        name,
                        spec,
                        warm: e.warm.clone(),
                        target: e.count,
                        state: Mutex::new(EntryState::default()),
                    }));
                }
                Err(why) => tracing::error!(image = ?e.image, %why, "pool entry left out"),
            }
        }
        if !entries.is_empty()
            && ctx.config.network.default_scope > crate::network::firewall::Scope::None
        {
            tracing::warn!(
                default_scope = %ctx.config.network.default_scope,
                "pool VMs have no NIC, so only starts that ask for scope \"none\" and no ports can use them; network.default_scope is wider"
            );
        }
        Self {
            refills: Arc::new(Semaphore::new(cfg.refill_concurrency as usize)),
            retry: Duration::from_secs(u64::from(cfg.retry_secs)),
            ctx,
            entries,
            wake: Arc::new(Notify::new()),
            closed: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Starts the refill task. Call after the start-up sweep, which would
    /// kill VMs booted before it.
    pub fn start(self: &Arc<Self>) {
        if self.entries.is_empty() {
            return;
        }
        for e in &self.entries {
            tracing::info!(pool = %e.name, target = e.target, warm = ?e.warm, "warm pool");
        }
        let pool = self.clone();
        tokio::spawn(async move {
            while !pool.closed.load(Ordering::SeqCst) {
                pool.refill_round().await;
                tokio::select! {
                    _ = pool.wake.notified() => {}
                    _ = tokio::time::sleep(TICK) => {}
                }
            }
        });
    }

    /// Removes every entry's dead VMs, then starts boots, one per entry in
    /// turn (so no entry starves another), while refill places are free.
    async fn refill_round(self: &Arc<Self>) {
        for entry in &self.entries {
            let dead: Vec<PooledVm> = {
                let mut st = entry.lock();
                let (alive, dead): (Vec<_>, Vec<_>) = std::mem::take(&mut st.ready)
                    .into_iter()
                    .partition(PooledVm::is_alive);
                st.ready = alive.into();
                st.failures += dead.len() as u64;
                dead
            };
            for vm in dead {
                tracing::warn!(pool = %entry.name, console = ?vm.console_tail(), "a pool VM died while waiting; replacing it");
                self.discard(vm);
            }
        }
        loop {
            let mut started = false;
            for entry in &self.entries {
                if self.closed.load(Ordering::SeqCst) {
                    return;
                }
                {
                    let st = entry.lock();
                    let have = st.ready.len() as u32 + st.booting;
                    if have >= entry.target || st.retry_at.is_some_and(|t| Instant::now() < t) {
                        continue;
                    }
                }
                let Ok(permit) = self.refills.clone().try_acquire_owned() else {
                    return;
                };
                self.spawn_boot(entry.clone(), permit);
                started = true;
            }
            if !started {
                return;
            }
        }
    }

    /// Boots one VM for `entry` on a task of its own. The entry counts it
    /// as booting until it is ready, or destroyed (failed, or booted after
    /// the pool closed).
    fn spawn_boot(self: &Arc<Self>, entry: Arc<Entry>, permit: OwnedSemaphorePermit) {
        entry.lock().booting += 1;
        let booting = Booting(entry.clone());
        let pool = self.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let booted = vm::boot_pooled(&pool.ctx, &entry.spec, &entry.warm).await;
            drop(permit);
            let ms = started.elapsed().as_millis() as u64;
            match booted {
                Ok(vm) if pool.closed.load(Ordering::SeqCst) => {
                    if let Err(e) = vm.destroy(&pool.ctx).await {
                        tracing::error!(error = %e, "cleanup of a pool VM booted during shutdown");
                    }
                }
                Ok(vm) => {
                    let mut st = entry.lock();
                    st.ready.push_back(vm);
                    st.refills += 1;
                    st.refill_ms_total += ms;
                    st.retry_at = None;
                    st.backoff = None;
                    tracing::info!(pool = %entry.name, ms, ready = st.ready.len(), "pool VM ready");
                }
                Err(e) => {
                    let mut st = entry.lock();
                    st.failures += 1;
                    // Doubling from retry_secs, never above the larger of
                    // it and MAX_RETRY.
                    let cap = MAX_RETRY.max(pool.retry);
                    let wait = st.backoff.map_or(pool.retry, |b| (b * 2).min(cap));
                    st.backoff = Some(wait);
                    st.retry_at = Some(Instant::now() + wait);
                    tracing::warn!(pool = %entry.name, error = %e, retry_in = ?wait, "pool VM failed to boot");
                }
            }
            drop(booting);
            pool.wake.notify_one();
        });
    }

    /// VMs booting in every entry.
    fn booting(&self) -> u32 {
        self.entries.iter().map(|e| e.lock().booting).sum()
    }

    /// Destroys a VM in the background.
    fn discard(&self, vm: PooledVm) {
        let ctx = self.ctx.clone();
        tokio::spawn(async move {
            if let Err(e) = vm.destroy(&ctx).await {
                tracing::error!(error = %e, "cleanup of a pool VM");
            }
        });
    }

    /// A ready VM for a sandbox defined as `spec` with `image` prepared, if
    /// an entry serves it and has one whose agent answers. Counts a hit or a
    /// miss for the entry; starts no entry serves are not counted.
    pub async fn take(&self, spec: &SandboxSpec, image: &PreparedImage) -> Option<PooledVm> {
        let entry = self.entries.iter().find(|e| e.serves(spec))?;
        loop {
            let next = entry.lock().ready.pop_front();
            let Some(vm) = next else {
                entry.lock().misses += 1;
                self.wake.notify_one();
                return None;
            };
            if vm.image_disk != image.disk {
                tracing::info!(pool = %entry.name, "pool VM booted an older build of the image; replacing it");
                self.discard(vm);
                continue;
            }
            if !vm.is_alive() || !vm.answers(CLAIM_HELLO_WAIT).await {
                entry.lock().failures += 1;
                tracing::warn!(pool = %entry.name, console = ?vm.console_tail(), "a pool VM stopped answering; not handed out");
                self.discard(vm);
                continue;
            }
            entry.lock().hits += 1;
            self.wake.notify_one();
            return Some(vm);
        }
    }

    /// Each entry's state and counters.
    pub fn status(&self) -> Vec<PoolStatus> {
        self.entries
            .iter()
            .map(|e| {
                let st = e.lock();
                PoolStatus {
                    name: e.name.clone(),
                    target: e.target,
                    ready: st.ready.len() as u32,
                    booting: st.booting,
                    hits: st.hits,
                    misses: st.misses,
                    refills: st.refills,
                    refill_ms_total: st.refill_ms_total,
                    failures: st.failures,
                }
            })
            .collect()
    }

    /// Stops refilling, waits (up to [`SHUTDOWN_BOOT_WAIT`]) for boots in
    /// progress, which destroy their VMs, and destroys every ready VM. A
    /// boot still running after the wait is left to the next broker's sweep.
    pub async fn shutdown(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.wake.notify_one();
        let until = Instant::now() + SHUTDOWN_BOOT_WAIT;
        while self.booting() > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if self.booting() > 0 {
            tracing::warn!(
                booting = self.booting(),
                "pool VMs still booting at shutdown: the next broker's start-up sweep removes them"
            );
        }
        let vms: Vec<PooledVm> = self
            .entries
            .iter()
            .flat_map(|e| std::mem::take(&mut e.lock().ready))
            .collect();
        let count = vms.len();
        let ctx = &self.ctx;
        for r in futures_util::future::join_all(vms.into_iter().map(|vm| vm.destroy(ctx))).await {
            if let Err(e) = r {
                tracing::error!(error = %e, "cleanup of a pool VM at shutdown");
            }
        }
        if count > 0 {
            tracing::info!(destroyed = count, "warm pool emptied");
        }
    }
}
