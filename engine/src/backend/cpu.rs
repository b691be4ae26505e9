//! The CPU reference backend: float32 everywhere, weights converted from their stored dtype on
//! the fly, rayon across rows / heads / experts, `gemm` for the products.

use super::{
    AttentionForm, Backend, Expert, ExpertRows, MlaDims, MlaSeq, MlaWeights, NoPicks, Routing,
    by_expert,
};
use std::borrow::Cow;

use crate::error::{EngineError, Result};
use crate::expert_shards::Pair;
use crate::kv_cache::{FP8_BLOCK, KvDtype};
use crate::linalg::{axpy, dot, dots, for_each_chunk, index_scores, linear, map_range};
use crate::rope::{Rope, RopeLayout};
use crate::weights::{Matrix, f32_to_fp8_e4m3, fp8_e4m3_to_f32};

/// A sequence of an [`Backend::mla_attention`] call on this backend.
type Seq<'a> = MlaSeq<'a, CpuTensor, CpuStore>;

/// The sequence's latent and RoPE-key tensors: [`Cpu::mla_attention`] has gathered any
/// stores before it hands a sequence on.
fn cached_tensors<'a>(seq: &Seq<'a>) -> (&'a CpuTensor, &'a CpuTensor) {
    seq.cached
        .tensors()
        .expect("mla_attention gathers stores into tensors first")
}

/// A row-major `[rows, cols]` float32 tensor in host memory.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuTensor {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl CpuTensor {
    fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

/// Rows of a paged KV pool in host memory: float32, bf16 as its bits (half the bytes), or fp8
/// e4m3 codes with a float32 scale per [`FP8_BLOCK`] values of a row (powers of two with
/// `ue8m0`: [`KvDtype::Fp8Ue8m0`]).
#[derive(Clone, Debug, PartialEq)]
pub enum CpuStore {
    F32 {
        cols: usize,
        data: Vec<f32>,
    },
    Bf16 {
        cols: usize,
        data: Vec<u16>,
    },
    Fp8 {
        cols: usize,
        codes: Vec<u8>,
        scales: Vec<f32>,
        ue8m0: bool,
    },
}

impl CpuStore {
    fn cols(&self) -> usize {
        match self {
            Self::F32 { cols, .. } | Self::Bf16 { cols, .. } | Self::Fp8 { cols, .. } => *cols,
        }
    }

    fn rows(&self) -> usize {
        let values = match self {
            Self::F32 { data, .. } => data.len(),
            Self::Bf16 { data, .. } => data.len(),
            Self::Fp8 { codes, .. } => codes.len(),
        };
        values / self.cols().max(1)
    }
}

/// Every e4m3 code's value: reading an fp8 pool is a table lookup and a multiply.
static FP8_VALUES: std::sync::LazyLock<[f32; 256]> =
    std::sync::LazyLock::new(|| std::array::from_fn(|q| fp8_e4m3_to_f32(q as u8)));

/// The scale an fp8 block whose largest magnitude is `amax` takes: `amax` (at least 1e-4) over
/// 448, e4m3's largest; with `ue8m0` the power of two at or above that, as DeepSeek's
/// `act_quant` rounds it for a `scale_fmt: "ue8m0"` checkpoint (dividing by it is then exact).
pub fn fp8_scale(amax: f32, ue8m0: bool) -> f32 {
    let s = amax.max(1e-4) / 448.0;
    let bits = s.to_bits();
    if ue8m0 && bits & 0x007f_ffff != 0 {
        // Positive and normal (at least 1e-4 / 448): the next exponent, no mantissa.
        f32::from_bits((bits + 0x0080_0000) & 0x7f80_0000)
    } else {
        s
    }
}

/// A row as fp8: for each block of [`FP8_BLOCK`] values its scale ([`fp8_scale`]) and each
/// value's e4m3 code of `x / scale`.
pub fn fp8_row(row: &[f32], codes: &mut [u8], scales: &mut [f32], ue8m0: bool) {
    for ((block, codes), scale) in row
        .chunks(FP8_BLOCK)
        .zip(codes.chunks_mut(FP8_BLOCK))
        .zip(scales.iter_mut())
    {
        let amax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
        *scale = fp8_scale(amax, ue8m0);
        for (c, &x) in codes.iter_mut().zip(block) {
            *c = f32_to_fp8_e4m3(x / *scale);
        }
    }
}

/// Each `dim` values of `x` (a head of the indexer's queries) rounded as an fp8 pool rounds a
/// row of `dim` ([`fp8_row`]): to an e4m3 code times a scale per [`FP8_BLOCK`] values. With the
/// model's Hadamard rotation before (see `Model`), these are the values DeepSeek's fp8 indexer
/// multiplies (its `act_quant` of the rotated queries and keys), `ue8m0` as the pool's scales.
pub fn fp8_round_rows(x: &mut [f32], dim: usize, ue8m0: bool) {
    let mut codes = vec![0u8; dim];
    let mut scales = vec![0f32; dim.div_ceil(FP8_BLOCK)];
    let values = &*FP8_VALUES;
    for row in x.chunks_mut(dim) {
        fp8_row(row, &mut codes, &mut scales, ue8m0);
        for (i, (v, &c)) in row.iter_mut().zip(&codes).enumerate() {
            *v = values[c as usize] * scales[i / FP8_BLOCK];
        }
    }
}

/// The CPU backend (uses rayon's global pool).
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

impl Backend for Cpu {
    type Tensor = CpuTensor;
    type Weight = Matrix;
    type Store = CpuStore;
    type Picks = NoPicks;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        // On a pool thread the pass's sequential parts and its split loops share the pool's
        // threads; from outside, the caller would be one more thread competing for the cores.
        rayon::scope(|_| f())
    }

    fn batch_groups(&self, tokens: &[usize]) -> usize {
        // A pass over a batch is a few hundred small steps (products, norms, attention per
        // sequence, routing), and splitting each across the pool costs a wake-up and a join
        // apiece while leaving the other threads idle in the steps that do not split. With
        // enough tokens, one pass per thread over its share of the sequences keeps every
        // thread busy with no synchronisation at all; each share keeps at least
        // MIN_GROUP_TOKENS rows for the dense products (the routed experts see fewer, as they
        // would at that batch size). A sequence bigger than a fair share (a long prefill chunk)
        // makes its part run with its work free to split (see `Model::forward`).
        const MIN_GROUP_TOKENS: usize = 16;
        let total: usize = tokens.iter().sum();
        rayon::current_num_threads()
            .min(tokens.len())
            .min(total / MIN_GROUP_TOKENS)
            .max(1)
    }

    fn upload(&self, matrix: Matrix) -> Result<Matrix> {
        Ok(matrix)
    }

    fn tensor(&self, rows: usize, cols: usize, data: Vec<f32>) -> CpuTensor {
        assert_eq!(
            data.len(),
            rows * cols,
            "tensor data is not [{rows}, {cols}]"
        );
        CpuTensor { rows, cols, data }
    }

    fn to_host(&self, x: &CpuTensor) -> Vec<f32> {
        x.data.clone()
    }

    fn shape(&self, x: &CpuTensor) -> (usize, usize) {
        (x.rows, x.cols)
    }

    fn embed(&self, table: &Matrix, tokens: &[u32]) -> CpuTensor {
        let cols = table.cols;
        let mut data = vec![0f32; tokens.len() * cols];
        for (row, &t) in data.chunks_mut(cols).zip(tokens) {
            table.rows_f32(t as usize, row);
        }
        self.tensor(tokens.len(), cols, data)
    }

    fn linear(&self, x: &CpuTensor, w: &Matrix) -> CpuTensor {
        let mut y = vec![0f32; x.rows * w.rows];
        linear(&x.data, x.rows, w, &mut y);
        self.tensor(x.rows, w.rows, y)
    }

    fn rms_norm(&self, x: &CpuTensor, w: &CpuTensor, eps: f32) -> CpuTensor {
        let mut out = x.clone();
        for_each_chunk(&mut out.data, x.cols, x.data.len(), |_, row| {
            let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
            let inv = 1.0 / (mean_sq + eps).sqrt();
            for (v, g) in row.iter_mut().zip(&w.data) {
                *v = *v * inv * g;
            }
        });
        out
    }

    fn layer_norm(&self, x: &CpuTensor, w: &CpuTensor, b: &CpuTensor, eps: f32) -> CpuTensor {
        let mut out = x.clone();
        for_each_chunk(&mut out.data, x.cols, x.data.len(), |_, row| {
            let n = row.len() as f32;
            let mean = row.iter().sum::<f32>() / n;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
            let inv = 1.0 / (var + eps).sqrt();
            for ((v, g), bias) in row.iter_mut().zip(&w.data).zip(&b.data) {
                *v = (*v - mean) * inv * g + bias;
            }
        });
        out
    }

    fn add(&self, x: &mut CpuTensor, y: &CpuTensor) {
        assert_eq!((x.rows, x.cols), (y.rows, y.cols), "add: shapes differ");
        for (a, b) in x.data.iter_mut().zip(&y.data) {
            *a += b;
        }
    }

    fn columns(&self, x: &CpuTensor, start: usize, len: usize) -> CpuTensor {
        let mut data = Vec::with_capacity(x.rows * len);
        for r in 0..x.rows {
            data.extend_from_slice(&x.row(r)[start..start + len]);
        }
        self.tensor(x.rows, len, data)
    }

    fn rows(&self, x: &CpuTensor, start: usize, len: usize) -> CpuTensor {
        self.tensor(
            len,
            x.cols,
            x.data[start * x.cols..(start + len) * x.cols].to_vec(),
        )
    }

    fn concat_rows(&self, parts: &[&CpuTensor]) -> CpuTensor {
        let cols = parts.first().map_or(0, |p| p.cols);
        let mut data = Vec::with_capacity(parts.iter().map(|p| p.data.len()).sum());
        for p in parts {
            assert_eq!(p.cols, cols, "concat_rows: column counts differ");
            data.extend_from_slice(&p.data);
        }
        self.tensor(data.len() / cols.max(1), cols, data)
    }

    fn append_rows(&self, cache: &mut CpuTensor, rows: &CpuTensor) {
        assert_eq!(cache.cols, rows.cols, "append_rows: column counts differ");
        cache.data.extend_from_slice(&rows.data);
        cache.rows += rows.rows;
    }

    fn kv_store(&self, rows: usize, cols: usize, dtype: KvDtype) -> Result<CpuStore> {
        let n = rows
            .checked_mul(cols)
            .filter(|_| rows.checked_mul(dtype.row_bytes(cols)).is_some())
            .ok_or_else(|| {
                EngineError::input(format!(
                    "a KV store of {rows} rows of {cols} {} values does not fit in memory",
                    dtype.as_str()
                ))
            })?;
        // Zeroed allocations: the pages are mapped as the cache fills.
        Ok(match dtype {
            KvDtype::Float32 => CpuStore::F32 {
                cols,
                data: vec![0.0; n],
            },
            KvDtype::Bfloat16 => CpuStore::Bf16 {
                cols,
                data: vec![0; n],
            },
            KvDtype::Fp8 | KvDtype::Fp8Ue8m0 => CpuStore::Fp8 {
                cols,
                codes: vec![0; n],
                scales: vec![0.0; rows * cols.div_ceil(FP8_BLOCK)],
                ue8m0: dtype == KvDtype::Fp8Ue8m0,
            },
        })
    }

    fn kv_dtype(&self, store: &CpuStore) -> KvDtype {
        match store {
            CpuStore::F32 { .. } => KvDtype::Float32,
            CpuStore::Bf16 { .. } => KvDtype::Bfloat16,
            CpuStore::Fp8 { ue8m0: false, .. } => KvDtype::Fp8,
            CpuStore::Fp8 { ue8m0: true, .. } => KvDtype::Fp8Ue8m0,
        }
    }

    fn write_rows(&self, dst: &mut CpuStore, slots: &[usize], rows: &CpuTensor) {
        assert_eq!(rows.rows, slots.len(), "write_rows: one slot per row");
        assert_eq!(dst.cols(), rows.cols, "write_rows: column counts differ");
        match dst {
            CpuStore::F32 { cols, data } => {
                for (i, &slot) in slots.iter().enumerate() {
                    data[slot * *cols..(slot + 1) * *cols].copy_from_slice(rows.row(i));
                }
            }
            CpuStore::Bf16 { cols, data } => {
                for (i, &slot) in slots.iter().enumerate() {
                    let dst = &mut data[slot * *cols..(slot + 1) * *cols];
                    for (d, &x) in dst.iter_mut().zip(rows.row(i)) {
                        *d = half::bf16::from_f32(x).to_bits();
                    }
                }
            }
            CpuStore::Fp8 {
                cols,
                codes,
                scales,
                ue8m0,
            } => {
                let blocks = cols.div_ceil(FP8_BLOCK);
                for (i, &slot) in slots.iter().enumerate() {
                    fp8_row(
                        rows.row(i),
                        &mut codes[slot * *cols..(slot + 1) * *cols],
                        &mut scales[slot * blocks..(slot + 1) * blocks],
                        *ue8m0,
                    );
                }
            }
        }
    }

    fn gather_rows(&self, src: &CpuStore, slots: &[usize]) -> CpuTensor {
        let rows = src.rows();
        assert!(
            slots.iter().all(|&s| s < rows),
            "gather_rows: slot beyond the pool"
        );
        let (cols, data) = match src {
            CpuStore::F32 { cols, data } => {
                let mut out = Vec::with_capacity(slots.len() * cols);
                for &slot in slots {
                    out.extend_from_slice(&data[slot * cols..(slot + 1) * cols]);
                }
                (*cols, out)
            }
            CpuStore::Bf16 { cols, data } => {
                let mut out = Vec::with_capacity(slots.len() * cols);
                for &slot in slots {
                    out.extend(
                        data[slot * cols..(slot + 1) * cols]
                            .iter()
                            .map(|&b| half::bf16::from_bits(b).to_f32()),
                    );
                }
                (*cols, out)
            }
            CpuStore::Fp8 {
                cols,
                codes,
                scales,
                ..
            } => {
                let blocks = cols.div_ceil(FP8_BLOCK);
                let values = &*FP8_VALUES;
                let mut out = Vec::with_capacity(slots.len() * cols);
                for &slot in slots {
                    let row = &codes[slot * cols..(slot + 1) * cols];
                    let row_scales = &scales[slot * blocks..(slot + 1) * blocks];
                    for (block, &scale) in row.chunks(FP8_BLOCK).zip(row_scales) {
                        out.extend(block.iter().map(|&q| values[q as usize] * scale));
                    }
                }
                (*cols, out)
            }
        };
        self.tensor(slots.len(), cols, data)
    }

    fn rope(
        &self,
        x: &mut CpuTensor,
        heads: usize,
        head_width: usize,
        offset: usize,
        positions: &[usize],
        rope: &Rope,
        layout: RopeLayout,
    ) {
        let (cols, work) = (x.cols, x.data.len());
        for_each_chunk(&mut x.data, cols, work, |i, row| {
            let pos = positions[i];
            for h in 0..heads {
                let start = h * head_width + offset;
                rope.apply(&mut row[start..start + rope.dim()], pos, layout);
            }
        });
    }

    fn hadamard(&self, x: &mut CpuTensor, dim: usize) {
        assert!(
            dim.is_power_of_two() && x.cols.is_multiple_of(dim),
            "hadamard: {dim} does not divide rows of {}",
            x.cols
        );
        let (cols, work) = (x.cols, x.data.len());
        for_each_chunk(&mut x.data, cols, work, |_, row| {
            row.chunks_exact_mut(dim).for_each(crate::linalg::hadamard);
        });
    }

    fn indexer_select(
        &self,
        q: &CpuTensor,
        w: &CpuTensor,
        keys: &CpuTensor,
        positions: &[usize],
        k: usize,
        scale: f32,
    ) -> Vec<Vec<u32>> {
        let heads = w.cols;
        let dim = keys.cols;
        let work = |rows: usize, keys: usize| rows * keys * heads * dim;
        let visible_total: usize = positions.iter().map(|p| p + 1).sum();
        map_range(q.rows, work(1, visible_total), |i| {
            let visible = positions[i] + 1;
            if visible <= k {
                return (0..visible as u32).collect();
            }
            let qi = q.row(i);
            let wi = w.row(i);
            // Split the keys across threads too: a decode step has a single query row.
            let mut scores = vec![0f32; visible];
            let keys = &keys.data[..visible * dim];
            for_each_chunk(&mut scores, KEYS_PER_TASK, work(1, visible), |c, out| {
                let first = c * KEYS_PER_TASK;
                let block = &keys[first * dim..(first + out.len()) * dim];
                index_scores(qi, wi, block, scale, out);
            });
            let mut scored: Vec<(f32, u32)> = scores.into_iter().zip(0..visible as u32).collect();
            top_k(&mut scored, k)
        })
    }

    fn mla_attention(
        &self,
        q: &CpuTensor,
        seqs: &[Seq<'_>],
        weights: MlaWeights<'_, Matrix>,
        dims: MlaDims,
        scale: f32,
    ) -> CpuTensor {
        // This backend reads no store in place, so a paged cache hands it gathered rows; a
        // sequence that names stores all the same has the rows it can see gathered here.
        let gathered: Vec<_> = seqs.iter().map(|s| s.gather_stores(self)).collect();
        let seqs: Vec<Seq<'_>> = seqs
            .iter()
            .zip(&gathered)
            .map(|(s, g)| g.as_ref().map_or(*s, |(latent, k_pe)| s.over(latent, k_pe)))
            .collect();
        let width = dims.heads * dims.v;
        let mut out = vec![0f32; q.rows * width];
        let mut absorbed = Vec::new();
        for seq in &seqs {
            match seq.form {
                AttentionForm::Expanded => {
                    let n = seq.positions.len();
                    let y = mla_expanded(
                        self,
                        &self.rows(q, seq.first, n),
                        seq,
                        weights.kv_b,
                        dims,
                        scale,
                    );
                    out[seq.first * width..(seq.first + n) * width].copy_from_slice(&y);
                }
                AttentionForm::Absorbed => absorbed.push(seq),
            }
        }
        if !absorbed.is_empty() {
            mla_absorbed(q, &absorbed, weights, dims, scale, &mut out);
        }
        self.tensor(q.rows, width, out)
    }

    fn swiglu(&self, x: &CpuTensor, expert: &Expert<Matrix>) -> CpuTensor {
        let mut gate = self.linear(x, &expert.gate);
        let up = self.linear(x, &expert.up);
        for (g, u) in gate.data.iter_mut().zip(&up.data) {
            *g = silu(*g) * u;
        }
        self.linear(&gate, &expert.down)
    }

    fn moe_experts(
        &self,
        x: &CpuTensor,
        routing: &Routing,
        experts: &[Expert<Matrix>],
    ) -> CpuTensor {
        let groups = by_expert(routing.pairs(), experts.len());
        let macs: usize = groups
            .iter()
            .map(|(e, rows)| rows.len() * 3 * x.cols * experts[*e].gate.rows)
            .sum();
        // One expert per task; each expert's products then run on its task's thread.
        let outputs = map_range(groups.len(), macs, |g| {
            self.expert_output(x, &groups[g], experts)
        });
        self.combine(x, groups.iter().zip(&outputs))
    }

    fn moe_experts_sharded(
        &self,
        x: &CpuTensor,
        work: &[Vec<Pair>],
        experts: &[Expert<Matrix>],
    ) -> CpuTensor {
        // Shards as tasks on the pool, one each (the CPU stand-in for one GPU each); a shard
        // runs its experts one after another.
        let per_shard: Vec<(Vec<ExpertRows>, Vec<CpuTensor>)> =
            map_range(work.len(), usize::MAX, |s| {
                let groups = by_expert(work[s].iter().copied(), experts.len());
                let outputs = groups
                    .iter()
                    .map(|g| self.expert_output(x, g, experts))
                    .collect();
                (groups, outputs)
            });
        self.combine(
            x,
            per_shard
                .iter()
                .flat_map(|(groups, outputs)| groups.iter().zip(outputs)),
        )
    }
}

impl Cpu {
    /// One expert's SwiGLU over the rows of `x` routed to it (row `j` of the result is for
    /// `rows[j]`).
    fn expert_output(
        &self,
        x: &CpuTensor,
        (e, rows): &ExpertRows,
        experts: &[Expert<Matrix>],
    ) -> CpuTensor {
        let mut data = Vec::with_capacity(rows.len() * x.cols);
        for &(r, _) in rows {
            data.extend_from_slice(x.row(r));
        }
        self.swiglu(&self.tensor(rows.len(), x.cols, data), &experts[*e])
    }

    /// `Σ weight · output` per row of `x`, over every expert's rows and outputs.
    fn combine<'a>(
        &self,
        x: &CpuTensor,
        parts: impl Iterator<Item = (&'a ExpertRows, &'a CpuTensor)>,
    ) -> CpuTensor {
        let mut out = vec![0f32; x.rows * x.cols];
        for ((_, rows), y) in parts {
            for (j, &(r, wt)) in rows.iter().enumerate() {
                axpy(wt, y.row(j), &mut out[r * x.cols..(r + 1) * x.cols]);
            }
        }
        self.tensor(x.rows, x.cols, out)
    }
}

/// Keys one task of the indexer scores (a decode step's one query splits its keys).
const KEYS_PER_TASK: usize = 2048;

/// SiLU in float32.
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// The indices of the `k` largest scores (ties broken towards the lower index).
fn top_k(scored: &mut [(f32, u32)], k: usize) -> Vec<u32> {
    let cmp = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    if k < scored.len() {
        scored.select_nth_unstable_by(k - 1, cmp);
    }
    let mut chosen: Vec<u32> = scored[..k.min(scored.len())]
        .iter()
        .map(|&(_, s)| s)
        .collect();
    chosen.sort_unstable();
    chosen
}

/// Softmax of `scores` in place (float32, max-subtracted).
fn softmax(scores: &mut [f32]) {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    for s in scores.iter_mut() {
        *s /= sum;
    }
}

/// The expanded form for one sequence's rows `q`: per-head keys and values built from every
/// cached latent row, then ordinary attention.
fn mla_expanded(
    cpu: &Cpu,
    q: &CpuTensor,
    seq: &Seq<'_>,
    kv_b: &Matrix,
    d: MlaDims,
    scale: f32,
) -> Vec<f32> {
    let (latent, k_pe) = cached_tensors(seq);
    let kv = cpu.linear(latent, kv_b); // [T, heads·(nope+v)]
    let qk = d.nope + d.rope;
    let kv_width = d.nope + d.v;
    let n = q.rows;
    let mut out = vec![0f32; n * d.heads * d.v];
    let work = seq.keys() * d.heads * (qk + d.v);
    for_each_chunk(&mut out, d.v, work, |task, o| {
        let (i, h) = (task / d.heads, task % d.heads);
        let keys = seq.key_rows(i);
        let qrow = &q.row(i)[h * qk..(h + 1) * qk];
        let mut scores: Vec<f32> = keys
            .iter()
            .map(|&s| {
                let kvs = &kv.row(s)[h * kv_width..];
                (dot(&qrow[..d.nope], &kvs[..d.nope]) + dot(&qrow[d.nope..], k_pe.row(s))) * scale
            })
            .collect();
        softmax(&mut scores);
        for (&s, &p) in keys.iter().zip(&scores) {
            let v = &kv.row(s)[h * kv_width + d.nope..h * kv_width + kv_width];
            axpy(p, v, o);
        }
    });
    out
}

/// The absorbed form for the rows of several sequences at once, in three stages (the same as a
/// GPU runs them): every row's queries are taken into the latent space
/// (`q_lat,h = q_nope,h · W_UK,h`, one product per head over all rows); each row attends in
/// the latent space, all heads against the same cached rows at once (`ctx_h = Σ p_h,s ·
/// latent_s`); and the contexts leave it (`out_h = ctx_h · W_UV,hᵀ`, one product per head).
/// Writes the rows of `seqs` in `out` (`[rows of q, heads·v]`).
fn mla_absorbed(
    q: &CpuTensor,
    seqs: &[&Seq<'_>],
    w: MlaWeights<'_, Matrix>,
    d: MlaDims,
    scale: f32,
    out: &mut [f32],
) {
    let qk = d.nope + d.rope;
    let kv_width = d.nope + d.v;
    // Every row of `seqs`: its sequence and its index there.
    let row_of: Vec<(&Seq<'_>, usize)> = seqs
        .iter()
        .flat_map(|&s| (0..s.positions.len()).map(move |i| (s, i)))
        .collect();
    let n = row_of.len();
    let q_row = |r: usize| q.row(row_of[r].0.first + row_of[r].1);
    let lat_width = d.heads * d.latent;

    // Stage 1: q_lat [n, heads·latent].
    let per_head = per_head_products(
        d.heads,
        n,
        n * d.heads * d.nope * d.latent,
        |r, h| &q_row(r)[h * qk..h * qk + d.nope],
        |h| w.uk_t.rows_slice(h * d.latent..(h + 1) * d.latent),
    );
    let mut q_lat = vec![0f32; n * lat_width];
    for (h, y) in per_head.iter().enumerate() {
        for r in 0..n {
            q_lat[r * lat_width + h * d.latent..][..d.latent]
                .copy_from_slice(&y[r * d.latent..(r + 1) * d.latent]);
        }
    }

    // Stage 2: ctx [n, heads·latent]. A task is one row's heads, or, with fewer rows than
    // threads (a decode step of one sequence), a share of them.
    let keys: usize = seqs.iter().map(|s| s.keys()).sum();
    let work = keys * d.heads * (2 * d.latent + d.rope);
    let threads = rayon::current_num_threads();
    let chunks = if n < threads && crate::linalg::split(work) {
        (2 * threads).div_ceil(n).min(d.heads)
    } else {
        1
    };
    let per_chunk = d.heads.div_ceil(chunks);
    let tasks: Vec<(usize, std::ops::Range<usize>)> = (0..n)
        .flat_map(|r| {
            (0..d.heads)
                .step_by(per_chunk)
                .map(move |h| (r, h..(h + per_chunk).min(d.heads)))
        })
        .collect();
    let parts = map_range(tasks.len(), work, |t| {
        let (r, heads) = tasks[t].clone();
        let (seq, i) = row_of[r];
        let q_pe: Vec<f32> = heads
            .clone()
            .flat_map(|h| q_row(r)[h * qk + d.nope..(h + 1) * qk].iter().copied())
            .collect();
        let q_lat = &q_lat[r * lat_width + heads.start * d.latent..][..heads.len() * d.latent];
        latent_attention(seq, i, q_lat, &q_pe, d, scale)
    });
    // Tasks are in row order, heads ascending: their contexts concatenate into [n, heads·latent].
    let ctx: Vec<f32> = parts.concat();

    // Stage 3: out_h = ctx_h · W_UV,hᵀ.
    let per_head = per_head_products(
        d.heads,
        n,
        n * d.heads * d.v * d.latent,
        |r, h| &ctx[r * lat_width + h * d.latent..][..d.latent],
        |h| w.kv_b.rows_slice(h * kv_width + d.nope..(h + 1) * kv_width),
    );
    let width = d.heads * d.v;
    for (h, y) in per_head.iter().enumerate() {
        for (r, &(seq, i)) in row_of.iter().enumerate() {
            out[(seq.first + i) * width + h * d.v..][..d.v]
                .copy_from_slice(&y[r * d.v..(r + 1) * d.v]);
        }
    }
}

/// For every head `h`: the `n` rows `input(r, h)` times `weight(h)ᵀ`, as `[n, weight(h).rows]`
/// (the heads side by side on the pool when `work`, their multiply-adds, is large).
fn per_head_products<'a>(
    heads: usize,
    n: usize,
    work: usize,
    input: impl Fn(usize, usize) -> &'a [f32] + Sync,
    weight: impl Fn(usize) -> Matrix + Sync,
) -> Vec<Vec<f32>> {
    map_range(heads, work, |h| {
        let w = weight(h);
        let mut x = Vec::with_capacity(n * w.cols);
        for r in 0..n {
            x.extend_from_slice(input(r, h));
        }
        let mut y = vec![0f32; n * w.rows];
        linear(&x, n, &w, &mut y);
        y
    })
}

/// Row `i` of `seq` in the latent space for some heads: their scores against the same key
/// rows (`q_lat` `[heads, latent]`, `q_pe` `[heads, rope]`), a softmax per head, and the
/// softmax-weighted sums of the latent rows (returned, `[heads, latent]`).
fn latent_attention(
    seq: &Seq<'_>,
    i: usize,
    q_lat: &[f32],
    q_pe: &[f32],
    d: MlaDims,
    scale: f32,
) -> Vec<f32> {
    let heads = q_lat.len() / d.latent;
    let mut ctx = vec![0f32; heads * d.latent];
    let keys = seq.key_rows(i);
    let t = keys.len();
    if t == 0 {
        return ctx;
    }
    // The key rows side by side: read in place when they are the cache's first rows in order
    // (dense attention, or a paged cache's gathered rows), else copied together.
    let prefix = keys.iter().enumerate().all(|(j, &s)| s == j);
    let (cached_latent, cached_k_pe) = cached_tensors(seq);
    let (latent, k_pe): (Cow<'_, [f32]>, Cow<'_, [f32]>) = if prefix {
        (
            cached_latent.data[..t * d.latent].into(),
            cached_k_pe.data[..t * d.rope].into(),
        )
    } else {
        let mut lat = Vec::with_capacity(t * d.latent);
        let mut pe = Vec::with_capacity(t * d.rope);
        for &s in &keys {
            lat.extend_from_slice(cached_latent.row(s));
            pe.extend_from_slice(cached_k_pe.row(s));
        }
        (lat.into(), pe.into())
    };
    // Scores [t, heads]: the latent part and the RoPE part.
    let mut scores = vec![0f32; t * heads];
    let mut rope_scores = vec![0f32; t * heads];
    dots(q_lat, heads, d.latent, &latent, &mut scores);
    dots(q_pe, heads, d.rope, &k_pe, &mut rope_scores);
    let mut p = vec![0f32; t];
    for (h, c) in ctx.chunks_exact_mut(d.latent).enumerate() {
        for (s, ps) in p.iter_mut().enumerate() {
            *ps = (scores[s * heads + h] + rope_scores[s * heads + h]) * scale;
        }
        softmax(&mut p);
        for (s, &ps) in p.iter().enumerate() {
            axpy(ps, &latent[s * d.latent..(s + 1) * d.latent], c);
        }
    }
    ctx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{CachedRows, IndexerSeq, Selection, absorbed_query_weight};
    use crate::kv_cache::PagedRows;
    use crate::linalg::tests::pseudo_random;

    /// Two sequences with their own caches in one call, rows of `q` out of order, one row no
    /// sequence names: the absorbed form (batched over sequences and heads) gives what the
    /// expanded form gives, alone or mixed in one call, with f32 and bf16 `kv_b`, dense and
    /// with selections (in-place prefixes and scattered rows).
    #[test]
    fn absorbed_and_expanded_attention_agree() {
        let cpu = Cpu;
        let d = MlaDims {
            heads: 3,
            nope: 8,
            rope: 4,
            v: 6,
            latent: 10,
        };
        let qk = d.nope + d.rope;
        let cache = |t: usize, seed: u32| {
            (
                cpu.tensor(t, d.latent, pseudo_random(t * d.latent, seed)),
                cpu.tensor(t, d.rope, pseudo_random(t * d.rope, seed + 1)),
            )
        };
        let (lat_a, pe_a) = cache(9, 2);
        let (lat_b, pe_b) = cache(4, 7);
        let q = cpu.tensor(4, d.heads * qk, pseudo_random(4 * d.heads * qk, 1));
        let kv_f32 = pseudo_random(d.heads * (d.nope + d.v) * d.latent, 4);
        let bf16: Vec<u8> = kv_f32
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_bits().to_le_bytes())
            .collect();
        let rows = d.heads * (d.nope + d.v);
        let kv_bs = [
            Matrix::from_f32(rows, d.latent, kv_f32.clone()),
            Matrix::from_bytes(rows, d.latent, crate::weights::StoredType::Bf16, bf16),
        ];
        // Sequence a: rows 2 and 0 of q at positions 5 and 8; sequence b: row 3 at position 3.
        let (pos_a, pos_b) = ([5], [8]);
        let pos_ab = [5, 8];
        let scattered = vec![vec![0, 2, 5], vec![1, 3, 7, 8]];
        let prefix = vec![vec![0, 1, 2, 3]];
        for kv_b in &kv_bs {
            let uk_t = absorbed_query_weight(kv_b, d);
            let weights = MlaWeights { kv_b, uk_t: &uk_t };
            for (sel_a, sel_b) in [
                (None, None),
                (Some(scattered.as_slice()), Some(prefix.as_slice())),
            ] {
                let run = |forms: [AttentionForm; 3]| {
                    // a's first query row alone (row 2), a's second (row 0) with b's (row 3).
                    let seqs = [
                        MlaSeq {
                            first: 2,
                            cached: CachedRows::Tensors {
                                latent: &lat_a,
                                k_pe: &pe_a,
                            },
                            positions: &pos_a,
                            selection: sel_a.map(|s| Selection::Listed(&s[..1])),
                            rows: None,
                            form: forms[0],
                        },
                        MlaSeq {
                            first: 0,
                            cached: CachedRows::Tensors {
                                latent: &lat_a,
                                k_pe: &pe_a,
                            },
                            positions: &pos_b,
                            selection: sel_a.map(|s| Selection::Listed(&s[1..])),
                            rows: None,
                            form: forms[1],
                        },
                        MlaSeq {
                            first: 3,
                            cached: CachedRows::Tensors {
                                latent: &lat_b,
                                k_pe: &pe_b,
                            },
                            positions: &[3],
                            selection: sel_b.map(Selection::Listed),
                            rows: None,
                            form: forms[2],
                        },
                    ];
                    cpu.mla_attention(&q, &seqs, weights, d, 0.3)
                };
                use AttentionForm::{Absorbed as A, Expanded as E};
                let expanded = run([E, E, E]);
                // Row 1 is no sequence's: zero.
                let width = d.heads * d.v;
                assert!(expanded.data[width..2 * width].iter().all(|&x| x == 0.0));
                assert!(expanded.data.iter().any(|&x| x != 0.0));
                for forms in [[A, A, A], [A, E, A], [E, A, E]] {
                    let other = run(forms);
                    for (x, y) in expanded.data.iter().zip(&other.data) {
                        assert!((x - y).abs() < 1e-5, "{forms:?}: {x} vs {y}");
                    }
                }
                // Two rows of one sequence in one entry give the same as one entry each.
                let both = cpu.mla_attention(
                    &cpu.concat_rows(&[&cpu.rows(&q, 2, 1), &cpu.rows(&q, 0, 1)]),
                    &[MlaSeq {
                        first: 0,
                        cached: CachedRows::Tensors {
                            latent: &lat_a,
                            k_pe: &pe_a,
                        },
                        positions: &pos_ab,
                        selection: sel_a.map(Selection::Listed),
                        rows: None,
                        form: A,
                    }],
                    weights,
                    d,
                    0.3,
                );
                for (r, src) in [(0, 2), (1, 0)] {
                    for (x, y) in both.row(r).iter().zip(expanded.row(src)) {
                        assert!((x - y).abs() < 1e-5, "two rows: {x} vs {y}");
                    }
                }
            }
        }
    }

    /// A random float32 `kv_b` for `d` and its absorbed query weight.
    fn random_mla_weights(d: MlaDims, seed: u32) -> (Matrix, Matrix) {
        let kv_b = Matrix::from_f32(
            d.heads * (d.nope + d.v),
            d.latent,
            pseudo_random(d.heads * (d.nope + d.v) * d.latent, seed),
        );
        let uk_t = absorbed_query_weight(&kv_b, d);
        (kv_b, uk_t)
    }

    /// Cached rows handed over as a paged pool's stores (which this backend does not read in
    /// place) are gathered first: every KV dtype, both forms, dense and with a selection, give
    /// what the same rows gathered by the caller give.
    #[test]
    fn attention_over_stores_gathers_the_rows_it_sees() {
        let cpu = Cpu;
        let d = MlaDims {
            heads: 2,
            nope: 4,
            rope: 6,
            v: 5,
            latent: 12,
        };
        let qk = d.nope + d.rope;
        let (pool, tokens) = (20, 9);
        // Blocks of 2 rows, the sequence's scattered over the pool's 10.
        let blocks = [7, 2, 9, 0, 5];
        let table = PagedRows::new(&blocks, 2, tokens);
        let slots = table.rows(0..tokens);
        let (kv_b, uk_t) = random_mla_weights(d, 3);
        let weights = MlaWeights {
            kv_b: &kv_b,
            uk_t: &uk_t,
        };
        let q = cpu.tensor(2, d.heads * qk, pseudo_random(2 * d.heads * qk, 5));
        let positions = [8, 4];
        let picked = vec![vec![0, 3, 8], vec![1, 4]];
        for dtype in [
            KvDtype::Float32,
            KvDtype::Bfloat16,
            KvDtype::Fp8,
            KvDtype::Fp8Ue8m0,
        ] {
            let mut latent = cpu.kv_store(pool, d.latent, dtype).unwrap();
            let mut k_pe = cpu.kv_store(pool, d.rope, dtype.rope_keys()).unwrap();
            let rows = |cols, seed| cpu.tensor(tokens, cols, pseudo_random(tokens * cols, seed));
            cpu.write_rows(&mut latent, &slots, &rows(d.latent, 7));
            cpu.write_rows(&mut k_pe, &slots, &rows(d.rope, 8));
            let (lat_t, pe_t) = (
                cpu.gather_rows(&latent, &slots),
                cpu.gather_rows(&k_pe, &slots),
            );
            for form in [AttentionForm::Expanded, AttentionForm::Absorbed] {
                for selection in [None, Some(Selection::Listed(picked.as_slice()))] {
                    let seq = MlaSeq {
                        first: 0,
                        cached: CachedRows::Stores {
                            latent: &latent,
                            k_pe: &k_pe,
                        },
                        positions: &positions,
                        selection,
                        rows: Some(table),
                        form,
                    };
                    let gathered = seq.over(&lat_t, &pe_t);
                    let want = cpu.mla_attention(&q, &[gathered], weights, d, 0.4);
                    let got = cpu.mla_attention(&q, &[seq], weights, d, 0.4);
                    assert!(want.data.iter().any(|&x| x != 0.0));
                    assert_eq!(want.data, got.data, "{dtype:?} {form:?} {selection:?}");
                }
            }
        }
    }

    /// Under an fp8 pool the indexer scores the queries rounded as the pool rounds its keys
    /// (DeepSeek's fp8 indexer); under the others, the queries as they are. The query
    /// [1, 0.94] rounds to [1, 13/14] (421.1 of the scale's 448 is nearest the e4m3 code 416),
    /// so against the keys [0, 1] and [0.935, 0], which both pools keep close to exactly, the
    /// fp8 pool picks the second key and the others the first.
    #[test]
    fn an_fp8_pool_scores_the_rounded_queries() {
        let cpu = Cpu;
        let mut rounded = vec![1.0, 0.94];
        fp8_round_rows(&mut rounded, 2, false);
        assert_eq!(rounded, [1.0, 1.0 / 448.0 * 416.0]);
        let keys = cpu.tensor(2, 2, vec![0.0, 1.0, 0.935, 0.0]);
        let blocks = [1];
        let table = PagedRows::new(&blocks, 2, 2);
        let seq = IndexerSeq {
            first: 0,
            positions: &[1],
            table,
        };
        let (q, w) = (
            cpu.tensor(1, 2, vec![1.0, 0.94]),
            cpu.tensor(1, 1, vec![1.0]),
        );
        for (dtype, want) in [
            (KvDtype::Float32, 0),
            (KvDtype::Bfloat16, 0),
            (KvDtype::Fp8, 1),
        ] {
            let mut store = cpu.kv_store(4, 2, dtype).unwrap();
            cpu.write_rows(&mut store, &table.rows(0..2), &keys);
            assert_eq!(cpu.kv_dtype(&store), dtype);
            let picked = cpu.indexer_select_paged(&q, &w, &store, &[seq], 1, 1.0);
            assert_eq!(picked, [[[want]]], "{dtype:?}");
        }
    }

    /// UE8M0 scales: the power of two at or above the float scale (the float scale itself where
    /// it is one), so every code is `x / scale` rounded with no error in the division. A pool of
    /// them keeps those scales and reads back what [`fp8_round_rows`] makes of a row, which is
    /// what the indexer's queries are rounded with over it.
    #[test]
    fn ue8m0_pools_round_with_power_of_two_scales() {
        for amax in [0.0, 1e-9, 1e-4, 0.3, 1.0, 448.0, 448.0 * 8.0, 1000.0, 3.7e6] {
            let (float, pow2) = (fp8_scale(amax, false), fp8_scale(amax, true));
            assert_eq!(
                pow2.to_bits() & 0x007f_ffff,
                0,
                "{amax}: {pow2} not a power of two"
            );
            assert!(
                pow2 >= float && pow2 < 2.0 * float,
                "{amax}: {pow2} vs {float}"
            );
            if float.to_bits() & 0x007f_ffff == 0 {
                assert_eq!(pow2, float, "{amax}");
            }
        }
        let cpu = Cpu;
        let cols = 2 * FP8_BLOCK + 24; // a short last block
        let x = cpu.tensor(3, cols, pseudo_random(3 * cols, 11));
        let slots = [4, 0, 2];
        let stores = [KvDtype::Fp8, KvDtype::Fp8Ue8m0].map(|dtype| {
            let mut store = cpu.kv_store(5, cols, dtype).unwrap();
            cpu.write_rows(&mut store, &slots, &x);
            assert_eq!(cpu.kv_dtype(&store), dtype);
            store
        });
        let CpuStore::Fp8 { scales, .. } = &stores[1] else {
            panic!("an fp8 pool keeps codes and scales")
        };
        let written: Vec<f32> = slots
            .iter()
            .flat_map(|&s| &scales[s * 3..s * 3 + 3])
            .copied()
            .collect();
        assert!(
            written
                .iter()
                .all(|s| *s > 0.0 && s.to_bits() & 0x007f_ffff == 0)
        );
        let read = stores
            .each_ref()
            .map(|store| cpu.gather_rows(store, &slots).data);
        for (ue8m0, read) in [(false, &read[0]), (true, &read[1])] {
            let mut want = x.data.clone();
            fp8_round_rows(&mut want, cols, ue8m0);
            assert_eq!(read, &want, "ue8m0 {ue8m0}");
        }
        assert_ne!(read[0], read[1], "the two scale formats round alike");
    }

    /// A single decode row with enough keys to split: its heads go to several tasks (on a
    /// two-thread pool) and still give the expanded form's result.
    #[test]
    fn one_rows_heads_split_over_threads_agree_with_the_expanded_form() {
        let cpu = Cpu;
        let d = MlaDims {
            heads: 8,
            nope: 16,
            rope: 16,
            v: 16,
            latent: 64,
        };
        let t = 400;
        // Enough work that the absorbed form splits it (see `split`).
        assert!(t * d.heads * (2 * d.latent + d.rope) >= 1 << 18);
        let qk = d.nope + d.rope;
        let q = cpu.tensor(1, d.heads * qk, pseudo_random(d.heads * qk, 11));
        let latent = cpu.tensor(t, d.latent, pseudo_random(t * d.latent, 12));
        let k_pe = cpu.tensor(t, d.rope, pseudo_random(t * d.rope, 13));
        let (kv_b, uk_t) = random_mla_weights(d, 14);
        let weights = MlaWeights {
            kv_b: &kv_b,
            uk_t: &uk_t,
        };
        let run = |form| {
            let seq = MlaSeq {
                first: 0,
                cached: CachedRows::Tensors {
                    latent: &latent,
                    k_pe: &k_pe,
                },
                positions: &[t - 1],
                selection: None,
                rows: None,
                form,
            };
            cpu.mla_attention(&q, &[seq], weights, d, 0.2)
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let (absorbed, expanded) =
            pool.install(|| (run(AttentionForm::Absorbed), run(AttentionForm::Expanded)));
        for (x, y) in absorbed.data.iter().zip(&expanded.data) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
    }

    #[test]
    fn the_absorbed_query_weight_is_each_heads_w_uk_transposed() {
        let d = MlaDims {
            heads: 2,
            nope: 3,
            rope: 2,
            v: 4,
            latent: 5,
        };
        let kv = pseudo_random(d.heads * (d.nope + d.v) * d.latent, 9);
        let kv_b = Matrix::from_f32(d.heads * (d.nope + d.v), d.latent, kv.clone());
        let t = absorbed_query_weight(&kv_b, d);
        assert_eq!((t.rows, t.cols), (d.heads * d.latent, d.nope));
        let t = t.to_f32_vec();
        for h in 0..d.heads {
            for c in 0..d.nope {
                for j in 0..d.latent {
                    let src = kv[(h * (d.nope + d.v) + c) * d.latent + j];
                    assert_eq!(
                        t[(h * d.latent + j) * d.nope + c],
                        src,
                        "head {h} ({c}, {j})"
                    );
                }
            }
        }
    }

    #[test]
    fn top_k_keeps_the_largest_and_sorts_indices() {
        let mut scored = vec![(0.1, 0), (0.9, 1), (-2.0, 2), (0.5, 3), (0.9, 4)];
        assert_eq!(top_k(&mut scored, 3), vec![1, 3, 4]);
    }
}
