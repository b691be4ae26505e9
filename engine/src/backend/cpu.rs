//! The CPU reference backend: float32 everywhere, weights converted from their stored dtype on
//! the fly, rayon across rows / heads / experts, `gemm` for the products.

use super::{AttentionForm, Backend, Expert, MlaDims, Routing};
use crate::error::Result;
use crate::expert_shards::Pair;
use crate::linalg::{axpy, dot, for_each_chunk, index_scores, linear, map_range};
use crate::rope::{Rope, RopeLayout};
use crate::weights::Matrix;

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

/// The CPU backend (uses rayon's global pool).
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

impl Backend for Cpu {
    type Tensor = CpuTensor;
    type Weight = Matrix;

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

    fn write_rows(&self, dst: &mut CpuTensor, slots: &[usize], rows: &CpuTensor) {
        assert_eq!(dst.cols, rows.cols, "write_rows: column counts differ");
        for (i, &slot) in slots.iter().enumerate() {
            dst.data[slot * dst.cols..(slot + 1) * dst.cols].copy_from_slice(rows.row(i));
        }
    }

    fn gather_rows(&self, src: &CpuTensor, slots: &[usize]) -> CpuTensor {
        let mut data = Vec::with_capacity(slots.len() * src.cols);
        for &slot in slots {
            data.extend_from_slice(src.row(slot));
        }
        self.tensor(slots.len(), src.cols, data)
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
        latent: &CpuTensor,
        k_pe: &CpuTensor,
        kv_b: &Matrix,
        positions: &[usize],
        selection: Option<&[Vec<u32>]>,
        dims: MlaDims,
        scale: f32,
        form: AttentionForm,
    ) -> CpuTensor {
        let n = q.rows;
        let out = match form {
            AttentionForm::Expanded => mla_expanded(
                self, q, latent, k_pe, kv_b, positions, selection, dims, scale,
            ),
            AttentionForm::Absorbed => {
                mla_absorbed(q, latent, k_pe, kv_b, positions, selection, dims, scale)
            }
        };
        self.tensor(n, dims.heads * dims.v, out)
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
        let pairs = routing
            .experts
            .iter()
            .zip(&routing.weights)
            .enumerate()
            .flat_map(|(row, (ids, weights))| {
                ids.iter().zip(weights).map(move |(&expert, &weight)| Pair {
                    row,
                    expert,
                    weight,
                })
            });
        let groups = by_expert(pairs, experts.len());
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

/// One expert and the (row, weight) pairs routed to it.
type ExpertRows = (usize, Vec<(usize, f32)>);

/// `pairs` grouped by expert, in expert order (so each expert runs one product over all its
/// rows, and sums are added in a fixed order).
fn by_expert(pairs: impl Iterator<Item = Pair>, num_experts: usize) -> Vec<ExpertRows> {
    let mut rows_of: Vec<Vec<(usize, f32)>> = vec![Vec::new(); num_experts];
    for p in pairs {
        rows_of[p.expert].push((p.row, p.weight));
    }
    rows_of
        .into_iter()
        .enumerate()
        .filter(|(_, rows)| !rows.is_empty())
        .collect()
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

/// Keys query `i` may attend to.
fn visible_keys(i: usize, positions: &[usize], selection: Option<&[Vec<u32>]>) -> Vec<usize> {
    let pos = positions[i];
    match selection {
        Some(sel) => sel[i]
            .iter()
            .map(|&s| s as usize)
            .filter(|&s| s <= pos)
            .collect(),
        None => (0..=pos).collect(),
    }
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

#[allow(clippy::too_many_arguments)]
fn mla_expanded(
    cpu: &Cpu,
    q: &CpuTensor,
    latent: &CpuTensor,
    k_pe: &CpuTensor,
    kv_b: &Matrix,
    positions: &[usize],
    selection: Option<&[Vec<u32>]>,
    d: MlaDims,
    scale: f32,
) -> Vec<f32> {
    let kv = cpu.linear(latent, kv_b); // [T, heads·(nope+v)]
    let qk = d.nope + d.rope;
    let kv_width = d.nope + d.v;
    let n = q.rows;
    let mut out = vec![0f32; n * d.heads * d.v];
    let keys_total: usize = match selection {
        Some(sel) => sel.iter().map(Vec::len).sum(),
        None => positions.iter().map(|p| p + 1).sum(),
    };
    let work = keys_total * d.heads * (qk + d.v);
    for_each_chunk(&mut out, d.v, work, |task, o| {
        let (i, h) = (task / d.heads, task % d.heads);
        let keys = visible_keys(i, positions, selection);
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

#[allow(clippy::too_many_arguments)]
fn mla_absorbed(
    q: &CpuTensor,
    latent: &CpuTensor,
    k_pe: &CpuTensor,
    kv_b: &Matrix,
    positions: &[usize],
    selection: Option<&[Vec<u32>]>,
    d: MlaDims,
    scale: f32,
) -> Vec<f32> {
    let qk = d.nope + d.rope;
    let kv_width = d.nope + d.v;
    let n = q.rows;
    let mut out = vec![0f32; n * d.heads * d.v];
    let keys: usize = match selection {
        Some(sel) => sel.iter().map(Vec::len).sum(),
        None => positions.iter().map(|p| p + 1).sum(),
    };
    let work = d.heads * (keys * (d.latent + d.rope) * 2 + n * (d.nope + d.v) * d.latent);
    let per_head: Vec<Vec<f32>> = map_range(d.heads, work, |h| {
        // W_UK,h: rows [h·kv_width, +nope) of kv_b; W_UV,h: the next v rows. Both [·, latent].
        // f32 weights are read in place; other dtypes are converted once per head and step.
        let head_rows = kv_b.rows_slice(h * kv_width..(h + 1) * kv_width);
        let converted;
        let w_head: &[f32] = match head_rows.as_f32() {
            Some(rows) => rows,
            None => {
                converted = head_rows.to_f32_vec();
                &converted
            }
        };
        let (w_uk, w_uv) = w_head.split_at(d.nope * d.latent);
        let mut head_out = vec![0f32; n * d.v];
        for i in 0..n {
            let qrow = &q.row(i)[h * qk..(h + 1) * qk];
            // q_lat = W_UKᵀ · q_nope
            let mut q_lat = vec![0f32; d.latent];
            for (j, &qn) in qrow[..d.nope].iter().enumerate() {
                axpy(qn, &w_uk[j * d.latent..(j + 1) * d.latent], &mut q_lat);
            }
            let keys = visible_keys(i, positions, selection);
            let mut scores: Vec<f32> = keys
                .iter()
                .map(|&s| (dot(&q_lat, latent.row(s)) + dot(&qrow[d.nope..], k_pe.row(s))) * scale)
                .collect();
            softmax(&mut scores);
            let mut ctx = vec![0f32; d.latent];
            for (&s, &p) in keys.iter().zip(&scores) {
                axpy(p, latent.row(s), &mut ctx);
            }
            for j in 0..d.v {
                head_out[i * d.v + j] = dot(&w_uv[j * d.latent..(j + 1) * d.latent], &ctx);
            }
        }
        head_out
    });
    for (h, head_out) in per_head.iter().enumerate() {
        for i in 0..n {
            out[(i * d.heads + h) * d.v..(i * d.heads + h + 1) * d.v]
                .copy_from_slice(&head_out[i * d.v..(i + 1) * d.v]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::tests::pseudo_random;

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
        let t = 9;
        let q = cpu.tensor(2, d.heads * (d.nope + d.rope), pseudo_random(2 * 36, 1));
        let latent = cpu.tensor(t, d.latent, pseudo_random(t * d.latent, 2));
        let k_pe = cpu.tensor(t, d.rope, pseudo_random(t * d.rope, 3));
        let kv_b = Matrix::from_f32(
            d.heads * (d.nope + d.v),
            d.latent,
            pseudo_random(42 * 10, 4),
        );
        let positions = [5, 8];
        let selection = vec![vec![0, 2, 5], vec![1, 3, 7, 8]];
        for sel in [None, Some(selection.as_slice())] {
            let a = cpu.mla_attention(
                &q,
                &latent,
                &k_pe,
                &kv_b,
                &positions,
                sel,
                d,
                0.3,
                AttentionForm::Expanded,
            );
            let b = cpu.mla_attention(
                &q,
                &latent,
                &k_pe,
                &kv_b,
                &positions,
                sel,
                d,
                0.3,
                AttentionForm::Absorbed,
            );
            for (x, y) in a.data.iter().zip(&b.data) {
                assert!((x - y).abs() < 1e-5, "{x} vs {y}");
            }
        }
    }

    #[test]
    fn top_k_keeps_the_largest_and_sorts_indices() {
        let mut scored = vec![(0.1, 0), (0.9, 1), (-2.0, 2), (0.5, 3), (0.9, 4)];
        assert_eq!(top_k(&mut scored, 3), vec![1, 3, 4]);
    }
}
