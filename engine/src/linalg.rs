//! Dense products on the CPU: `y = x · Wᵀ` for weights in any stored dtype.
//!
//! Products with many input rows (prefill) go to the `gemm` crate (cache-blocked, SIMD,
//! rayon): f32 weights directly, other dtypes converted a block of rows at a time into a
//! per-thread f32 buffer, so a bf16 model never needs an f32 copy of its weights. Products with
//! few input rows (decode batches, short prefill chunks) use a register-tiled kernel here
//! instead: each weight row is read (and bf16 widened, in registers) once per tile of input
//! rows, with nothing packed or converted in memory first, and the weight rows are split
//! across threads.

use gemm::Parallelism;
use rayon::prelude::*;

use crate::weights::Matrix;

/// Rows of a converted weight block (a multiple of the fp8 block size).
const BLOCK_ROWS: usize = 256;
/// At most this many input rows use the register-tiled path ([`tiled`]); more use `gemm`.
const TILED_MAX_ROWS: usize = 64;

/// Below this much work (multiply-adds, or element operations) a step of the forward pass runs
/// on the calling thread: handing it to the pool and waking the other threads costs more than
/// it saves. The demo model's ops, and most decode ops of small models, are this small.
const PARALLEL_MIN_WORK: usize = 1 << 18;

/// Whether `work` should be split across the rayon pool: not when it is small, and not when the
/// caller runs as one task of a split loop with at least as many items as threads (e.g. one
/// expert of a MoE layer with many experts in use), which keeps every thread busy already.
pub(crate) fn split(work: usize) -> bool {
    rayon::current_num_threads() > 1 && work >= PARALLEL_MIN_WORK && !IN_TASK.get()
}

thread_local! {
    /// Set while this thread runs one task of a split loop (see [`split`]).
    static IN_TASK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` as one task of a split loop: work it starts stays on this thread.
fn as_task<R>(f: impl FnOnce() -> R) -> R {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            IN_TASK.set(self.0);
        }
    }
    let _reset = Reset(IN_TASK.replace(true));
    f()
}

/// Runs item `f` of a split loop of `items` items: as a task that keeps its own work on this
/// thread when the loop alone has enough items to keep every thread busy, else free to split.
fn run_item<R>(items: usize, f: impl FnOnce() -> R) -> R {
    if items >= rayon::current_num_threads() {
        as_task(f)
    } else {
        f()
    }
}

/// `f(i, chunk)` for each `chunk_len`-long chunk of `data`: on the pool when [`split`]`(work)`.
pub(crate) fn for_each_chunk<T: Send>(
    data: &mut [T],
    chunk_len: usize,
    work: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    let chunk_len = chunk_len.max(1);
    // One chunk is not split: running it here leaves work it starts free to split.
    if data.len() > chunk_len && split(work) {
        let items = data.len().div_ceil(chunk_len);
        data.par_chunks_mut(chunk_len)
            .enumerate()
            .for_each(|(i, c)| run_item(items, || f(i, c)));
    } else {
        data.chunks_mut(chunk_len)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    }
}

/// `[f(0), …, f(n - 1)]`: on the pool when [`split`]`(work)`.
pub(crate) fn map_range<R: Send>(
    n: usize,
    work: usize,
    f: impl Fn(usize) -> R + Sync + Send,
) -> Vec<R> {
    if n > 1 && split(work) {
        (0..n)
            .into_par_iter()
            .map(|i| run_item(n, || f(i)))
            .collect()
    } else {
        (0..n).map(f).collect()
    }
}

/// `[f(p) for (p, _) in parts]`, the parts side by side on the pool. A part marked `true` runs
/// as one task (the work it starts stays on its thread); one marked `false` (a part much
/// bigger than the others) leaves its work free to split, so threads done with their own part
/// help with it.
pub(crate) fn map_parts<P: Send, R: Send>(
    parts: Vec<(P, bool)>,
    f: impl Fn(P) -> R + Sync + Send,
) -> Vec<R> {
    parts
        .into_par_iter()
        .map(|(p, keep)| if keep { as_task(|| f(p)) } else { f(p) })
        .collect()
}

fn parallelism(macs: usize) -> Parallelism {
    if split(macs) {
        Parallelism::Rayon(rayon::current_num_threads())
    } else {
        Parallelism::None
    }
}

thread_local! {
    /// Each thread's buffer for a block of converted weight rows, kept between products.
    static BLOCK: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
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
    if n <= TILED_MAX_ROWS {
        return tiled(x, n, w, y);
    }
    match w.as_f32() {
        Some(data) => gemm_f32(x, n, data, m, k, y, m, 0),
        None => {
            // The buffer is taken out, not borrowed: while this thread waits on the pool below
            // it may run another product (even another forward pass), which then gets a fresh
            // buffer instead of finding this one borrowed.
            let mut block = BLOCK.take();
            // Every element of the block is written by the conversion before it is read, and
            // the product overwrites `y` (it does not accumulate), so nothing needs zeroing.
            if block.len() < BLOCK_ROWS * k {
                block.resize(BLOCK_ROWS * k, 0.0);
            }
            let parallel = split(n * m * k);
            for first in (0..m).step_by(BLOCK_ROWS) {
                let rows = BLOCK_ROWS.min(m - first);
                let block = &mut block[..rows * k];
                let convert = |(i, chunk): (usize, &mut [f32])| w.rows_f32(first + i * 16, chunk);
                if parallel {
                    block.par_chunks_mut(k * 16).enumerate().for_each(convert);
                } else {
                    block.chunks_mut(k * 16).enumerate().for_each(convert);
                }
                gemm_f32(x, n, block, rows, k, y, m, first);
            }
            BLOCK.set(block);
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
            parallelism(n * m * k),
        );
    }
}

/// Weight rows as the tiled kernel reads them: f32 as stored, bf16 as stored (widened in
/// registers), or rows of another dtype converted to f32 first.
#[derive(Clone, Copy)]
enum Rows<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u8]),
}

/// `y = x · wᵀ` for few input rows, a block of at most 64 weight rows at a time (so a block
/// stays in cache while every group of input rows reads it). On one thread the kernel writes
/// `y` in place; split over the pool, each task computes its blocks' outputs for every input
/// row into whole rows of a transposed `yt`, which is then transposed into `y`.
fn tiled(x: &[f32], n: usize, w: &Matrix, y: &mut [f32]) {
    let (k, m) = (w.cols, w.rows);
    // Multiples of 8 weight rows, about 4 tasks a thread, at most 64 rows a task.
    let rows_per_task = (m / (rayon::current_num_threads() * 4)).clamp(8, 64) / 8 * 8;
    if !split(n * m * k) {
        // On this thread: straight into y (column `first + r` of every row).
        let mut buf = Vec::new();
        for first in (0..m).step_by(rows_per_task) {
            let rows = rows_per_task.min(m - first);
            let weights = weight_rows(w, &mut buf, first, rows);
            products_strided(x, n, k, weights, &mut y[first..], Layout::columns(rows, m));
        }
        return;
    }
    // Side by side: each task owns whole rows of the transposed output `yt` ([m, n]).
    let mut yt = vec![0f32; m * n];
    yt.par_chunks_mut(rows_per_task * n)
        .enumerate()
        .for_each_init(Vec::new, |buf, (task, out)| {
            as_task(|| {
                let first = task * rows_per_task;
                let rows = out.len() / n;
                products(x, n, k, weight_rows(w, buf, first, rows), out)
            })
        });
    for i in 0..n {
        for r in 0..m {
            y[i * m + r] = yt[r * n + i];
        }
    }
}

/// Weight rows `first..first + rows` of `w` as the tiled kernel reads them (other dtypes
/// converted into `buf`).
fn weight_rows<'a>(w: &'a Matrix, buf: &'a mut Vec<f32>, first: usize, rows: usize) -> Rows<'a> {
    let k = w.cols;
    if let Some(data) = w.as_f32() {
        Rows::F32(&data[first * k..(first + rows) * k])
    } else if let Some(bytes) = w.as_bf16_bytes() {
        Rows::Bf16(&bytes[2 * first * k..2 * (first + rows) * k])
    } else {
        buf.resize(rows * k, 0.0);
        w.rows_f32(first, buf);
        Rows::F32(buf)
    }
}

/// `out[r, i] = w[r] · x[i]` for every weight row `r` (`out.len() / n` of them) and input
/// row `i` of `x` (`[n, k]`).
fn products(x: &[f32], n: usize, k: usize, w: Rows, out: &mut [f32]) {
    let rows = out.len().checked_div(n).unwrap_or(0);
    products_strided(x, n, k, w, out, Layout::transposed(rows, n));
}

/// Where products go: `rows` weight rows, the product of weight row `r` and input row `i` at
/// `out[r · row_stride + i · col_stride]`.
#[derive(Clone, Copy, Debug)]
struct Layout {
    rows: usize,
    row_stride: usize,
    col_stride: usize,
}

impl Layout {
    /// `[rows, n]`: a weight row's products side by side.
    fn transposed(rows: usize, n: usize) -> Self {
        Self {
            rows,
            row_stride: n,
            col_stride: 1,
        }
    }

    /// Columns of an `[n, width]` output: an input row's products side by side.
    fn columns(rows: usize, width: usize) -> Self {
        Self {
            rows,
            row_stride: 1,
            col_stride: width,
        }
    }
}

/// `w[r] · x[i]` for the weight rows `r` and the rows `i` of `x` (`[n, k]`), written where
/// `layout` says; nothing else in `out` is touched.
fn products_strided(x: &[f32], n: usize, k: usize, w: Rows, out: &mut [f32], layout: Layout) {
    let Layout {
        rows,
        row_stride,
        col_stride,
    } = layout;
    assert_eq!(x.len(), n * k, "products: x is not [n, k]");
    match w {
        Rows::F32(w) => assert_eq!(w.len(), rows * k, "products: weights are not [rows, k]"),
        Rows::Bf16(w) => assert_eq!(w.len(), 2 * rows * k, "products: weights are not [rows, k]"),
    }
    if rows == 0 || n == 0 {
        return;
    }
    assert!(
        (rows - 1) * row_stride + (n - 1) * col_stride < out.len(),
        "products: out is too short for {rows} × {n} at strides {row_stride}, {col_stride}"
    );
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA; the shapes and the furthest write were
        // checked just above.
        return unsafe { x86::products(x, n, k, w, out, layout) };
    }
    products_portable(x, n, k, w, out, layout);
}

/// [`products_strided`] without SIMD intrinsics (CPUs without AVX2 + FMA, other
/// architectures).
fn products_portable(x: &[f32], n: usize, k: usize, w: Rows, out: &mut [f32], layout: Layout) {
    let Layout {
        rows,
        row_stride,
        col_stride,
    } = layout;
    let mut row = vec![0f32; k];
    for r in 0..rows {
        let wr: &[f32] = match w {
            Rows::F32(w) => &w[r * k..(r + 1) * k],
            Rows::Bf16(w) => {
                bf16_to_f32(&w[2 * r * k..2 * (r + 1) * k], &mut row);
                &row
            }
        };
        for i in 0..n {
            out[r * row_stride + i * col_stride] = dot_portable(wr, &x[i * k..(i + 1) * k]);
        }
    }
}

/// `out[r, i] = w[r] · x[i]` for every row `r` of the f32 rows `w` (`[out.len() / n, k]`) and
/// row `i` of `x` (`[n, k]`), on this thread: the tiled kernel for small products whose
/// "weights" are activations (attention scores of several heads against cached keys).
pub fn dots(x: &[f32], n: usize, k: usize, w: &[f32], out: &mut [f32]) {
    if n == 0 || out.is_empty() {
        return;
    }
    products(x, n, k, Rows::F32(w), out);
}

/// Whether the CPU has AVX2 and FMA (std caches the answer after the first call).
#[cfg(target_arch = "x86_64")]
#[inline]
fn avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// `a · b`. Uses AVX2 + FMA where the CPU has them (checked at run time, so one binary runs
/// on any x86-64), else a portable loop the compiler vectorises to the baseline SIMD width.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        return unsafe { x86::dot(a, b) };
    }
    dot_portable(a, b)
}

/// `y += alpha · x`.
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "axpy: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        return unsafe { x86::axpy(alpha, x, y) };
    }
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

/// The lightning indexer's scores of one query against a block of keys:
/// `out[s] = Σ_h w[h] · relu(scale · q[h] · keys[s])` with `q` `[heads, dim]`, `keys` `[n, dim]`.
pub fn index_scores(q: &[f32], w: &[f32], keys: &[f32], scale: f32, out: &mut [f32]) {
    let heads = w.len();
    let dim = q.len() / heads.max(1);
    assert_eq!(q.len(), heads * dim, "index_scores: q is not [heads, dim]");
    assert_eq!(
        keys.len(),
        out.len() * dim,
        "index_scores: keys is not [out.len(), dim]"
    );
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above); shapes checked above.
        return unsafe { x86::index_scores(q, w, keys, dim, scale, out) };
    }
    for (o, key) in out.iter_mut().zip(keys.chunks_exact(dim.max(1))) {
        *o = (0..heads)
            .map(|h| w[h] * (scale * dot_portable(&q[h * dim..(h + 1) * dim], key)).max(0.0))
            .sum();
    }
}

/// Rotates `v` (a power-of-two length) in place by the orthonormal Walsh–Hadamard matrix
/// `H / √n` (Sylvester's order), the fast way: log₂ n passes of sums and differences.
pub fn hadamard(v: &mut [f32]) {
    let n = v.len();
    assert!(
        n.is_power_of_two(),
        "hadamard: length {n} is not a power of two"
    );
    let mut h = 1;
    while h < n {
        for pair in v.chunks_exact_mut(2 * h) {
            let (a, b) = pair.split_at_mut(h);
            for (x, y) in a.iter_mut().zip(b) {
                (*x, *y) = (*x + *y, *x - *y);
            }
        }
        h *= 2;
    }
    let scale = (n as f32).sqrt().recip();
    v.iter_mut().for_each(|x| *x *= scale);
}

/// Little-endian bf16 bytes to f32 (`dst.len()` values from `2 · dst.len()` bytes).
pub fn bf16_to_f32(src: &[u8], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len() * 2, "bf16_to_f32: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above); lengths checked above.
        return unsafe { x86::bf16_to_f32(src, dst) };
    }
    for (o, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *o = bf16_le(b[0], b[1]);
    }
}

/// One little-endian bf16 value as f32 (bf16 is the top half of an f32).
#[inline]
fn bf16_le(lo: u8, hi: u8) -> f32 {
    f32::from_bits(u32::from(u16::from_le_bytes([lo, hi])) << 16)
}

/// Eight independent accumulators, so the compiler can keep them in one vector register.
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (a8, a_tail) = a.split_at(a.len() / 8 * 8);
    let (b8, b_tail) = b.split_at(a8.len());
    for (ca, cb) in a8.chunks_exact(8).zip(b8.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += ca[l] * cb[l];
        }
    }
    let tail: f32 = a_tail.iter().zip(b_tail).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must support AVX2 and FMA; `a` and `b` must have equal lengths.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut i = 0;
        // SAFETY (all loads): every offset read is below `n`, the length of both slices.
        unsafe {
            // Four accumulators hide the FMA latency; each covers 8 lanes.
            let mut acc = [_mm256_setzero_ps(); 4];
            while i + 32 <= n {
                for (j, acc) in acc.iter_mut().enumerate() {
                    let off = i + 8 * j;
                    *acc = _mm256_fmadd_ps(
                        _mm256_loadu_ps(pa.add(off)),
                        _mm256_loadu_ps(pb.add(off)),
                        *acc,
                    );
                }
                i += 32;
            }
            while i + 8 <= n {
                acc[0] = _mm256_fmadd_ps(
                    _mm256_loadu_ps(pa.add(i)),
                    _mm256_loadu_ps(pb.add(i)),
                    acc[0],
                );
                i += 8;
            }
            let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            let mut sum = hsum(v);
            while i < n {
                sum += *pa.add(i) * *pb.add(i);
                i += 1;
            }
            sum
        }
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA; `q` is `[w.len(), dim]`, `keys` `[out.len(), dim]`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn index_scores(
        q: &[f32],
        w: &[f32],
        keys: &[f32],
        dim: usize,
        scale: f32,
        out: &mut [f32],
    ) {
        for (o, key) in out.iter_mut().zip(keys.chunks_exact(dim.max(1))) {
            let mut score = 0.0;
            for (h, &wh) in w.iter().enumerate() {
                // SAFETY: same features as this function; both slices have length dim.
                let qk = unsafe { dot(&q[h * dim..(h + 1) * dim], key) };
                score += wh * (scale * qk).max(0.0);
            }
            *o = score;
        }
    }

    /// # Safety
    /// The CPU must support AVX2; `src` must hold `2 · dst.len()` bytes.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn bf16_to_f32(src: &[u8], dst: &mut [f32]) {
        let n = dst.len();
        let (ps, pd) = (src.as_ptr(), dst.as_mut_ptr());
        let mut i = 0;
        // SAFETY (all accesses): value i reads bytes 2i, 2i+1 < src.len() and writes dst[i], i < n.
        unsafe {
            while i + 8 <= n {
                _mm256_storeu_ps(pd.add(i), widen8(ps.add(2 * i)));
                i += 8;
            }
            while i < n {
                *pd.add(i) = super::bf16_le(*ps.add(2 * i), *ps.add(2 * i + 1));
                i += 1;
            }
        }
    }

    /// 8 little-endian bf16 values (16 bytes at `p`) as f32 lanes: a zero-extend and a shift.
    ///
    /// # Safety
    /// AVX2; 16 bytes at `p` are readable.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn widen8(p: *const u8) -> __m256 {
        // SAFETY: the caller guarantees the 16 bytes.
        unsafe {
            let halves = _mm_loadu_si128(p.cast());
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16))
        }
    }

    use super::{Layout, Rows};

    /// Weight rows of a stored dtype; [`Lanes::row`] picks one, the loads read it as f32.
    trait Lanes: Copy {
        /// # Safety
        /// AVX2 and FMA; values `t..t + 8` of the first row exist.
        unsafe fn load8(self, t: usize) -> __m256;
        /// # Safety
        /// Value `t` of the first row exists.
        unsafe fn get(self, t: usize) -> f32;
        /// The rows from `r` on.
        fn row(self, r: usize) -> Self;
    }

    #[derive(Clone, Copy)]
    struct F32Rows(*const f32, usize);

    #[derive(Clone, Copy)]
    struct Bf16Rows(*const u8, usize);

    impl Lanes for F32Rows {
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn load8(self, t: usize) -> __m256 {
            // SAFETY: the caller guarantees the 8 values exist.
            unsafe { _mm256_loadu_ps(self.0.add(t)) }
        }
        #[inline]
        unsafe fn get(self, t: usize) -> f32 {
            // SAFETY: the caller guarantees the value exists.
            unsafe { *self.0.add(t) }
        }
        fn row(self, r: usize) -> Self {
            Self(self.0.wrapping_add(r * self.1), self.1)
        }
    }

    impl Lanes for Bf16Rows {
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn load8(self, t: usize) -> __m256 {
            // SAFETY: the caller guarantees the 8 values (16 bytes) exist.
            unsafe { widen8(self.0.add(2 * t)) }
        }
        #[inline]
        unsafe fn get(self, t: usize) -> f32 {
            // SAFETY: the caller guarantees the value (2 bytes) exists.
            unsafe {
                let p = self.0.add(2 * t);
                super::bf16_le(*p, *p.add(1))
            }
        }
        fn row(self, r: usize) -> Self {
            Self(self.0.wrapping_add(2 * r * self.1), self.1)
        }
    }

    /// `w[r] · x[i]` written where `layout` says; see [`super::products_strided`].
    ///
    /// # Safety
    /// AVX2 and FMA; `x` is `[n, k]`, `w` holds `rows` rows of `k`, and `out` reaches
    /// `(rows - 1) · row_stride + (n - 1) · col_stride` of `layout`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn products(
        x: &[f32],
        n: usize,
        k: usize,
        w: Rows,
        out: &mut [f32],
        layout: Layout,
    ) {
        // SAFETY: forwarded from the caller.
        unsafe {
            match w {
                Rows::F32(w) => products_of(x, n, k, F32Rows(w.as_ptr(), k), out, layout),
                Rows::Bf16(w) => products_of(x, n, k, Bf16Rows(w.as_ptr(), k), out, layout),
            }
        }
    }

    /// Groups of 8, 4, 2 or 1 input rows (whatever is left), each against every weight row in
    /// turn: one weight row is one memory stream (several rows read side by side would be
    /// several streams, which on the machines measured halves the bandwidth of products bound
    /// by it, like an LM head or f32 weights at small batch), each chunk of it loaded once for
    /// all the group's input rows (which sit in L1 or L2, depending on k); the task's weight
    /// rows are re-read for later groups from the cache levels they fit in. Every group keeps
    /// 8 accumulators (enough independent FMAs to fill both FMA pipes), unrolling along k when
    /// it has fewer than 8 rows.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn products_of<W: Lanes>(
        x: &[f32],
        n: usize,
        k: usize,
        w: W,
        out: &mut [f32],
        Layout {
            rows,
            row_stride,
            col_stride,
        }: Layout,
    ) {
        let (px, po) = (x.as_ptr(), out.as_mut_ptr());
        let mut i = 0;
        // SAFETY (every call): rows i..i + R of x and row r of w exist; the writes are
        // out[r * row_stride + (i + j) * col_stride] for j < R, inside `out` (the caller's
        // bound).
        unsafe {
            while i < n {
                let group = match n - i {
                    8.. => 8,
                    4..=7 => 4,
                    2 | 3 => 2,
                    _ => 1,
                };
                let xi = px.add(i * k);
                for r in 0..rows {
                    let (wr, oi) = (w.row(r), po.add(r * row_stride + i * col_stride));
                    match group {
                        8 => tile::<8, 1, W>(xi, k, wr, oi, col_stride),
                        4 => tile::<4, 2, W>(xi, k, wr, oi, col_stride),
                        2 => tile::<2, 4, W>(xi, k, wr, oi, col_stride),
                        _ => tile::<1, 8, W>(xi, k, wr, oi, col_stride),
                    }
                }
                i += group;
            }
        }
    }

    /// `out[r · stride] = w · x[r]` for `r < R`, `w` the first row of `w`: `R × U`
    /// accumulators of 8 lanes, the weight row read once in chunks of `8 · U`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const R: usize, const U: usize, W: Lanes>(
        x: *const f32,
        k: usize,
        w: W,
        out: *mut f32,
        stride: usize,
    ) {
        // SAFETY: rows < R of x and row 0 of w have k values; the writes are out[r · stride]
        // for r < R.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); U]; R];
            let mut t = 0;
            while t + 8 * U <= k {
                for u in 0..U {
                    let wv = w.load8(t + 8 * u);
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let xv = _mm256_loadu_ps(x.add(r * k + t + 8 * u));
                        acc[u] = _mm256_fmadd_ps(xv, wv, acc[u]);
                    }
                }
                t += 8 * U;
            }
            while t + 8 <= k {
                let wv = w.load8(t);
                for (r, acc) in acc.iter_mut().enumerate() {
                    acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(r * k + t)), wv, acc[0]);
                }
                t += 8;
            }
            for (r, acc) in acc.iter().enumerate() {
                let mut v = acc[0];
                for a in &acc[1..] {
                    v = _mm256_add_ps(v, *a);
                }
                let mut sum = hsum(v);
                for tt in t..k {
                    sum += *x.add(r * k + tt) * w.get(tt);
                }
                *out.add(r * stride) = sum;
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let v = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
        let v = _mm_add_ss(v, _mm_shuffle_ps(v, v, 1));
        _mm_cvtss_f32(v)
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA; `x` and `y` must have equal lengths.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len();
        let (px, py) = (x.as_ptr(), y.as_mut_ptr());
        let mut i = 0;
        // SAFETY (all accesses): every offset is below `n`, the length of both slices.
        unsafe {
            let va = _mm256_set1_ps(alpha);
            while i + 8 <= n {
                let v = _mm256_fmadd_ps(va, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i)));
                _mm256_storeu_ps(py.add(i), v);
                i += 8;
            }
            while i < n {
                *py.add(i) += alpha * *px.add(i);
                i += 1;
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The fast transform is `H / √n` of Sylvester's matrix (`H[i][j] = (-1)^popcount(i & j)`),
    /// computed in float64 here, and it is its own inverse and keeps dot products.
    #[test]
    fn hadamard_is_sylvesters_orthonormal_rotation() {
        for n in [1, 2, 8, 128] {
            let x = pseudo_random(n, n as u32);
            let mut fast = x.clone();
            hadamard(&mut fast);
            for (i, &got) in fast.iter().enumerate() {
                let want: f64 = x
                    .iter()
                    .enumerate()
                    .map(|(j, &v)| {
                        v as f64
                            * if (i & j).count_ones() % 2 == 0 {
                                1.0
                            } else {
                                -1.0
                            }
                    })
                    .sum::<f64>()
                    / (n as f64).sqrt();
                assert!(
                    (got as f64 - want).abs() < 1e-5,
                    "n {n}, [{i}]: {got} vs {want}"
                );
            }
            let y = pseudo_random(n, 99);
            let mut ry = y.clone();
            hadamard(&mut ry);
            assert!((dot(&x, &y) - dot(&fast, &ry)).abs() < 1e-4 * n as f32);
            hadamard(&mut fast);
            for (a, b) in fast.iter().zip(&x) {
                assert!((a - b).abs() < 1e-5, "not its own inverse: {a} vs {b}");
            }
        }
    }

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
    fn index_scores_match_the_formula() {
        let (heads, dim, n) = (3, 20, 7);
        let q = pseudo_random(heads * dim, 6);
        let w = pseudo_random(heads, 7);
        let keys = pseudo_random(n * dim, 8);
        let mut got = vec![0.0; n];
        index_scores(&q, &w, &keys, 0.5, &mut got);
        for s in 0..n {
            let want: f64 = (0..heads)
                .map(|h| {
                    let qk: f64 = (0..dim)
                        .map(|d| q[h * dim + d] as f64 * keys[s * dim + d] as f64)
                        .sum();
                    w[h] as f64 * (0.5 * qk).max(0.0)
                })
                .sum();
            assert!(
                (got[s] as f64 - want).abs() < 1e-5,
                "key {s}: {} vs {want}",
                got[s]
            );
        }
    }

    #[test]
    fn bf16_conversion_is_exact_at_every_tail_length() {
        for len in [0, 1, 7, 8, 9, 17, 100] {
            let want: Vec<f32> = pseudo_random(len, 5)
                .iter()
                .map(|v| half::bf16::from_f32(*v).to_f32())
                .collect();
            let bytes: Vec<u8> = want
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect();
            let mut got = vec![f32::NAN; len];
            bf16_to_f32(&bytes, &mut got);
            assert_eq!(got, want, "len {len}");
        }
    }

    #[test]
    fn dot_and_axpy_match_plain_loops_at_every_tail_length() {
        for len in [0, 1, 7, 8, 9, 31, 32, 33, 64, 100, 513] {
            let a = pseudo_random(len, 3);
            let b = pseudo_random(len, 4);
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            let got = dot(&a, &b) as f64;
            assert!(
                (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                "dot len {len}: {got} vs {want}"
            );
            assert!((dot_portable(&a, &b) as f64 - want).abs() < 1e-4 * (1.0 + want.abs()));
            let mut y = b.clone();
            axpy(0.5, &a, &mut y);
            for (i, yi) in y.iter().enumerate() {
                assert!(
                    (yi - (b[i] + 0.5 * a[i])).abs() < 1e-6,
                    "axpy len {len} at {i}"
                );
            }
        }
    }

    #[test]
    fn gemm_and_tiled_paths_match_a_naive_product() {
        // Every input-row tail of the tiled kernel (1, 2, 3 after groups of 4), weight-row
        // tails (not a multiple of 8, or of the tile's 2 / 4 / 8), k tails (not a multiple
        // of 8), and the gemm path above TILED_MAX_ROWS.
        for (n, m, k) in [
            (1, 7, 5),
            (2, 9, 8),
            (3, 300, 33),
            (5, 13, 17),
            (6, 129, 37),
            (7, 31, 16),
            (8, 65, 64),
            (9, 513, 40),
            (17, 64, 1),
            (64, 24, 9),
            (65, 40, 24),
            // Above the split threshold: the pool's branches of both paths.
            (4, 700, 128),
            (24, 300, 96),
            (100, 300, 64),
        ] {
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
    fn tiled_kernel_and_portable_loop_agree_for_f32_and_bf16_rows() {
        for (n, rows, k) in [(1, 9, 7), (3, 8, 16), (4, 17, 33), (6, 5, 64), (13, 24, 9)] {
            let x = pseudo_random(n * k, 9);
            let (wv, bytes) = bf16_values(rows * k, 10);
            let want = naive(&x, n, &wv, rows, k); // [n, rows]
            for w in [Rows::F32(&wv), Rows::Bf16(&bytes)] {
                let mut fast = vec![f32::NAN; rows * n];
                let mut portable = vec![f32::NAN; rows * n];
                products(&x, n, k, w, &mut fast);
                products_portable(&x, n, k, w, &mut portable, Layout::transposed(rows, n));
                for r in 0..rows {
                    for i in 0..n {
                        let b = want[i * rows + r];
                        for (path, got) in [
                            ("tiled", fast[r * n + i]),
                            ("portable", portable[r * n + i]),
                        ] {
                            assert!(
                                (got - b).abs() < 1e-4 * (1.0 + b.abs()),
                                "{path} {n}x{rows}x{k} at ({r}, {i}): {got} vs {b}"
                            );
                        }
                    }
                }
                // Written in place into rows of a wider [n, rows + 3] output: the other
                // columns stay untouched (NaN).
                let width = rows + 3;
                let mut fast = vec![f32::NAN; n * width];
                let mut portable = vec![f32::NAN; n * width];
                let layout = Layout::columns(rows, width);
                products_strided(&x, n, k, w, &mut fast[2..], layout);
                products_portable(&x, n, k, w, &mut portable[2..], layout);
                for (path, got) in [("tiled", &fast), ("portable", &portable)] {
                    for i in 0..n {
                        for c in 0..width {
                            let v = got[i * width + c];
                            match c.checked_sub(2).filter(|&r| r < rows) {
                                Some(r) => {
                                    let b = want[i * rows + r];
                                    assert!(
                                        (v - b).abs() < 1e-4 * (1.0 + b.abs()),
                                        "{path} strided {n}x{rows}x{k} at ({i}, {r}): {v} vs {b}"
                                    );
                                }
                                None => assert!(v.is_nan(), "{path} strided wrote column {c}"),
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_weights_convert_blockwise() {
        // The tiled kernel (widening in registers, 6 and 12 rows), block conversion for gemm
        // (80 rows), below and above the split threshold, with row and k tails.
        for (n, m, k) in [
            (6, 600, 24),
            (12, 600, 24),
            (3, 37, 19),
            (6, 700, 128),
            (12, 700, 64),
            (80, 300, 24),
            (80, 130, 40),
        ] {
            bf16_case(n, m, k);
        }
    }

    /// `len` pseudo-random values rounded to bf16 (so every path sees identical values), as
    /// f32 and as little-endian bf16 bytes.
    fn bf16_values(len: usize, seed: u32) -> (Vec<f32>, Vec<u8>) {
        let values: Vec<f32> = pseudo_random(len, seed)
            .into_iter()
            .map(|v| f32::from_bits(v.to_bits() & 0xffff_0000))
            .collect();
        let bytes = values
            .iter()
            .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
            .collect();
        (values, bytes)
    }

    fn bf16_case(n: usize, m: usize, k: usize) {
        let x = pseudo_random(n * k, 3);
        let (wv, bytes) = bf16_values(m * k, 4);
        let w = Matrix::from_bytes(m, k, crate::weights::StoredType::Bf16, bytes);
        let mut y = vec![0.0; n * m];
        linear(&x, n, &w, &mut y);
        let want = naive(&x, n, &wv, m, k);
        for (a, b) in y.iter().zip(&want) {
            assert!(
                (a - b).abs() < 1e-4 * (1.0 + b.abs()),
                "{n}x{m}x{k}: {a} vs {b}"
            );
        }
        let mut y1 = vec![0.0; m];
        linear(&x[..k], 1, &w, &mut y1);
        for (a, b) in y1.iter().zip(&want[..m]) {
            assert!(
                (a - b).abs() < 1e-4 * (1.0 + b.abs()),
                "1x{m}x{k}: {a} vs {b}"
            );
        }
    }
}
