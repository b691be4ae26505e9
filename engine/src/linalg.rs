//! Dense products on the CPU: `y = x · Wᵀ` for weights in any stored dtype.
//!
//! f32 weights go straight to the `gemm` crate (cache-blocked, SIMD, rayon). Other dtypes are
//! converted a block of rows at a time into a per-thread f32 buffer, so a bf16 model never
//! needs an f32 copy of its weights. Few-row products (decode) are matrix-vector work bound by
//! memory bandwidth; they split the weight rows across threads and convert on the fly.

use gemm::Parallelism;
use rayon::prelude::*;

use crate::weights::Matrix;

/// Rows of a converted weight block (a multiple of the fp8 block size).
const BLOCK_ROWS: usize = 256;
/// At most this many input rows use the matrix-vector path.
const GEMV_MAX_ROWS: usize = 4;

fn parallelism() -> Parallelism {
    match rayon::current_num_threads() {
        1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// `y[n, w.rows] = x[n, w.cols] · wᵀ`.
pub fn linear(x: &[f32], n: usize, w: &Matrix, y: &mut [f32]) {
    let (k, m) = (w.cols, w.rows);
    assert_eq!(x.len(), n * k, "linear: input is not [n, {k}]");
    assert_eq!(y.len(), n * m, "linear: output is not [n, {m}]");
    if n == 0 || m == 0 {
        return;
    }
    if k == 0 {
        y.fill(0.0);
        return;
    }
    if n <= GEMV_MAX_ROWS {
        return gemv(x, n, w, y);
    }
    match w.as_f32() {
        Some(data) => gemm_f32(x, n, data, m, k, y, m, 0),
        None => {
            y.par_chunks_mut(m).for_each(|row| row.fill(0.0));
            let mut block = vec![0f32; BLOCK_ROWS * k];
            for first in (0..m).step_by(BLOCK_ROWS) {
                let rows = BLOCK_ROWS.min(m - first);
                let block = &mut block[..rows * k];
                block
                    .par_chunks_mut(k * 16)
                    .enumerate()
                    .for_each(|(i, chunk)| w.rows_f32(first + i * 16, chunk));
                gemm_f32(x, n, block, rows, k, y, m, first);
            }
        }
    }
}

/// `y[:, col0..col0+m] = x · wᵀ` with `w` an f32 `[m, k]` block and `y` row stride `y_stride`.
#[allow(clippy::too_many_arguments)]
fn gemm_f32(
    x: &[f32],
    n: usize,
    w: &[f32],
    m: usize,
    k: usize,
    y: &mut [f32],
    y_stride: usize,
    col0: usize,
) {
    assert!(w.len() >= m * k && x.len() >= n * k && y.len() >= (n - 1) * y_stride + col0 + m);
    // SAFETY: the asserts above bound every index the strides reach: dst is n×m at
    // y[col0 + i*y_stride + j], lhs is x as n×k row-major, rhs is wᵀ (k×m) read from w's
    // row-major [m, k] storage with column stride k and row stride 1.
    unsafe {
        gemm::gemm(
            n,
            m,
            k,
            y.as_mut_ptr().add(col0),
            1,
            y_stride as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism(),
        );
    }
}

fn gemv(x: &[f32], n: usize, w: &Matrix, y: &mut [f32]) {
    let (k, m) = (w.cols, w.rows);
    let rows_per_task = (m / (rayon::current_num_threads() * 4)).clamp(1, 64);
    let mut yt = vec![0f32; m * n]; // [m, n]: each task owns whole output rows
    yt.par_chunks_mut(rows_per_task * n)
        .enumerate()
        .for_each_init(Vec::new, |buf: &mut Vec<f32>, (task, out)| {
            let first = task * rows_per_task;
            let rows = out.len() / n;
            let weights: &[f32] = match w.as_f32() {
                Some(data) => &data[first * k..(first + rows) * k],
                None => {
                    buf.resize(rows * k, 0.0);
                    w.rows_f32(first, buf);
                    buf
                }
            };
            for r in 0..rows {
                let wr = &weights[r * k..(r + 1) * k];
                for i in 0..n {
                    out[r * n + i] = dot(wr, &x[i * k..(i + 1) * k]);
                }
            }
        });
    for i in 0..n {
        for r in 0..m {
            y[i * m + r] = yt[r * n + i];
        }
    }
}

/// Dot product with eight independent accumulators (lets the compiler vectorise).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        sum += a[i] * b[i];
    }
    sum
}

/// `y += alpha · x`.
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn naive(x: &[f32], n: usize, w: &[f32], m: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0.0; n * m];
        for i in 0..n {
            for j in 0..m {
                y[i * m + j] = (0..k).map(|t| x[i * k + t] * w[j * k + t]).sum();
            }
        }
        y
    }

    /// Deterministic values in [-0.5, 0.5) for tests (no RNG crate needed).
    pub(crate) fn pseudo_random(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }

    #[test]
    fn gemm_and_gemv_paths_match_a_naive_product() {
        for (n, m, k) in [(1, 7, 5), (3, 300, 33), (9, 513, 40), (17, 64, 1)] {
            let x = pseudo_random(n * k, 1);
            let wv = pseudo_random(m * k, 2);
            let w = Matrix::from_f32(m, k, wv.clone());
            let mut y = vec![0.0; n * m];
            linear(&x, n, &w, &mut y);
            let want = naive(&x, n, &wv, m, k);
            for (a, b) in y.iter().zip(&want) {
                assert!((a - b).abs() < 1e-4, "{n}x{m}x{k}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn bf16_weights_convert_blockwise() {
        let (n, m, k) = (6, 600, 24);
        let x = pseudo_random(n * k, 3);
        // Round the weights to bf16 so the two paths see identical values.
        let wv: Vec<f32> = pseudo_random(m * k, 4)
            .into_iter()
            .map(|v| f32::from_bits(v.to_bits() & 0xffff_0000))
            .collect();
        let bytes: Vec<u8> = wv
            .iter()
            .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
            .collect();
        let w = Matrix::from_bytes(m, k, crate::weights::StoredType::Bf16, bytes);
        let mut y = vec![0.0; n * m];
        linear(&x, n, &w, &mut y);
        let want = naive(&x, n, &wv, m, k);
        for (a, b) in y.iter().zip(&want) {
            assert!((a - b).abs() < 1e-4);
        }
        let mut y1 = vec![0.0; m];
        linear(&x[..k], 1, &w, &mut y1);
        for (a, b) in y1.iter().zip(&want[..m]) {
            assert!((a - b).abs() < 1e-4);
        }
    }
}
