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
}

/// Builder for an AAD byte string.
pub struct Aad(Vec<u8>);

impl Aad {
    pub fn new(kind: RecordKind) -> Self {
        let mut v = Vec::with_capacity(128);
        v.extend_from_slice(b"chatvault/v1");
        v.push(kind as u8);
        Aad(v)
    }

    pub fn bytes(mut self, field: &[u8]) -> Self {
        self.0.extend_from_slice(&(field.len() as u32).to_be_bytes());
        self.0.extend_from_slice(field);
        self
    }

    pub fn u64(mut self, n: u64) -> Self {
        self.0.extend_from_slice(&n.to_be_bytes());
        self
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_prefixes_keep_field_boundaries_apart() {
        let a = Aad::new(RecordKind::Message).bytes(b"ab").bytes(b"c");
        let b = Aad::new(RecordKind::Message).bytes(b"a").bytes(b"bc");
        assert_ne!(a.as_slice(), b.as_slice());
    }

    #[test]
    fn kind_is_part_of_the_aad() {
        let a = Aad::new(RecordKind::Message).bytes(b"x");
        let b = Aad::new(RecordKind::TranscriptBody).bytes(b"x");
        assert_ne!(a.as_slice(), b.as_slice());
    }
}
