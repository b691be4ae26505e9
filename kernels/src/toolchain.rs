//! Finding `nvcc` and the flags every kernel is compiled with.
//!
//! Lookup order: `SPARSEMOE_NVCC` (the `nvcc` binary itself, or a Python venv holding the
//! `nvidia-cuda-nvcc` wheel, whose compiler sits at `lib/python3.*/site-packages/nvidia/cu13/bin/nvcc`),
//! then `nvcc` on `PATH`, then `$CUDA_HOME/bin/nvcc`. `kernels/nvcc-env.sh VENV` prints the
//! exports for a venv; `.ci/run` installs the pinned wheels and sets `SPARSEMOE_NVCC`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Targets: Hopper with its arch-specific instructions, and Ampere; PTX of each for the driver's JIT.
pub const GENCODE: &[&str] = &[
    "-gencode=arch=compute_90a,code=[sm_90a,compute_90a]",
    "-gencode=arch=compute_80,code=[sm_80,compute_80]",
];

/// Flags for every `.cu`: any warning (front end, ptxas — spills and local memory included —,
/// host compiler) is an error.
pub const FLAGS: &[&str] = &[
    "-std=c++17",
    "-O3",
    "-Werror",
    "all-warnings",
    "-Xptxas=-warn-spills,-warn-lmem-usage",
    "-Xcompiler=-Wall,-Wextra,-Werror",
];

/// The `nvcc` to use, or `None` when none is found.
pub fn find_nvcc() -> Option<PathBuf> {
    if let Some(given) = std::env::var_os("SPARSEMOE_NVCC").filter(|v| !v.is_empty()) {
        return nvcc_at(Path::new(&given));
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("nvcc");
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    let cuda_home = std::env::var_os("CUDA_HOME")?;
    let candidate = Path::new(&cuda_home).join("bin/nvcc");
    candidate.is_file().then_some(candidate)
}

/// `given` is `nvcc` itself, a CUDA root (`bin/nvcc`), or a venv with the PyPI wheel layout.
fn nvcc_at(given: &Path) -> Option<PathBuf> {
    if given.is_file() {
        return Some(given.to_path_buf());
    }
    let root = given.join("bin/nvcc");
    if root.is_file() {
        return Some(root);
    }
    let lib = std::fs::read_dir(given.join("lib")).ok()?;
    lib.flatten()
        .map(|python| python.path().join("site-packages/nvidia/cu13/bin/nvcc"))
        .find(|candidate| candidate.is_file())
}

/// The directory holding the `.cu` files (for `-I` and for reading them from disk).
pub fn cuda_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda")
}

/// The full command that compiles `source` into the object file `out` (fatbin inside).
pub fn compile_command(nvcc: &Path, source: &Path, out: &Path) -> Command {
    let mut cmd = Command::new(nvcc);
    cmd.args(FLAGS)
        .args(GENCODE)
        .arg("-I")
        .arg(cuda_dir())
        .arg("-c")
        .arg(source)
        .arg("-o")
        .arg(out);
    cmd
}

/// `nvcc --version`'s last line (e.g. "Build cuda_13.0.r13.0/compiler.36424714_0").
pub fn nvcc_version(nvcc: &Path) -> Option<String> {
    let out = Command::new(nvcc).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.contains("release"))
        .map(|l| l.trim().to_string())
}
