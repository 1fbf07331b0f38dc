//! Client commands: a newcomer's way to see chatvault work from a shell. Output is JSON.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use serde_json::{Value, json};
use tonic::Status;

use super::connect::{Authed, TlsArgs, channel, credential};
use crate::grpc::pb;
use crate::grpc::pb::export_service_client::ExportServiceClient;
use crate::grpc::pb::subject_service_client::SubjectServiceClient;
use crate::grpc::pb::transcript_service_client::TranscriptServiceClient;

#[derive(Args, Debug)]
pub struct Conn {
    /// Server URL.
    #[arg(long, env = "CHATVAULT_SERVER", default_value = "http://127.0.0.1:50051", global = true)]
    server: String,
    /// File with the tenant's API key (mode 0600), when CHATVAULT_API_KEY is not set.
    #[arg(long, env = "CHATVAULT_API_KEY_FILE", global = true)]
    api_key_file: Option<PathBuf>,
    #[command(flatten)]
    tls: TlsArgs,
}

/// Where the API key comes from: never a flag, so it does not show in `ps`.
pub const API_KEY_ENV: &str = "CHATVAULT_API_KEY";

#[derive(Subcommand, Debug)]
pub enum ClientCommand {
    /// Store (or replace) a transcript.
    Put {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        subject: String,
        #[arg(long)]
        transcript: String,
        #[arg(long, default_value = "web")]
        channel: String,
        /// ROLE:NAME:TEXT, role one of visitor, agent, bot, system. Repeatable.
        #[arg(long = "message", short = 'm')]
        messages: Vec<String>,
        /// KEY=VALUE metadata. Repeatable.
        #[arg(long = "meta")]
        metadata: Vec<String>,
    },
    /// Append messages to an open transcript.
    Append {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        transcript: String,
        #[arg(long = "message", short = 'm', required = true)]
        messages: Vec<String>,
    },
    /// Close a transcript (sets ended_at to now).
    Close {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        transcript: String,
    },
    /// Print a transcript, decrypted.
    Get {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        transcript: String,
    },
    /// List a subject's transcripts, newest first.
    List {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        subject: String,
        #[arg(long, default_value_t = 0)]
        page_size: u32,
        #[arg(long, default_value = "")]
        page_token: String,
    },
    /// Delete one transcript.
    Delete {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        transcript: String,
    },
    /// Crypto-shred a subject: all of its transcripts become unreadable.
    Shred {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        subject: String,
    },
    /// Whether an erasure (the erasure_id of a receipt) is final yet.
    Erasure {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        id: String,
    },
    /// Show a subject's status.
    Subject {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        subject: String,
    },
    /// Export decrypted transcripts as one JSON document: a subject's, or with
    /// --whole-tenant every readable one of the tenant.
    Export {
        #[command(flatten)]
        conn: Conn,
        #[arg(long, required_unless_present = "whole_tenant", conflicts_with = "whole_tenant")]
        subject: Option<String>,
        #[arg(long)]
        whole_tenant: bool,
        /// Write the document here (created with mode 0600) instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

async fn transcripts(conn: &Conn) -> Result<TranscriptServiceClient<Authed>, String> {
    let key = credential(API_KEY_ENV, conn.api_key_file.as_deref(), "API key")?;
    Ok(TranscriptServiceClient::with_interceptor(channel(&conn.server, &conn.tls).await?, key))
}

pub async fn subjects(conn: &Conn) -> Result<SubjectServiceClient<Authed>, String> {
    let key = credential(API_KEY_ENV, conn.api_key_file.as_deref(), "API key")?;
    Ok(SubjectServiceClient::with_interceptor(channel(&conn.server, &conn.tls).await?, key))
}

async fn exports(conn: &Conn) -> Result<ExportServiceClient<Authed>, String> {
    let key = credential(API_KEY_ENV, conn.api_key_file.as_deref(), "API key")?;
    Ok(ExportServiceClient::with_interceptor(channel(&conn.server, &conn.tls).await?, key))
}

/// Streams an export to a file or standard output as it arrives. A stream that ends in
/// an error leaves what arrived (not valid JSON) and fails the command.
async fn export(conn: &Conn, subject: Option<String>, out: Option<&Path>) -> Result<(), String> {
    let mut client = exports(conn).await?;
    let mut stream = match subject {
        Some(subject_id) => client.export_subject(pb::ExportSubjectRequest { subject_id }).await,
        None => client.export_tenant(pb::ExportTenantRequest {}).await,
    }
    .map_err(status)?
    .into_inner();
    let mut sink: Box<dyn Write> = match out {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| format!("--out {}: {e}", path.display()))?;
            Box::new(std::io::BufWriter::new(file))
        }
        None => Box::new(std::io::stdout().lock()),
    };
    while let Some(chunk) = stream.message().await.map_err(status)? {
        sink.write_all(&chunk.data).map_err(|e| format!("writing the export: {e}"))?;
    }
    sink.write_all(b"\n").and_then(|()| sink.flush()).map_err(|e| format!("writing the export: {e}"))
}

pub fn status(s: Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

pub async fn run(cmd: ClientCommand) -> Result<(), String> {
    let out = match cmd {
        ClientCommand::Export { conn, subject, whole_tenant: _, out } => {
            return export(&conn, subject, out.as_deref()).await;
        }
        ClientCommand::Put { conn, subject, transcript, channel, messages, metadata } => {
            let transcript = pb::Transcript {
                transcript_id: transcript,
                subject_id: subject,
                channel,
                messages: parse_messages(&messages)?,
                metadata: parse_metadata(&metadata)?,
                ..Default::default()
            };
            let req = pb::PutTranscriptRequest { transcript: Some(transcript) };
            let r = transcripts(&conn).await?.put_transcript(req).await.map_err(status)?.into_inner();
            json!({ "replaced": r.replaced })
        }
        ClientCommand::Append { conn, transcript, messages } => {
            let req = pb::AppendMessagesRequest {
                transcript_id: transcript,
                messages: parse_messages(&messages)?,
                expected_message_count: None,
            };
            let r = transcripts(&conn).await?.append_messages(req).await.map_err(status)?.into_inner();
            json!({ "message_count": r.message_count })
        }
        ClientCommand::Close { conn, transcript } => {
            let req = pb::CloseTranscriptRequest { transcript_id: transcript, ended_at: None };
            let r = transcripts(&conn).await?.close_transcript(req).await.map_err(status)?.into_inner();
            json!({ "ended_at": r.ended_at.map(|t| t.to_string()) })
        }
        ClientCommand::Get { conn, transcript } => {
            let req = pb::GetTranscriptRequest { transcript_id: transcript };
            let r = transcripts(&conn).await?.get_transcript(req).await.map_err(status)?.into_inner();
            r.transcript.map(transcript_json).unwrap_or(Value::Null)
        }
        ClientCommand::List { conn, subject, page_size, page_token } => {
            let req = pb::ListTranscriptsRequest { subject_id: subject, page_size, page_token };
            let r = transcripts(&conn).await?.list_transcripts(req).await.map_err(status)?.into_inner();
            json!({
                "transcripts": r.transcripts.into_iter().map(transcript_json).collect::<Vec<_>>(),
                "next_page_token": r.next_page_token,
            })
        }
        ClientCommand::Delete { conn, transcript } => {
            let req = pb::DeleteTranscriptRequest { transcript_id: transcript };
            let r = transcripts(&conn).await?.delete_transcript(req).await.map_err(status)?.into_inner();
            json!({ "deleted": true, "receipt": receipt_json(r.receipt.unwrap_or_default()) })
        }
        ClientCommand::Shred { conn, subject } => {
            let req = pb::ShredSubjectRequest { subject_id: subject };
            let r = subjects(&conn).await?.shred_subject(req).await.map_err(status)?.into_inner();
            receipt_json(r.receipt.unwrap_or_default())
        }
        ClientCommand::Erasure { conn, id } => {
            let req = pb::GetErasureRequest { erasure_id: id };
            let r = subjects(&conn).await?.get_erasure(req).await.map_err(status)?.into_inner();
            json!({
                "erasure_id": r.erasure_id,
                "state": r.state().as_str_name(),
                "erased_at": r.erased_at.map(|t| t.to_string()),
                "final_at": r.final_at.map(|t| t.to_string()),
            })
        }
        ClientCommand::Subject { conn, subject } => {
            let req = pb::GetSubjectRequest { subject_id: subject };
            let r = subjects(&conn).await?.get_subject(req).await.map_err(status)?.into_inner();
            json!({
                "subject_blind_id": r.subject_blind_id,
                "status": r.status().as_str_name(),
                "transcript_count": r.transcript_count,
                "last_shredded_at": r.last_shredded_at.map(|t| t.to_string()),
            })
        }
    };
    println!("{}", serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?);
    Ok(())
}

fn parse_messages(specs: &[String]) -> Result<Vec<pb::Message>, String> {
    specs
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let mut parts = spec.splitn(3, ':');
            let (Some(role), Some(name), Some(text)) = (parts.next(), parts.next(), parts.next()) else {
                return Err(format!("--message {spec:?}: expected ROLE:NAME:TEXT"));
            };
            let role = match role {
                "visitor" => pb::AuthorRole::Visitor,
                "agent" => pb::AuthorRole::Agent,
                "bot" => pb::AuthorRole::Bot,
                "system" => pb::AuthorRole::System,
                other => return Err(format!("--message: unknown role {other:?}")),
            };
            Ok(pb::Message {
                message_id: format!("m{}-{i}", std::process::id()),
                author_role: role as i32,
                author_name: name.to_owned(),
                sent_at: None,
                text: text.to_owned(),
            })
        })
        .collect()
}

fn parse_metadata(specs: &[String]) -> Result<std::collections::HashMap<String, String>, String> {
    specs
        .iter()
        .map(|s| {
            s.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| format!("--meta {s:?}: expected KEY=VALUE"))
        })
        .collect()
}

/// A receipt as the CLI prints it; `chatvault receipt verify` reads it back.
fn receipt_json(rc: pb::ShredReceipt) -> Value {
    let state = rc.state().as_str_name();
    let signed = rc.signed.unwrap_or_default();
    json!({
        "subject_blind_id": rc.subject_blind_id,
        "transcript_blind_id": (!rc.transcript_blind_id.is_empty()).then_some(&rc.transcript_blind_id),
        "shredded_at": rc.shredded_at.map(|t| t.to_string()),
        "transcripts_shredded": rc.transcripts_shredded,
        "erasure_id": rc.erasure_id,
        "state": state,
        "signed": super::receipt::signed_json(&signed.payload, &signed.signature, &signed.key_id),
    })
}

fn transcript_json(t: pb::Transcript) -> Value {
    json!({
        "transcript_id": t.transcript_id,
        "subject_id": t.subject_id,
        "channel": t.channel,
        "started_at": t.started_at.map(|t| t.to_string()),
        "ended_at": t.ended_at.map(|t| t.to_string()),
        "metadata": t.metadata,
        "message_count": t.message_count,
        "messages": t.messages.into_iter().map(|m| json!({
            "message_id": m.message_id,
            "author_role": m.author_role().as_str_name(),
            "author_name": m.author_name,
            "sent_at": m.sent_at.map(|t| t.to_string()),
            "text": m.text,
        })).collect::<Vec<_>>(),
    })
}
