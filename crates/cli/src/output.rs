//! Printing helpers shared by the commands.

/// Bytes as lowercase hex, space-free (`e8 0b` → `e80b`).
pub fn hex_bytes(bytes: &[u8]) -> String {
    shadowpatch_symbols::hex(bytes)
}

/// 1536 → "1.5 KiB".
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Throughput in GB/s (10^9 bytes per second) from bytes and microseconds.
pub fn gb_per_s(bytes: u64, micros: u64) -> f64 {
    if micros == 0 {
        return 0.0;
    }
    bytes as f64 / micros as f64 / 1000.0
}

/// Print a value as pretty JSON on stdout.
pub fn print_json(value: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(value).expect("serializable"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(1 << 30), "1.0 GiB");
        assert_eq!(hex_bytes(&[0xe8, 0x0b]), "e80b");
        assert_eq!(gb_per_s(1_000_000_000, 1_000_000), 1.0);
    }
}
