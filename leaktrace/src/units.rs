//! Units shared by every layer: pages, and how byte counts and rates are written.

/// The page size leaktrace assumes (x86-64).
pub const PAGE: u64 = 4096;

/// `n` rounded up to a whole page (saturating).
pub fn page_up(n: u64) -> u64 {
    n.saturating_add(PAGE - 1) & !(PAGE - 1)
}

/// `n` rounded down to a whole page.
pub fn page_down(n: u64) -> u64 {
    n & !(PAGE - 1)
}

/// Human-readable byte count (binary units).
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A signed byte change: `+1.5 MiB`, `-12 B`.
pub fn signed_bytes(b: f64) -> String {
    if b >= 0.0 {
        format!("+{}", bytes(b.round() as u64))
    } else {
        format!("-{}", bytes((-b).round() as u64))
    }
}

/// A signed rate in bytes per second: `+1.5 MiB/s`.
pub fn rate(bytes_per_s: f64) -> String {
    format!("{}/s", signed_bytes(bytes_per_s))
}

/// `s` with control characters as `?`: text a target chose (its command line, a
/// path) printed on a terminal must not carry escape sequences.
pub fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// For `skip_serializing_if`: a zero count is left out of the JSON.
#[allow(clippy::trivially_copy_pass_by_ref)] // serde passes fields by reference
pub fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_strips_escapes() {
        assert_eq!(printable("a\x1b[2Jb\u{9b}c\td"), "a?[2Jb?c?d");
    }

    #[test]
    fn formats_sizes_and_rates() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(signed_bytes(-2048.0), "-2.0 KiB");
        assert_eq!(rate(3.0 * 1048576.0), "+3.0 MiB/s");
        assert_eq!(rate(-1536.0), "-1.5 KiB/s");
        assert_eq!(page_up(1), PAGE);
        assert_eq!(page_up(u64::MAX), !(PAGE - 1));
        assert_eq!(page_down(PAGE + 1), PAGE);
    }
}
