//! Erasure receipts: what a shred or a delete hands back as proof. Each names its
//! erasure by an opaque id — the key-store epoch that must be destroyed and the ledger
//! entry, sealed for the tenant, so it says nothing of other tenants' erasures — and is
//! signed (Ed25519, `keys::ReceiptSigner`) over a canonical JSON payload that anyone can
//! check offline with the server's public key. Whether an erasure is final yet is asked
//! by id: final once its epoch is destroyed, with the time it was.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use super::layout::Blind;
use super::model::{ErasureState, ErasureStatus, ShredReceipt, SignedReceipt, TenantId, Timestamp};
use super::{Vault, VaultError};
use crate::crypto::{Aad, Algorithm, RecordKind};
use crate::keys::{ErasureKind, SignatureCheck, verify_signature};

/// The format name every receipt payload carries.
pub const RECEIPT_FORMAT: &str = "chatvault.receipt.v1";
const ERASURE_ID_KEY: &[u8] = b"chatvault/control/erasure-id/v1";

/// What a receipt says, as signed: field order fixed, so the payload is canonical.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptPayload {
    pub format: String,
    /// `subject` (ShredSubject) or `transcript` (DeleteTranscript).
    pub kind: String,
    pub tenant: String,
    /// Keyed blind index of the subject id: the tenant matches it to its own records.
    pub subject_blind_id: String,
    /// Keyed blind index of the transcript id, for a deletion.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub transcript_blind_id: String,
    pub erased_at: String,
    /// Transcripts the erasure made unreadable.
    pub transcripts_erased: u64,
    /// Opaque id of the erasure; empty when the call erased nothing (already erased, or
    /// never stored).
    pub erasure_id: String,
    /// Which key signed it (`keys::key_id_of` its public key).
    pub key_id: String,
}

/// Why a receipt does not verify.
#[derive(Debug, thiserror::Error)]
pub enum ReceiptError {
    #[error("receipt: {0}")]
    Malformed(String),
    #[error(transparent)]
    Signature(#[from] SignatureCheck),
}

/// Checks a signed receipt with the server's public key (hex) alone and returns what it
/// says. Nothing of the server is needed.
pub fn verify_receipt(public_hex: &str, signed: &SignedReceipt) -> Result<ReceiptPayload, ReceiptError> {
    verify_signature(public_hex, &signed.key_id, signed.payload.as_bytes(), &signed.signature)?;
    let payload: ReceiptPayload =
        serde_json::from_str(&signed.payload).map_err(|e| ReceiptError::Malformed(format!("payload: {e}")))?;
    if payload.format != RECEIPT_FORMAT {
        return Err(ReceiptError::Malformed(format!("format {:?} is not {RECEIPT_FORMAT}", payload.format)));
    }
    if payload.key_id != signed.key_id {
        return Err(ReceiptError::Malformed("the payload names another key than the signature".into()));
    }
    Ok(payload)
}

/// What one erasure call did, for its receipt.
pub(super) struct Erased<'a> {
    pub kind: ErasureKind,
    pub subject: &'a Blind,
    pub transcript: Option<&'a Blind>,
    pub at: Timestamp,
    pub transcripts_erased: u64,
    /// The epoch in force and the ledger entry; `None` when nothing was erased.
    pub done: Option<(u64, u64)>,
}

/// The epoch and ledger entry an erasure id stands for.
struct ErasureRef {
    epoch: u64,
    counter: u64,
    at: Timestamp,
}

impl Vault {
    fn erasure_id_aad(tenant: &TenantId) -> Aad {
        Aad::new(RecordKind::ErasureId).bytes(tenant.as_str().as_bytes())
    }

    fn erasure_id(&self, tenant: &TenantId, r: &ErasureRef) -> Result<String, VaultError> {
        let mut plain = Vec::with_capacity(24);
        plain.extend_from_slice(&r.epoch.to_be_bytes());
        plain.extend_from_slice(&r.counter.to_be_bytes());
        plain.extend_from_slice(&r.at.micros().to_be_bytes());
        let key = self.keys.control_key(ERASURE_ID_KEY);
        let sealed = self
            .keys
            .binding()
            .seal(Algorithm::Aes256Gcm, &key, &Self::erasure_id_aad(tenant), &plain)
            .map_err(super::seal::seal_err)?;
        Ok(URL_SAFE_NO_PAD.encode(sealed))
    }

    fn erasure_ref(&self, tenant: &TenantId, id: &str) -> Result<ErasureRef, VaultError> {
        let bad = || VaultError::invalid("erasure_id", "is not an erasure id this server issued to this tenant");
        let sealed = URL_SAFE_NO_PAD.decode(id.trim()).map_err(|_| bad())?;
        let key = self.keys.control_key(ERASURE_ID_KEY);
        let plain = self.keys.binding().open(&key, &Self::erasure_id_aad(tenant), &sealed).map_err(|_| bad())?;
        let field = |i: usize| plain.get(i * 8..i * 8 + 8).and_then(|b| b.try_into().ok()).ok_or_else(bad);
        let at = Timestamp::from_micros(i64::from_be_bytes(field(2)?)).ok_or_else(bad)?;
        Ok(ErasureRef { epoch: u64::from_be_bytes(field(0)?), counter: u64::from_be_bytes(field(1)?), at })
    }

    /// Whether an erasure is final yet: its epoch destroyed (and when), or still pending.
    pub fn erasure_status(&self, tenant: &TenantId, erasure_id: &str) -> Result<ErasureStatus, VaultError> {
        let r = self.erasure_ref(tenant, erasure_id)?;
        let destroyed = self.ledger.with_state(|s| s.destroyed.get(&r.epoch).copied())?;
        let oldest_live = self.keys.epochs().first().copied().unwrap_or(u64::MAX);
        let state = match destroyed {
            Some(at) => ErasureState::Final { at: Timestamp::from_micros(at).unwrap_or(r.at) },
            // Destroyed without the ledger hearing (a crash): final, time unknown.
            None if r.epoch < oldest_live => ErasureState::Final { at: r.at },
            None => ErasureState::Pending,
        };
        let _ = r.counter;
        Ok(ErasureStatus { erasure_id: erasure_id.to_owned(), erased_at: r.at, state })
    }

    /// The signed receipt of an erasure (`done`: its epoch and ledger entry), or of a call
    /// that erased nothing.
    pub(super) fn receipt(&self, tenant: &TenantId, e: Erased<'_>) -> Result<ShredReceipt, VaultError> {
        let Erased { kind, subject, transcript, at, transcripts_erased, done } = e;
        let erasure_id = match done {
            Some((epoch, counter)) => self.erasure_id(tenant, &ErasureRef { epoch, counter, at })?,
            None => String::new(),
        };
        let payload = ReceiptPayload {
            format: RECEIPT_FORMAT.into(),
            kind: match kind {
                ErasureKind::Subject => "subject",
                ErasureKind::Transcript => "transcript",
                ErasureKind::Tenant => "tenant",
            }
            .into(),
            tenant: tenant.as_str().to_owned(),
            subject_blind_id: hex::encode(subject),
            transcript_blind_id: transcript.map(hex::encode).unwrap_or_default(),
            erased_at: crate::export::rfc3339(at).to_string(),
            transcripts_erased,
            erasure_id: erasure_id.clone(),
            key_id: self.receipts.key_id().to_owned(),
        };
        let payload = serde_json::to_string(&payload).map_err(|e| VaultError::Internal(e.to_string()))?;
        let signed = SignedReceipt {
            signature: self.receipts.sign(payload.as_bytes()).to_vec(),
            key_id: self.receipts.key_id().to_owned(),
            payload,
        };
        Ok(ShredReceipt {
            subject_blind_id: hex::encode(subject),
            transcript_blind_id: transcript.map(hex::encode).unwrap_or_default(),
            shredded_at: at,
            transcripts_shredded: transcripts_erased,
            state: if done.is_some() { ErasureState::Pending } else { ErasureState::NothingErased },
            erasure_id,
            signed,
        })
    }

    /// The public key receipts are signed with (hex) and its key id.
    pub fn receipt_public_key(&self) -> (String, String) {
        (hex::encode(self.receipts.public_key()), self.receipts.key_id().to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::super::{AuthorRole, Message, Transcript, testing};
    use super::*;

    #[tokio::test]
    async fn receipts_verify_offline_and_say_when_the_erasure_becomes_final() {
        let dir = tempfile::tempdir().unwrap();
        let v = testing::open(dir.path(), testing::HandClock::new(), |_| {});
        let (acme, other) = (TenantId::parse("acme").unwrap(), TenantId::parse("other").unwrap());
        let t = Transcript::new("t", "alice", vec![Message::new("m", AuthorRole::Visitor, "A", "x")]);
        v.put_transcript(&acme, t).await.unwrap();
        let receipt = v.shred_subject(&acme, "alice").await.unwrap();
        let (public, _) = v.receipt_public_key();
        let said = verify_receipt(&public, &receipt.signed).unwrap();
        assert_eq!((said.kind.as_str(), said.transcripts_erased), ("subject", 1));
        assert_eq!(said.erasure_id, receipt.erasure_id);

        let mut altered = receipt.signed.clone();
        altered.payload = altered.payload.replace("\"transcripts_erased\":1", "\"transcripts_erased\":0");
        assert!(matches!(verify_receipt(&public, &altered), Err(ReceiptError::Signature(SignatureCheck::Mismatch))));

        assert_eq!(v.erasure_status(&acme, &receipt.erasure_id).unwrap().state, ErasureState::Pending);
        assert!(v.erasure_status(&other, &receipt.erasure_id).is_err(), "another tenant cannot read it");
        v.rotate_key_store().unwrap();
        assert!(matches!(v.erasure_status(&acme, &receipt.erasure_id).unwrap().state, ErasureState::Final { .. }));

        // A retry erases nothing and reveals no epoch.
        let again = v.shred_subject(&acme, "alice").await.unwrap();
        assert_eq!((again.erasure_id.as_str(), again.state), ("", ErasureState::NothingErased));
        assert_eq!(verify_receipt(&public, &again.signed).unwrap().erasure_id, "");
    }
}
