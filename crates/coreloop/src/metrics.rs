//! Prometheus metrics and health endpoints of the supervisor.
//!
//! The supervisor already knows everything worth exporting: it accepts every connection,
//! forwards each to a worker, and receives every worker's `Status` report (live
//! connections, closes, RSS) from inside the worker's event loop. This module keeps those
//! figures in a `prometheus-client` registry (the exposition format is the crate's, not
//! ours) and serves it over HTTP on a separate listener:
//!
//! - `GET /metrics`: the registry, in the OpenMetrics text format;
//! - `GET /healthz`: `200` while at least one worker is ready and the server is not
//!   stopping, `503` otherwise (a readiness probe for a load balancer or Kubernetes).
//!
//! Counters touched per connection are handles kept by the supervisor (one atomic add
//! each); per-worker gauges are refreshed when a scrape comes in. The endpoint reads at
//! most one small request head per connection, with a deadline, and closes: it is for
//! scrapers on a trusted network, not for the public.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::debug;

/// Labels of per-worker series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct WorkerLabels {
    pub(crate) worker: u32,
}

/// Labels of per-listener series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ListenerLabels {
    pub(crate) listener: String,
}

/// Labels of per-accept-loop series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct AcceptorLabels {
    pub(crate) acceptor: u32,
}

/// Labels of the restart counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RestartLabels {
    pub(crate) worker: u32,
    pub(crate) reason: &'static str,
}

/// Every series the supervisor exports.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    pub(crate) accepted: Family<ListenerLabels, Counter>,
    pub(crate) accept_errors: Family<ListenerLabels, Counter>,
    pub(crate) acceptor_accepted: Family<AcceptorLabels, Counter>,
    pub(crate) forwarded: Family<WorkerLabels, Counter>,
    pub(crate) restarts: Family<RestartLabels, Counter>,
    pub(crate) live: Family<WorkerLabels, Gauge>,
    pub(crate) rss: Family<WorkerLabels, Gauge>,
    pub(crate) heartbeat_lag: Family<WorkerLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub(crate) workers_ready: Gauge,
    pub(crate) recovered: Counter,
    pub(crate) dispatch_latency: Histogram,
    pub(crate) accept_poll_interval: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl Metrics {
    /// The accept loops' series.
    fn register_accepting(&self, registry: &mut Registry) {
        registry.register(
            "accepted",
            "Connections accepted, per listener",
            self.accepted.clone(),
        );
        registry.register(
            "accept_errors",
            "accept() failures, per listener",
            self.accept_errors.clone(),
        );
        registry.register(
            "acceptor_accepted",
            "Connections accepted, per accept loop (0: the supervisor's main thread)",
            self.acceptor_accepted.clone(),
        );
    }

    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("coreloop");
        let metrics = Self {
            accepted: Family::default(),
            accept_errors: Family::default(),
            acceptor_accepted: Family::default(),
            forwarded: Family::default(),
            restarts: Family::default(),
            live: Family::default(),
            rss: Family::default(),
            heartbeat_lag: Family::default(),
            workers_ready: Gauge::default(),
            recovered: Counter::default(),
            // 10 µs .. ~80 ms.
            dispatch_latency: Histogram::new(exponential_buckets(0.000_01, 2.0, 14)),
            accept_poll_interval: Gauge::default(),
            registry: Registry::default(),
        };
        metrics.register_accepting(&mut registry);
        registry.register(
            "forwarded",
            "Connections handed to each worker slot",
            metrics.forwarded.clone(),
        );
        registry.register(
            "worker_restarts",
            "Workers replaced, per slot and reason (crash, hang, retire, reload, recycle)",
            metrics.restarts.clone(),
        );
        registry.register(
            "worker_live_connections",
            "Connections each worker is serving, as it counts them at every open and close",
            metrics.live.clone(),
        );
        registry.register(
            "worker_resident_bytes",
            "Resident set size of each worker, as it last reported",
            metrics.rss.clone(),
        );
        registry.register(
            "worker_heartbeat_lag_seconds",
            "Time since each worker's event loop last reported",
            metrics.heartbeat_lag.clone(),
        );
        registry.register(
            "workers_ready",
            "Workers taking connections",
            metrics.workers_ready.clone(),
        );
        registry.register(
            "recovered_connections",
            "Connections taken back from dead workers' queues and re-dispatched",
            metrics.recovered.clone(),
        );
        registry.register(
            "dispatch_latency_seconds",
            "Time from accept to the connection being queued to a worker",
            metrics.dispatch_latency.clone(),
        );
        registry.register(
            "accept_poll_interval_seconds",
            "How often the supervisor polls its listeners: 0 while it accepts on readiness \
             (light load), 0.00025 under load, up to 0.001 while the CPUs are saturated",
            metrics.accept_poll_interval.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }

    /// The registry in the OpenMetrics text format.
    pub(crate) fn encode(&self) -> String {
        let mut text = String::with_capacity(4096);
        if let Err(err) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            debug!(error = %err, "cannot encode metrics");
        }
        text
    }
}

/// Longest request head the endpoint reads.
const MAX_HEAD: usize = 4096;
/// Deadline for a scraper to send its request.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// What the endpoint answers, decided by the caller from the request path.
pub(crate) enum Reply {
    Metrics(String),
    Healthy(bool),
    NotFound,
}

/// Reads one request head from `stream` and returns its path (`None` for a request that
/// is not a complete `GET` within the limits).
pub(crate) async fn read_path(stream: &mut tokio::net::TcpStream) -> Option<String> {
    let mut head = Vec::with_capacity(512);
    let read = async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await.ok()?;
            if n == 0 || head.len() + n > MAX_HEAD {
                return None;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Some(())
    };
    tokio::time::timeout(HEAD_TIMEOUT, read).await.ok()??;
    let line = head.split(|&b| b == b'\r').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split(' ');
    match (parts.next(), parts.next()) {
        (Some("GET"), Some(path)) => Some(path.to_owned()),
        _ => None,
    }
}

/// Writes `reply` and closes.
pub(crate) async fn write_reply(stream: &mut tokio::net::TcpStream, reply: Reply) {
    let (status, content_type, body) = match reply {
        Reply::Metrics(text) => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            text,
        ),
        Reply::Healthy(true) => ("200 OK", "text/plain", "ok\n".to_owned()),
        Reply::Healthy(false) => (
            "503 Service Unavailable",
            "text/plain",
            "unavailable\n".to_owned(),
        ),
        Reply::NotFound => ("404 Not Found", "text/plain", "not found\n".to_owned()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_encodes_every_series() {
        let metrics = Metrics::new();
        metrics
            .forwarded
            .get_or_create(&WorkerLabels { worker: 1 })
            .inc_by(3);
        metrics.dispatch_latency.observe(0.000_05);
        let text = metrics.encode();
        assert!(
            text.contains("coreloop_forwarded_total{worker=\"1\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("coreloop_dispatch_latency_seconds_count 1"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
