//! Test bytes that do not repeat (shared by the tests and the benches).

/// Bytes with no repeats at block scale (unlike `pattern`, whose 4 MiB
/// blocks are all alike), from a xorshift generator seeded by `seed`.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}
