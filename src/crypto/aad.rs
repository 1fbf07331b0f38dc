//! Associated data: binds each ciphertext to where it belongs.
//!
//! Every field is length-prefixed so no two different field lists encode alike;
//! the record kind comes first, so a header can never pass for a message.

/// What a ciphertext is; part of its AAD.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    /// A key-store key wrapped under the root key (key directory).
    KeyStoreKey = 1,
    /// A tenant's blind-index key wrapped under a key-store key.
    TenantKey = 2,
    /// A subject's data key wrapped under a key-store key.
    SubjectKey = 3,
    /// A transcript's key wrapped under its subject's data key.
    TranscriptKey = 4,
    /// The encrypted part of a transcript header.
    TranscriptBody = 5,
    /// One message of a transcript.
    Message = 6,
    /// A tenant's registry entry (settings, API key hashes).
    TenantRecord = 7,
    /// A transcript key (already wrapped under its subject's data key) sealed again under
    /// a key-store key, so that a key-store rotation sweeps every copy of a deleted one.
    TranscriptKeySeal = 8,
    /// The seed of the key that signs erasure receipts, wrapped under the root key.
    ReceiptSigningKey = 9,
    /// An erasure id: which epoch and ledger entry an erasure is, sealed for one tenant.
    ErasureId = 10,
    /// A run of one transcript's messages sealed as one record (a packed chunk).
    MessageChunk = 11,
}

/// Builder for an AAD: what a record is and where it belongs. How it is encoded depends
/// on the envelope version ([`Binding`]).
pub struct Aad {
    kind: RecordKind,
    fields: Vec<u8>,
}

impl Aad {
    pub fn new(kind: RecordKind) -> Self {
        Aad { kind, fields: Vec::with_capacity(112) }
    }

    pub fn bytes(mut self, field: &[u8]) -> Self {
        self.fields.extend_from_slice(&(field.len() as u32).to_be_bytes());
        self.fields.extend_from_slice(field);
        self
    }

    pub fn u64(mut self, n: u64) -> Self {
        self.fields.extend_from_slice(&n.to_be_bytes());
        self
    }

    /// The AAD of envelopes written before regions (v1): the record's fields alone.
    pub fn legacy(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(13 + self.fields.len());
        v.extend_from_slice(b"chatvault/v1");
        v.push(self.kind as u8);
        v.extend_from_slice(&self.fields);
        v
    }

    /// The AAD of v2 envelopes: the region first, then the record's fields.
    pub fn in_region(&self, region: &str) -> Vec<u8> {
        let mut v = Vec::with_capacity(21 + region.len() + self.fields.len());
        v.extend_from_slice(b"chatvault/v2");
        v.extend_from_slice(&(region.len() as u32).to_be_bytes());
        v.extend_from_slice(region.as_bytes());
        v.push(self.kind as u8);
        v.extend_from_slice(&self.fields);
        v
    }
}

/// Seals and opens for one region: every envelope it writes has the region in its AAD,
/// so a record or wrapped key copied into another region's shard does not open there,
/// even under the same keys. Envelopes from before regions (v1) open only where the
/// key directory was migrated from a single-region release (`legacy`).
#[derive(Clone, Debug)]
pub struct Binding {
    region: std::sync::Arc<str>,
    legacy: bool,
}

impl Binding {
    pub fn new(region: &str, legacy: bool) -> Self {
        Binding { region: region.into(), legacy }
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    /// Whether envelopes from before regions are read.
    pub fn reads_legacy(&self) -> bool {
        self.legacy
    }

    pub fn seal(
        &self,
        alg: super::Algorithm,
        key: &super::SecretKey,
        aad: &Aad,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, super::CryptoError> {
        super::aead::seal_as(super::aead::ENVELOPE_V2, alg, key, &aad.in_region(&self.region), plaintext)
    }

    pub fn open(
        &self,
        key: &super::SecretKey,
        aad: &Aad,
        envelope: &[u8],
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, super::CryptoError> {
        match super::aead::version_of(envelope)? {
            super::aead::ENVELOPE_V2 => super::aead::open(key, &aad.in_region(&self.region), envelope),
            super::aead::ENVELOPE_V1 if self.legacy => super::aead::open(key, &aad.legacy(), envelope),
            super::aead::ENVELOPE_V1 => Err(super::CryptoError::Authentication),
            v => Err(super::CryptoError::UnknownVersion(v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::crypto::{Algorithm, CryptoError, SecretKey};

    #[test]
    fn length_prefixes_keep_field_boundaries_apart() {
        let a = Aad::new(RecordKind::Message).bytes(b"ab").bytes(b"c");
        let b = Aad::new(RecordKind::Message).bytes(b"a").bytes(b"bc");
        assert_ne!(a.in_region("eu"), b.in_region("eu"));
        assert_ne!(a.legacy(), b.legacy());
    }

    #[test]
    fn kind_is_part_of_the_aad() {
        let a = Aad::new(RecordKind::Message).bytes(b"x");
        let b = Aad::new(RecordKind::TranscriptBody).bytes(b"x");
        assert_ne!(a.in_region("eu"), b.in_region("eu"));
    }

    #[test]
    fn a_record_sealed_in_one_region_does_not_open_in_another_under_the_same_key() {
        let key = SecretKey::generate().unwrap();
        let aad = || Aad::new(RecordKind::Message).bytes(b"tenant").u64(7);
        let eu = Binding::new("eu", false);
        let sealed = eu.seal(Algorithm::Aes256Gcm, &key, &aad(), b"hi").unwrap();
        assert_eq!(&eu.open(&key, &aad(), &sealed).unwrap()[..], b"hi");
        for other in [Binding::new("us", false), Binding::new("us", true), Binding::new("e", false)] {
            assert_eq!(other.open(&key, &aad(), &sealed), Err(CryptoError::Authentication));
        }
        // Nor can the version byte be turned back to pass as a record from before regions.
        let mut downgraded = sealed.clone();
        downgraded[0] = 1;
        assert_eq!(Binding::new("eu", true).open(&key, &aad(), &downgraded), Err(CryptoError::Authentication));
    }

    #[test]
    fn records_from_before_regions_open_only_where_the_key_directory_was_migrated() {
        let key = SecretKey::generate().unwrap();
        let aad = || Aad::new(RecordKind::Message).bytes(b"tenant");
        let old = crate::crypto::seal(Algorithm::ChaCha20Poly1305, &key, &aad().legacy(), b"old").unwrap();
        assert_eq!(&Binding::new("eu", true).open(&key, &aad(), &old).unwrap()[..], b"old");
        assert_eq!(Binding::new("eu", false).open(&key, &aad(), &old), Err(CryptoError::Authentication));
    }
}
