//! What the host-side benchmark examples share: medians, races and the machine's description.

use std::time::Instant;

/// The median of `v` (the upper one for an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The CPU's model name (from /proc/cpuinfo) and how many CPUs this process may use.
pub fn machine() -> (String, usize) {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    (model, cpus)
}

/// The median milliseconds a run of `before` and a run of `after` took, run alternately `reps`
/// times (what each returns is kept from the optimiser).
#[allow(dead_code)] // not every example races two variants
pub fn race(
    reps: usize,
    mut before: impl FnMut() -> u64,
    mut after: impl FnMut() -> u64,
) -> (f64, f64) {
    let (mut b, mut a) = (Vec::new(), Vec::new());
    let mut sink = 0u64;
    for _ in 0..reps {
        let t = Instant::now();
        sink = sink.wrapping_add(before());
        b.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        sink = sink.wrapping_add(after());
        a.push(t.elapsed().as_secs_f64() * 1e3);
    }
    std::hint::black_box(sink);
    (median(b), median(a))
}
