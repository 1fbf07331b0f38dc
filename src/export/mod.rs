//! JSON export of decrypted transcripts: a subject's access and portability requests
//! (GDPR art. 15 and 20), or a tenant taking its data elsewhere. One JSON document,
//! written in chunks while the vault is walked, so a tenant of any size is exported in
//! bounded memory.
//!
//! The document (`"format": "chatvault.export.v1"`) names its scope first, then holds
//! `transcripts`, and ends with the counts. A document cut short by a failure is not
//! valid JSON, so a truncated export can never pass for a whole one.

mod time;

use std::ops::ControlFlow;

use serde::Serialize;
use zeroize::Zeroize;

pub use time::{Rfc3339, rfc3339};

use crate::vault::{
    AuthorRole, MessageRef, Scope, SubjectInfo, SubjectStatus, TenantId, Timestamp, Transcript, Vault, VaultError,
    Visit,
};

pub const FORMAT: &str = "chatvault.export.v1";

/// Bytes per chunk handed to the sink (a chunk may exceed it by one message).
pub const DEFAULT_CHUNK_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Vault(#[from] VaultError),
    /// The sink refused a chunk: the reader went away.
    #[error("the export was cancelled by its reader")]
    Cancelled,
    #[error("internal error: JSON serialisation failed")]
    Json,
}

/// What an export wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Exported {
    pub transcripts: u64,
    pub messages: u64,
    pub bytes: u64,
}

/// An export whose request was checked: nothing has been read or written yet. Owns its
/// request, so it can be checked on one thread and written on another.
pub struct Export {
    tenant: TenantId,
    subject: Option<(String, SubjectInfo)>,
    exported_at: Timestamp,
}

impl Export {
    /// Checks the request (a malformed subject id fails here, before any byte is written).
    pub fn start(vault: &Vault, tenant: &TenantId, scope: Scope<'_>) -> Result<Self, ExportError> {
        let subject = match scope {
            Scope::Subject(id) => Some((id.to_owned(), vault.get_subject(tenant, id)?)),
            Scope::Tenant => None,
        };
        Ok(Export { tenant: tenant.clone(), subject, exported_at: vault.now() })
    }

    /// Writes the document to `sink` in chunks of about `chunk_bytes`. The sink returns
    /// false to cancel (its reader went away).
    pub fn write(
        &self,
        vault: &Vault,
        chunk_bytes: usize,
        sink: &mut dyn FnMut(Vec<u8>) -> bool,
    ) -> Result<Exported, ExportError> {
        let mut out = Chunker::new(chunk_bytes, sink);
        let head = DocumentHead {
            format: FORMAT,
            scope: if self.subject.is_some() { "subject" } else { "tenant" },
            tenant_id: self.tenant.as_str(),
            subject_id: self.subject.as_ref().map(|(id, _)| id.as_str()),
            subject_status: self.subject.as_ref().map(|(_, info)| status_name(info.status)),
            exported_at: rfc3339(self.exported_at),
        };
        out.open_object(&head, "transcripts")?;
        let scope = match &self.subject {
            Some((id, _)) => Scope::Subject(id),
            None => Scope::Tenant,
        };
        let mut failed = None;
        let walked = vault.walk_transcripts(&self.tenant, scope, &mut |v| {
            let step = match v {
                Visit::Begin(t) => out.open_object(&TranscriptHead::of(t), "messages"),
                Visit::Message(m) => out.element(&MessageJson::of(m)),
                Visit::End { message_count } => out.close_object(&[("message_count", u64::from(message_count))]),
            };
            match step {
                Ok(()) => ControlFlow::Continue(()),
                Err(e) => {
                    failed = Some(e);
                    ControlFlow::Break(())
                }
            }
        })?;
        // The visitor breaks only on a failure, which it kept.
        if let Some(e) = failed {
            return Err(e);
        }
        out.close_object(&[("transcript_count", walked.transcripts), ("message_count", walked.messages)])?;
        let bytes = out.finish()?;
        Ok(Exported { transcripts: walked.transcripts, messages: walked.messages, bytes })
    }
}

/// Builds the document in a buffer and hands it on whenever it holds a chunk.
struct Chunker<'s> {
    buf: Vec<u8>,
    chunk_bytes: usize,
    sink: &'s mut dyn FnMut(Vec<u8>) -> bool,
    written: u64,
    /// Per open array: whether the next element is its first.
    first: Vec<bool>,
}

impl<'s> Chunker<'s> {
    fn new(chunk_bytes: usize, sink: &'s mut dyn FnMut(Vec<u8>) -> bool) -> Self {
        let chunk_bytes = chunk_bytes.max(1);
        Chunker { buf: Vec::with_capacity(chunk_bytes + 1024), chunk_bytes, sink, written: 0, first: Vec::new() }
    }

    /// Writes `head` (a struct) without its closing brace, then `"array":[`. As an element
    /// of the enclosing array, if there is one.
    fn open_object(&mut self, head: &impl Serialize, array: &str) -> Result<(), ExportError> {
        self.separate();
        serde_json::to_writer(&mut self.buf, head).map_err(|_| ExportError::Json)?;
        if self.buf.pop() != Some(b'}') {
            return Err(ExportError::Json);
        }
        if self.buf.last() != Some(&b'{') {
            self.buf.push(b',');
        }
        serde_json::to_writer(&mut self.buf, array).map_err(|_| ExportError::Json)?;
        self.buf.extend_from_slice(b":[");
        self.first.push(true);
        self.flush_if_full()
    }

    /// One element of the innermost open array.
    fn element(&mut self, value: &impl Serialize) -> Result<(), ExportError> {
        self.separate();
        serde_json::to_writer(&mut self.buf, value).map_err(|_| ExportError::Json)?;
        self.flush_if_full()
    }

    /// The comma before every element of an open array but its first.
    fn separate(&mut self) {
        if let Some(first) = self.first.last_mut()
            && !std::mem::replace(first, false)
        {
            self.buf.push(b',');
        }
    }

    /// Closes the innermost array and its object, with trailing number fields.
    fn close_object(&mut self, fields: &[(&str, u64)]) -> Result<(), ExportError> {
        self.first.pop();
        self.buf.push(b']');
        for (name, n) in fields {
            self.buf.push(b',');
            serde_json::to_writer(&mut self.buf, name).map_err(|_| ExportError::Json)?;
            self.buf.push(b':');
            self.buf.extend_from_slice(n.to_string().as_bytes());
        }
        self.buf.push(b'}');
        self.flush_if_full()
    }

    fn flush_if_full(&mut self) -> Result<(), ExportError> {
        if self.buf.len() >= self.chunk_bytes { self.flush() } else { Ok(()) }
    }

    fn flush(&mut self) -> Result<(), ExportError> {
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(self.chunk_bytes + 1024));
        self.written += chunk.len() as u64;
        if (self.sink)(chunk) { Ok(()) } else { Err(ExportError::Cancelled) }
    }

    fn finish(&mut self) -> Result<u64, ExportError> {
        if !self.buf.is_empty() {
            self.flush()?;
        }
        Ok(self.written)
    }
}

/// What was not handed on (an export that failed part-way) is decrypted data.
impl Drop for Chunker<'_> {
    fn drop(&mut self) {
        self.buf.zeroize();
    }
}

#[derive(Serialize)]
struct DocumentHead<'a> {
    format: &'static str,
    scope: &'static str,
    tenant_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject_status: Option<&'static str>,
    exported_at: Rfc3339,
}

#[derive(Serialize)]
struct TranscriptHead<'a> {
    transcript_id: &'a str,
    subject_id: &'a str,
    channel: &'a str,
    started_at: Option<Rfc3339>,
    ended_at: Option<Rfc3339>,
    metadata: &'a std::collections::BTreeMap<String, String>,
}

impl<'a> TranscriptHead<'a> {
    fn of(t: &'a Transcript) -> Self {
        TranscriptHead {
            transcript_id: &t.transcript_id,
            subject_id: &t.subject_id,
            channel: &t.channel,
            started_at: t.started_at.map(rfc3339),
            ended_at: t.ended_at.map(rfc3339),
            metadata: &t.metadata,
        }
    }
}

#[derive(Serialize)]
struct MessageJson<'a> {
    message_id: &'a str,
    author_role: &'static str,
    author_name: &'a str,
    sent_at: Rfc3339,
    text: &'a str,
}

impl<'a> MessageJson<'a> {
    fn of(m: MessageRef<'a>) -> Self {
        MessageJson {
            message_id: m.message_id,
            author_role: role_name(m.author_role),
            author_name: m.author_name,
            sent_at: rfc3339(m.sent_at),
            text: m.text,
        }
    }
}

fn role_name(r: AuthorRole) -> &'static str {
    match r {
        AuthorRole::Visitor => "visitor",
        AuthorRole::Agent => "agent",
        AuthorRole::Bot => "bot",
        AuthorRole::System => "system",
    }
}

fn status_name(s: SubjectStatus) -> &'static str {
    match s {
        SubjectStatus::Unknown => "unknown",
        SubjectStatus::Active => "active",
        SubjectStatus::Shredded => "shredded",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_concatenate_to_one_document_with_commas_only_between_elements() {
        let mut chunks: Vec<Vec<u8>> = Vec::new();
        let mut sink = |c: Vec<u8>| {
            chunks.push(c);
            true
        };
        let mut out = Chunker::new(8, &mut sink);
        out.open_object(&serde_json::json!({}), "outer").unwrap();
        for inner in [0, 2, 1] {
            out.open_object(&serde_json::json!({ "n": inner }), "items").unwrap();
            (0..inner).try_for_each(|i| out.element(&i)).unwrap();
            out.close_object(&[("count", inner)]).unwrap();
        }
        out.close_object(&[("total", 3)]).unwrap();
        out.finish().unwrap();
        drop(out);
        assert!(chunks.len() > 3, "small chunks were asked for");
        let doc: serde_json::Value = serde_json::from_slice(&chunks.concat()).unwrap();
        assert_eq!(
            doc,
            serde_json::json!({ "outer": [
                { "n": 0, "items": [], "count": 0 },
                { "n": 2, "items": [0, 1], "count": 2 },
                { "n": 1, "items": [0], "count": 1 },
            ], "total": 3 })
        );
    }

    #[test]
    fn a_sink_that_refuses_cancels_the_export() {
        let mut sink = |_: Vec<u8>| false;
        let mut out = Chunker::new(1, &mut sink);
        assert!(matches!(out.open_object(&serde_json::json!({}), "x"), Err(ExportError::Cancelled)));
    }
}
