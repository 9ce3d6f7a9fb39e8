//! VNC Authentication (RFC 6143 section 7.2.2): DES-encrypt a 16-byte challenge.
//!
//! The key is the password's first eight bytes, zero-padded, with the bits of every byte
//! reversed. RFC 6143 does not say so, but every implementation since the original AT&T code
//! does it (their DES routine numbered bits the other way), so a compliant peer needs it too.

use des::Des;
use des::cipher::generic_array::GenericArray;
use des::cipher::{BlockEncrypt, KeyInit};

/// The 16-byte response a client sends for `challenge` under `password`.
pub fn response(password: &[u8], challenge: &[u8; 16]) -> [u8; 16] {
    let mut key = [0u8; 8];
    for (k, p) in key.iter_mut().zip(password) {
        *k = p.reverse_bits();
    }
    let cipher = Des::new(&GenericArray::from(key));
    let mut out = *challenge;
    for block in out.chunks_exact_mut(8) {
        cipher.encrypt_block(GenericArray::from_mut_slice(block));
    }
    out
}

/// Whether `answer` is the right response, compared without an early exit so the time taken
/// says nothing about how many bytes matched.
pub fn verify(password: &[u8], challenge: &[u8; 16], answer: &[u8; 16]) -> bool {
    let expected = response(password, challenge);
    expected
        .iter()
        .zip(answer)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Computed independently with
    /// `openssl enc -des-ecb -K 0e86ceceeef64e26 -nopad -provider legacy`
    /// (0e86ceceeef64e26 is "password" with each byte's bits reversed).
    #[test]
    fn known_vector() {
        let challenge: [u8; 16] = core::array::from_fn(|i| i as u8);
        let expected = [
            0xb8, 0x66, 0x92, 0x41, 0x25, 0xc8, 0xee, 0xbb, 0x9d, 0xeb, 0xc1, 0xdb, 0x61, 0xc5,
            0x38, 0xe2,
        ];
        assert_eq!(response(b"password", &challenge), expected);
        assert!(verify(b"password", &challenge, &expected));
        assert!(!verify(b"passwore", &challenge, &expected));
    }

    #[test]
    fn only_first_eight_bytes_count() {
        let c = [7u8; 16];
        assert_eq!(
            response(b"password", &c),
            response(b"password-and-more", &c)
        );
        assert_ne!(response(b"pass", &c), response(b"password", &c));
    }
}
