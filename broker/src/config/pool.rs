//! `[pool]`: warm pools of booted, jailed VMs waiting to be claimed by a
//! `sandbox.start`, per image and size, within a host memory budget.

use serde::Deserialize;

/// Most VMs one entry may keep ready.
pub const MAX_POOL_COUNT: u32 = 64;
/// Most entries.
pub const MAX_POOL_ENTRIES: usize = 16;
/// Interpreters a pool VM may start ahead of the first cell.
pub const WARM_LANGUAGES: [&str; 2] = ["python", "nodejs"];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Host memory, MiB, all pool VMs together may be charged: each counts
    /// its guest RAM plus `limits.vmm_overhead_mib` (its cgroup's limit).
    /// The entries' targets must fit in it. 0 with no entries: no pool.
    pub budget_mib: u64,
    /// Pool VMs booting at once (refills compete with cold starts for CPU).
    pub refill_concurrency: u32,
    /// After a pool VM fails to boot, the next attempt for its entry waits
    /// this long, doubling while failures continue up to 60 s (or this
    /// value, if longer).
    pub retry_secs: u32,
    pub entries: Vec<PoolEntry>,
}

/// One pool: which sandboxes it serves and how many VMs it keeps ready.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PoolEntry {
    /// As `sandbox.start` names it; absent: `images.default`.
    pub image: Option<String>,
    /// Absent: `limits.default_memory_mib`.
    pub memory_mib: Option<u32>,
    /// Absent: `limits.default_cpus`.
    pub cpus: Option<u32>,
    /// VMs kept ready.
    pub count: u32,
    /// Interpreters started in each VM before it is claimed ("python",
    /// "nodejs"), so the sandbox's first cell runs warm.
    #[serde(default)]
    pub warm: Vec<String>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            budget_mib: 0,
            refill_concurrency: 1,
            retry_secs: 5,
            entries: Vec::new(),
        }
    }
}

impl PoolConfig {
    /// Checks the entries against the budget; `default_memory_mib`,
    /// `default_cpus`, `max_memory_mib`, `max_cpus` and `overhead_mib` are
    /// the broker's `[limits]`.
    pub fn validate(&self, limits: &super::Limits, sandbox_ids: u32) -> Result<(), String> {
        if self.entries.len() > MAX_POOL_ENTRIES {
            return Err(format!(
                "pool.entries has {} entries; at most {MAX_POOL_ENTRIES}",
                self.entries.len()
            ));
        }
        if !(1..=16).contains(&self.refill_concurrency) {
            return Err("pool.refill_concurrency must be 1-16".into());
        }
        if !(1..=3600).contains(&self.retry_secs) {
            return Err("pool.retry_secs must be 1-3600".into());
        }
        let mut needed: u64 = 0;
        let mut vms: u64 = 0;
        for (i, e) in self.entries.iter().enumerate() {
            let at = format!("pool.entries[{i}]");
            if !(1..=MAX_POOL_COUNT).contains(&e.count) {
                return Err(format!("{at}.count must be 1-{MAX_POOL_COUNT}"));
            }
            let memory = e.memory_mib.unwrap_or(limits.default_memory_mib);
            let cpus = e.cpus.unwrap_or(limits.default_cpus);
            if let Some(problem) = limits.size_problem(memory, cpus) {
                return Err(format!(
                    "{at}: {problem} (limits.max_memory_mib, limits.max_cpus)"
                ));
            }
            for w in &e.warm {
                if !WARM_LANGUAGES.contains(&w.as_str()) {
                    return Err(format!(
                        "{at}.warm names {w:?}; use \"python\" and/or \"nodejs\""
                    ));
                }
            }
            if e.warm.len()
                != e.warm
                    .iter()
                    .collect::<std::collections::BTreeSet<_>>()
                    .len()
            {
                return Err(format!("{at}.warm names a language twice"));
            }
            if self.entries[..i]
                .iter()
                .any(|o| o.same_sandboxes(e, limits))
            {
                return Err(format!(
                    "{at} serves the same image and size as an earlier entry; merge them"
                ));
            }
            needed += u64::from(e.count) * (u64::from(memory) + u64::from(limits.vmm_overhead_mib));
            vms += u64::from(e.count);
        }
        if needed > self.budget_mib {
            return Err(format!(
                "the pool entries need {needed} MiB of host memory (guest RAM + limits.vmm_overhead_mib per VM) but pool.budget_mib is {}; raise the budget or lower the counts",
                self.budget_mib
            ));
        }
        // While a dead pool VM is destroyed its replacement may already
        // boot: one more uid per refill place.
        let refilling = if vms > 0 {
            u64::from(self.refill_concurrency)
        } else {
            0
        };
        if vms + refilling + u64::from(limits.max_sandboxes) > u64::from(sandbox_ids) {
            return Err(format!(
                "sandbox_ids.count ({sandbox_ids}) must cover limits.max_sandboxes ({}) plus every pool VM ({vms}) plus pool.refill_concurrency ({refilling}, replacements booting while dead VMs are removed): each VM has its own uid",
                limits.max_sandboxes
            ));
        }
        Ok(())
    }

    /// Total VMs the pools keep ready.
    pub fn total_count(&self) -> u32 {
        self.entries.iter().map(|e| e.count).sum()
    }
}

impl PoolEntry {
    fn same_sandboxes(&self, other: &PoolEntry, limits: &super::Limits) -> bool {
        self.image == other.image
            && self.memory_mib.unwrap_or(limits.default_memory_mib)
                == other.memory_mib.unwrap_or(limits.default_memory_mib)
            && self.cpus.unwrap_or(limits.default_cpus) == other.cpus.unwrap_or(limits.default_cpus)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Limits;

    fn entry(count: u32) -> PoolEntry {
        PoolEntry {
            image: Some("python".into()),
            memory_mib: Some(256),
            cpus: Some(1),
            count,
            warm: vec!["python".into()],
        }
    }

    fn pool(entries: Vec<PoolEntry>, budget_mib: u64) -> PoolConfig {
        PoolConfig {
            budget_mib,
            entries,
            ..PoolConfig::default()
        }
    }

    #[test]
    fn a_pool_within_its_budget_passes() {
        let l = Limits::default();
        let per_vm = 256 + u64::from(l.vmm_overhead_mib);
        pool(vec![entry(2)], 2 * per_vm).validate(&l, 1000).unwrap();
        PoolConfig::default().validate(&l, 1000).unwrap();
    }

    #[test]
    fn every_bad_setting_is_refused_by_name() {
        let l = Limits::default();
        let big = 1 << 30;
        let cases = [
            (pool(vec![entry(2)], 100), "pool.budget_mib"),
            (pool(vec![entry(0)], big), "count"),
            (pool(vec![entry(MAX_POOL_COUNT + 1)], big), "count"),
            (
                pool(
                    vec![PoolEntry {
                        memory_mib: Some(32),
                        ..entry(1)
                    }],
                    big,
                ),
                "memory 32 MiB",
            ),
            (
                pool(
                    vec![PoolEntry {
                        cpus: Some(0),
                        ..entry(1)
                    }],
                    big,
                ),
                "cpus",
            ),
            (
                pool(
                    vec![PoolEntry {
                        warm: vec!["ruby".into()],
                        ..entry(1)
                    }],
                    big,
                ),
                "warm",
            ),
            (
                pool(
                    vec![PoolEntry {
                        warm: vec!["python".into(), "python".into()],
                        ..entry(1)
                    }],
                    big,
                ),
                "twice",
            ),
            (pool(vec![entry(1), entry(2)], big), "merge"),
            (
                PoolConfig {
                    refill_concurrency: 0,
                    ..pool(vec![], 0)
                },
                "refill_concurrency",
            ),
        ];
        for (cfg, word) in cases {
            let err = cfg.validate(&l, 1000).expect_err(word);
            assert!(err.contains(word), "{word}: {err}");
        }
        let err = pool(vec![entry(10)], big)
            .validate(&l, l.max_sandboxes + 5)
            .expect_err("uids");
        assert!(err.contains("sandbox_ids.count"), "{err}");
    }
}
