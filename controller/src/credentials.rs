//! Credentials at rest: envelope encryption, no I/O.
//!
//! Each record gets a fresh 256-bit data key; the credentials (JSON) are sealed with it under
//! AES-256-GCM, and the data key is sealed ("wrapped") under a key-encryption key (KEK) named
//! by its id. Both seals bind the session id and the KEK id as associated data, so a record
//! moved to another session, or relabelled with another key id, fails to open instead of
//! decrypting. Several KEKs can be loaded: the newest writes, all read, and [`KeyRing::rewrap`]
//! moves a record to the newest KEK by re-sealing its data key only, never decrypting the
//! credentials. The plaintext exists only in the request and in an admin's read.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore as _;
use serde::{Deserialize, Serialize};

/// A sealed credentials record, as stored (`vncgate:credentials:<session>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    pub v: u32,
    pub session_id: String,
    pub provider: String,
    /// The KEK that wraps the data key.
    pub kid: String,
    /// Nonce and ciphertext of the wrapped data key, hex.
    pub dek_nonce: String,
    pub dek: String,
    /// Nonce and ciphertext of the credentials, hex.
    pub nonce: String,
    pub ciphertext: String,
    /// Unix milliseconds.
    pub stored_at: u64,
}

/// Why a record could not be sealed or opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CryptoError {
    /// The record names a KEK that is not loaded.
    UnknownKey(String),
    /// Authentication failed: the wrong key, a record moved to another session, or tampering.
    Open(String),
    Malformed(String),
}

impl std::fmt::Display for CryptoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CryptoError::UnknownKey(k) => write!(f, "key '{k}' is not loaded (--credentials-key)"),
            CryptoError::Open(w) => write!(f, "cannot open the record: {w}"),
            CryptoError::Malformed(w) => write!(f, "malformed record: {w}"),
        }
    }
}

impl std::error::Error for CryptoError {}

/// A key-encryption key. `Debug` never shows the key.
#[derive(Clone)]
pub struct Kek {
    pub id: String,
    key: [u8; 32],
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Kek({}, <redacted>)", self.id)
    }
}

impl Kek {
    pub fn new(id: &str, key: [u8; 32]) -> Result<Kek, String> {
        if id.is_empty()
            || id.len() > 64
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(format!(
                "key id '{id}' must be 1-64 characters of A-Z a-z 0-9 - _ ."
            ));
        }
        Ok(Kek {
            id: id.to_owned(),
            key,
        })
    }

    /// `ID=FILE`: the file holds the 32-byte key as 64 hex digits (`openssl rand -hex 32`).
    pub fn from_flag(flag: &str) -> Result<Kek, String> {
        let (id, path) = flag
            .split_once('=')
            .ok_or_else(|| format!("--credentials-key '{flag}': expected ID=FILE"))?;
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--credentials-key {id}: {path}: {e}"))?;
        let mut key = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut key).map_err(|_| {
            format!("--credentials-key {id}: {path} must hold 64 hex digits (openssl rand -hex 32)")
        })?;
        Kek::new(id, key)
    }

    /// A random key, for a controller without `--credentials-key` (its records do not
    /// outlive it).
    pub fn ephemeral() -> Kek {
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        Kek {
            id: "ephemeral".into(),
            key,
        }
    }
}

/// The loaded KEKs; the last one is the newest, which seals.
#[derive(Debug, Clone)]
pub struct KeyRing {
    keys: Vec<Kek>,
}

/// Associated data of the credentials' seal: the session. (The key id is bound where the
/// KEK is used, in the data key's seal, so a rewrap touches only that.)
fn aad_data(session_id: &str) -> Vec<u8> {
    format!("vncgate-credentials/v1\0data\0{session_id}").into_bytes()
}

/// Associated data of the data key's seal: the session and the KEK's id.
fn aad_dek(session_id: &str, kid: &str) -> Vec<u8> {
    format!("vncgate-credentials/v1\0dek\0{session_id}\0{kid}").into_bytes()
}

fn seal(key: &[u8; 32], plaintext: &[u8], aad: &[u8]) -> ([u8; 12], Vec<u8>) {
    let mut nonce = [0u8; 12];
    rand::rng().fill_bytes(&mut nonce);
    let ct = Aes256Gcm::new(key.into())
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .expect("AES-GCM seals any message under 64 GiB");
    (nonce, ct)
}

fn open(key: &[u8; 32], nonce_hex: &str, ct_hex: &str, aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let nonce = hex::decode(nonce_hex).map_err(|e| CryptoError::Malformed(e.to_string()))?;
    if nonce.len() != 12 {
        return Err(CryptoError::Malformed("nonce is not 12 bytes".into()));
    }
    let ct = hex::decode(ct_hex).map_err(|e| CryptoError::Malformed(e.to_string()))?;
    Aes256Gcm::new(key.into())
        .decrypt(Nonce::from_slice(&nonce), Payload { msg: &ct, aad })
        .map_err(|_| CryptoError::Open("authentication failed".into()))
}

impl KeyRing {
    pub fn new(keys: Vec<Kek>) -> Result<KeyRing, String> {
        if keys.is_empty() {
            return Err("no credentials key".into());
        }
        for (i, k) in keys.iter().enumerate() {
            if keys[..i].iter().any(|o| o.id == k.id) {
                return Err(format!("--credentials-key {}: given twice", k.id));
            }
        }
        Ok(KeyRing { keys })
    }

    pub fn newest(&self) -> &Kek {
        self.keys.last().expect("a key ring is never empty")
    }

    fn key(&self, kid: &str) -> Result<&Kek, CryptoError> {
        self.keys
            .iter()
            .find(|k| k.id == kid)
            .ok_or_else(|| CryptoError::UnknownKey(kid.to_owned()))
    }

    /// Seals `plaintext` for `session_id` under a fresh data key wrapped by the newest KEK.
    pub fn seal(&self, session_id: &str, provider: &str, plaintext: &[u8], now_ms: u64) -> Sealed {
        let kek = self.newest();
        let mut dek = [0u8; 32];
        rand::rng().fill_bytes(&mut dek);
        let (nonce, ct) = seal(&dek, plaintext, &aad_data(session_id));
        let (dek_nonce, wrapped) = seal(&kek.key, &dek, &aad_dek(session_id, &kek.id));
        Sealed {
            v: 1,
            session_id: session_id.to_owned(),
            provider: provider.to_owned(),
            kid: kek.id.clone(),
            dek_nonce: hex::encode(dek_nonce),
            dek: hex::encode(wrapped),
            nonce: hex::encode(nonce),
            ciphertext: hex::encode(ct),
            stored_at: now_ms,
        }
    }

    fn unwrap_dek(&self, s: &Sealed) -> Result<[u8; 32], CryptoError> {
        let kek = self.key(&s.kid)?;
        let dek = open(
            &kek.key,
            &s.dek_nonce,
            &s.dek,
            &aad_dek(&s.session_id, &s.kid),
        )?;
        dek.try_into()
            .map_err(|_| CryptoError::Malformed("data key is not 32 bytes".into()))
    }

    /// Opens a record of `session_id` (the id is checked by the AEAD, not just compared).
    pub fn open(&self, session_id: &str, s: &Sealed) -> Result<Vec<u8>, CryptoError> {
        let bound = Sealed {
            session_id: session_id.to_owned(),
            ..s.clone()
        };
        let dek = self.unwrap_dek(&bound)?;
        open(&dek, &s.nonce, &s.ciphertext, &aad_data(session_id))
    }

    /// The record under the newest KEK: its data key is unwrapped and wrapped again; the
    /// ciphertext is not touched, so the credentials are never decrypted. `None` when it is
    /// under the newest already.
    pub fn rewrap(&self, s: &Sealed) -> Result<Option<Sealed>, CryptoError> {
        let newest = self.newest();
        if s.kid == newest.id {
            return Ok(None);
        }
        let dek = self.unwrap_dek(s)?;
        let (dek_nonce, wrapped) = seal(&newest.key, &dek, &aad_dek(&s.session_id, &newest.id));
        Ok(Some(Sealed {
            kid: newest.id.clone(),
            dek_nonce: hex::encode(dek_nonce),
            dek: hex::encode(wrapped),
            ..s.clone()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(ids: &[&str]) -> KeyRing {
        KeyRing::new(
            ids.iter()
                .enumerate()
                .map(|(i, id)| Kek::new(id, [i as u8 + 1; 32]).unwrap())
                .collect(),
        )
        .unwrap()
    }

    const SECRET: &[u8] = br#"{"password":"hunter2-plaintext"}"#;

    #[test]
    fn seals_and_opens_and_hides_the_plaintext() {
        let r = ring(&["k1"]);
        let s = r.seal("s-1", "github", SECRET, 5);
        let stored = serde_json::to_string(&s).unwrap();
        assert!(!stored.contains("hunter2"), "{stored}");
        assert_eq!(r.open("s-1", &s).unwrap(), SECRET);
        // Two seals of the same plaintext differ (fresh data key and nonces).
        assert_ne!(r.seal("s-1", "github", SECRET, 5).ciphertext, s.ciphertext);
    }

    #[test]
    fn a_record_moved_or_relabelled_does_not_open() {
        let r = ring(&["k1", "k2"]);
        let s = r.seal("s-1", "github", SECRET, 5);
        assert!(matches!(r.open("s-2", &s), Err(CryptoError::Open(_))));
        let relabelled = Sealed {
            kid: "k1".into(),
            ..s.clone()
        };
        assert!(matches!(
            r.open("s-1", &relabelled),
            Err(CryptoError::Open(_))
        ));
        // One bit of the ciphertext flipped: the tag no longer matches.
        let mut ct = hex::decode(&s.ciphertext).unwrap();
        ct[0] ^= 1;
        let tampered = Sealed {
            ciphertext: hex::encode(ct),
            ..s.clone()
        };
        assert!(matches!(
            r.open("s-1", &tampered),
            Err(CryptoError::Open(_))
        ));
        assert_eq!(
            ring(&["other"]).open("s-1", &s),
            Err(CryptoError::UnknownKey("k2".into()))
        );
    }

    #[test]
    fn rewrap_moves_to_the_newest_key_and_the_old_one_can_go() {
        let old = ring(&["k1"]);
        let s = old.seal("s-1", "github", SECRET, 5);
        let both = ring(&["k1", "k2"]);
        assert_eq!(
            both.open("s-1", &s).unwrap(),
            SECRET,
            "old records stay readable"
        );
        let moved = both.rewrap(&s).unwrap().expect("moved to k2");
        assert_eq!(moved.kid, "k2");
        assert_eq!(
            moved.ciphertext, s.ciphertext,
            "the data itself is not re-encrypted"
        );
        assert!(both.rewrap(&moved).unwrap().is_none());
        // Only k2 now (same key bytes as k2 in `both`).
        let only_new = KeyRing::new(vec![Kek::new("k2", [2; 32]).unwrap()]).unwrap();
        assert_eq!(only_new.open("s-1", &moved).unwrap(), SECRET);
        assert!(only_new.open("s-1", &s).is_err());
    }

    #[test]
    fn key_flags_and_ids() {
        assert!(Kek::new("a b", [0; 32]).is_err());
        assert!(KeyRing::new(vec![]).is_err());
        let dup = vec![
            Kek::new("k", [0; 32]).unwrap(),
            Kek::new("k", [1; 32]).unwrap(),
        ];
        assert!(KeyRing::new(dup).is_err());
        assert!(Kek::from_flag("nofile").unwrap_err().contains("ID=FILE"));
        let p = std::env::temp_dir().join(format!("vncgate-kek-{}", std::process::id()));
        std::fs::write(&p, "zz").unwrap();
        let e = Kek::from_flag(&format!("k1={}", p.display())).unwrap_err();
        assert!(e.contains("64 hex digits"), "{e}");
        std::fs::write(&p, format!("{}\n", "ab".repeat(32))).unwrap();
        let k = Kek::from_flag(&format!("k1={}", p.display())).unwrap();
        assert_eq!(format!("{k:?}"), "Kek(k1, <redacted>)");
        let _ = std::fs::remove_file(&p);
    }
}
