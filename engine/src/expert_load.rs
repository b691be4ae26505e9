//! Routed-token counters per (layer, expert): always on and cheap (one relaxed atomic add per
//! routed token), unlike a full [`crate::model::Trace`]. The server exports them as
//! `sparsemoe_expert_tokens_total{layer,expert}` for expert placement.

use std::sync::atomic::{AtomicU64, Ordering};

/// Cumulative routed-token counts; `counts[layer]` is empty for dense layers.
#[derive(Debug, Default)]
pub struct ExpertLoad {
    counts: Vec<Vec<AtomicU64>>,
}

impl ExpertLoad {
    /// Zeroed counters for `experts_per_layer[l]` experts in layer `l` (0 for dense layers).
    pub fn new(experts_per_layer: &[usize]) -> Self {
        Self {
            counts: experts_per_layer
                .iter()
                .map(|&n| (0..n).map(|_| AtomicU64::new(0)).collect())
                .collect(),
        }
    }

    /// Counts one token routed to each of `experts` in `layer`.
    pub fn record(&self, layer: usize, experts: &[usize]) {
        if let Some(row) = self.counts.get(layer) {
            for &e in experts {
                if let Some(c) = row.get(e) {
                    c.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// The counts so far, `[layer][expert]`.
    pub fn snapshot(&self) -> Vec<Vec<u64>> {
        self.counts
            .iter()
            .map(|row| row.iter().map(|c| c.load(Ordering::Relaxed)).collect())
            .collect()
    }
}
