//! This process's resident memory, from `/proc/self` (Linux): what the loading tests and
//! `tulu bench`'s load line report. Elsewhere every figure is `None`.

use std::path::Path;

/// Resident set size now, in bytes.
pub fn rss_bytes() -> Option<u64> {
    status_kib("VmRSS:").map(|k| k * 1024)
}

/// Peak resident set size since the process started or since [`reset_peak_rss`], in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    status_kib("VmHWM:").map(|k| k * 1024)
}

/// Resets the peak to the current resident size (Linux ≥ 4.0); `false` when it cannot.
pub fn reset_peak_rss() -> bool {
    std::fs::write(Path::new("/proc/self/clear_refs"), "5").is_ok()
}

/// A `Name:   1234 kB` line of /proc/self/status.
fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line[field.len()..].trim().trim_end_matches("kB").trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_follows_a_large_allocation_and_resets() {
        if rss_bytes().is_none() {
            return; // not Linux
        }
        assert!(reset_peak_rss(), "/proc/self/clear_refs is not writable");
        let before = peak_rss_bytes().unwrap();
        let big = vec![1u8; 64 << 20];
        assert!(peak_rss_bytes().unwrap() >= before + (60 << 20), "a touched 64 MiB buffer shows in the peak");
        drop(big);
        assert!(reset_peak_rss());
        assert!(peak_rss_bytes().unwrap() < before + (60 << 20) + (16 << 20), "the reset forgets the freed buffer");
    }
}
