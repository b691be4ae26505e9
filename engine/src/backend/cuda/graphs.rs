//! CUDA graphs of each layer's MLP block at small batches (`Cuda::graph_rows`).
//!
//! A decode step's MLP blocks (the norm, the router's product, the routing, the experts'
//! grouped products, their sum and the shared expert's) are a dozen short launches a layer whose
//! shapes depend only on the step's rows, and whose inputs are all on the device: replaying a
//! recording of them costs the host one call instead of a dozen. Attention stays outside (its
//! launches take the step's positions, cache slots and key counts from the host), as vLLM's
//! piecewise graphs leave it.
//!
//! A `(model, layer, rows, hidden)` block runs as it is until a run copies nothing to or from
//! the host (the first run of a layer may copy its experts' address table, once). The next time
//! it is captured (on the lane's one stream) into a graph, and from then on each time is a copy
//! of the rows in, the graph's launch, a copy of the rows out and, for a MoE layer, its counts
//! added to the step's. A capture spoiled by a copy asked for while capturing (see `uploads`) is
//! tried again after a clean run, up to [`SPOILED`] times; a block spoiled that often, or whose
//! capture the driver refused, runs as it is from then on. The setters that change what a block
//! launches, and a cuBLAS refusal, forget every graph; an outcome from before that is not kept.
//!
//! The graphs of one shape read and write the same buffers (`Io`: the rows, and the counts of a
//! MoE layer): they run one at a time on the lane's stream, each copying its rows in first. What
//! a graph allocates inside comes from the driver's graph memory pool, whose physical memory
//! graphs launched into one stream may share (CUDA's graph memory nodes); a step is captured
//! only up to `in_place_rows` rows, where those allocations are small.
//!
//! A lane is driven by one thread at a time (the engine's step loop): work queued on its stream
//! by another thread during a capture would be captured with it.
//!
//! Counters of launches (`Cuda::in_place_products`, `Cuda::routed_on_device`, …) count what is
//! launched or captured: a replay adds nothing to them.

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaContext, CudaGraph};

use super::{Cuda, CudaTensor, ok};
use crate::backend::{Backend, BlockId, GraphCounts, MlpBlock};

/// A lane's graphs and what they did.
#[derive(Default)]
pub(super) struct Graphs {
    /// The most rows a block is captured for; 0: none is.
    pub rows: AtomicUsize,
    state: Mutex<State>,
    /// Bumped by [`Graphs::clear`]: what a run or capture begun before it found is not kept.
    generation: AtomicU64,
    /// Blocks captured into graphs.
    pub captured: AtomicU64,
    /// Graph launches.
    pub replayed: AtomicU64,
    /// Captures spoiled by a copy to or from the host.
    pub spoiled: AtomicU64,
    /// Blocks left to run as they are for good: their captures were refused or spoiled too
    /// often.
    pub eager: AtomicU64,
}

#[derive(Default)]
struct State {
    blocks: HashMap<Key, Block>,
    io: HashMap<IoKey, Io>,
}

impl Graphs {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What the graphs did so far.
    pub fn counts(&self) -> GraphCounts {
        GraphCounts {
            captured: self.captured.load(Relaxed),
            replayed: self.replayed.load(Relaxed),
            spoiled: self.spoiled.load(Relaxed),
            eager: self.eager.load(Relaxed),
        }
    }

    /// Forgets every graph (their buffers are freed with them).
    pub fn clear(&self) {
        self.generation.fetch_add(1, Relaxed);
        let mut state = self.state();
        state.blocks.clear();
        state.io.clear();
    }

    /// Forgets model `model`'s graphs.
    pub fn forget(&self, model: u64) {
        self.state().blocks.retain(|key, _| key.0.model != model);
    }

    /// Keeps `block` as what `key` does next, unless the graphs were forgotten since
    /// `generation`.
    fn settle(&self, generation: u64, key: Key, block: Block) {
        let mut state = self.state();
        if self.generation.load(Relaxed) == generation {
            state.blocks.insert(key, block);
        }
    }
}

/// A block by its model and layer, rows and hidden width.
type Key = (BlockId, usize, usize);

/// The buffers of the graphs of one shape: rows, hidden width and, for a MoE layer's, the
/// step's counts' shape.
type IoKey = (usize, usize, Option<(usize, usize)>);

/// Spoiled captures after which a block runs as it is for good.
const SPOILED: u32 = 3;

enum Block {
    /// Copied to or from the host when it last ran; `spoiled`: its captures spoiled so far.
    Copied {
        spoiled: u32,
    },
    /// Last ran copying nothing to or from the host; captured the next time. `load`: the shape
    /// of the step's counts, for a block given them.
    Seen {
        load: Option<(usize, usize)>,
        spoiled: u32,
    },
    /// Runs as it is.
    Eager,
    Recorded(Recorded),
}

/// What [`Cuda::graphed_block`] does with a block, decided under the lock.
enum Next {
    Replay,
    Eager,
    Run { spoiled: u32 },
    Capture { io: IoKey, spoiled: u32 },
}

/// The rows a graph updates in place, and the counts it adds up (zeroed at its start, added to
/// the step's after each launch).
struct Io {
    h: CudaTensor,
    load: Option<CudaTensor>,
}

/// A captured block.
struct Recorded {
    graph: Graph,
    io: IoKey,
    /// Buffers of the lane's upload caches the graph reads, held for as long as it lives.
    kept: Vec<Arc<dyn Any + Send + Sync>>,
    ctx: Arc<CudaContext>,
}

/// What a capture gave.
enum Captured {
    Graph(Graph, Vec<Arc<dyn Any + Send + Sync>>),
    /// It asked for a copy to or from the host.
    Spoiled,
    /// The driver refused it, or it made counts of its own.
    Refused,
}

/// A graph, used only under [`Graphs`]' lock (or before it is shared).
struct Graph(CudaGraph);

// SAFETY: a CudaGraph is a pair of driver handles and its stream; the driver requires calls on
// one graph to be serialised, which the lock around every shared `Graph` does.
unsafe impl Send for Graph {}
unsafe impl Sync for Graph {}

impl Drop for Recorded {
    fn drop(&mut self) {
        // cudarc destroys the graph and frees the buffers without making the context current.
        let _ = self.ctx.bind_to_thread();
        self.kept.clear();
    }
}

/// On every way out of [`Cuda::capture`], a panic included: the upload caches copy again, and a
/// capture still open on the stream is ended and its graph dropped, so that nothing queued
/// after it is captured instead of run.
struct Open<'a>(&'a Cuda);

impl Drop for Open<'_> {
    fn drop(&mut self) {
        use cudarc::driver::result::{graph, stream};
        use cudarc::driver::sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
        let uploads = &self.0.uploads;
        uploads.capturing.store(false, Relaxed);
        uploads.spoiled.store(false, Relaxed);
        drop(uploads.take_kept());
        let cu_stream = self.0.stream.cu_stream();
        // SAFETY: the lane's own stream, alive as long as the lane.
        let open =
            |s| unsafe { stream::is_capturing(s) }.map(|st| st != CU_STREAM_CAPTURE_STATUS_NONE);
        if open(cu_stream).unwrap_or(true) {
            // SAFETY: as above; a graph returned here was never instantiated and is ours.
            if let Ok(g) = unsafe { stream::end_capture(cu_stream) }
                && !g.is_null()
            {
                let _ = unsafe { graph::destroy(g) };
            }
            if open(cu_stream).unwrap_or(true) && !std::thread::panicking() {
                panic!("sparsemoe-engine: CUDA graphs: the stream could not leave a capture");
            }
        }
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
        // One stream only (expert shards' lanes would need a capture across streams), and steps
        // whose products read their weights in place (longer ones copy to the host).
        let most = self.graphs.rows.load(Relaxed).min(self.in_place_limit());
        let wanted = (1..=most).contains(&h.rows) && self.graphs_unavailable().is_none();
        if !wanted {
            return block(h, load);
        }
        let key = (id, h.rows, h.cols);
        let generation = self.graphs.generation.load(Relaxed);
        let mut state = self.graphs.state();
        let next = match state.blocks.get(&key) {
            Some(Block::Recorded(_)) => Next::Replay,
            Some(Block::Eager) => Next::Eager,
            None => Next::Run { spoiled: 0 },
            Some(&Block::Copied { spoiled }) => Next::Run { spoiled },
            Some(&Block::Seen { load, spoiled }) => Next::Capture {
                io: (h.rows, h.cols, load),
                spoiled,
            },
        };
        match next {
            Next::Replay => {
                let State { blocks, io } = &mut *state;
                let Some(Block::Recorded(recorded)) = blocks.get(&key) else {
                    unreachable!("a recorded block")
                };
                let io = io
                    .get_mut(&recorded.io)
                    .expect("a graph's buffers live as long as it");
                self.replay(&recorded.graph, io, h, load);
            }
            Next::Eager => {
                drop(state);
                block(h, load);
            }
            Next::Run { spoiled } => {
                drop(state);
                let before = self.host_traffic();
                block(h, load);
                let next = match self.host_traffic() == before {
                    true => Block::Seen {
                        load: load.as_ref().map(|l| (l.rows, l.cols)),
                        spoiled,
                    },
                    false => Block::Copied { spoiled },
                };
                self.graphs.settle(generation, key, next);
            }
            Next::Capture {
                io: io_key,
                spoiled,
            } => {
                let mut io = match state.io.remove(&io_key) {
                    Some(io) => io,
                    None => Io {
                        // SAFETY: every launch copies the step's rows in before the graph
                        // reads them.
                        h: unsafe { self.uninit(io_key.0, io_key.1) },
                        load: io_key.2.map(|(r, c)| self.zeros(r, c)),
                    },
                };
                drop(state);
                let captured = self.capture(&mut io, block);
                let mut state = self.graphs.state();
                let current = self.graphs.generation.load(Relaxed) == generation;
                let next = match captured {
                    Captured::Graph(graph, kept) if current => {
                        self.graphs.captured.fetch_add(1, Relaxed);
                        self.replay(&graph, &mut io, h, load);
                        state.io.insert(io_key, io);
                        let recorded = Recorded {
                            graph,
                            io: io_key,
                            kept,
                            ctx: self.stream.context().clone(),
                        };
                        state.blocks.insert(key, Block::Recorded(recorded));
                        return;
                    }
                    Captured::Graph(..) => None, // recorded with settings since changed
                    Captured::Spoiled => {
                        self.graphs.spoiled.fetch_add(1, Relaxed);
                        Some(match spoiled + 1 < SPOILED {
                            true => Block::Copied {
                                spoiled: spoiled + 1,
                            },
                            false => Block::Eager,
                        })
                    }
                    Captured::Refused => Some(Block::Eager),
                };
                if let Some(next) = next.filter(|_| current) {
                    if matches!(next, Block::Eager) {
                        self.graphs.eager.fetch_add(1, Relaxed);
                    }
                    state.blocks.insert(key, next);
                }
                state.io.insert(io_key, io);
                drop(state);
                // Nothing captured ran: the block runs now as it is.
                block(h, load);
            }
        }
    }

    /// Copies to the device and back since the lane was made: a block with any runs as it is.
    fn host_traffic(&self) -> u64 {
        self.host_reads.load(Relaxed) + self.uploads.copies.load(Relaxed)
    }

    /// `block` captured over `io`, or why not.
    fn capture(&self, io: &mut Io, block: &mut MlpBlock<'_, CudaTensor>) -> Captured {
        let mode = CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        if let Err(e) = self.stream.begin_capture(mode) {
            eprintln!("sparsemoe-engine: CUDA graphs: a capture could not begin ({e:?})");
            return Captured::Refused;
        }
        let open = Open(self);
        self.uploads.capturing.store(true, Relaxed);
        if let Some(load) = io.load.as_mut() {
            ok(self.stream.memset_zeros(&mut load.buf), "zeroing counts");
        }
        let had_load = io.load.is_some();
        block(&mut io.h, &mut io.load);
        self.uploads.capturing.store(false, Relaxed);
        let spoiled = self.uploads.spoiled.swap(false, Relaxed);
        let kept = self.uploads.take_kept();
        // An error cudarc recorded in the capture (a refused free) would stop end_capture before
        // it ends the capture: taken here, it refuses the capture instead.
        let recorded = self
            .stream
            .context()
            .check_err()
            .map_err(|e| format!("{e:?}"));
        let ended = self
            .stream
            .end_capture(CUgraphInstantiate_flags(0))
            .map_err(|e| format!("{e:?}"))
            .and_then(|graph| graph.ok_or_else(|| "the capture was empty".to_string()));
        drop(open);
        if !had_load && io.load.is_some() {
            // Made in the capture, it belongs to a graph never launched: not freed here, where
            // the driver would refuse (this does not happen: the first run had counts then).
            std::mem::forget(io.load.take());
            return Captured::Refused;
        }
        match (ended, recorded) {
            (Ok(graph), Ok(())) if !spoiled => Captured::Graph(Graph(graph), kept),
            (Ok(_), Ok(())) => Captured::Spoiled,
            (Err(e), _) | (_, Err(e)) => {
                eprintln!(
                    "sparsemoe-engine: CUDA graphs: a capture failed ({e}); that block runs \
                     without a graph from now on"
                );
                Captured::Refused
            }
        }
    }

    /// One launch of `graph` for `h` through `io`, adding its counts to `load`.
    fn replay(
        &self,
        graph: &Graph,
        io: &mut Io,
        h: &mut CudaTensor,
        load: &mut Option<CudaTensor>,
    ) {
        let n = h.rows * h.cols;
        self.copy(
            &h.buf.slice(..n),
            &mut io.h.buf.slice_mut(..n),
            "copying rows into a graph",
        );
        ok(graph.0.launch(), "launching a CUDA graph");
        self.copy(
            &io.h.buf.slice(..n),
            &mut h.buf.slice_mut(..n),
            "copying rows out of a graph",
        );
        if let Some(counts) = &io.load {
            match load {
                Some(load) => self.add(load, counts),
                None => *load = Some(self.columns(counts, 0, counts.cols)),
            }
        }
        self.graphs.replayed.fetch_add(1, Relaxed);
    }
}
