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

    /// Adds `counts[e]` tokens routed to expert `e` of `layer` (counts a backend kept on the
    /// device, as floats: whole numbers, exact below 2^24).
    pub fn add(&self, layer: usize, counts: &[f32]) {
        if let Some(row) = self.counts.get(layer) {
            for (c, &n) in row.iter().zip(counts) {
                if n > 0.0 {
                    c.fetch_add(n as u64, Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use super::ExpertLoad;

    #[test]
    fn device_counts_add_to_the_recorded_ones() {
        let load = ExpertLoad::new(&[0, 3]);
        load.record(1, &[0, 2]);
        load.add(1, &[2.0, 0.0, 5.0]);
        load.add(0, &[7.0]); // a dense layer has no counters
        load.add(9, &[1.0]); // nor does a layer past the model's
        assert_eq!(load.snapshot(), vec![vec![], vec![3, 0, 6]]);
    }
}
