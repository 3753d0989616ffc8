//! Prometheus metrics: HTTP requests by route and status with latency
//! histograms, sandbox operations by method and outcome, JSON-RPC errors by
//! code, MCP sessions, broker calls in flight against their bound, and —
//! asked of the broker at scrape time — sandboxes running. Rendered in the text exposition format by `GET /metrics`, which
//! can be bound to its own address (`metrics.listen`).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use crate::rpc::methods::Method;
use crate::state::AppState;

/// Histogram bucket bounds, seconds.
const BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, secs: f64) {
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += secs;
    }
}

#[derive(Debug, Default)]
struct Inner {
    http: BTreeMap<(&'static str, u16), u64>,
    http_latency: BTreeMap<&'static str, Histogram>,
    calls: BTreeMap<(&'static str, &'static str, &'static str), u64>,
    call_latency: BTreeMap<(&'static str, &'static str), Histogram>,
    errors: BTreeMap<i32, u64>,
}

/// The gateway's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

/// The route label of a request path (bounded: unknown paths are `other`).
pub fn route_label(path: &str) -> &'static str {
    match path {
        "/api/v1/rpc" => "/api/v1/rpc",
        "/api/v1/health" => "/api/v1/health",
        "/mcp" => "/mcp",
        "/metrics" => "/metrics",
        _ => "other",
    }
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(inner) => inner,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// One HTTP request answered.
    pub fn http_request(&self, route: &'static str, status: u16, took: Duration) {
        let mut inner = self.lock();
        *inner.http.entry((route, status)).or_default() += 1;
        inner
            .http_latency
            .entry(route)
            .or_default()
            .observe(took.as_secs_f64());
    }

    /// One sandbox operation (JSON-RPC call or MCP tool call) done.
    pub fn rpc_call(&self, via: &'static str, method: &str, code: Option<i32>, took: Duration) {
        // Unknown method names are the caller's text: one bucket for them.
        let method = Method::lookup(method).map_or("unknown", Method::name);
        let outcome = if code.is_some() { "error" } else { "ok" };
        let mut inner = self.lock();
        *inner.calls.entry((via, method, outcome)).or_default() += 1;
        inner
            .call_latency
            .entry((via, method))
            .or_default()
            .observe(took.as_secs_f64());
        if let Some(code) = code {
            *inner.errors.entry(code).or_default() += 1;
        }
    }

    /// An error answered before any call ran (auth, limits, framing).
    pub fn error(&self, code: i32) {
        *self.lock().errors.entry(code).or_default() += 1;
    }

    /// The exposition text; `running` is the broker's count (None: the
    /// broker did not answer), `sessions` the live MCP sessions,
    /// `broker_calls` the broker calls in flight and their bound.
    pub fn render(
        &self,
        running: Option<u32>,
        sessions: usize,
        broker_calls: (usize, usize),
    ) -> String {
        let inner = self.lock();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP moat_gateway_http_requests_total HTTP requests answered, by route and status."
        );
        let _ = writeln!(out, "# TYPE moat_gateway_http_requests_total counter");
        for ((route, status), n) in &inner.http {
            let _ = writeln!(
                out,
                "moat_gateway_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        histograms(
            &mut out,
            "moat_gateway_http_request_duration_seconds",
            "HTTP request latency, by route.",
            inner
                .http_latency
                .iter()
                .map(|(route, h)| (format!("route=\"{route}\""), h)),
        );
        let _ = writeln!(out, "# HELP moat_gateway_sandbox_operations_total Sandbox operations, by interface, method and outcome.");
        let _ = writeln!(out, "# TYPE moat_gateway_sandbox_operations_total counter");
        for ((via, method, outcome), n) in &inner.calls {
            let _ = writeln!(out, "moat_gateway_sandbox_operations_total{{via=\"{via}\",method=\"{method}\",outcome=\"{outcome}\"}} {n}");
        }
        histograms(
            &mut out,
            "moat_gateway_sandbox_operation_duration_seconds",
            "Sandbox operation latency, by interface and method.",
            inner
                .call_latency
                .iter()
                .map(|((via, method), h)| (format!("via=\"{via}\",method=\"{method}\""), h)),
        );
        let _ = writeln!(
            out,
            "# HELP moat_gateway_errors_total JSON-RPC errors returned, by code."
        );
        let _ = writeln!(out, "# TYPE moat_gateway_errors_total counter");
        for (code, n) in &inner.errors {
            let _ = writeln!(out, "moat_gateway_errors_total{{code=\"{code}\"}} {n}");
        }
        gauge(
            &mut out,
            "moat_gateway_mcp_sessions",
            "MCP sessions alive.",
            sessions,
        );
        gauge(
            &mut out,
            "moat_gateway_broker_calls_in_flight",
            "Broker calls in flight (all keys).",
            broker_calls.0,
        );
        gauge(
            &mut out,
            "moat_gateway_broker_calls_max",
            "The bound on broker calls in flight (limits.max_broker_calls).",
            broker_calls.1,
        );
        gauge(
            &mut out,
            "moat_gateway_broker_up",
            "Whether the broker answered the scrape's health check.",
            u8::from(running.is_some()),
        );
        if let Some(running) = running {
            gauge(
                &mut out,
                "moat_sandboxes_running",
                "Sandboxes running, as the broker counts them.",
                running,
            );
        }
        out
    }
}

/// One gauge: its HELP and TYPE lines and its value.
fn gauge(out: &mut String, name: &str, help: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} gauge");
    let _ = writeln!(out, "{name} {value}");
}

fn histograms<'a>(
    out: &mut String,
    name: &str,
    help: &str,
    series: impl Iterator<Item = (String, &'a Histogram)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} histogram");
    for (labels, h) in series {
        for (bound, count) in BUCKETS.iter().zip(h.counts) {
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", h.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.count);
    }
}

/// A Prometheus label value: backslash, quote and newline escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The broker's warm pools: one series per pool and measure.
pub fn render_pools(pools: &[moat_proto::broker::PoolStatus]) -> String {
    let mut out = String::new();
    if pools.is_empty() {
        return out;
    }
    type Field = fn(&moat_proto::broker::PoolStatus) -> u64;
    let series: [(&str, &str, &str, Field); 8] = [
        (
            "moat_pool_target",
            "gauge",
            "VMs each warm pool keeps ready.",
            |p| u64::from(p.target),
        ),
        (
            "moat_pool_ready",
            "gauge",
            "Warm-pool VMs ready to be claimed.",
            |p| u64::from(p.ready),
        ),
        (
            "moat_pool_booting",
            "gauge",
            "Warm-pool VMs booting.",
            |p| u64::from(p.booting),
        ),
        (
            "moat_pool_hits_total",
            "counter",
            "Starts served by a warm-pool VM.",
            |p| p.hits,
        ),
        (
            "moat_pool_misses_total",
            "counter",
            "Starts a pool could serve that booted cold (none ready).",
            |p| p.misses,
        ),
        (
            "moat_pool_refills_total",
            "counter",
            "Warm-pool VMs booted.",
            |p| p.refills,
        ),
        (
            "moat_pool_refill_seconds_total",
            "counter",
            "Boot time (start to ready) of the warm-pool VMs booted, summed.",
            |p| p.refill_ms_total,
        ),
        (
            "moat_pool_failures_total",
            "counter",
            "Warm-pool VMs that failed to boot or died while waiting.",
            |p| p.failures,
        ),
    ];
    for (name, kind, help, field) in series {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for p in pools {
            let value = field(p);
            let pool = label(&p.name);
            if name == "moat_pool_refill_seconds_total" {
                let _ = writeln!(out, "{name}{{pool=\"{pool}\"}} {}", value as f64 / 1000.0);
            } else {
                let _ = writeln!(out, "{name}{{pool=\"{pool}\"}} {value}");
            }
        }
    }
    out
}

/// `GET /metrics`.
pub async fn handler(State(state): State<AppState>) -> impl IntoResponse {
    let health = state
        .broker()
        .health(state.deadlines().health.min(Duration::from_secs(2)))
        .await
        .ok();
    let calls = state.broker().calls();
    let mut body = state.metrics().render(
        health.as_ref().map(|reply| reply.running_sandboxes),
        state.sessions().len(),
        (calls.in_flight(), calls.max()),
    );
    if let Some(health) = &health {
        body.push_str(&render_pools(&health.pools));
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_render_one_series_per_pool_with_escaped_names() {
        let pools = [moat_proto::broker::PoolStatus {
            name: "py\"thon 512MiB 1cpu".into(),
            target: 2,
            ready: 1,
            booting: 1,
            hits: 5,
            misses: 3,
            refills: 6,
            refill_ms_total: 12_500,
            failures: 0,
        }];
        let text = render_pools(&pools);
        assert!(
            text.contains("moat_pool_ready{pool=\"py\\\"thon 512MiB 1cpu\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("moat_pool_hits_total{pool=") && text.contains("} 5\n"),
            "{text}"
        );
        assert!(
            text.contains("moat_pool_refill_seconds_total{pool=\"py\\\"thon 512MiB 1cpu\"} 12.5"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE moat_pool_misses_total counter"),
            "{text}"
        );
        assert!(render_pools(&[]).is_empty());
    }

    #[test]
    fn renders_counters_histograms_and_gauges() {
        let m = Metrics::default();
        m.http_request("/api/v1/rpc", 200, Duration::from_millis(3));
        m.http_request("/api/v1/rpc", 200, Duration::from_millis(30));
        m.rpc_call(
            "jsonrpc",
            "sandbox.stop",
            Some(-32003),
            Duration::from_millis(1),
        );
        m.rpc_call(
            "jsonrpc",
            "\"evil\"",
            Some(-32601),
            Duration::from_millis(1),
        );
        m.error(-32002);
        let text = m.render(Some(3), 2, (5, 256));
        for needle in [
            "moat_gateway_http_requests_total{route=\"/api/v1/rpc\",status=\"200\"} 2",
            "moat_gateway_http_request_duration_seconds_bucket{route=\"/api/v1/rpc\",le=\"0.005\"} 1",
            "moat_gateway_http_request_duration_seconds_bucket{route=\"/api/v1/rpc\",le=\"+Inf\"} 2",
            "moat_gateway_http_request_duration_seconds_count{route=\"/api/v1/rpc\"} 2",
            "moat_gateway_sandbox_operations_total{via=\"jsonrpc\",method=\"sandbox.stop\",outcome=\"error\"} 1",
            "method=\"unknown\"",
            "moat_gateway_errors_total{code=\"-32003\"} 1",
            "moat_gateway_errors_total{code=\"-32002\"} 1",
            "moat_sandboxes_running 3",
            "moat_gateway_mcp_sessions 2",
            "moat_gateway_broker_up 1",
            "moat_gateway_broker_calls_in_flight 5",
            "moat_gateway_broker_calls_max 256",
        ] {
            assert!(text.contains(needle), "{needle} missing in:\n{text}");
        }
        assert!(!text.contains("evil"));
        let text = m.render(None, 0, (0, 1));
        assert!(text.contains("moat_gateway_broker_up 0"));
        assert!(!text.contains("moat_sandboxes_running"));
    }
}
