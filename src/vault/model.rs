//! Domain types the vault speaks. Personal fields are kept out of `Debug`.

use std::collections::BTreeMap;
use std::fmt;

use super::VaultError;

/// A tenant (chat business) id: 1-64 characters of `[A-Za-z0-9._-]`. Not personal data.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct TenantId(String);

impl TenantId {
    pub fn parse(s: &str) -> Result<Self, VaultError> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(TenantId(s.to_owned()))
        } else {
            Err(VaultError::invalid("tenant_id", "must be 1-64 characters of A-Z a-z 0-9 . _ -"))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Microseconds since the Unix epoch, from 1970-01-01 to 9999-12-31.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Hash)]
pub struct Timestamp(i64);

/// 9999-12-31T23:59:59.999999Z, the end of protobuf's Timestamp range.
const MAX_MICROS: i64 = 253_402_300_799_999_999;

impl Timestamp {
    pub const UNIX_EPOCH: Timestamp = Timestamp(0);

    pub fn from_micros(micros: i64) -> Option<Self> {
        (0..=MAX_MICROS).contains(&micros).then_some(Timestamp(micros))
    }
    /// From protobuf's seconds + nanos; `None` when out of range or malformed.
    pub fn from_unix(seconds: i64, nanos: i32) -> Option<Self> {
        if !(0..1_000_000_000).contains(&nanos) {
            return None;
        }
        let micros = seconds.checked_mul(1_000_000)?.checked_add(i64::from(nanos / 1000))?;
        Self::from_micros(micros)
    }
    pub fn micros(self) -> i64 {
        self.0
    }
    pub fn seconds(self) -> i64 {
        self.0.div_euclid(1_000_000)
    }
    pub fn subsec_nanos(self) -> i32 {
        (self.0.rem_euclid(1_000_000) * 1000) as i32
    }
}

/// Who wrote a message.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum AuthorRole {
    Visitor,
    Agent,
    Bot,
    System,
}

impl AuthorRole {
    pub(crate) fn code(self) -> u8 {
        match self {
            AuthorRole::Visitor => 1,
            AuthorRole::Agent => 2,
            AuthorRole::Bot => 3,
            AuthorRole::System => 4,
        }
    }
    pub(crate) fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => AuthorRole::Visitor,
            2 => AuthorRole::Agent,
            3 => AuthorRole::Bot,
            4 => AuthorRole::System,
            _ => return None,
        })
    }
}

/// One chat message. `sent_at: None` means "now" on write.
#[derive(Clone, PartialEq, Eq)]
pub struct Message {
    pub message_id: String,
    pub author_role: AuthorRole,
    pub author_name: String,
    pub sent_at: Option<Timestamp>,
    pub text: String,
}

impl Message {
    /// A message to write, sent "now" (the server's receive time).
    pub fn new(
        message_id: impl Into<String>,
        author_role: AuthorRole,
        author_name: impl Into<String>,
        text: impl Into<String>,
    ) -> Self {
        Message {
            message_id: message_id.into(),
            author_role,
            author_name: author_name.into(),
            sent_at: None,
            text: text.into(),
        }
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("author_role", &self.author_role)
            .field("text_len", &self.text.len())
            .finish_non_exhaustive()
    }
}

/// A message as read, lent out without copying (see `Vault::walk_transcripts`).
#[derive(Clone, Copy)]
pub struct MessageRef<'a> {
    pub message_id: &'a str,
    pub author_role: AuthorRole,
    pub author_name: &'a str,
    pub sent_at: Timestamp,
    pub text: &'a str,
}

impl fmt::Debug for MessageRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MessageRef")
            .field("author_role", &self.author_role)
            .field("text_len", &self.text.len())
            .finish_non_exhaustive()
    }
}

/// A transcript as written and as read back. On read, timestamps are always set.
#[derive(Clone, PartialEq, Eq)]
pub struct Transcript {
    pub transcript_id: String,
    pub subject_id: String,
    pub channel: String,
    pub started_at: Option<Timestamp>,
    pub ended_at: Option<Timestamp>,
    pub metadata: BTreeMap<String, String>,
    pub messages: Vec<Message>,
    /// Filled in on read; ignored on write.
    pub message_count: u32,
}

impl Transcript {
    /// A transcript to write: started "now", open, no channel, metadata or messages yet.
    pub fn new(transcript_id: impl Into<String>, subject_id: impl Into<String>, messages: Vec<Message>) -> Self {
        Transcript {
            transcript_id: transcript_id.into(),
            subject_id: subject_id.into(),
            channel: String::new(),
            started_at: None,
            ended_at: None,
            metadata: BTreeMap::new(),
            messages,
            message_count: 0,
        }
    }
}

impl fmt::Debug for Transcript {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transcript")
            .field("started_at", &self.started_at)
            .field("ended_at", &self.ended_at)
            .field("message_count", &self.message_count)
            .finish_non_exhaustive()
    }
}

/// A page of a subject's transcripts (without messages), newest first.
#[derive(Debug)]
pub struct TranscriptPage {
    pub transcripts: Vec<Transcript>,
    pub next_page_token: Option<String>,
}

/// Proof of a crypto-shred (of a subject, or of one transcript's key); holds no
/// personal data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShredReceipt {
    pub subject_blind_id: String,
    /// Set for a transcript deletion.
    pub transcript_blind_id: String,
    pub shredded_at: Timestamp,
    pub transcripts_shredded: u64,
    /// Opaque id of the erasure, to ask whether it is final yet; empty when nothing was
    /// erased. It reveals nothing of other tenants' erasures.
    pub erasure_id: String,
    pub state: ErasureState,
    pub signed: SignedReceipt,
}

/// Whether an erasure holds against old copies of the data directory yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErasureState {
    /// Unreadable through the service; the key-store epoch a copy taken before it would
    /// need still exists, until the next rotation.
    Pending,
    /// That epoch was destroyed at `at`: no copy of anything, with any key the server
    /// holds, decrypts it.
    Final { at: Timestamp },
    /// The call erased nothing (never stored, or erased before).
    NothingErased,
}

/// A receipt as signed: canonical JSON and an Ed25519 signature over its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedReceipt {
    pub payload: String,
    pub signature: Vec<u8>,
    pub key_id: String,
}

/// What the server says of an erasure, by id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErasureStatus {
    pub erasure_id: String,
    pub erased_at: Timestamp,
    pub state: ErasureState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubjectStatus {
    Unknown,
    Active,
    Shredded,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubjectInfo {
    pub subject_blind_id: String,
    pub status: SubjectStatus,
    pub transcript_count: u64,
    pub last_shredded_at: Option<Timestamp>,
}

/// What a key-store rotation did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RotationReport {
    pub new_epoch: u64,
    pub destroyed_epochs: Vec<u64>,
    pub keys_rewrapped: u64,
}

/// How key-store rotations have gone lately. A rotation that keeps failing leaves
/// erasures pending: this is what makes that loud.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RotationHealth {
    pub last_completed_at: Option<Timestamp>,
    /// The latest failure since the last success, with its error.
    pub last_failure: Option<(Timestamp, String)>,
    pub consecutive_failures: u32,
}

/// A write's result and the subject whose data it touched (hex blind index), for the audit trail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Touched<T> {
    pub value: T,
    pub subject_blind_id: String,
}

impl<T> Touched<T> {
    pub(super) fn new(value: T, subject: &[u8; 32]) -> Self {
        Touched { value, subject_blind_id: hex::encode(subject) }
    }
}
