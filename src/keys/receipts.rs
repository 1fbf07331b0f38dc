//! The key that signs erasure receipts: Ed25519, kept in the key directory sealed under
//! the root key. It is never rotated with the key-store keys, so a receipt stays
//! verifiable after the epoch it names is destroyed. Its public half is written beside it
//! (`receipt-signing.pub`) and served by the API: with it alone, a tenant, a data subject
//! or a regulator checks a receipt offline.

use std::fs;
use std::path::Path;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::root::RootKey;
use super::{KeyError, files};
use crate::crypto::{self, Aad, Algorithm, Binding, RecordKind};

const KEY_FILE: &str = "receipt-signing.key";
/// The public key, hex, for operators to publish.
pub const PUBLIC_FILE: &str = "receipt-signing.pub";
const MAGIC: [u8; 4] = *b"CVRK";
const VERSION: u16 = 1;

#[derive(Serialize, Deserialize)]
struct KeyFile {
    magic: [u8; 4],
    version: u16,
    sealed: Vec<u8>,
}

/// Signs receipts. The secret half is zeroized on drop and never leaves this type.
pub struct ReceiptSigner {
    key: SigningKey,
    key_id: String,
}

impl ReceiptSigner {
    /// Loads the signing key from `dir`, making one on first use.
    pub(super) fn open(dir: &Path, root: &RootKey, store_id: &[u8; 16], binding: &Binding) -> Result<Self, KeyError> {
        let path = dir.join(KEY_FILE);
        let aad = Aad::new(RecordKind::ReceiptSigningKey).bytes(store_id);
        let seed: Zeroizing<Vec<u8>> = match fs::read(&path) {
            Ok(bytes) => {
                let file: KeyFile = postcard::from_bytes(&bytes)
                    .map_err(|_| KeyError::Corrupt(format!("{} is not a key file", path.display())))?;
                if file.magic != MAGIC || file.version != VERSION {
                    return Err(KeyError::Corrupt(format!("{}: unknown format", path.display())));
                }
                binding
                    .open(root.wrapping_key(), &aad, &file.sealed)
                    .map_err(|_| KeyError::Corrupt(format!("{} does not open under this root key", path.display())))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let seed = Zeroizing::new(crypto::random_bytes::<32>()?.to_vec());
                let sealed = binding.seal(Algorithm::Aes256Gcm, root.wrapping_key(), &aad, &seed)?;
                let file = KeyFile { magic: MAGIC, version: VERSION, sealed };
                let bytes = postcard::to_allocvec(&file).map_err(|e| KeyError::Corrupt(e.to_string()))?;
                files::write_atomic(&path, &bytes).map_err(|e| KeyError::io(&path, e))?;
                seed
            }
            Err(e) => return Err(KeyError::io(&path, e)),
        };
        let mut raw = Zeroizing::new([0u8; 32]);
        raw.copy_from_slice(seed.get(..32).ok_or_else(|| KeyError::Corrupt("receipt key length".into()))?);
        let key = SigningKey::from_bytes(&raw);
        let public = key.verifying_key().to_bytes();
        let pub_path = dir.join(PUBLIC_FILE);
        if fs::read_to_string(&pub_path).ok().as_deref().map(str::trim) != Some(hex::encode(public).as_str()) {
            files::write_atomic(&pub_path, format!("{}\n", hex::encode(public)).as_bytes())
                .map_err(|e| KeyError::io(&pub_path, e))?;
        }
        Ok(ReceiptSigner { key, key_id: key_id_of(&public) })
    }

    /// Ed25519 signature over `payload`.
    pub fn sign(&self, payload: &[u8]) -> [u8; 64] {
        self.key.sign(payload).to_bytes()
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// Short public name of the key: the first 8 bytes of its public key's SHA-256, hex.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }
}

impl std::fmt::Debug for ReceiptSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiptSigner").field("key_id", &self.key_id).finish_non_exhaustive()
    }
}

/// The key id of a public key (see [`ReceiptSigner::key_id`]).
pub fn key_id_of(public: &[u8; 32]) -> String {
    hex::encode(&Sha256::digest(public)[..8])
}

/// Why a receipt does not verify.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureCheck {
    #[error("the public key is not 64 hexadecimal characters of an Ed25519 key")]
    BadPublicKey,
    #[error("the signature is not 64 bytes")]
    BadSignatureEncoding,
    #[error("the receipt was signed by key {signed_by}, not by the key given ({given})")]
    OtherKey { signed_by: String, given: String },
    #[error("the signature does not match the receipt: it was altered, or not signed by this key")]
    Mismatch,
}

/// Checks an Ed25519 signature over `payload` with a hex public key: what
/// `chatvault receipt verify` does, with nothing of the server's.
pub fn verify_signature(
    public_hex: &str,
    key_id: &str,
    payload: &[u8],
    signature: &[u8],
) -> Result<(), SignatureCheck> {
    let mut public = [0u8; 32];
    hex::decode_to_slice(public_hex.trim(), &mut public).map_err(|_| SignatureCheck::BadPublicKey)?;
    let given = key_id_of(&public);
    if given != key_id {
        return Err(SignatureCheck::OtherKey { signed_by: key_id.to_owned(), given });
    }
    let key = VerifyingKey::from_bytes(&public).map_err(|_| SignatureCheck::BadPublicKey)?;
    let sig: [u8; 64] = signature.try_into().map_err(|_| SignatureCheck::BadSignatureEncoding)?;
    key.verify_strict(payload, &Signature::from_bytes(&sig)).map_err(|_| SignatureCheck::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::SecretKey;

    #[test]
    fn a_receipt_key_persists_signs_and_verifies_only_its_own_untouched_payloads() {
        let dir = tempfile::tempdir().unwrap();
        let root = RootKey::from_secret(SecretKey::from_slice(&[5; 32]).unwrap());
        let signer = ReceiptSigner::open(dir.path(), &root, &[1; 16], &Binding::new("eu", false)).unwrap();
        let again = ReceiptSigner::open(dir.path(), &root, &[1; 16], &Binding::new("eu", false)).unwrap();
        assert_eq!(signer.public_key(), again.public_key(), "the same key after a reopen");
        let public = fs::read_to_string(dir.path().join(PUBLIC_FILE)).unwrap();
        assert_eq!(public.trim(), hex::encode(signer.public_key()));

        let sig = signer.sign(b"payload");
        assert_eq!(verify_signature(&public, signer.key_id(), b"payload", &sig), Ok(()));
        assert_eq!(verify_signature(&public, signer.key_id(), b"paylOad", &sig), Err(SignatureCheck::Mismatch));
        let mut bad = sig;
        bad[10] ^= 1;
        assert_eq!(verify_signature(&public, signer.key_id(), b"payload", &bad), Err(SignatureCheck::Mismatch));
        let other = hex::encode([7u8; 32]);
        assert!(matches!(
            verify_signature(&other, signer.key_id(), b"payload", &sig),
            Err(SignatureCheck::OtherKey { .. } | SignatureCheck::BadPublicKey)
        ));
        let wrong_root = RootKey::from_secret(SecretKey::from_slice(&[6; 32]).unwrap());
        assert!(matches!(
            ReceiptSigner::open(dir.path(), &wrong_root, &[1; 16], &Binding::new("eu", false)),
            Err(KeyError::Corrupt(_))
        ));
    }
}
