//! One audit record: who did what to which (blinded) ids, from where, with what outcome.
//! Deliberately no free text: nothing a client sends can end up here verbatim except ids
//! of the form the server itself validates.

use std::fmt;

use serde::{Deserialize, Serialize};

macro_rules! names {
    ($(#[$m:meta])* $vis:vis enum $ty:ident { $($var:ident => $name:literal,)* }) => {
        $(#[$m])*
        $vis enum $ty { $($var,)* }
        impl $ty {
            pub const ALL: &'static [$ty] = &[$($ty::$var,)*];
            pub fn as_str(self) -> &'static str {
                match self { $($ty::$var => $name,)* }
            }
            pub fn parse(s: &str) -> Option<$ty> {
                match s { $($name => Some($ty::$var),)* _ => None }
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

names! {
    /// What was done. The names are stable: they are what operators query by.
    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
    pub enum Operation {
        PutTranscript => "transcript.put",
        AppendMessages => "transcript.append",
        CloseTranscript => "transcript.close",
        GetTranscript => "transcript.get",
        ListTranscripts => "transcript.list",
        DeleteTranscript => "transcript.delete",
        ShredSubject => "subject.shred",
        GetSubject => "subject.get",
        Authenticate => "auth.failed",
        Lockout => "auth.lockout",
        CreateTenant => "admin.tenant.create",
        SuspendTenant => "admin.tenant.suspend",
        ResumeTenant => "admin.tenant.resume",
        DeleteTenant => "admin.tenant.delete",
        IssueApiKey => "admin.key.issue",
        RevokeApiKey => "admin.key.revoke",
        SetAllowlist => "admin.allowlist.set",
        SetRetention => "admin.retention.set",
        AdminDenied => "admin.denied",
        QueryAudit => "admin.audit.query",
        VerifyAudit => "admin.audit.verify",
        // Appended, never inserted: stored records name operations by position.
        ExportSubject => "subject.export",
        ExportTenant => "tenant.export",
        GetErasure => "subject.erasure.get",
        Backup => "admin.backup",
        // Refused authentications from one source in one window, counted in `count`.
        AuthFailedRepeated => "auth.failed.repeated",
        AdminDeniedRepeated => "admin.denied.repeated",
        // Retention's deletions and closes of one tenant in one run, counted in `count`.
        RetentionPurge => "retention.purge",
        RetentionClose => "retention.close",
        SetHold => "admin.hold.set",
        ReleaseHold => "admin.hold.release",
        RunRetention => "admin.retention.run",
    }
}

names! {
    /// How it ended, coarsely: enough to tell access from attempt.
    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
    pub enum Outcome {
        Ok => "ok",
        InvalidArgument => "invalid_argument",
        NotFound => "not_found",
        Conflict => "conflict",
        Unauthenticated => "unauthenticated",
        PermissionDenied => "permission_denied",
        LockedOut => "locked_out",
        Unavailable => "unavailable",
        Error => "error",
    }
}

impl Operation {
    /// Whether the operation changed state: its record is made durable before the reply.
    pub fn is_change(self) -> bool {
        !matches!(
            self,
            Operation::GetTranscript
                | Operation::ListTranscripts
                | Operation::ExportSubject
                | Operation::ExportTenant
                | Operation::GetSubject
                | Operation::GetErasure
                | Operation::QueryAudit
                | Operation::VerifyAudit
        )
    }
}

/// What the caller knows of an event; the log adds the sequence number, time and chain.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub tenant: String,
    pub key_id: String,
    /// Hex blind index (tenant-keyed HMAC) of the subject, never the raw id.
    pub subject: String,
    /// Hex blind index of the transcript.
    pub transcript: String,
    pub source: String,
    /// How many events this one record stands for: above 1 for an aggregate of refused
    /// calls from one source (0 and 1 both mean one).
    pub count: u32,
    /// The reason an operator gave for a hold set or released; never client data.
    pub detail: String,
}

/// One stored, chained record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    pub at_micros: i64,
    pub operation: Operation,
    pub outcome: Outcome,
    pub tenant: String,
    pub key_id: String,
    pub subject: String,
    pub transcript: String,
    pub source: String,
    /// Events the record stands for (1 but for aggregates).
    pub count: u32,
    /// The reason an operator gave (holds), or empty.
    pub detail: String,
    /// MAC of the previous record: the chain link.
    pub prev: [u8; 32],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_operation_codes_never_move() {
        // Records on disk name an operation by its position: a new one goes last.
        let code = |op: Operation| postcard::to_allocvec(&op).unwrap();
        assert_eq!(code(Operation::PutTranscript), [0]);
        assert_eq!(code(Operation::VerifyAudit), [20]);
        assert_eq!(code(Operation::ExportTenant), [22]);
        assert_eq!(code(Operation::GetErasure), [23]);
        assert_eq!(code(Operation::AdminDeniedRepeated), [26]);
        assert_eq!(Operation::ALL.len(), 32);
    }
}
