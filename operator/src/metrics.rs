//! Prometheus metrics of the controller, served on /metrics.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// The operator's metrics, registered in their own registry.
#[derive(Clone, Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: IntCounter,
    pub failures: IntCounterVec,
    pub duration: Histogram,
    pub managed: IntGauge,
    pub writes: IntCounter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let reconciles = IntCounter::new("sparsemoe_operator_reconciles_total", "Reconciles run")
            .expect("valid metric");
        let failures = IntCounterVec::new(
            Opts::new(
                "sparsemoe_operator_reconcile_errors_total",
                "Reconciles that failed, by reason",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "sparsemoe_operator_reconcile_duration_seconds",
                "Reconcile duration",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        )
        .expect("valid metric");
        let managed = IntGauge::new(
            "sparsemoe_operator_managed_objects",
            "InferenceDeployments the controller manages",
        )
        .expect("valid metric");
        let writes = IntCounter::new(
            "sparsemoe_operator_api_writes_total",
            "Write requests (apply, delete, status) the reconciler sent",
        )
        .expect("valid metric");
        for collector in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(failures.clone()),
            Box::new(duration.clone()),
            Box::new(managed.clone()),
            Box::new(writes.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        Self {
            registry,
            reconciles,
            failures,
            duration,
            managed,
            writes,
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus::TextEncoder::new()
            .encode_utf8(&self.registry.gather(), &mut out)
            .unwrap_or_default();
        out
    }
}
