//! Printing helpers shared by the commands.

/// Bytes as lowercase hex, space-free (`e8 0b` → `e80b`).
pub fn hex_bytes(bytes: &[u8]) -> String {
    shadowpatch_symbols::hex(bytes)
}

pub use shadowpatch_report::{gb_per_s, human_bytes, print_json};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(hex_bytes(&[0xe8, 0x0b]), "e80b");
    }
}
