//! Session tokens: held and compared only as SHA-256 digests, in constant time.
//!
//! The plaintext a client presents is hashed as soon as it is parsed and dropped; routes
//! store digests. `Debug` never prints a digest either, so a token cannot leak into a log.

use subtle::ConstantTimeEq as _;
use vncgate_ws::handshake::PresentedToken;

pub use vncgate_schema::record::MAX_TOKEN_LEN;

pub type TokenDigest = [u8; 32];

/// A token presented by a client, kept as its digest.
#[derive(Clone)]
pub struct Token(TokenDigest);

impl Token {
    /// Hashes a token. Tokens are printable ASCII without spaces or separators (they ride
    /// in a URL query, a subprotocol token or a header); the error is the reason a client
    /// gets with its 400.
    pub fn from_bytes(raw: &[u8]) -> Result<Token, &'static str> {
        vncgate_schema::record::check_token(raw)?;
        Ok(Token(Self::digest_of(raw)))
    }

    /// Hashes the token a client presented in its upgrade request; the plaintext stays
    /// with the request, which the session drops before the relay starts.
    pub fn presented(t: &PresentedToken) -> Result<Token, &'static str> {
        Self::from_bytes(t.bytes())
    }

    pub fn digest_of(raw: &[u8]) -> TokenDigest {
        vncgate_schema::record::token_digest(raw)
    }

    /// Constant-time comparison against a stored digest.
    pub fn matches_digest(&self, digest: &TokenDigest) -> bool {
        self.0.ct_eq(digest).into()
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Parses a digest written as 64 hex digits (the routes file's `token_sha256`).
pub fn parse_digest_hex(hex_digest: &str) -> Result<TokenDigest, String> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_digest.trim(), &mut out)
        .map_err(|e| format!("token_sha256 must be 64 hex digits: {e}"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_matches_only_same_token() {
        let t = Token::from_bytes(b"abc").unwrap();
        assert!(t.matches_digest(&Token::digest_of(b"abc")));
        assert!(!t.matches_digest(&Token::digest_of(b"abd")));
        assert_eq!(format!("{t:?}"), "Token(<redacted>)");
    }

    #[test]
    fn sha256_of_abc_in_hex() {
        let d =
            parse_digest_hex("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
                .unwrap();
        assert_eq!(d, Token::digest_of(b"abc"));
        assert!(parse_digest_hex("zz").is_err());
    }

    #[test]
    fn rejects_bad_tokens() {
        assert!(Token::from_bytes(b"").is_err());
        assert!(Token::from_bytes(b"a b").is_err());
        assert!(Token::from_bytes(&vec![b'a'; MAX_TOKEN_LEN + 1]).is_err());
    }
}
