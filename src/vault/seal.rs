//! Encrypting vault records in place: which key, which AAD. A record's AAD names its
//! tenant, subject, transcript incarnation and (for messages) its sequence number, so a
//! ciphertext copied anywhere else fails to open.

use std::collections::BTreeMap;

use zeroize::Zeroizing;

use super::VaultError;
use super::layout::Blind;
use super::model::{AuthorRole, Message, MessageRef, Timestamp, Transcript};
use super::records::{self, Body, BodyRef, StoredMessageRef};
use crate::crypto::{Aad, Algorithm, Binding, CryptoError, RecordKind, SecretKey};

/// Where a transcript's records belong.
pub struct Place<'a> {
    /// The region's sealing: its name is in every AAD.
    pub binding: &'a Binding,
    pub tenant: &'a str,
    pub subject: &'a Blind,
    pub transcript: &'a Blind,
    pub incarnation: u64,
}

impl super::Vault {
    /// Where a transcript's records belong, in this vault's region.
    pub(super) fn place<'a>(
        &'a self,
        tenant: &'a super::model::TenantId,
        subject: &'a Blind,
        transcript: &'a Blind,
        incarnation: u64,
    ) -> Place<'a> {
        Place { binding: self.binding(), tenant: tenant.as_str(), subject, transcript, incarnation }
    }
}

impl Place<'_> {
    fn aad(&self, kind: RecordKind) -> Aad {
        Aad::new(kind).bytes(self.tenant.as_bytes()).bytes(self.subject).bytes(self.transcript).u64(self.incarnation)
    }

    pub fn wrap_transcript_key(
        &self,
        alg: Algorithm,
        dek: &SecretKey,
        generation: u32,
        tk: &SecretKey,
    ) -> Result<Vec<u8>, VaultError> {
        let aad = self.aad(RecordKind::TranscriptKey).u64(u64::from(generation));
        self.binding.seal(alg, dek, &aad, tk.expose()).map_err(seal_err)
    }

    pub fn unwrap_transcript_key(
        &self,
        dek: &SecretKey,
        generation: u32,
        wrapped: &[u8],
    ) -> Result<SecretKey, VaultError> {
        let aad = self.aad(RecordKind::TranscriptKey).u64(u64::from(generation));
        let raw = self.binding.open(dek, &aad, wrapped).map_err(crypto_err("transcript key"))?;
        SecretKey::from_slice(&raw).map_err(crypto_err("transcript key"))
    }

    pub fn seal_body(&self, alg: Algorithm, tk: &SecretKey, t: &Transcript) -> Result<Vec<u8>, VaultError> {
        let body = BodyRef {
            transcript_id: &t.transcript_id,
            subject_id: &t.subject_id,
            channel: &t.channel,
            metadata: t.metadata.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect(),
        };
        let hint = body.transcript_id.len()
            + body.subject_id.len()
            + body.channel.len()
            + body.metadata.iter().map(|(k, v)| k.len() + v.len() + 10).sum::<usize>();
        let plain = records::encode_secret(&body, hint)?;
        self.binding.seal(alg, tk, &self.aad(RecordKind::TranscriptBody), &plain).map_err(seal_err)
    }

    /// Opens a body into a transcript without messages.
    pub fn open_body(&self, tk: &SecretKey, sealed: &[u8]) -> Result<Transcript, VaultError> {
        let plain =
            self.binding.open(tk, &self.aad(RecordKind::TranscriptBody), sealed).map_err(crypto_err("transcript"))?;
        let body: Body = postcard::from_bytes(&plain).map_err(|_| VaultError::Corrupt("transcript"))?;
        Ok(Transcript {
            transcript_id: body.transcript_id,
            subject_id: body.subject_id,
            channel: body.channel,
            started_at: None,
            ended_at: None,
            metadata: body.metadata.into_iter().collect::<BTreeMap<_, _>>(),
            messages: Vec::new(),
            message_count: 0,
        })
    }

    pub fn seal_message_plain(
        &self,
        alg: Algorithm,
        tk: &SecretKey,
        seq: u32,
        plain: &[u8],
    ) -> Result<Vec<u8>, VaultError> {
        self.binding.seal(alg, tk, &self.message_aad(seq), plain).map_err(seal_err)
    }

    /// A single message's plaintext, for packing it into a chunk.
    pub fn open_message_plain(
        &self,
        tk: &SecretKey,
        seq: u32,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        self.binding.open(tk, &self.message_aad(seq), sealed).map_err(crypto_err("message"))
    }

    fn message_aad(&self, seq: u32) -> Aad {
        self.aad(RecordKind::Message).u64(u64::from(seq))
    }

    /// Seals messages `first ..` as one chunk. Its AAD names the span, so a chunk moved
    /// to other sequence numbers, cut or merged fails to open.
    pub fn seal_chunk(
        &self,
        alg: Algorithm,
        tk: &SecretKey,
        first: u32,
        plains: &[Zeroizing<Vec<u8>>],
    ) -> Result<Vec<u8>, VaultError> {
        let mut buf = Zeroizing::new(Vec::with_capacity(1 + plains.iter().map(|p| p.len() + 3).sum::<usize>()));
        buf.push(CHUNK_V1);
        for p in plains {
            put_varint(&mut buf, p.len() as u64);
            buf.extend_from_slice(p);
        }
        let aad = self.chunk_aad(first, plains.len() as u32);
        self.binding.seal(alg, tk, &aad, &buf).map_err(seal_err)
    }

    /// Opens the chunk of messages `first .. first + count`: its plaintext, to be split
    /// with [`chunk_messages`].
    pub fn open_chunk(
        &self,
        tk: &SecretKey,
        first: u32,
        count: u32,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        self.binding.open(tk, &self.chunk_aad(first, count), sealed).map_err(crypto_err("message"))
    }

    fn chunk_aad(&self, first: u32, count: u32) -> Aad {
        self.aad(RecordKind::MessageChunk).u64(u64::from(first)).u64(u64::from(count))
    }
}

/// A chunk's plaintext format: a version byte, then each message's plaintext after its
/// length (LEB128). Chunks of another version are refused as corrupt, never misread.
const CHUNK_V1: u8 = 1;

/// The messages of an opened chunk of `count`, in order.
pub fn chunk_messages(plain: &[u8], count: u32) -> Result<Vec<&[u8]>, VaultError> {
    let corrupt = || VaultError::Corrupt("message chunk");
    let (&version, mut rest) = plain.split_first().ok_or_else(corrupt)?;
    if version != CHUNK_V1 {
        return Err(corrupt());
    }
    let mut out = Vec::with_capacity(count as usize);
    while !rest.is_empty() {
        let (len, after) = take_varint(rest).ok_or_else(corrupt)?;
        let len = usize::try_from(len).map_err(|_| corrupt())?;
        let (m, after) = (after.get(..len).ok_or_else(corrupt)?, &after[len..]);
        out.push(m);
        rest = after;
    }
    if out.len() != count as usize {
        return Err(corrupt());
    }
    Ok(out)
}

fn put_varint(buf: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        buf.push((n as u8) | 0x80);
        n >>= 7;
    }
    buf.push(n as u8);
}

fn take_varint(b: &[u8]) -> Option<(u64, &[u8])> {
    let mut n = 0u64;
    for (i, &byte) in b.iter().enumerate().take(10) {
        n |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((n, &b[i + 1..]));
        }
    }
    None
}

/// A message's plaintext as stored, alone or in a chunk.
pub fn message_plain(m: &Message, now: Timestamp) -> Result<Zeroizing<Vec<u8>>, VaultError> {
    let stored = StoredMessageRef {
        message_id: &m.message_id,
        role: m.author_role.code(),
        author_name: &m.author_name,
        sent_at: m.sent_at.unwrap_or(now).micros(),
        text: &m.text,
    };
    let hint = stored.message_id.len() + stored.author_name.len() + stored.text.len() + 16;
    records::encode_secret(&stored, hint)
}

/// Lends `f` a view of a message's plaintext; nothing of it is copied unless `f` copies it.
pub fn message_view<R>(plain: &[u8], f: impl FnOnce(MessageRef<'_>) -> R) -> Result<R, VaultError> {
    let s: StoredMessageRef<'_> = postcard::from_bytes(plain).map_err(|_| VaultError::Corrupt("message"))?;
    Ok(f(MessageRef {
        message_id: s.message_id,
        author_role: AuthorRole::from_code(s.role).ok_or(VaultError::Corrupt("message"))?,
        author_name: s.author_name,
        sent_at: Timestamp::from_micros(s.sent_at).ok_or(VaultError::Corrupt("message"))?,
        text: s.text,
    }))
}

pub fn owned_message(m: MessageRef<'_>) -> Message {
    Message {
        message_id: m.message_id.to_owned(),
        author_role: m.author_role,
        author_name: m.author_name.to_owned(),
        sent_at: Some(m.sent_at),
        text: m.text.to_owned(),
    }
}

/// A failure to encrypt is the server's own fault, never the stored data's.
pub fn seal_err(e: CryptoError) -> VaultError {
    VaultError::Internal(format!("encryption failed: {e}"))
}

/// Maps a crypto failure on stored data to the vault error that names the record.
pub fn crypto_err(what: &'static str) -> impl Fn(CryptoError) -> VaultError {
    move |e| match e {
        CryptoError::Authentication => VaultError::Integrity(what),
        CryptoError::Rng => VaultError::Internal("random number generator failed".into()),
        _ => VaultError::Corrupt(what),
    }
}
