//! `chatvault admin ...`: the operator's commands against the admin listener. JSON out.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::client::status;
use super::connect::{Authed, TlsArgs, channel, credential};
use crate::config::OPERATOR_TOKEN_ENV;
use crate::grpc::pb;
use crate::grpc::pb::admin_service_client::AdminServiceClient;

#[derive(Args, Debug)]
pub struct AdminConn {
    /// Admin listener URL.
    #[arg(long, env = "CHATVAULT_ADMIN_SERVER", default_value = "http://127.0.0.1:50052", global = true)]
    admin_server: String,
    /// File with the operator token (mode 0600), when CHATVAULT_OPERATOR_TOKEN is not set.
    /// A development server's token is in <key_dir>/dev-operator.token.
    #[arg(long, env = "CHATVAULT_OPERATOR_TOKEN_FILE", global = true)]
    operator_token_file: Option<PathBuf>,
    /// The region to act in: required to create a tenant; for audit, erasures,
    /// retention runs and backups, needed when the server hosts several regions.
    #[arg(long, default_value = "", global = true)]
    region: String,
    #[command(flatten)]
    tls: TlsArgs,
}

#[derive(Args, Debug)]
pub struct AdminArgs {
    #[command(flatten)]
    conn: AdminConn,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Subcommand, Debug)]
enum AdminCommand {
    /// Tenants: create, get, list, suspend, resume, delete.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// API keys: issue (printed once), list, revoke.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Replace a tenant's allowlist (no networks: deny all, unless configured otherwise).
    Allowlist { tenant: String, networks: Vec<String> },
    /// Set a tenant's retention.
    Retention {
        tenant: String,
        #[arg(long, default_value_t = 0)]
        purge_after_close_secs: u64,
        #[arg(long, default_value_t = 0)]
        close_inactive_after_secs: u64,
        /// Purge any transcript this long after it started, closed or not.
        #[arg(long, default_value_t = 0)]
        max_age_secs: u64,
        /// Purge transcripts as soon as they close.
        #[arg(long)]
        purge_on_close: bool,
    },
    /// What retention has done for a tenant; `--run` runs it for every tenant first.
    RetentionStatus {
        tenant: String,
        #[arg(long)]
        run: bool,
    },
    /// Legal holds: set, release, list.
    #[command(subcommand)]
    Hold(HoldCommand),
    /// The audit trail: query, verify.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Whether erasures are becoming final: pending erasures, rotations.
    Erasures,
}

#[derive(Subcommand, Debug)]
enum TenantCommand {
    Create {
        tenant: String,
        #[arg(long, default_value = "")]
        name: String,
        /// A network the tenant may connect from (CIDR). Repeatable.
        #[arg(long = "allow")]
        allow: Vec<String>,
    },
    Get {
        tenant: String,
    },
    List,
    Suspend {
        tenant: String,
    },
    Resume {
        tenant: String,
    },
    /// Shred all of a tenant's data and retire its id. Irreversible.
    Delete {
        tenant: String,
        /// Required: confirms the erasure.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand, Debug)]
enum KeyCommand {
    Issue {
        tenant: String,
        /// Print only the key, for `export CHATVAULT_API_KEY=$(...)`.
        #[arg(long)]
        raw: bool,
    },
    List {
        tenant: String,
    },
    Revoke {
        tenant: String,
        key_id: String,
    },
}

#[derive(Subcommand, Debug)]
enum HoldCommand {
    /// Hold the whole tenant, or one subject (--subject) or transcript (--transcript).
    Set {
        tenant: String,
        #[arg(long, conflicts_with = "transcript")]
        subject: Option<String>,
        #[arg(long)]
        transcript: Option<String>,
        /// Why (a case reference); kept with the hold and in the audit trail.
        #[arg(long)]
        reason: String,
    },
    Release {
        tenant: String,
        hold_id: String,
        #[arg(long)]
        reason: String,
    },
    List {
        tenant: String,
    },
}

fn hold_json(h: pb::Hold) -> Value {
    json!({
        "hold_id": h.hold_id,
        "scope": h.scope,
        "subject": (!h.subject.is_empty()).then_some(h.subject),
        "transcript": (!h.transcript.is_empty()).then_some(h.transcript),
        "reason": h.reason,
        "set_at": h.set_at.map(|t| t.to_string()),
    })
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// Records, oldest first. Times are RFC 3339 (2026-11-23T10:00:00Z).
    Query {
        #[arg(long, default_value = "")]
        tenant: String,
        #[arg(long, default_value = "")]
        key_id: String,
        /// e.g. transcript.get, subject.shred, auth.failed. Repeatable.
        #[arg(long = "operation")]
        operations: Vec<String>,
        /// Raw subject id; blinded by the server (needs --tenant).
        #[arg(long, default_value = "")]
        subject: String,
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        until: Option<String>,
        /// Records per page; 0 follows every page to the end.
        #[arg(long, default_value_t = 0)]
        limit: u32,
    },
    /// Walk the whole chain; exits non-zero if it is broken.
    Verify,
}

fn time(flag: &str, v: Option<String>) -> Result<Option<prost_types::Timestamp>, String> {
    v.map(|s| s.parse().map_err(|_| format!("--{flag}: {s:?} is not an RFC 3339 time (2026-11-23T10:00:00Z)")))
        .transpose()
}

fn tenant_json(t: pb::Tenant) -> Value {
    let r = t.retention.unwrap_or_default();
    json!({
        "tenant_id": t.tenant_id,
        "region": t.region,
        "display_name": t.display_name,
        "status": t.status().as_str_name(),
        "created_at": t.created_at.map(|t| t.to_string()),
        "allowlist": t.allowlist,
        "retention": { "purge_after_close_secs": r.purge_after_close_seconds,
                       "close_inactive_after_secs": r.close_inactive_after_seconds,
                       "max_age_secs": r.max_age_seconds,
                       "purge_on_close": r.purge_on_close },
        "live_api_keys": t.live_api_keys,
    })
}

fn key_json(k: pb::ApiKey) -> Value {
    json!({
        "key_id": k.key_id,
        "created_at": k.created_at.map(|t| t.to_string()),
        "revoked_at": k.revoked_at.map(|t| t.to_string()),
    })
}

fn record_json(r: pb::AuditRecord) -> Value {
    json!({
        "sequence": r.sequence,
        "time": r.time.map(|t| t.to_string()),
        "operation": r.operation,
        "outcome": r.outcome,
        "tenant_id": r.tenant_id,
        "key_id": r.key_id,
        "subject_blind_id": r.subject_blind_id,
        "transcript_blind_id": r.transcript_blind_id,
        "source_address": r.source_address,
    })
}

/// `chatvault backup`: the operator's connection and where the server writes the copy.
#[derive(Args, Debug)]
pub struct BackupArgs {
    #[command(flatten)]
    conn: AdminConn,
    /// Directory the server writes the backup to (on its own machine; must not exist or
    /// be empty; never inside the data or key directory).
    #[arg(long)]
    out: PathBuf,
}

pub async fn backup(args: BackupArgs) -> Result<(), String> {
    let BackupArgs { conn, out } = args;
    let out = std::path::absolute(&out).map_err(|e| format!("--out {}: {e}", out.display()))?;
    let token = credential(OPERATOR_TOKEN_ENV, conn.operator_token_file.as_deref(), "operator token")?;
    let mut c: AdminServiceClient<Authed> =
        AdminServiceClient::with_interceptor(channel(&conn.admin_server, &conn.tls).await?, token);
    let req = pb::BackupRequest { out_dir: out.display().to_string(), region: conn.region.clone() };
    let r = c.backup(req).await.map_err(status)?.into_inner();
    let out = json!({
        "out_dir": r.out_dir,
        "records": r.records,
        "ledger_counter": r.ledger_counter,
        "key_epochs": r.key_epochs,
        "restorable_until": "a key-store rotation destroys these epochs; take a new backup after each rotation",
    });
    println!("{}", serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?);
    Ok(())
}

pub async fn run(args: AdminArgs) -> Result<(), String> {
    let AdminArgs { conn, command } = args;
    let region = conn.region.clone();
    let token = credential(OPERATOR_TOKEN_ENV, conn.operator_token_file.as_deref(), "operator token")?;
    let mut c: AdminServiceClient<Authed> =
        AdminServiceClient::with_interceptor(channel(&conn.admin_server, &conn.tls).await?, token);
    let out = match command {
        AdminCommand::Tenant(TenantCommand::Create { tenant, name, allow }) => {
            let req = pb::CreateTenantRequest {
                tenant_id: tenant,
                display_name: name,
                allowlist: allow,
                retention: None,
                region: region.clone(),
            };
            tenant_json(c.create_tenant(req).await.map_err(status)?.into_inner())
        }
        AdminCommand::Tenant(TenantCommand::Get { tenant }) => {
            tenant_json(c.get_tenant(pb::GetTenantRequest { tenant_id: tenant }).await.map_err(status)?.into_inner())
        }
        AdminCommand::Tenant(TenantCommand::List) => {
            let r =
                c.list_tenants(pb::ListTenantsRequest { region: region.clone() }).await.map_err(status)?.into_inner();
            json!({ "tenants": r.tenants.into_iter().map(tenant_json).collect::<Vec<_>>() })
        }
        AdminCommand::Tenant(TenantCommand::Suspend { tenant }) => tenant_json(
            c.suspend_tenant(pb::SuspendTenantRequest { tenant_id: tenant }).await.map_err(status)?.into_inner(),
        ),
        AdminCommand::Tenant(TenantCommand::Resume { tenant }) => tenant_json(
            c.resume_tenant(pb::ResumeTenantRequest { tenant_id: tenant }).await.map_err(status)?.into_inner(),
        ),
        AdminCommand::Tenant(TenantCommand::Delete { tenant, yes }) => {
            if !yes {
                return Err(format!("deleting {tenant} shreds all its data for good; add --yes to confirm"));
            }
            let r = c.delete_tenant(pb::DeleteTenantRequest { tenant_id: tenant }).await.map_err(status)?.into_inner();
            json!({ "subjects_shredded": r.subjects_shredded, "key_epoch": r.key_epoch })
        }
        AdminCommand::Key(KeyCommand::Issue { tenant, raw }) => {
            let r = c.issue_api_key(pb::IssueApiKeyRequest { tenant_id: tenant }).await.map_err(status)?.into_inner();
            if raw {
                println!("{}", r.api_key);
                return Ok(());
            }
            json!({ "key": r.key.map(key_json), "api_key": r.api_key,
                    "note": "shown once: store it now; the server keeps only a hash" })
        }
        AdminCommand::Key(KeyCommand::List { tenant }) => {
            let r = c.list_api_keys(pb::ListApiKeysRequest { tenant_id: tenant }).await.map_err(status)?.into_inner();
            json!({ "keys": r.keys.into_iter().map(key_json).collect::<Vec<_>>() })
        }
        AdminCommand::Key(KeyCommand::Revoke { tenant, key_id }) => {
            let req = pb::RevokeApiKeyRequest { tenant_id: tenant, key_id };
            key_json(c.revoke_api_key(req).await.map_err(status)?.into_inner())
        }
        AdminCommand::Allowlist { tenant, networks } => {
            let req = pb::SetAllowlistRequest { tenant_id: tenant, allowlist: networks };
            tenant_json(c.set_allowlist(req).await.map_err(status)?.into_inner())
        }
        AdminCommand::Retention {
            tenant,
            purge_after_close_secs,
            close_inactive_after_secs,
            max_age_secs,
            purge_on_close,
        } => {
            let retention = pb::Retention {
                purge_after_close_seconds: purge_after_close_secs,
                close_inactive_after_seconds: close_inactive_after_secs,
                max_age_seconds: max_age_secs,
                purge_on_close,
            };
            let req = pb::SetRetentionRequest { tenant_id: tenant, retention: Some(retention) };
            tenant_json(c.set_retention(req).await.map_err(status)?.into_inner())
        }
        AdminCommand::Audit(AuditCommand::Query { tenant, key_id, operations, subject, since, until, limit }) => {
            let mut req = pb::QueryAuditRequest {
                tenant_id: tenant,
                key_id,
                operations,
                subject_id: subject,
                start_time: time("since", since)?,
                end_time: time("until", until)?,
                page_size: limit,
                page_token: String::new(),
                region: region.clone(),
            };
            let mut records = Vec::new();
            loop {
                let r = c.query_audit(req.clone()).await.map_err(status)?.into_inner();
                records.extend(r.records.into_iter().map(record_json));
                if r.next_page_token.is_empty() || limit != 0 {
                    break json!({ "records": records, "next_page_token": r.next_page_token });
                }
                req.page_token = r.next_page_token;
            }
        }
        AdminCommand::RetentionStatus { tenant, run } => {
            if run {
                c.run_retention(pb::RunRetentionRequest { region: region.clone() }).await.map_err(status)?;
            }
            let req = pb::GetRetentionStatusRequest { tenant_id: tenant };
            let s = c.get_retention_status(req).await.map_err(status)?.into_inner();
            json!({
                "tenant_id": s.tenant_id,
                "last_run_at": s.last_run_at.map(|t| t.to_string()),
                "purged_total": s.purged_total,
                "closed_total": s.closed_total,
                "last_purged": s.last_purged,
                "last_closed": s.last_closed,
                "backlog": s.backlog,
                "held": s.held,
            })
        }
        AdminCommand::Hold(HoldCommand::Set { tenant, subject, transcript, reason }) => {
            let req = pb::SetHoldRequest {
                tenant_id: tenant,
                subject_id: subject.unwrap_or_default(),
                transcript_id: transcript.unwrap_or_default(),
                reason,
            };
            hold_json(c.set_hold(req).await.map_err(status)?.into_inner())
        }
        AdminCommand::Hold(HoldCommand::Release { tenant, hold_id, reason }) => {
            let req = pb::ReleaseHoldRequest { tenant_id: tenant, hold_id, reason };
            hold_json(c.release_hold(req).await.map_err(status)?.into_inner())
        }
        AdminCommand::Hold(HoldCommand::List { tenant }) => {
            let req = pb::ListHoldsRequest { tenant_id: tenant };
            let holds = c.list_holds(req).await.map_err(status)?.into_inner().holds;
            Value::Array(holds.into_iter().map(hold_json).collect())
        }
        AdminCommand::Erasures => {
            let r = c
                .get_erasure_status(pb::GetErasureStatusRequest { region: region.clone() })
                .await
                .map_err(status)?
                .into_inner();
            json!({
                "pending_erasures": r.pending_erasures,
                "oldest_pending_at": r.oldest_pending_at.map(|t| t.to_string()),
                "live_epochs": r.live_epochs,
                "rotation_due": r.rotation_due,
                "last_rotation_at": r.last_rotation_at.map(|t| t.to_string()),
                "consecutive_failures": r.consecutive_failures,
                "last_failure_at": r.last_failure_at.map(|t| t.to_string()),
                "last_failure": (!r.last_failure.is_empty()).then_some(r.last_failure),
            })
        }
        AdminCommand::Audit(AuditCommand::Verify) => {
            let r =
                c.verify_audit(pb::VerifyAuditRequest { region: region.clone() }).await.map_err(status)?.into_inner();
            let out = json!({
                "intact": r.intact,
                "records_checked": r.records_checked,
                "head_sequence": r.head_sequence,
                "head_mac": r.head_mac,
                "pruned_records": r.pruned_records,
                "first_sequence": r.first_sequence,
                "first_bad_sequence": (!r.intact).then_some(r.first_bad_sequence),
                "problem": (!r.intact).then_some(r.problem),
                "accepted_gaps": r.accepted_gaps.iter().map(|g| json!({
                    "first_sequence": g.first_sequence,
                    "last_sequence": g.last_sequence,
                })).collect::<Vec<_>>(),
            });
            if !r.intact {
                println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
                return Err("the audit chain is broken".into());
            }
            out
        }
    };
    println!("{}", serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?);
    Ok(())
}
