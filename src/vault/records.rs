//! Stored record formats. Each value starts with a format version byte, so a later
//! build can read what an earlier one wrote (and refuse what it cannot).

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use zeroize::Zeroizing;

use super::VaultError;

const RECORD_V1: u8 = 1;

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, VaultError> {
    let mut out = vec![RECORD_V1];
    postcard::to_io(value, &mut out).map_err(|e| VaultError::Internal(format!("encode: {e}")))?;
    Ok(out)
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8], what: &'static str) -> Result<T, VaultError> {
    match bytes.split_first() {
        Some((&RECORD_V1, body)) => postcard::from_bytes(body).map_err(|_| VaultError::Corrupt(what)),
        _ => Err(VaultError::Corrupt(what)),
    }
}

/// Encodes a plaintext that is about to be encrypted into a zeroizing buffer sized up
/// front, so no reallocation leaves a stray copy of it on the heap.
pub fn encode_secret<T: Serialize>(value: &T, size_hint: usize) -> Result<Zeroizing<Vec<u8>>, VaultError> {
    let mut buf = Zeroizing::new(Vec::with_capacity(size_hint + 64));
    postcard::to_io(value, &mut *buf).map_err(|e| VaultError::Internal(format!("encode: {e}")))?;
    Ok(buf)
}

/// A wrapped key in the data directory, with the generation it belongs to.
#[derive(Serialize, Deserialize)]
pub struct KeyRecord {
    pub generation: u32,
    pub wrapped: Vec<u8>,
}

/// Per subject: which key generation is live and what it covers. No personal data.
#[derive(Serialize, Deserialize, Default, Clone, Debug)]
pub struct SubjectRecord {
    pub generation: u32,
    pub active: bool,
    pub transcript_count: u64,
    pub last_shredded_at: Option<i64>,
}

/// Per transcript: small plaintext bookkeeping, written on put and close, and by an
/// append only when the minute of the last write moved on (the message count is the last
/// message's sequence number + 1), so an append mostly writes just its messages, however
/// long the transcript is. No personal data.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub subject: [u8; 32],
    pub generation: u32,
    pub incarnation: u64,
    pub started_at: i64,
    pub ended_at: Option<i64>,
    /// The minute (µs) of the last write to an open transcript: its entry in the
    /// activity index. None in headers written before the time indexes, until migrated.
    pub activity: Option<i64>,
}

/// [`Header`] as written before the time indexes (record version 1).
#[derive(Deserialize)]
struct HeaderV1 {
    subject: [u8; 32],
    generation: u32,
    incarnation: u64,
    started_at: i64,
    ended_at: Option<i64>,
}

const HEADER_V2: u8 = 2;

pub fn encode_header(h: &Header) -> Result<Vec<u8>, VaultError> {
    let mut out = vec![HEADER_V2];
    postcard::to_io(h, &mut out).map_err(|e| VaultError::Internal(format!("encode: {e}")))?;
    Ok(out)
}

pub fn decode_header(bytes: &[u8]) -> Result<Header, VaultError> {
    const WHAT: &str = "transcript header";
    match bytes.split_first() {
        Some((&HEADER_V2, body)) => postcard::from_bytes(body).map_err(|_| VaultError::Corrupt(WHAT)),
        Some((&RECORD_V1, body)) => {
            let h: HeaderV1 = postcard::from_bytes(body).map_err(|_| VaultError::Corrupt(WHAT))?;
            Ok(Header {
                subject: h.subject,
                generation: h.generation,
                incarnation: h.incarnation,
                started_at: h.started_at,
                ended_at: h.ended_at,
                activity: None,
            })
        }
        _ => Err(VaultError::Corrupt(WHAT)),
    }
}

/// Per transcript incarnation, written once: its encrypted [`Body`] and, in records of
/// earlier versions only, its key (now kept in a record of its own, `transcript_keys.rs`).
#[derive(Serialize, Deserialize, Clone)]
pub struct BodyRecord {
    /// The transcript key sealed under the subject's data key; empty when the key has its
    /// own record. In memory (the body cache) always filled in.
    pub wrapped_key: Vec<u8>,
    /// [`Body`], sealed under the transcript key.
    pub body: Vec<u8>,
}

/// The personal part of a transcript header; only ever stored encrypted.
#[derive(Serialize, Deserialize)]
pub struct Body {
    pub transcript_id: String,
    pub subject_id: String,
    pub channel: String,
    pub metadata: Vec<(String, String)>,
}

/// [`Body`] borrowing from the request: serialised straight into a zeroizing buffer, so
/// no extra owned copy of the personal data is made on the way to encryption.
#[derive(Serialize)]
pub struct BodyRef<'a> {
    pub transcript_id: &'a str,
    pub subject_id: &'a str,
    pub channel: &'a str,
    pub metadata: Vec<(&'a str, &'a str)>,
}

/// One message; only ever stored encrypted. Borrowed both ways: written straight from the
/// request into a zeroizing buffer, and read as a view into the decrypted plaintext, so
/// no extra owned copy of the personal data is made on the way in or out.
#[derive(Serialize, Deserialize)]
pub struct StoredMessageRef<'a> {
    pub message_id: &'a str,
    pub role: u8,
    pub author_name: &'a str,
    pub sent_at: i64,
    pub text: &'a str,
}

/// Per value-log segment: bytes of values no record points at any more.
#[derive(Serialize, Deserialize, Default, Debug)]
pub struct SegmentTally {
    pub dead_bytes: u64,
}

/// Work for the background reclaimer: ciphertext nobody can read any more.
#[derive(Serialize, Deserialize, Debug)]
pub enum Garbage {
    /// All messages of one dead transcript incarnation.
    Incarnation { tenant: String, transcript: [u8; 32], incarnation: u64 },
    /// Every transcript of one shredded subject generation.
    SubjectGeneration { tenant: String, subject: [u8; 32], generation: u32 },
    /// Every record of an erased tenant.
    Tenant { tenant: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_written_before_the_time_indexes_read_back_without_activity() {
        #[derive(Serialize)]
        struct Old {
            subject: [u8; 32],
            generation: u32,
            incarnation: u64,
            started_at: i64,
            ended_at: Option<i64>,
        }
        let old =
            encode(&Old { subject: [1; 32], generation: 2, incarnation: 3, started_at: 4, ended_at: Some(5) }).unwrap();
        let h = decode_header(&old).unwrap();
        assert_eq!((h.generation, h.incarnation, h.started_at, h.ended_at, h.activity), (2, 3, 4, Some(5), None));
        let new = Header { activity: Some(60_000_000), ..h };
        assert_eq!(decode_header(&encode_header(&new).unwrap()).unwrap(), new);
        assert!(decode_header(&[9, 0]).is_err());
    }

    #[test]
    fn unknown_record_versions_are_refused() {
        let mut bytes = encode(&SubjectRecord::default()).unwrap();
        assert!(decode::<SubjectRecord>(&bytes, "subject").is_ok());
        bytes[0] = 2;
        assert!(matches!(decode::<SubjectRecord>(&bytes, "subject"), Err(VaultError::Corrupt("subject"))));
    }
}
