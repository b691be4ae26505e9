//! How much memory this process may still use: the smaller of the kernel's `MemAvailable` and,
//! in a container, what its cgroup's limit leaves (`memory.max` − `memory.current`, cgroup v2;
//! `memory.limit_in_bytes` − `memory.usage_in_bytes`, v1; the files at the root of
//! /sys/fs/cgroup, which is the container's own cgroup under the usual cgroup namespace).
//! `serve` sizes the KV cache from it when given a memory fraction.

use std::path::Path;

/// Bytes available to this process now, or None when nothing could be read.
pub fn available_bytes() -> Option<u64> {
    let read = |p: &str| std::fs::read_to_string(Path::new(p)).ok();
    let meminfo = read("/proc/meminfo").and_then(|t| mem_available(&t));
    let cgroup = cgroup_headroom(
        read("/sys/fs/cgroup/memory.max")
            .or_else(|| read("/sys/fs/cgroup/memory/memory.limit_in_bytes")),
        read("/sys/fs/cgroup/memory.current")
            .or_else(|| read("/sys/fs/cgroup/memory/memory.usage_in_bytes")),
    );
    match (meminfo, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `MemAvailable` from the text of /proc/meminfo, in bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let rest = line.strip_prefix("MemAvailable:")?;
        let kib: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
        kib.checked_mul(1024)
    })
}

/// What a cgroup's limit leaves above its usage; None without a limit ("max", or the huge
/// number cgroup v1 reports for none) or when either file is missing or unreadable.
fn cgroup_headroom(limit: Option<String>, usage: Option<String>) -> Option<u64> {
    let limit: u64 = limit?.trim().parse().ok()?;
    if limit >= 1 << 60 {
        return None;
    }
    let usage: u64 = usage?.trim().parse().ok()?;
    Some(limit.saturating_sub(usage))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_and_cgroup_files_parse() {
        let meminfo = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(mem_available(meminfo), Some(2048 * 1024));
        assert_eq!(mem_available("MemTotal: 5 kB\n"), None);
        assert_eq!(mem_available("MemAvailable: lots kB\n"), None);
        let s = |v: &str| Some(v.to_string());
        assert_eq!(cgroup_headroom(s("1000\n"), s("400\n")), Some(600));
        assert_eq!(cgroup_headroom(s("1000"), s("1400")), Some(0));
        assert_eq!(cgroup_headroom(s("max\n"), s("400")), None);
        assert_eq!(cgroup_headroom(s("9223372036854771712"), s("400")), None);
        assert_eq!(cgroup_headroom(s("1000"), None), None);
        assert_eq!(cgroup_headroom(None, s("1")), None);
    }

    #[test]
    fn this_machine_reports_some_memory() {
        // Linux always has /proc/meminfo; the answer must be a plausible byte count.
        if cfg!(target_os = "linux") {
            let bytes = available_bytes().expect("/proc/meminfo is readable on Linux");
            assert!(bytes > 1 << 20, "{bytes} bytes available");
        }
    }
}
