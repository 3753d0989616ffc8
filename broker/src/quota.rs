//! Per-namespace quotas: how many sandboxes one namespace may run at once
//! (`limits.max_sandboxes_per_namespace`). A permit is taken before a VM is
//! launched and given back when it is dropped, so a failed start or a stop
//! frees it and two concurrent starts cannot both take the last one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Running-sandbox counts by namespace.
#[derive(Debug)]
pub struct NamespaceQuota {
    max: u32,
    counts: Arc<Mutex<HashMap<String, u32>>>,
}

/// One running (or starting) sandbox's share of its namespace's quota.
#[derive(Debug)]
pub struct NamespacePermit {
    namespace: String,
    counts: Arc<Mutex<HashMap<String, u32>>>,
}

impl NamespaceQuota {
    pub fn new(max: u32) -> Self {
        Self {
            max,
            counts: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    pub fn max(&self) -> u32 {
        self.max
    }

    /// Takes a permit, or `None` when the namespace is at its quota.
    pub fn try_take(&self, namespace: &str) -> Option<NamespacePermit> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(namespace.to_string()).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(NamespacePermit {
            namespace: namespace.to_string(),
            counts: self.counts.clone(),
        })
    }
}

impl Drop for NamespacePermit {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.namespace) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.namespace);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_is_per_namespace_and_permits_return_on_drop() {
        let q = NamespaceQuota::new(2);
        let a1 = q.try_take("a").unwrap();
        let _a2 = q.try_take("a").unwrap();
        assert!(q.try_take("a").is_none());
        let _b = q.try_take("b").unwrap();
        drop(a1);
        assert!(q.try_take("a").is_some());
    }
}
