//! `[lifecycle]`: what happens to sandboxes over time and across broker
//! restarts — idle and total lifetimes (with per-namespace overrides), how
//! long stopped definitions are kept and how many, and what a broker does
//! with running VMs when it stops.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LifecycleConfig {
    /// At SIGTERM, stop every sandbox (true) or leave the VMs running for
    /// the next broker to re-adopt (false, the default).
    pub stop_sandboxes_on_shutdown: bool,
    /// After SIGTERM, how long calls in flight may take to finish before
    /// they are failed and the broker exits.
    pub shutdown_grace_secs: u32,
    /// A running sandbox with no call (start, command, REPL cell) for this
    /// long is stopped (0: never). Metrics requests do not count as use.
    pub idle_timeout_secs: u64,
    /// A running sandbox is stopped this long after it started (0: never).
    pub max_lifetime_secs: u64,
    /// A stopped sandbox's definition is forgotten this long after it
    /// stopped (0: kept until `moat sandbox rm`).
    pub stopped_retention_secs: u64,
    /// Most definitions kept per namespace. Defining one more forgets the
    /// one stopped longest ago; when every one runs, the start is refused.
    pub max_definitions_per_namespace: u32,
    /// How often lifetimes and retention are checked.
    pub check_interval_secs: u32,
    /// Per-namespace overrides of the lifetimes.
    pub namespaces: BTreeMap<String, NamespaceLifetimes>,
}

/// A namespace's own lifetimes (unset: the server-wide value).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NamespaceLifetimes {
    pub idle_timeout_secs: Option<u64>,
    pub max_lifetime_secs: Option<u64>,
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        Self {
            stop_sandboxes_on_shutdown: false,
            shutdown_grace_secs: 30,
            idle_timeout_secs: 3600,
            max_lifetime_secs: 0,
            stopped_retention_secs: 7 * 24 * 3600,
            max_definitions_per_namespace: 1024,
            check_interval_secs: 10,
            namespaces: BTreeMap::new(),
        }
    }
}

/// Longest lifetime or retention accepted (ten years).
const MAX_SECS: u64 = 10 * 365 * 24 * 3600;

impl LifecycleConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.shutdown_grace_secs > 3600 {
            return Err(format!(
                "lifecycle.shutdown_grace_secs = {} is over an hour; use at most 3600",
                self.shutdown_grace_secs
            ));
        }
        if self.check_interval_secs == 0 || self.check_interval_secs > 3600 {
            return Err(format!(
                "lifecycle.check_interval_secs = {} must be 1-3600",
                self.check_interval_secs
            ));
        }
        if self.max_definitions_per_namespace == 0 {
            return Err("lifecycle.max_definitions_per_namespace must be greater than 0".into());
        }
        let mut secs = vec![
            (
                "lifecycle.idle_timeout_secs".to_string(),
                self.idle_timeout_secs,
            ),
            (
                "lifecycle.max_lifetime_secs".to_string(),
                self.max_lifetime_secs,
            ),
            (
                "lifecycle.stopped_retention_secs".to_string(),
                self.stopped_retention_secs,
            ),
        ];
        for (ns, l) in &self.namespaces {
            moat_proto::names::validate_name("namespace", ns)
                .map_err(|e| format!("lifecycle.namespaces: {e}"))?;
            for (what, v) in [
                ("idle_timeout_secs", l.idle_timeout_secs),
                ("max_lifetime_secs", l.max_lifetime_secs),
            ] {
                if let Some(v) = v {
                    secs.push((format!("lifecycle.namespaces.{ns}.{what}"), v));
                }
            }
        }
        for (what, v) in secs {
            if v > MAX_SECS {
                return Err(format!(
                    "{what} = {v} is over ten years; use 0 for \"never\""
                ));
            }
        }
        Ok(())
    }

    /// Idle limit of a namespace's sandboxes (None: never).
    pub fn idle_timeout(&self, namespace: &str) -> Option<Duration> {
        let secs = self
            .namespaces
            .get(namespace)
            .and_then(|n| n.idle_timeout_secs)
            .unwrap_or(self.idle_timeout_secs);
        (secs > 0).then(|| Duration::from_secs(secs))
    }

    /// Total lifetime limit of a namespace's sandboxes (None: never).
    pub fn max_lifetime(&self, namespace: &str) -> Option<Duration> {
        let secs = self
            .namespaces
            .get(namespace)
            .and_then(|n| n.max_lifetime_secs)
            .unwrap_or(self.max_lifetime_secs);
        (secs > 0).then(|| Duration::from_secs(secs))
    }

    /// How long stopped definitions are kept (None: until removed).
    pub fn stopped_retention(&self) -> Option<Duration> {
        (self.stopped_retention_secs > 0).then(|| Duration::from_secs(self.stopped_retention_secs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_overrides_win_and_zero_means_never() {
        let c: LifecycleConfig = toml::from_str(
            r#"
idle_timeout_secs = 60
[namespaces.ci]
idle_timeout_secs = 0
max_lifetime_secs = 600
"#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.idle_timeout("other"), Some(Duration::from_secs(60)));
        assert_eq!(c.idle_timeout("ci"), None);
        assert_eq!(c.max_lifetime("other"), None);
        assert_eq!(c.max_lifetime("ci"), Some(Duration::from_secs(600)));
        assert_eq!(
            LifecycleConfig::default().stopped_retention(),
            Some(Duration::from_secs(604800))
        );
    }

    #[test]
    fn bad_values_are_named() {
        let bad = |t: &str| {
            toml::from_str::<LifecycleConfig>(t)
                .map_err(|e| e.to_string())
                .and_then(|c| c.validate())
                .unwrap_err()
        };
        assert!(bad("check_interval_secs = 0").contains("check_interval_secs"));
        assert!(bad("[namespaces.\"../x\"]").contains("namespace"));
        assert!(bad("[namespaces.a]\nidle_timeout_secs = 999999999999")
            .contains("namespaces.a.idle_timeout_secs"));
        assert!(bad("idle = 3").contains("unknown field"));
        assert!(bad("max_definitions_per_namespace = 0").contains("max_definitions"));
    }
}
