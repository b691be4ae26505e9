//! The engine thread: owns the model and runs continuous batching. Requests arrive over a
//! channel; every step the scheduler drops cancelled sequences, gives each running decode one
//! token, fills the rest of the step's token budget with prefill chunks (so a long prompt never
//! stalls running decodes), admits waiting requests while KV blocks last, and preempts the
//! newest running sequence when a running one needs a block and none is free. A preempted
//! sequence keeps its sampler and generated tokens and is re-queued at the front; it recomputes
//! its cache when it runs again, so nothing is lost.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::backend::Backend;
use crate::error::{EngineError, Result};
use crate::generate::FinishReason;
use crate::kv_cache::{BlockAllocator, BlockTable, KvDtype, SeqCache, SharedPool};
use crate::metrics::Metrics;
use crate::model::{LogitRows, Model, SeqStep};
use crate::sampling::{Sampler, SamplingParams, TokenLogprob, logprobs};
use rayon::prelude::*;

/// Scheduler limits.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Tokens one forward step processes at most (decodes + prefill chunks).
    pub max_batch_tokens: usize,
    /// Sequences running at once.
    pub max_running: usize,
    /// Requests accepted but not yet running; beyond it `submit` says `QueueFull`.
    pub max_waiting: usize,
    /// The longest sequence (prompt + output) a request may reach.
    pub max_context: usize,
    /// Share computed KV blocks between requests whose prompts start alike.
    pub prefix_caching: bool,
    /// How the KV pool stores its rows.
    pub kv_dtype: KvDtype,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_batch_tokens: 256,
            max_running: 64,
            max_waiting: 256,
            max_context: 4096,
            prefix_caching: true,
            kv_dtype: KvDtype::Float32,
        }
    }
}

/// One generation request.
#[derive(Debug)]
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub params: SamplingParams,
    /// Token ids that end generation (not emitted).
    pub stop_tokens: Vec<u32>,
    /// Tokens generated before a stop token may end the request (vLLM's `min_tokens`; the
    /// server likewise lets no stop string end within them).
    pub min_tokens: usize,
    /// `Some(n)`: report each token's logprob and the `n` most likely alternatives.
    pub logprobs: Option<usize>,
}

/// What the engine tells a request's owner.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Token {
        id: u32,
        logprob: Option<TokenLogprob>,
    },
    Finished {
        reason: FinishReason,
        prompt_tokens: usize,
        /// Tokens generated, the stop token that ended the output among them.
        completion_tokens: usize,
        /// The stop token's log-probability, when it ended the output and they were asked for
        /// (its text is never sent).
        stop_logprob: Option<TokenLogprob>,
    },
    Error(String),
}

/// Why a request was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitError {
    /// The waiting queue is full (HTTP 429).
    QueueFull,
    /// The engine is draining or stopped (HTTP 503).
    Unavailable,
}

/// Counters shared between the engine thread and the server.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Submitted and not yet finished (waiting + running); drain waits for it to reach 0.
    pub active: AtomicUsize,
    /// Submitted and not yet admitted to the running batch.
    pub waiting: AtomicUsize,
    pub running: AtomicUsize,
    /// KV blocks in use.
    pub used_blocks: AtomicUsize,
    pub total_blocks: AtomicUsize,
    /// Set when the engine thread has stopped (every handle gone, or a panic in a step).
    pub stopped: AtomicBool,
    /// Why the engine thread failed, when it did (a panic in a step: a device failure, which
    /// the backend's compute methods cannot return as an error).
    pub failure: std::sync::Mutex<Option<String>>,
}

impl EngineStats {
    /// Why the engine thread failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Marks the engine failed (logged): stopped first, so whoever sees the failure (`/health`)
    /// also sees the stop (`/ready`, `submit`).
    fn fail(&self, message: String) {
        eprintln!("sparsemoe-engine: the engine thread failed: {message}");
        self.stopped.store(true, Ordering::SeqCst);
        *self
            .failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(message);
    }
}

/// The message a panic carried.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic with no message".into())
}

/// Runs the engine loop `run`; a panic that escapes it (outside a step, which
/// [`Engine::run`] catches itself) is recorded as the engine's failure.
fn run_guarded(stats: &EngineStats, run: impl FnOnce()) {
    if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        stats.fail(panic_message(panic.as_ref()));
    }
    stats.stopped.store(true, Ordering::SeqCst);
}

struct Submission {
    request: GenerationRequest,
    events: UnboundedSender<Event>,
    arrived: Instant,
}

/// A cheap, cloneable handle to the engine thread.
#[derive(Clone, Debug)]
pub struct EngineHandle {
    tx: mpsc::Sender<Submission>,
    pub stats: Arc<EngineStats>,
    max_waiting: usize,
}

impl EngineHandle {
    /// Queues a request; its events arrive on the returned receiver. Dropping the receiver
    /// cancels the request (its slot and KV blocks are freed at the next step).
    pub fn submit(
        &self,
        request: GenerationRequest,
    ) -> Result<UnboundedReceiver<Event>, SubmitError> {
        let mut receivers = self.submit_all(vec![request])?;
        Ok(receivers.remove(0))
    }

    /// Queues several requests (the choices of one API request) all or none: when the queue
    /// has room for fewer, none is queued. Their events arrive on the receivers, in order.
    pub fn submit_all(
        &self,
        requests: Vec<GenerationRequest>,
    ) -> Result<Vec<UnboundedReceiver<Event>>, SubmitError> {
        if self.stats.stopped.load(Ordering::SeqCst) {
            return Err(SubmitError::Unavailable);
        }
        let n = requests.len();
        // Room for all n is taken in one step: a request that does not fit never holds room
        // another could have used.
        let reserved =
            self.stats
                .waiting
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |waiting| {
                    (waiting + n <= self.max_waiting).then_some(waiting + n)
                });
        if reserved.is_err() {
            return Err(SubmitError::QueueFull);
        }
        self.stats.active.fetch_add(n, Ordering::SeqCst);
        let mut receivers = Vec::with_capacity(n);
        for (sent, request) in requests.into_iter().enumerate() {
            let (events, rx) = unbounded_channel();
            let submission = Submission {
                request,
                events,
                arrived: Instant::now(),
            };
            if self.tx.send(submission).is_err() {
                // The engine thread is gone. The room of those not sent is given back; those
                // sent went with the thread, which may have counted some of them off already,
                // so theirs is left (the counters no longer matter once it has stopped).
                self.stats.waiting.fetch_sub(n - sent, Ordering::SeqCst);
                self.stats.active.fetch_sub(n - sent, Ordering::SeqCst);
                return Err(SubmitError::Unavailable);
            }
            receivers.push(rx);
        }
        Ok(receivers)
    }

    /// The most requests that may wait for a slot (`--max-queue`).
    pub fn queue_capacity(&self) -> usize {
        self.max_waiting
    }
}

struct Sequence<B: Backend> {
    events: UnboundedSender<Event>,
    sampler: Sampler,
    /// Prompt followed by the generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    max_tokens: usize,
    stop_tokens: Vec<u32>,
    min_tokens: usize,
    logprobs: Option<usize>,
    cache: SeqCache<B>,
    blocks: BlockTable,
    arrived: Instant,
    admitted: bool,
    last_token_at: Option<Instant>,
}

impl<B: Backend> Sequence<B> {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    fn pending(&self) -> usize {
        self.tokens.len() - self.cache.len()
    }

    fn cancelled(&self) -> bool {
        self.events.is_closed()
    }
}

/// Starts the engine thread with `model`, a KV pool of `blocks`, and `metrics`. Fails when the
/// pool cannot be allocated. `max_context` is cut to what the pool holds (a sequence alone
/// always fits, so one that waits for blocks waits only for older sequences to finish or give
/// them up), and a step takes at least one token of one sequence.
pub fn spawn<B: Backend>(
    model: Model<B>,
    blocks: BlockAllocator,
    config: SchedulerConfig,
    metrics: Arc<Metrics>,
) -> Result<EngineHandle> {
    let config = SchedulerConfig {
        max_context: config.max_context.min(blocks.capacity_tokens()),
        max_batch_tokens: config.max_batch_tokens.max(1),
        max_running: config.max_running.max(1),
        ..config
    };
    let pool = model.new_paged_pool(blocks.block_size(), blocks.total_blocks(), config.kv_dtype)?;
    let (tx, rx) = mpsc::channel();
    let stats = Arc::new(EngineStats::default());
    stats
        .total_blocks
        .store(blocks.total_blocks(), Ordering::SeqCst);
    let handle = EngineHandle {
        tx,
        stats: stats.clone(),
        max_waiting: config.max_waiting,
    };
    let engine = Engine {
        pool,
        model,
        blocks,
        config,
        metrics,
        stats: stats.clone(),
        rx,
        waiting: VecDeque::new(),
        running: Vec::new(),
    };
    std::thread::Builder::new()
        .name("sparsemoe-engine".into())
        .spawn(move || run_guarded(&stats, move || engine.run()))
        .map_err(|e| EngineError::Device(format!("spawning the engine thread: {e}")))?;
    Ok(handle)
}

struct Engine<B: Backend> {
    model: Model<B>,
    /// The paged KV store every sequence's cache lives in.
    pool: SharedPool<B>,
    blocks: BlockAllocator,
    config: SchedulerConfig,
    metrics: Arc<Metrics>,
    stats: Arc<EngineStats>,
    rx: mpsc::Receiver<Submission>,
    waiting: VecDeque<Sequence<B>>,
    running: Vec<Sequence<B>>,
}

impl<B: Backend> Engine<B> {
    fn run(mut self) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                // Idle: block until a request comes (or every handle is gone).
                match self.rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(s) => self.accept(s),
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
            while let Ok(s) = self.rx.try_recv() {
                self.accept(s);
            }
            // A panic in a step is a device failure (the backend's compute methods cannot
            // return errors): the engine cannot go on.
            let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step()));
            match stepped {
                Ok(Ok(())) => {}
                Ok(Err(message)) => {
                    // A model error fails the sequences of this step, not the engine.
                    for seq in self.running.drain(..) {
                        let _ = seq.events.send(Event::Error(message.clone()));
                        self.blocks.release(&mut { seq.blocks });
                        self.stats.active.fetch_sub(1, Ordering::SeqCst);
                    }
                }
                Err(panic) => {
                    self.fail(panic_message(panic.as_ref()));
                    return;
                }
            }
            self.publish();
        }
        self.stats.stopped.store(true, Ordering::SeqCst);
    }

    /// The engine failed: recorded (so `/health` and `/ready` answer 503 with why, and new
    /// requests are refused), and every request it holds, or that is still on its way in, ends
    /// with the reason.
    fn fail(&mut self, message: String) {
        self.stats.fail(message.clone());
        let error = format!("the engine failed: {message}");
        for seq in self.running.drain(..).chain(self.waiting.drain(..)) {
            let _ = seq.events.send(Event::Error(error.clone()));
        }
        while let Ok(s) = self.rx.try_recv() {
            let _ = s.events.send(Event::Error(error.clone()));
        }
        self.publish();
    }

    fn accept(&mut self, s: Submission) {
        // The server validates too; this keeps one bad request from failing a whole step.
        let vocab = self.model.config.vocab_size;
        let problem = if s.request.prompt.is_empty() {
            Some("the prompt is empty".to_string())
        } else if let Some(bad) = s.request.prompt.iter().find(|&&t| t as usize >= vocab) {
            Some(format!(
                "token id {bad} is out of range (vocabulary of {vocab})"
            ))
        } else if s.request.prompt.len() >= self.config.max_context {
            Some(format!(
                "the prompt has {} tokens; the context limit is {}",
                s.request.prompt.len(),
                self.config.max_context
            ))
        } else if s.request.max_tokens == 0 {
            Some("max_tokens must be at least 1".to_string())
        } else {
            None
        };
        if let Some(message) = problem {
            let _ = s.events.send(Event::Error(message));
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            self.stats.active.fetch_sub(1, Ordering::SeqCst);
            return;
        }
        let seq = Sequence {
            sampler: Sampler::new(s.request.params).with_prompt(&s.request.prompt),
            min_tokens: s.request.min_tokens,
            prompt_len: s.request.prompt.len(),
            tokens: s.request.prompt,
            max_tokens: s.request.max_tokens,
            stop_tokens: s.request.stop_tokens,
            logprobs: s.request.logprobs,
            cache: SeqCache::paged(self.pool.clone()),
            blocks: BlockTable::default(),
            events: s.events,
            arrived: s.arrived,
            admitted: false,
            last_token_at: None,
        };
        self.waiting.push_back(seq);
    }

    fn publish(&self) {
        // Waiting: accepted and never admitted (some still in the channel), plus preempted.
        let preempted = self.waiting.iter().filter(|s| s.admitted).count();
        let waiting = self.stats.waiting.load(Ordering::SeqCst) + preempted;
        self.metrics.requests_running.set(self.running.len() as i64);
        self.metrics.requests_waiting.set(waiting as i64);
        self.metrics.kv_cache_usage.set(self.blocks.usage());
        self.stats
            .running
            .store(self.running.len(), Ordering::SeqCst);
        self.stats.used_blocks.store(
            self.blocks.total_blocks() - self.blocks.free_blocks(),
            Ordering::SeqCst,
        );
    }

    fn finish(&mut self, mut seq: Sequence<B>) {
        self.blocks.release(&mut seq.blocks);
        if !seq.admitted {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        self.stats.active.fetch_sub(1, Ordering::SeqCst);
    }

    fn preempt(&mut self, index: usize) {
        let mut seq = self.running.remove(index);
        self.blocks.release(&mut seq.blocks);
        seq.cache = SeqCache::paged(self.pool.clone());
        self.metrics.preemptions.inc();
        self.waiting.push_front(seq);
    }

    /// One forward step. Returns an error message if the model failed.
    fn step(&mut self) -> Result<(), String> {
        // Cancelled requests leave first, freeing their blocks.
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].cancelled() {
                let seq = self.running.remove(i);
                self.finish(seq);
            } else {
                i += 1;
            }
        }
        let mut i = 0;
        while i < self.waiting.len() {
            if self.waiting[i].cancelled() {
                if let Some(seq) = self.waiting.remove(i) {
                    self.finish(seq);
                }
            } else {
                i += 1;
            }
        }

        // Plan: running sequences first (decodes, then unfinished prefills), in arrival order.
        let mut budget = self.config.max_batch_tokens;
        let mut plan: Vec<usize> = Vec::new(); // tokens per running index
        // The newest running sequence waits for blocks only older ones hold: nothing newer may
        // take what frees up before it does.
        let mut stalled = false;
        let mut i = 0;
        while i < self.running.len() {
            let mut n = self.running[i].pending().min(budget);
            if n == 0 {
                plan.push(0);
                i += 1;
                continue;
            }
            let mut want = self.running[i].cache.len() + n;
            let mut fits = self.blocks.grow(&mut self.running[i].blocks, want);
            if !fits && n > 1 {
                // A prefill chunk takes what its blocks and the free ones hold rather than
                // preempt others (or itself, losing its progress) for the whole chunk.
                let seq = &self.running[i];
                let held = seq.blocks.blocks.len() + self.blocks.free_blocks();
                let room = (held * self.blocks.block_size()).saturating_sub(seq.cache.len());
                if room > 0 {
                    n = n.min(room);
                    want = seq.cache.len() + n;
                    fits = self.blocks.grow(&mut self.running[i].blocks, want);
                }
            }
            while !fits && self.running.len() > i + 1 {
                self.preempt(self.running.len() - 1);
                fits = self.blocks.grow(&mut self.running[i].blocks, want);
            }
            if !fits {
                // Only older sequences hold the blocks it needs (with max_context within the
                // pool, a sequence alone always fits): it keeps its own and skips this step
                // rather than give them back and start over, since its own request would be
                // first in line to take them again, recompute, and meet the same wall. An
                // older sequence that needs its blocks preempts it; when one finishes, it goes
                // on.
                plan.push(0);
                stalled = true;
                break;
            }
            plan.push(n);
            budget -= n;
            i += 1;
        }
        // One entry a running sequence: preemption only takes sequences not yet planned.
        debug_assert_eq!(plan.len(), self.running.len());

        // Admit waiting requests while the budget and the blocks last.
        while !stalled && budget > 0 && self.running.len() < self.config.max_running {
            let Some(front) = self.waiting.front_mut() else {
                break;
            };
            // A fresh (or preempted) sequence first shares the cached blocks of its prompt's
            // longest cached prefix; at least its last token is computed, for its logits.
            let shared = if self.config.prefix_caching && front.blocks.blocks.is_empty() {
                let lookup = &front.tokens[..front.tokens.len() - 1];
                let shared = self.blocks.share_prefix(&mut front.blocks, lookup);
                front.cache.start_after_shared_prefix(shared);
                Some((lookup.len(), shared))
            } else {
                None
            };
            let n = front.pending().min(budget);
            let want = front.cache.len() + n;
            if !self.blocks.grow(&mut front.blocks, want) {
                // It waits with nothing held; the lookup runs again next time.
                self.blocks.release(&mut front.blocks);
                front.cache = SeqCache::paged(self.pool.clone());
                break;
            }
            // Counted for new requests only: a preempted one coming back finds its own blocks.
            if let (Some((queried, hit)), false) = (shared, front.admitted) {
                self.metrics.prefix_cache_queries.inc_by(queried as u64);
                self.metrics.prefix_cache_hits.inc_by(hit as u64);
            }
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            if !seq.admitted {
                seq.admitted = true;
                self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
                self.metrics
                    .queue_time
                    .observe(seq.arrived.elapsed().as_secs_f64());
            }
            self.running.push(seq);
            plan.push(n);
            budget -= n;
        }
        if plan.iter().all(|&n| n == 0) {
            return Ok(());
        }

        // Run the step: each cache reads and writes the pool through its block table.
        for seq in &mut self.running {
            seq.cache.set_blocks(&seq.blocks.blocks);
        }
        let inputs: Vec<Vec<u32>> = self
            .running
            .iter()
            .zip(&plan)
            .map(|(s, &n)| s.tokens[s.cache.len()..s.cache.len() + n].to_vec())
            .collect();
        let mut steps: Vec<SeqStep<'_, B>> = self
            .running
            .iter_mut()
            .zip(&inputs)
            .filter(|(_, t)| !t.is_empty())
            .map(|(s, tokens)| SeqStep {
                tokens,
                cache: &mut s.cache,
                logits: LogitRows::Last,
            })
            .collect();
        let logits = self
            .model
            .forward(&mut steps, None)
            .map_err(|e| e.to_string())?;
        drop(steps);
        if self.config.prefix_caching {
            // Blocks this step filled can now serve other prompts.
            for seq in &mut self.running {
                self.blocks
                    .register(&mut seq.blocks, &seq.tokens, seq.cache.len());
            }
        }

        // Sample where a sequence's whole input is now cached (not after a mid-prefill chunk):
        // the draws (and logprobs) side by side over the rayon pool, as each reads a whole
        // vocabulary of logits; each sequence has its own random stream, so the order does not
        // matter.
        let now = Instant::now();
        let mut logits = logits.into_iter();
        let rows: Vec<Option<Vec<f32>>> = plan
            .iter()
            .enumerate()
            .map(|(index, &n)| {
                let row = if n == 0 { None } else { logits.next() };
                row.filter(|_| self.running[index].pending() == 0)
            })
            .collect();
        // Per running sequence: nothing to pick this step, its pick, or a faulty row.
        type Pick = Option<Result<(u32, Option<TokenLogprob>), ()>>;
        let picks: Vec<Pick> = self
            .running
            .iter_mut()
            .zip(&rows)
            .map(|(seq, row)| {
                let row = row.as_deref()?;
                // Until min_tokens are out, the stop tokens cannot be picked.
                let suppress: &[u32] = if seq.generated() < seq.min_tokens {
                    &seq.stop_tokens
                } else {
                    &[]
                };
                Some((&mut seq.sampler, suppress, seq.logprobs, row))
            })
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|job| {
                let (sampler, suppress, top, row) = job?;
                // A row with nothing to pick (every logit NaN or -inf) is a numeric fault, on
                // the device or in the weights; sampling it would emit token 0 until the end.
                if !row.iter().any(|&l| l > f32::NEG_INFINITY) {
                    return Some(Err(()));
                }
                let token = sampler.sample(row, suppress);
                Some(Ok((token, top.map(|top| logprobs(row, token, top)))))
            })
            .collect();
        let mut done = Vec::new();
        let mut faulted = Vec::new();
        for (index, pick) in picks.into_iter().enumerate() {
            let (token, logprob) = match pick {
                None => continue,
                Some(Ok(pick)) => pick,
                Some(Err(())) => {
                    faulted.push(index);
                    continue;
                }
            };
            let seq = &mut self.running[index];
            if seq.generated() == 0 && seq.last_token_at.is_none() {
                self.metrics
                    .time_to_first_token
                    .observe(now.duration_since(seq.arrived).as_secs_f64());
                self.metrics.prompt_tokens.inc_by(seq.prompt_len as u64);
            } else if let Some(last) = seq.last_token_at {
                self.metrics
                    .inter_token_latency
                    .observe(now.duration_since(last).as_secs_f64());
            }
            seq.last_token_at = Some(now);
            // A stop token is generated (and counted, as OpenAI and vLLM count it) but neither
            // sent nor kept in the sequence.
            let stop_token = seq.stop_tokens.contains(&token);
            let mut stop_logprob = None;
            let finish = if stop_token {
                self.metrics.generation_tokens.inc();
                stop_logprob = logprob;
                Some(FinishReason::Stop)
            } else {
                seq.tokens.push(token);
                self.metrics.generation_tokens.inc();
                if seq
                    .events
                    .send(Event::Token { id: token, logprob })
                    .is_err()
                {
                    None // cancelled; removed next step
                } else if seq.generated() >= seq.max_tokens
                    || seq.tokens.len() >= self.config.max_context
                {
                    Some(FinishReason::Length)
                } else {
                    None
                }
            };
            if let Some(reason) = finish {
                let _ = seq.events.send(Event::Finished {
                    reason,
                    prompt_tokens: seq.prompt_len,
                    completion_tokens: seq.generated() + usize::from(stop_token),
                    stop_logprob,
                });
                // (Its end-to-end latency is the server's to count, which also sees the
                // outputs a stop string ends: to the engine, cancellations.)
                done.push(index);
            }
        }
        // Every index once, in descending order, so that removals do not shift the rest.
        let mut ended: Vec<(usize, bool)> = done.into_iter().map(|i| (i, false)).collect();
        ended.extend(faulted.into_iter().map(|i| (i, true)));
        ended.sort_unstable_by_key(|&(index, _)| std::cmp::Reverse(index));
        for (index, fault) in ended {
            let mut seq = self.running.remove(index);
            if fault {
                let _ = seq.events.send(Event::Error(
                    "the model's output for this sequence had no usable logit (every one NaN \
                     or -inf): a numeric fault on the device or in the checkpoint's weights"
                        .into(),
                ));
                // Its cached rows may be as broken: no later request reuses them.
                self.blocks.discard(&mut seq.blocks);
            }
            self.finish(seq);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A handle whose engine thread is a channel the test holds (or has dropped).
    fn handle(max_waiting: usize) -> (EngineHandle, mpsc::Receiver<Submission>) {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(EngineStats::default());
        let handle = EngineHandle {
            tx,
            stats,
            max_waiting,
        };
        (handle, rx)
    }

    fn requests(n: usize) -> Vec<GenerationRequest> {
        (0..n)
            .map(|i| GenerationRequest {
                prompt: vec![2, 3 + i as u32],
                max_tokens: 4,
                params: SamplingParams::greedy(),
                stop_tokens: Vec::new(),
                min_tokens: 0,
                logprobs: None,
            })
            .collect()
    }

    #[test]
    fn a_requests_choices_are_queued_all_or_none() {
        let (engine, rx) = handle(4);
        let counts = |e: &EngineHandle| {
            (
                e.stats.waiting.load(Ordering::SeqCst),
                e.stats.active.load(Ordering::SeqCst),
            )
        };
        assert_eq!(engine.submit_all(requests(3)).map(|r| r.len()), Ok(3));
        assert_eq!(counts(&engine), (3, 3));
        // Room for one: two are refused together, and take nothing.
        assert_eq!(
            engine.submit_all(requests(2)).map(|r| r.len()),
            Err(SubmitError::QueueFull)
        );
        assert_eq!(counts(&engine), (3, 3));
        assert_eq!(engine.submit(requests(1).remove(0)).map(|_| ()), Ok(()));
        assert_eq!(counts(&engine), (4, 4));
        // Queued in order, each with its own events.
        let prompts: Vec<Vec<u32>> = rx.try_iter().map(|s| s.request.prompt).collect();
        assert_eq!(prompts, [vec![2, 3], vec![2, 4], vec![2, 5], vec![2, 3]]);

        // The engine thread gone: refused, and the room given back.
        let (engine, rx) = handle(4);
        drop(rx);
        assert_eq!(
            engine.submit_all(requests(2)).map(|r| r.len()),
            Err(SubmitError::Unavailable)
        );
        assert_eq!(counts(&engine), (0, 0));
    }
}
