//! Safetensors checkpoints, memory-mapped: tensors stay in the page cache in their stored
//! dtype (f32, bf16, f16, fp8 e4m3 with 128×128 block scales) and are converted to f32 row by
//! row when used, so resident memory stays near the checkpoint size.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::{EngineError, Result};

/// Block edge of DeepSeek's fp8 weight scales (`weight_scale_inv` is `[ceil(rows/128), ceil(cols/128)]`).
pub const FP8_BLOCK: usize = 128;

/// Stored element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoredType {
    F32,
    Bf16,
    F16,
    F8E4M3,
}

impl StoredType {
    fn from_safetensors(dtype: Dtype) -> Option<Self> {
        match dtype {
            Dtype::F32 => Some(Self::F32),
            Dtype::BF16 => Some(Self::Bf16),
            Dtype::F16 => Some(Self::F16),
            Dtype::F8_E4M3 => Some(Self::F8E4M3),
            _ => None,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::Bf16 | Self::F16 => 2,
            Self::F8E4M3 => 1,
        }
    }
}

/// Bytes of one tensor inside a mapped file.
#[derive(Clone)]
pub struct Blob {
    map: Arc<Mmap>,
    range: Range<usize>,
}

impl std::fmt::Debug for Blob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Blob({} bytes)", self.range.len())
    }
}

impl Blob {
    pub fn bytes(&self) -> &[u8] {
        &self.map[self.range.clone()]
    }

    fn slice(&self, range: Range<usize>) -> Self {
        Self {
            map: self.map.clone(),
            range: self.range.start + range.start..self.range.start + range.end,
        }
    }
}

/// A weight matrix `[rows, cols]` (row-major, `Linear` layout `[out, in]`) in its stored dtype.
#[derive(Clone, Debug)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub dtype: StoredType,
    blob: Blob,
    /// fp8 only: `[ceil(rows/128), ceil(cols/128)]` dequantisation multipliers; the first row of
    /// this matrix is row `scale_row_offset` of the scale grid's weight.
    fp8_scales: Option<Arc<Vec<f32>>>,
    scale_row_offset: usize,
    scale_cols: usize,
}

impl Matrix {
    /// A matrix that owns f32 data (tests, converted weights).
    pub fn from_f32(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        assert_eq!(data.len(), rows * cols, "matrix data length");
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        Self::from_bytes(rows, cols, StoredType::F32, bytes)
    }

    /// A matrix that owns little-endian data of a 16- or 32-bit type.
    pub fn from_bytes(rows: usize, cols: usize, dtype: StoredType, bytes: Vec<u8>) -> Self {
        assert_ne!(dtype, StoredType::F8E4M3, "fp8 matrices need scales");
        assert_eq!(
            bytes.len(),
            rows * cols * dtype.size(),
            "matrix data length"
        );
        // An anonymous map is page-aligned, so f32 data is always castable.
        let mut map = memmap2::MmapMut::map_anon(bytes.len().max(1)).expect("anonymous map");
        map[..bytes.len()].copy_from_slice(&bytes);
        let map = Arc::new(map.make_read_only().expect("read-only map"));
        Self {
            rows,
            cols,
            dtype,
            blob: Blob {
                map,
                range: 0..bytes.len(),
            },
            fp8_scales: None,
            scale_row_offset: 0,
            scale_cols: 0,
        }
    }

    /// An fp8 e4m3 matrix that owns its codes (`rows · cols`, row-major) and DeepSeek's block
    /// scales (`scale_inv`: `[ceil(rows/128), ceil(cols/128)]` multipliers), as a checkpoint
    /// stores them (tests, converted weights).
    pub fn from_fp8(rows: usize, cols: usize, codes: Vec<u8>, scale_inv: Vec<f32>) -> Self {
        assert_eq!(codes.len(), rows * cols, "fp8 matrix codes length");
        let scale_cols = cols.div_ceil(FP8_BLOCK);
        assert_eq!(
            scale_inv.len(),
            rows.div_ceil(FP8_BLOCK) * scale_cols,
            "fp8 matrix scale grid length"
        );
        let mut map = memmap2::MmapMut::map_anon(codes.len().max(1)).expect("anonymous map");
        map[..codes.len()].copy_from_slice(&codes);
        Self {
            rows,
            cols,
            dtype: StoredType::F8E4M3,
            blob: Blob {
                map: Arc::new(map.make_read_only().expect("read-only map")),
                range: 0..codes.len(),
            },
            fp8_scales: Some(Arc::new(scale_inv)),
            scale_row_offset: 0,
            scale_cols,
        }
    }

    /// The data as `&[f32]` when stored as aligned f32 (zero-copy fast path).
    pub fn as_f32(&self) -> Option<&[f32]> {
        if self.dtype != StoredType::F32 {
            return None;
        }
        bytemuck::try_cast_slice(self.blob.bytes()).ok()
    }

    /// The raw little-endian bf16 bytes of a bf16 matrix (`2 · rows · cols` of them).
    pub fn as_bf16_bytes(&self) -> Option<&[u8]> {
        (self.dtype == StoredType::Bf16).then(|| self.blob.bytes())
    }

    /// An fp8 matrix's e4m3 codes (`rows · cols` bytes, row-major) and, per row, the scale of
    /// each 128-column block (`rows · ceil(cols / 128)` values): value `(r, c)` is
    /// `fp8_e4m3_to_f32(codes[r · cols + c]) · scales[r · ceil(cols / 128) + c / 128]`.
    pub fn fp8_parts(&self) -> Option<(&[u8], Vec<f32>)> {
        let scales = self.fp8_scales.as_ref()?;
        let per_row = self.cols.div_ceil(FP8_BLOCK);
        let mut rows = Vec::with_capacity(self.rows * per_row);
        for r in 0..self.rows {
            let block_row = (self.scale_row_offset + r) / FP8_BLOCK;
            rows.extend_from_slice(&scales[block_row * self.scale_cols..][..per_row]);
        }
        Some((self.blob.bytes(), rows))
    }

    /// Rows `range` of this matrix as a matrix (no copy).
    pub fn rows_slice(&self, range: Range<usize>) -> Self {
        assert!(range.end <= self.rows);
        let row_bytes = self.cols * self.dtype.size();
        Self {
            rows: range.len(),
            cols: self.cols,
            dtype: self.dtype,
            blob: self
                .blob
                .slice(range.start * row_bytes..range.end * row_bytes),
            fp8_scales: self.fp8_scales.clone(),
            scale_row_offset: self.scale_row_offset + range.start,
            scale_cols: self.scale_cols,
        }
    }

    /// Writes rows `first..first + out.len() / cols` into `out` as f32.
    pub fn rows_f32(&self, first: usize, out: &mut [f32]) {
        let n = out.len() / self.cols;
        debug_assert!(first + n <= self.rows);
        let esz = self.dtype.size();
        let bytes = &self.blob.bytes()[first * self.cols * esz..(first + n) * self.cols * esz];
        match self.dtype {
            StoredType::F32 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            StoredType::Bf16 => crate::linalg::bf16_to_f32(bytes, &mut out[..n * self.cols]),
            StoredType::F16 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
                }
            }
            StoredType::F8E4M3 => {
                let scales = self.fp8_scales.as_ref().expect("fp8 matrix has scales");
                for r in 0..n {
                    let global_row = self.scale_row_offset + first + r;
                    let scale_row = &scales[(global_row / FP8_BLOCK) * self.scale_cols..];
                    let src = &bytes[r * self.cols..(r + 1) * self.cols];
                    let dst = &mut out[r * self.cols..(r + 1) * self.cols];
                    for (c, (o, &q)) in dst.iter_mut().zip(src).enumerate() {
                        *o = fp8_e4m3_to_f32(q) * scale_row[c / FP8_BLOCK];
                    }
                }
            }
        }
    }

    /// The whole matrix as f32 (small matrices, tests).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        if !out.is_empty() {
            self.rows_f32(0, &mut out);
        }
        out
    }

    /// Bytes the stored data occupies.
    pub fn stored_bytes(&self) -> usize {
        self.blob.range.len()
    }
}

/// fp8 e4m3 (the "fn" variant: no infinities, 0x7f/0xff are NaN) to f32.
pub fn fp8_e4m3_to_f32(q: u8) -> f32 {
    let sign = if q & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = ((q >> 3) & 0x0f) as i32;
    let mant = (q & 0x07) as f32;
    if exp == 0x0f && q & 0x07 == 0x07 {
        return f32::NAN;
    }
    if exp == 0 {
        sign * mant / 8.0 * 2f32.powi(-6)
    } else {
        sign * (1.0 + mant / 8.0) * 2f32.powi(exp - 7)
    }
}

/// The e4m3 ("fn") code nearest `x`, ties to even, saturating at ±448 (NaN gives 0x7f): the
/// inverse of [`fp8_e4m3_to_f32`] on its values, as the CUDA kernels' `f32_to_e4m3_rn` computes.
pub fn f32_to_fp8_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7f;
    }
    let sign = ((x.to_bits() >> 31) as u8) << 7;
    let a = x.abs().min(448.0);
    if a < 2f32.powi(-6) {
        // Subnormal codes step by 2^-9; 8 steps is the smallest normal, code 0x08.
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    let bits = a.to_bits();
    let mut exp = ((bits >> 23) & 0xff) as i32 - 127;
    let (mut keep, rest) = ((bits >> 20) & 0x7, bits & 0xf_ffff);
    if rest > 0x8_0000 || (rest == 0x8_0000 && keep & 1 == 1) {
        keep += 1;
    }
    if keep == 8 {
        keep = 0;
        exp += 1;
    }
    sign | ((((exp + 7) as u32) << 3 | keep).min(0x7e) as u8)
}

struct TensorEntry {
    file: usize,
    dtype: StoredType,
    shape: Vec<usize>,
    range: Range<usize>,
}

/// All tensors of a model directory (one file, or shards listed in `model.safetensors.index.json`).
pub struct WeightStore {
    files: Vec<(PathBuf, Arc<Mmap>)>,
    tensors: HashMap<String, TensorEntry>,
}

impl std::fmt::Debug for WeightStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "WeightStore({} files, {} tensors)",
            self.files.len(),
            self.tensors.len()
        )
    }
}

impl WeightStore {
    /// Maps the checkpoint of `dir`: the shards listed in `model.safetensors.index.json`, else
    /// `model.safetensors`, else every `*.safetensors` file.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let mut names: Vec<PathBuf> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path)
                .map_err(|e| EngineError::io(&index_path, e))?;
            let index: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                EngineError::weights(
                    index_path.display().to_string(),
                    format!("invalid JSON: {e}"),
                )
            })?;
            let map = index
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| {
                    EngineError::weights(
                        index_path.display().to_string(),
                        "missing object `weight_map`",
                    )
                })?;
            let mut files: Vec<PathBuf> = Vec::new();
            for file in map.values() {
                let file = file.as_str().ok_or_else(|| {
                    EngineError::weights(
                        index_path.display().to_string(),
                        "`weight_map` values must be file names",
                    )
                })?;
                if file.contains('/') || file.contains("..") {
                    return Err(EngineError::weights(
                        index_path.display().to_string(),
                        format!(
                            "shard name {file:?} must be a plain file name in the model directory"
                        ),
                    ));
                }
                let path = dir.join(file);
                if !files.contains(&path) {
                    files.push(path);
                }
            }
            if files.is_empty() {
                return Err(EngineError::weights(
                    index_path.display().to_string(),
                    "`weight_map` names no tensors",
                ));
            }
            files
        } else if dir.join("model.safetensors").exists() {
            vec![dir.join("model.safetensors")]
        } else {
            let entries = std::fs::read_dir(dir).map_err(|e| EngineError::io(dir, e))?;
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect()
        };
        names.sort();
        if names.is_empty() {
            return Err(EngineError::weights(
                dir.display().to_string(),
                "no *.safetensors files in the model directory",
            ));
        }
        let mut store = Self {
            files: Vec::new(),
            tensors: HashMap::new(),
        };
        for path in names {
            store.add_file(path)?;
        }
        Ok(store)
    }

    /// A checkpoint held in memory (the built-in demo model, embedded in the binary): one
    /// safetensors file's bytes, copied once into an anonymous page-aligned map so tensors
    /// read as aligned f32 exactly as from a mapped file. `name` labels errors.
    pub fn from_bytes(name: &str, bytes: &[u8]) -> Result<Self> {
        let path = PathBuf::from(name);
        let mut map = memmap2::MmapMut::map_anon(bytes.len().max(1))
            .map_err(|e| EngineError::io(&path, e))?;
        map[..bytes.len()].copy_from_slice(bytes);
        let map = map
            .make_read_only()
            .map_err(|e| EngineError::io(&path, e))?;
        let mut store = Self {
            files: Vec::new(),
            tensors: HashMap::new(),
        };
        store.add_map(path, map)?;
        Ok(store)
    }

    fn add_file(&mut self, path: PathBuf) -> Result<()> {
        let file = File::open(&path).map_err(|e| EngineError::io(&path, e))?;
        // SAFETY: the model files are read-only inputs; the engine never writes them, and a
        // concurrent writer is an operator error that the docs warn about (as with any mmap loader).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| EngineError::io(&path, e))?;
        self.add_map(path, map)
    }

    fn add_map(&mut self, path: PathBuf, map: Mmap) -> Result<()> {
        let shown = path.display().to_string();
        let parsed = SafeTensors::deserialize(&map).map_err(|e| {
            EngineError::weights(shown.clone(), format!("not a valid safetensors file: {e}"))
        })?;
        let base = map.as_ptr() as usize;
        let file_index = self.files.len();
        for (name, view) in parsed.iter() {
            let dtype = StoredType::from_safetensors(view.dtype()).ok_or_else(|| {
                EngineError::tensor(
                    name,
                    &shown,
                    format!("unsupported dtype {:?}", view.dtype()),
                )
            })?;
            let start = view.data().as_ptr() as usize - base;
            let entry = TensorEntry {
                file: file_index,
                dtype,
                shape: view.shape().to_vec(),
                range: start..start + view.data().len(),
            };
            if self.tensors.insert(name.to_string(), entry).is_some() {
                return Err(EngineError::tensor(
                    name,
                    &shown,
                    "appears in more than one file",
                ));
            }
        }
        self.files.push((path, Arc::new(map)));
        Ok(())
    }

    /// Whether a tensor exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The directory the shards are in (for errors about a tensor no shard holds).
    pub fn dir(&self) -> String {
        self.files[0]
            .0
            .parent()
            .unwrap_or(Path::new("."))
            .display()
            .to_string()
    }

    fn entry(&self, name: &str) -> Result<&TensorEntry> {
        self.tensors
            .get(name)
            .ok_or_else(|| EngineError::tensor(name, &self.dir(), "missing from the checkpoint"))
    }

    fn file_name(&self, entry: &TensorEntry) -> String {
        self.files[entry.file].0.display().to_string()
    }

    /// The shape of a tensor.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.entry(name)?.shape.clone())
    }

    /// A 1-D tensor of `len` values as f32 (norm weights, biases).
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let entry = self.entry(name)?;
        if entry.shape != [len] {
            return Err(EngineError::tensor(
                name,
                &self.file_name(entry),
                format!("expected shape [{len}], found {:?}", entry.shape),
            ));
        }
        if entry.dtype == StoredType::F8E4M3 {
            return Err(EngineError::tensor(
                name,
                &self.file_name(entry),
                "fp8 is only supported for weight matrices",
            ));
        }
        Ok(self.raw_matrix(name, entry, 1, len).to_f32_vec())
    }

    fn raw_matrix(&self, _name: &str, entry: &TensorEntry, rows: usize, cols: usize) -> Matrix {
        Matrix {
            rows,
            cols,
            dtype: entry.dtype,
            blob: Blob {
                map: self.files[entry.file].1.clone(),
                range: entry.range.clone(),
            },
            fp8_scales: None,
            scale_row_offset: 0,
            scale_cols: 0,
        }
    }

    /// A `[rows, cols]` weight matrix; fp8 weights bring their `<name>_scale_inv` block scales.
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        self.tensor_as_matrix(name, &[rows, cols], rows, cols)
    }

    /// A `[count, rows, cols]` stack (fused experts) as one `[count·rows, cols]` matrix.
    pub fn stacked(&self, name: &str, count: usize, rows: usize, cols: usize) -> Result<Matrix> {
        self.tensor_as_matrix(name, &[count, rows, cols], count * rows, cols)
    }

    fn tensor_as_matrix(
        &self,
        name: &str,
        shape: &[usize],
        rows: usize,
        cols: usize,
    ) -> Result<Matrix> {
        let entry = self.entry(name)?;
        let file = self.file_name(entry);
        if entry.shape != shape {
            return Err(EngineError::tensor(
                name,
                &file,
                format!("expected shape {shape:?}, found {:?}", entry.shape),
            ));
        }
        let mut matrix = self.raw_matrix(name, entry, rows, cols);
        if entry.dtype == StoredType::F8E4M3 {
            let scale_name = format!("{}_scale_inv", name);
            let scale_rows = rows.div_ceil(FP8_BLOCK);
            let scale_cols = cols.div_ceil(FP8_BLOCK);
            if shape.len() != 2 {
                return Err(EngineError::tensor(
                    name,
                    &file,
                    "fp8 is supported for 2-D weights only",
                ));
            }
            let scale_entry = self.entry(&scale_name)?;
            if scale_entry.shape != [scale_rows, scale_cols] {
                return Err(EngineError::tensor(
                    &scale_name,
                    &self.file_name(scale_entry),
                    format!(
                        "expected shape [{scale_rows}, {scale_cols}] for 128x128 block scales, found {:?}",
                        scale_entry.shape
                    ),
                ));
            }
            if scale_entry.dtype == StoredType::F8E4M3 {
                return Err(EngineError::tensor(
                    &scale_name,
                    &self.file_name(scale_entry),
                    "scales must be a float type",
                ));
            }
            let scales = self
                .raw_matrix(&scale_name, scale_entry, scale_rows, scale_cols)
                .to_f32_vec();
            matrix.fp8_scales = Some(Arc::new(scales));
            matrix.scale_cols = scale_cols;
        }
        Ok(matrix)
    }

    /// Bytes of all mapped files.
    pub fn total_bytes(&self) -> usize {
        self.files.iter().map(|(_, m)| m.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn fp8_encoding_inverts_decoding_and_rounds_to_even() {
        use super::{f32_to_fp8_e4m3, fp8_e4m3_to_f32};
        for code in (0u8..=0xff).filter(|c| c & 0x7f != 0x7f) {
            let v = fp8_e4m3_to_f32(code);
            assert_eq!(f32_to_fp8_e4m3(v), code, "code {code:#04x} = {v}");
        }
        // Between every two neighbouring codes: the midpoint goes to the even one, a hair
        // either side to the nearer one (every binade, the subnormals and their edge).
        for c in 0u8..0x7e {
            let (lo, hi) = (fp8_e4m3_to_f32(c), fp8_e4m3_to_f32(c + 1));
            let mid = (lo + hi) / 2.0;
            let even = if c % 2 == 0 { c } else { c + 1 };
            assert_eq!(
                f32_to_fp8_e4m3(mid),
                even,
                "midpoint of {c:#04x} and the next"
            );
            let hair = (hi - lo) / 64.0;
            assert_eq!(f32_to_fp8_e4m3(mid - hair), c);
            assert_eq!(f32_to_fp8_e4m3(mid + hair), c + 1);
            assert_eq!(f32_to_fp8_e4m3(-(mid + hair)), 0x80 | (c + 1));
        }
        // Midpoints go to the even neighbour: 1.0625 between 1.0 (0x38) and 1.125 (0x39),
        // 1.1875 between 0x39 and 1.25 (0x3a); just above a midpoint goes up.
        assert_eq!(f32_to_fp8_e4m3(1.0625), 0x38);
        assert_eq!(f32_to_fp8_e4m3(1.1875), 0x3a);
        assert_eq!(f32_to_fp8_e4m3(1.0625 + 1e-6), 0x39);
        // Subnormals (steps of 2^-9) and the edge to the smallest normal.
        assert_eq!(f32_to_fp8_e4m3(2.5 * 2f32.powi(-9)), 0x02);
        assert_eq!(f32_to_fp8_e4m3(2f32.powi(-6) - 2f32.powi(-11)), 0x08);
        // Saturation, not infinity or NaN; NaN stays NaN; the sign of zero is kept.
        assert_eq!(f32_to_fp8_e4m3(1e6), 0x7e);
        assert_eq!(f32_to_fp8_e4m3(-470.0), 0xfe);
        assert_eq!(f32_to_fp8_e4m3(f32::NAN), 0x7f);
        assert_eq!(f32_to_fp8_e4m3(-0.0), 0x80);
    }

    use super::*;

    #[test]
    fn fp8_e4m3_decodes_known_values() {
        assert_eq!(fp8_e4m3_to_f32(0x00), 0.0);
        assert_eq!(fp8_e4m3_to_f32(0x38), 1.0); // exponent 7 = bias
        assert_eq!(fp8_e4m3_to_f32(0xb8), -1.0);
        assert_eq!(fp8_e4m3_to_f32(0x7e), 448.0); // largest finite
        assert_eq!(fp8_e4m3_to_f32(0x01), 2f32.powi(-9)); // smallest subnormal
        assert!(fp8_e4m3_to_f32(0x7f).is_nan());
    }

    #[test]
    fn row_slices_convert_the_right_rows() {
        let m = Matrix::from_f32(3, 2, vec![1., 2., 3., 4., 5., 6.]);
        let tail = m.rows_slice(1..3);
        assert_eq!(tail.to_f32_vec(), vec![3., 4., 5., 6.]);
        assert_eq!(m.as_f32().unwrap()[5], 6.0);
    }

    /// `fp8_parts` of a row slice that starts inside a 128-row block gives back, code by code and
    /// scale by scale, the values `to_f32_vec` dequantises.
    #[test]
    fn fp8_parts_carry_each_rows_block_scales() {
        let (rows, cols) = (300, 200);
        let codes: Vec<u8> = (0..rows * cols).map(|i| (i * 7 % 0x7e) as u8).collect();
        let grid = vec![0.5, 2.0, 0.25, 4.0, 1.5, 3.0]; // [3 block rows, 2 block cols]
        let full = Matrix::from_fp8(rows, cols, codes, grid);
        let slice = full.rows_slice(100..290);
        let want = slice.to_f32_vec();
        let (q, scales) = slice.fp8_parts().unwrap();
        assert_eq!((q.len(), scales.len()), (190 * cols, 190 * 2));
        for (i, &w) in want.iter().enumerate() {
            let (r, c) = (i / cols, i % cols);
            assert_eq!(
                fp8_e4m3_to_f32(q[i]) * scales[r * 2 + c / 128],
                w,
                "({r}, {c})"
            );
        }
        // Row 100 of the slice is row 200 of the matrix: block row 1.
        assert_eq!(&scales[200..202], &[0.25, 4.0]);
        assert!(Matrix::from_f32(1, 1, vec![1.0]).fp8_parts().is_none());
    }
}
