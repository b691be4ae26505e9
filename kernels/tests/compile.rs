//! Compiles every `.cu` for sm_90a and sm_80 (SASS + PTX) and fails on any error or warning.
//! Without `nvcc` it says it skipped, unless `CI` is set: then a missing compiler fails.

use sparsemoe_kernels::{SOURCES, toolchain};
use std::time::Instant;

#[test]
fn every_kernel_compiles_without_warnings() {
    let Some(nvcc) = toolchain::find_nvcc() else {
        let message =
            "skipped: nvcc not found (set SPARSEMOE_NVCC or run .ci/run, which installs it)";
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set, so this cannot skip: {message}"
        );
        eprintln!("{message}");
        return;
    };
    let version = toolchain::nvcc_version(&nvcc).unwrap_or_else(|| "unknown version".into());
    eprintln!("nvcc: {} ({version})", nvcc.display());
    let out_dir = std::env::temp_dir().join(format!("sparsemoe-kernels-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).unwrap();

    let started = Instant::now();
    // Two at a time: the build machines have two cores.
    let results: Vec<(String, std::process::Output, f64)> = SOURCES
        .chunks(2)
        .flat_map(|pair| {
            let handles: Vec<_> = pair
                .iter()
                .map(|src| {
                    let source = toolchain::cuda_dir().join(src.file);
                    let object = out_dir.join(format!("{}.o", src.file));
                    let mut cmd = toolchain::compile_command(&nvcc, &source, &object);
                    let file = src.file.to_string();
                    std::thread::spawn(move || {
                        let t = Instant::now();
                        let output = cmd.output().expect("nvcc runs");
                        (file, output, t.elapsed().as_secs_f64())
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        })
        .collect();

    let mut failures = Vec::new();
    for (file, output, secs) in &results {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stdout = String::from_utf8_lossy(&output.stdout);
        let warned =
            stderr.to_lowercase().contains("warning") || stdout.to_lowercase().contains("warning");
        eprintln!(
            "{file}: {} in {secs:.1}s",
            if output.status.success() && !warned {
                "ok"
            } else {
                "FAILED"
            }
        );
        if !output.status.success() || warned {
            failures.push(format!("{file}:\n{stdout}{stderr}"));
        }
    }
    eprintln!(
        "compiled {} files in {:.1}s",
        results.len(),
        started.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&out_dir);
    assert!(
        failures.is_empty(),
        "nvcc failed or warned:\n{}",
        failures.join("\n")
    );
}
