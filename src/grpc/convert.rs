//! Wire types to domain types and back. Whole structs are destructured, so a new proto
//! field breaks the build here instead of being silently dropped.

use prost_types::Timestamp as PbTimestamp;
use tonic::Status;

use super::pb;
use crate::vault::{
    AuthorRole, ErasureState, ErasureStatus, Message, ShredReceipt, SignedReceipt, SubjectInfo, SubjectStatus,
    Timestamp, Transcript,
};

pub fn timestamp_in(field: &str, ts: Option<PbTimestamp>) -> Result<Option<Timestamp>, Status> {
    match ts {
        None => Ok(None),
        Some(PbTimestamp { seconds, nanos }) => Timestamp::from_unix(seconds, nanos).map(Some).ok_or_else(|| {
            Status::invalid_argument(format!("{field}: must be between 1970-01-01 and 9999-12-31 with nanos in 0..1e9"))
        }),
    }
}

pub fn timestamp_out(ts: Timestamp) -> PbTimestamp {
    PbTimestamp { seconds: ts.seconds(), nanos: ts.subsec_nanos() }
}

fn role_in(field: &str, role: i32) -> Result<AuthorRole, Status> {
    match pb::AuthorRole::try_from(role) {
        Ok(pb::AuthorRole::Visitor) => Ok(AuthorRole::Visitor),
        Ok(pb::AuthorRole::Agent) => Ok(AuthorRole::Agent),
        Ok(pb::AuthorRole::Bot) => Ok(AuthorRole::Bot),
        Ok(pb::AuthorRole::System) => Ok(AuthorRole::System),
        Ok(pb::AuthorRole::Unspecified) => Err(Status::invalid_argument(format!("{field}: must be set"))),
        Err(_) => Err(Status::invalid_argument(format!("{field}: unknown value {role}"))),
    }
}

fn role_out(role: AuthorRole) -> pb::AuthorRole {
    match role {
        AuthorRole::Visitor => pb::AuthorRole::Visitor,
        AuthorRole::Agent => pb::AuthorRole::Agent,
        AuthorRole::Bot => pb::AuthorRole::Bot,
        AuthorRole::System => pb::AuthorRole::System,
    }
}

pub fn messages_in(field: &str, messages: Vec<pb::Message>) -> Result<Vec<Message>, Status> {
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let pb::Message { message_id, author_role, author_name, sent_at, text } = m;
            Ok(Message {
                message_id,
                author_role: role_in(&format!("{field}[{i}].author_role"), author_role)?,
                author_name,
                sent_at: timestamp_in(&format!("{field}[{i}].sent_at"), sent_at)?,
                text,
            })
        })
        .collect()
}

fn message_out(m: Message) -> pb::Message {
    let Message { message_id, author_role, author_name, sent_at, text } = m;
    pb::Message {
        message_id,
        author_role: role_out(author_role) as i32,
        author_name,
        sent_at: sent_at.map(timestamp_out),
        text,
    }
}

pub fn transcript_in(t: Option<pb::Transcript>) -> Result<Transcript, Status> {
    let pb::Transcript {
        transcript_id,
        subject_id,
        channel,
        started_at,
        ended_at,
        metadata,
        messages,
        message_count: _, // server-filled; ignored on write
    } = t.ok_or_else(|| Status::invalid_argument("transcript: must be set"))?;
    Ok(Transcript {
        transcript_id,
        subject_id,
        channel,
        started_at: timestamp_in("transcript.started_at", started_at)?,
        ended_at: timestamp_in("transcript.ended_at", ended_at)?,
        metadata: metadata.into_iter().collect(),
        messages: messages_in("transcript.messages", messages)?,
        message_count: 0,
    })
}

pub fn transcript_out(t: Transcript) -> pb::Transcript {
    let Transcript { transcript_id, subject_id, channel, started_at, ended_at, metadata, messages, message_count } = t;
    pb::Transcript {
        transcript_id,
        subject_id,
        channel,
        started_at: started_at.map(timestamp_out),
        ended_at: ended_at.map(timestamp_out),
        metadata: metadata.into_iter().collect(),
        messages: messages.into_iter().map(message_out).collect(),
        message_count,
    }
}

pub fn receipt_out(r: ShredReceipt) -> pb::ShredReceipt {
    let ShredReceipt {
        subject_blind_id,
        transcript_blind_id,
        shredded_at,
        transcripts_shredded,
        erasure_id,
        state,
        signed,
    } = r;
    let SignedReceipt { payload, signature, key_id } = signed;
    #[allow(deprecated)]
    pb::ShredReceipt {
        subject_blind_id,
        shredded_at: Some(timestamp_out(shredded_at)),
        transcripts_shredded,
        key_epoch: 0,
        erasure_id,
        state: state_out(state) as i32,
        signed: Some(pb::SignedReceipt { payload, signature, key_id }),
        transcript_blind_id,
    }
}

fn state_out(s: ErasureState) -> pb::ErasureState {
    match s {
        ErasureState::Pending => pb::ErasureState::Pending,
        ErasureState::Final { .. } => pb::ErasureState::Final,
        ErasureState::NothingErased => pb::ErasureState::NothingErased,
    }
}

pub fn erasure_out(e: ErasureStatus) -> pb::ErasureStatus {
    let ErasureStatus { erasure_id, erased_at, state } = e;
    pb::ErasureStatus {
        erasure_id,
        state: state_out(state) as i32,
        erased_at: Some(timestamp_out(erased_at)),
        final_at: match state {
            ErasureState::Final { at } => Some(timestamp_out(at)),
            _ => None,
        },
    }
}

pub fn subject_out(s: SubjectInfo) -> pb::GetSubjectResponse {
    let SubjectInfo { subject_blind_id, status, transcript_count, last_shredded_at } = s;
    let status = match status {
        SubjectStatus::Unknown => pb::SubjectStatus::Unknown,
        SubjectStatus::Active => pb::SubjectStatus::Active,
        SubjectStatus::Shredded => pb::SubjectStatus::Shredded,
    };
    pb::GetSubjectResponse {
        subject_blind_id,
        status: status as i32,
        transcript_count,
        last_shredded_at: last_shredded_at.map(timestamp_out),
    }
}
