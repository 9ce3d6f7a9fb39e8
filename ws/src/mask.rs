//! Client-to-server payload unmasking (RFC 6455 §5.3), in place, a machine word at a time.

/// XORs `data` with `mask`, where `data[0]` is payload byte number `offset` of its frame
/// (so a payload split across reads unmasks correctly piece by piece).
#[inline]
pub fn unmask(data: &mut [u8], mask: [u8; 4], offset: usize) {
    // The mask starting at byte `offset % 4`, as a little-endian word: a rotation in a
    // register (a byte-array rotate costs a call into the general slice code).
    let m32 = u32::from_le_bytes(mask).rotate_right(8 * (offset % 4) as u32);
    let m = m32.to_le_bytes();
    // Eight bytes at a time with unaligned word loads; the mask repeats every four bytes,
    // so the same word applies to every 8-byte chunk.
    let word = u64::from(m32) | (u64::from(m32) << 32);
    let mut chunks = data.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_le_bytes(c.try_into().expect("8-byte chunk")) ^ word;
        c.copy_from_slice(&v.to_le_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= m[i % 4];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(data: &mut [u8], mask: [u8; 4], offset: usize) {
        for (i, b) in data.iter_mut().enumerate() {
            *b ^= mask[(offset + i) % 4];
        }
    }

    #[test]
    fn matches_bytewise_for_all_lengths_and_offsets() {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        for len in 0..70 {
            for off in 0..8 {
                let orig: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
                let mut a = orig.clone();
                let mut b = orig.clone();
                unmask(&mut a, mask, off);
                naive(&mut b, mask, off);
                assert_eq!(a, b, "len {len} off {off}");
            }
        }
    }

    #[test]
    fn rfc6455_masked_hello() {
        // §5.7: a masked "Hello".
        let mut p = [0x7f, 0x9f, 0x4d, 0x51, 0x58];
        unmask(&mut p, [0x37, 0xfa, 0x21, 0x3d], 0);
        assert_eq!(&p, b"Hello");
    }

    #[test]
    fn split_payload_unmasks_like_whole() {
        let mask = [1, 2, 3, 4];
        let orig: Vec<u8> = (0..100u8).collect();
        let mut whole = orig.clone();
        unmask(&mut whole, mask, 0);
        let mut parts = orig.clone();
        let (a, b) = parts.split_at_mut(37);
        unmask(a, mask, 0);
        unmask(b, mask, 37);
        assert_eq!(whole, parts);
    }
}
