//! Request limits and checks. Every error names the offending field.

use serde::{Deserialize, Serialize};

use super::VaultError;
use super::model::{Message, Transcript};

/// Size limits on what clients may store. Units are in the names.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Transcript, message and subject ids.
    pub max_id_bytes: usize,
    /// One message's text.
    pub max_message_text_bytes: usize,
    /// Author names and channel names.
    pub max_name_bytes: usize,
    /// Messages in one PutTranscript or AppendMessages call.
    pub max_messages_per_call: usize,
    /// Messages in one transcript over its life.
    pub max_messages_per_transcript: u32,
    pub max_metadata_entries: usize,
    pub max_metadata_key_bytes: usize,
    pub max_metadata_value_bytes: usize,
    /// Ciphertext bytes one GetTranscript may gather; keep below the gRPC encoding limit.
    pub max_response_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_id_bytes: 256,
            max_message_text_bytes: 64 * 1024,
            max_name_bytes: 256,
            max_messages_per_call: 1000,
            max_messages_per_transcript: 100_000,
            max_metadata_entries: 64,
            max_metadata_key_bytes: 128,
            max_metadata_value_bytes: 4096,
            max_response_bytes: 32 * 1024 * 1024,
        }
    }
}

impl Limits {
    pub fn id(&self, field: &str, value: &str) -> Result<(), VaultError> {
        if value.is_empty() {
            return Err(VaultError::invalid(field, "must not be empty"));
        }
        self.max(field, value, self.max_id_bytes)
    }

    fn max(&self, field: &str, value: &str, limit: usize) -> Result<(), VaultError> {
        if value.len() > limit {
            return Err(VaultError::invalid(field, format!("is {} bytes; the limit is {limit}", value.len())));
        }
        Ok(())
    }

    pub fn messages(&self, field: &str, messages: &[Message], allow_empty: bool) -> Result<(), VaultError> {
        if messages.is_empty() && !allow_empty {
            return Err(VaultError::invalid(field, "must hold at least one message"));
        }
        if messages.len() > self.max_messages_per_call {
            return Err(VaultError::invalid(
                field,
                format!("holds {} messages; the limit per call is {}", messages.len(), self.max_messages_per_call),
            ));
        }
        for (i, m) in messages.iter().enumerate() {
            self.id(&format!("{field}[{i}].message_id"), &m.message_id)?;
            self.max(&format!("{field}[{i}].author_name"), &m.author_name, self.max_name_bytes)?;
            self.max(&format!("{field}[{i}].text"), &m.text, self.max_message_text_bytes)?;
        }
        Ok(())
    }

    pub fn transcript(&self, t: &Transcript) -> Result<(), VaultError> {
        self.id("transcript.transcript_id", &t.transcript_id)?;
        self.id("transcript.subject_id", &t.subject_id)?;
        self.max("transcript.channel", &t.channel, self.max_name_bytes)?;
        if t.metadata.len() > self.max_metadata_entries {
            return Err(VaultError::invalid(
                "transcript.metadata",
                format!("has {} entries; the limit is {}", t.metadata.len(), self.max_metadata_entries),
            ));
        }
        for (k, v) in &t.metadata {
            if k.is_empty() {
                return Err(VaultError::invalid("transcript.metadata", "keys must not be empty"));
            }
            self.max("transcript.metadata key", k, self.max_metadata_key_bytes)?;
            self.max("transcript.metadata value", v, self.max_metadata_value_bytes)?;
        }
        if let (Some(s), Some(e)) = (t.started_at, t.ended_at)
            && e < s
        {
            return Err(VaultError::invalid("transcript.ended_at", "must not be before started_at"));
        }
        self.messages("transcript.messages", &t.messages, true)
    }
}
