//! CUDA graphs of each layer's MLP block at small batches (`Cuda::graph_rows`).
//!
//! A decode step's MLP blocks (the norm, the router's product, the routing, the experts'
//! grouped products, their sum and the shared expert's) are a dozen short launches a layer whose
//! shapes depend only on the step's rows, and whose inputs are all on the device: replaying a
//! recording of them costs the host one call instead of a dozen. Attention stays outside (its
//! launches take the step's positions, cache slots and key counts from the host), as vLLM's
//! piecewise graphs leave it.
//!
//! A `(layer, rows, hidden)` block runs as it is until a run copies nothing to or from the host
//! (the first run of a layer may copy its experts' address table, once). The next time it is
//! captured (on the lane's one stream) into a graph over buffers of its own, kept with the
//! graph, and from then on each time is a copy of the rows in, the graph's launch, a copy of the
//! rows out and, for a MoE layer, its counts added to the step's. A capture spoiled by a copy
//! asked for while capturing (see `uploads`) is tried again after a clean run, up to
//! [`SPOILED`] times; a block spoiled that often, or whose capture the driver refused, runs as
//! it is from then on.
//!
//! Counters of launches (`Cuda::in_place_products`, `Cuda::routed_on_device`, …) count what is
//! launched or captured: a replay adds nothing to them.

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use cudarc::driver::CudaGraph;
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};

use super::{Cuda, CudaTensor, ok};
use crate::backend::{Backend, BlockId, MlpBlock};

/// A lane's graphs and what they did.
#[derive(Default)]
pub(super) struct Graphs {
    /// The most rows a block is captured for; 0: none is.
    pub rows: AtomicUsize,
    blocks: Mutex<HashMap<Key, Block>>,
    /// Blocks captured into graphs.
    pub captured: AtomicU64,
    /// Graph launches.
    pub replayed: AtomicU64,
    /// Captures spoiled by a copy to or from the host.
    pub spoiled: AtomicU64,
    /// Blocks left to run as they are: they copied to or from the host, or their capture
    /// failed.
    pub eager: AtomicU64,
}

impl Graphs {
    /// Forgets every graph (their buffers are freed with them).
    pub fn clear(&self) {
        self.blocks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Forgets model `model`'s graphs.
    pub fn forget(&self, model: u64) {
        let mut blocks = self.blocks.lock().unwrap_or_else(|e| e.into_inner());
        blocks.retain(|key, _| key.0.model != model);
    }
}

/// A block by its model and layer, rows and hidden width.
type Key = (BlockId, usize, usize);

/// Spoiled captures after which a block runs as it is for good.
const SPOILED: u32 = 3;

enum Block {
    /// Copied to or from the host when it last ran; `spoiled`: its captures spoiled so far.
    Copied {
        spoiled: u32,
    },
    /// Last ran copying nothing to or from the host; captured the next time. `load`: the shape
    /// of the step's counts after it, if it had any.
    Seen {
        load: Option<(usize, usize)>,
        spoiled: u32,
    },
    /// Runs as it is.
    Eager,
    Recorded(Recorded),
}

/// A captured block and the buffers its graph reads and writes.
struct Recorded {
    graph: Graph,
    /// The rows it updates in place.
    h: CudaTensor,
    /// The counts it adds up (zeroed at its start), added to the step's after each launch.
    load: Option<CudaTensor>,
    /// Buffers of the lane's upload caches the graph reads, held for as long as it lives.
    _kept: Vec<Arc<dyn Any + Send + Sync>>,
}

/// What a capture gave.
enum Captured {
    Graph(Recorded),
    /// It asked for a copy to or from the host.
    Spoiled,
    /// The driver refused it, or it left an allocation of its own live.
    Refused,
}

/// A graph, used only under [`Graphs::blocks`]' lock.
struct Graph(CudaGraph);

// SAFETY: a CudaGraph is a pair of driver handles and its stream; the driver requires calls on
// one graph to be serialised, which the lock around every `Graph` does.
unsafe impl Send for Graph {}
unsafe impl Sync for Graph {}

impl Drop for Recorded {
    fn drop(&mut self) {
        // The graph and buffers are freed by cudarc, which needs the context current.
        let _ = self.h.buf.context().bind_to_thread();
    }
}

impl Cuda {
    /// [`crate::backend::Backend::mlp_block`]: see the module's text.
    pub(super) fn graphed_block(
        &self,
        id: BlockId,
        h: &mut CudaTensor,
        load: &mut Option<CudaTensor>,
        block: &mut MlpBlock<'_, CudaTensor>,
    ) {
        // One stream only: expert shards' lanes would need a capture across streams.
        let wanted = (1..=self.graphs.rows.load(Relaxed)).contains(&h.rows)
            && self.shards.is_empty()
            && self.stream.context().has_async_alloc();
        if !wanted {
            return block(h, load);
        }
        let key = (id, h.rows, h.cols);
        let mut blocks = self.graphs.blocks.lock().unwrap_or_else(|e| e.into_inner());
        match blocks.get_mut(&key) {
            Some(Block::Recorded(recorded)) => self.replay(recorded, h, load),
            Some(Block::Eager) => block(h, load),
            None | Some(Block::Copied { .. }) => {
                let spoiled = match blocks.get(&key) {
                    Some(Block::Copied { spoiled }) => *spoiled,
                    _ => 0,
                };
                let before = self.host_traffic();
                block(h, load);
                let next = match self.host_traffic() == before {
                    true => Block::Seen {
                        load: load.as_ref().map(|l| (l.rows, l.cols)),
                        spoiled,
                    },
                    false => Block::Copied { spoiled },
                };
                blocks.insert(key, next);
            }
            Some(&mut Block::Seen {
                load: counts,
                spoiled,
            }) => {
                let captured = self.capture(h.rows, h.cols, counts, block);
                if matches!(captured, Captured::Spoiled) {
                    self.graphs.spoiled.fetch_add(1, Relaxed);
                }
                let next = match captured {
                    Captured::Graph(mut recorded) => {
                        self.replay(&mut recorded, h, load);
                        blocks.insert(key, Block::Recorded(recorded));
                        return;
                    }
                    Captured::Spoiled if spoiled + 1 < SPOILED => Block::Copied {
                        spoiled: spoiled + 1,
                    },
                    Captured::Spoiled | Captured::Refused => {
                        self.graphs.eager.fetch_add(1, Relaxed);
                        Block::Eager
                    }
                };
                blocks.insert(key, next);
                // Nothing captured ran: the block runs now as it is.
                block(h, load);
            }
        }
    }

    /// Copies to the device and back since the lane was made: a block with any runs as it is.
    fn host_traffic(&self) -> u64 {
        self.host_reads.load(Relaxed) + self.uploads.copies.load(Relaxed)
    }

    /// `block` captured over buffers of its own, or why not.
    fn capture(
        &self,
        rows: usize,
        cols: usize,
        counts: Option<(usize, usize)>,
        block: &mut MlpBlock<'_, CudaTensor>,
    ) -> Captured {
        // SAFETY: every launch copies the step's rows in before the graph reads them.
        let mut h = unsafe { self.uninit(rows, cols) };
        let mut load = counts.map(|(r, c)| self.zeros(r, c));
        let mode = CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        if let Err(e) = self.stream.begin_capture(mode) {
            eprintln!("sparsemoe-engine: CUDA graphs: a capture could not begin ({e:?})");
            return Captured::Refused;
        }
        self.uploads.capturing.store(true, Relaxed);
        if let Some(load) = load.as_mut() {
            ok(self.stream.memset_zeros(&mut load.buf), "zeroing counts");
        }
        let had_load = load.is_some();
        block(&mut h, &mut load);
        self.uploads.capturing.store(false, Relaxed);
        let spoiled = self.uploads.spoiled.swap(false, Relaxed);
        let kept = self.uploads.take_kept();
        let ended = self
            .stream
            .end_capture(CUgraphInstantiate_flags(0))
            .map_err(|e| format!("{e:?}"))
            .and_then(|graph| graph.ok_or_else(|| "the capture was empty".to_string()));
        if load.is_some() && !had_load {
            // Made in the capture, it belongs to a graph about to go: never freed here, where
            // the driver would refuse (this does not happen: the first run had counts then).
            std::mem::forget(load.take());
            return Captured::Refused;
        }
        match ended {
            Ok(graph) if !spoiled => {
                self.graphs.captured.fetch_add(1, Relaxed);
                Captured::Graph(Recorded {
                    graph: Graph(graph),
                    h,
                    load,
                    _kept: kept,
                })
            }
            Ok(_) => Captured::Spoiled,
            Err(e) => {
                eprintln!(
                    "sparsemoe-engine: CUDA graphs: a capture failed ({e}); that block runs \
                     without a graph from now on"
                );
                Captured::Refused
            }
        }
    }

    /// One launch of `recorded` for `h`, adding its counts to `load`.
    fn replay(&self, recorded: &mut Recorded, h: &mut CudaTensor, load: &mut Option<CudaTensor>) {
        let n = h.rows * h.cols;
        self.copy(
            &h.buf.slice(..n),
            &mut recorded.h.buf.slice_mut(..n),
            "copying rows into a graph",
        );
        ok(recorded.graph.0.launch(), "launching a CUDA graph");
        self.copy(
            &recorded.h.buf.slice(..n),
            &mut h.buf.slice_mut(..n),
            "copying rows out of a graph",
        );
        if let Some(counts) = &recorded.load {
            match load {
                Some(load) => self.add(load, counts),
                None => {
                    let mut copy = self.zeros(counts.rows, counts.cols);
                    self.add(&mut copy, counts);
                    *load = Some(copy);
                }
            }
        }
        self.graphs.replayed.fetch_add(1, Relaxed);
    }
}
