//! What an operator watches: Prometheus text at `metrics_listen` (loopback by default).
//! One process-wide set of families, recorded where things happen (the edge, the
//! authenticator, the group commit, the key cache) and, for state the vault holds
//! (erasures pending, backlog, bytes on disk), read fresh at each scrape. No tenant or
//! subject id is ever a label.

mod server;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::fmt::Write as _;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

pub use server::serve;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// `/chatvault.v1.TranscriptService/GetTranscript`, as on the wire.
    pub rpc: String,
    /// The gRPC status name (`OK`, `NOT_FOUND`, ...).
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub listener: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AreaLabels {
    pub area: Area,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Area {
    Index,
    Values,
    Audit,
    Ledger,
}

/// Label values in Prometheus's lower case (the derive would write `Index`).
macro_rules! lower_case_label {
    ($ty:ty { $($variant:ident => $name:literal),* $(,)? }) => {
        impl EncodeLabelValue for $ty {
            fn encode(&self, e: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                e.write_str(match self { $(Self::$variant => $name),* })
            }
        }
    };
}

lower_case_label!(Area { Index => "index", Values => "values", Audit => "audit", Ledger => "ledger" });
lower_case_label!(CacheOutcome { Hit => "hit", Miss => "miss" });

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: CacheOutcome,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum CacheOutcome {
    Hit,
    Miss,
}

/// Every family chatvault exports.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RpcLabels, Counter>,
    pub request_seconds: Family<RpcLabels, Histogram>,
    pub auth_failures: Family<ReasonLabels, Counter>,
    pub lockouts: Counter,
    pub argon2_waiting: Gauge,
    pub argon2_running: Gauge,
    pub argon2_verifications: Counter,
    pub commit_batch_size: Histogram,
    pub commit_sync_seconds: Histogram,
    pub key_cache: Family<OutcomeLabels, Counter>,
    pub exports_open: Gauge,
    pub response_bytes_held: Gauge,
    pub connections_open: Family<ListenerLabels, Gauge>,
    pub connections_refused: Family<RefusedLabels, Counter>,
    pub limits_hit: Family<ReasonLabels, Counter>,
    pub audit_denials_suppressed: Counter,
    pub erasures_pending: Gauge,
    pub oldest_pending_erasure_seconds: Gauge,
    pub rotation_due: Gauge,
    pub rotation_failures: Gauge,
    pub key_store_epochs: Gauge,
    pub reclaim_backlog_records: Gauge,
    pub value_log_dead_bytes: Gauge,
    pub groups_packed: Counter,
    pub groups_left_unpacked: Counter,
    pub disk_bytes: Family<AreaLabels, Gauge>,
    pub retention_purged: Counter,
    pub retention_closed: Counter,
    pub retention_backlog: Gauge,
    pub retention_runs: Counter,
}

/// The work limits `limits_hit` counts, by the name their refusals give.
const LIMITS: &[&str] = &[
    "max_exports",
    "max_exports_per_tenant",
    "max_concurrent_reads",
    "max_concurrent_erasures",
    "max_inflight_response_bytes",
    "send_timeout",
];

fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.000_05, 2.0, 18) // 50 µs .. ~6.5 s
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("chatvault");
        let requests = Family::<RpcLabels, Counter>::default();
        let request_seconds =
            Family::<RpcLabels, Histogram>::new_with_constructor(|| Histogram::new(latency_buckets()) as Histogram);
        let commit_batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        let commit_sync_seconds = Histogram::new(latency_buckets());
        let m = Metrics {
            requests,
            request_seconds,
            auth_failures: Family::default(),
            lockouts: Counter::default(),
            argon2_waiting: Gauge::default(),
            argon2_running: Gauge::default(),
            argon2_verifications: Counter::default(),
            commit_batch_size,
            commit_sync_seconds,
            key_cache: Family::default(),
            exports_open: Gauge::default(),
            response_bytes_held: Gauge::default(),
            connections_open: Family::default(),
            connections_refused: Family::default(),
            limits_hit: Family::default(),
            audit_denials_suppressed: Counter::default(),
            erasures_pending: Gauge::default(),
            oldest_pending_erasure_seconds: Gauge::default(),
            rotation_due: Gauge::default(),
            rotation_failures: Gauge::default(),
            key_store_epochs: Gauge::default(),
            reclaim_backlog_records: Gauge::default(),
            value_log_dead_bytes: Gauge::default(),
            groups_packed: Counter::default(),
            groups_left_unpacked: Counter::default(),
            disk_bytes: Family::default(),
            retention_purged: Counter::default(),
            retention_closed: Counter::default(),
            retention_backlog: Gauge::default(),
            retention_runs: Counter::default(),
            registry: Registry::default(),
        };
        // Series that start at zero rather than appear with their first event: a rate of
        // refusals is 0, not absent, before the first one.
        for listener in ["data", "admin"] {
            m.connections(listener);
            for reason in ["per_source", "max_connections"] {
                let _ = m
                    .connections_refused
                    .get_or_create(&RefusedLabels { listener: listener.into(), reason: reason.into() });
            }
        }
        for limit in LIMITS {
            let _ = m.limits_hit.get_or_create(&ReasonLabels { reason: (*limit).into() });
        }
        let r = &mut registry;
        r.register("requests", "gRPC calls answered, by method and status", m.requests.clone());
        r.register("request_seconds", "gRPC call latency, by method and status", m.request_seconds.clone());
        r.register("auth_failures", "refused authentications, by reason", m.auth_failures.clone());
        r.register("lockouts", "key ids, addresses or networks locked out", m.lockouts.clone());
        r.register("argon2_waiting", "API key verifications waiting for an argon2 slot", m.argon2_waiting.clone());
        r.register("argon2_running", "argon2 verifications running", m.argon2_running.clone());
        r.register("argon2_verifications", "argon2 verifications run", m.argon2_verifications.clone());
        r.register("commit_batch_size", "writes made durable by one group-commit sync", m.commit_batch_size.clone());
        r.register("commit_sync_seconds", "duration of one group-commit sync", m.commit_sync_seconds.clone());
        r.register("key_cache", "unwrapped-key cache lookups", m.key_cache.clone());
        r.register("exports_open", "export streams in progress", m.exports_open.clone());
        r.register(
            "response_bytes_held",
            "decrypted response bytes reads hold until their responses are out",
            m.response_bytes_held.clone(),
        );
        r.register("connections_open", "connections open, by listener", m.connections_open.clone());
        r.register("connections_refused", "connections closed at accept, by reason", m.connections_refused.clone());
        r.register("limits_hit", "calls refused by a work limit, by limit", m.limits_hit.clone());
        r.register(
            "audit_denials_suppressed",
            "refused calls counted in an aggregate audit record instead of one each",
            m.audit_denials_suppressed.clone(),
        );
        r.register("erasures_pending", "erasures not final yet", m.erasures_pending.clone());
        r.register(
            "oldest_pending_erasure_seconds",
            "age of the oldest erasure not final yet",
            m.oldest_pending_erasure_seconds.clone(),
        );
        r.register("rotation_due", "1 while a key-store rotation is due", m.rotation_due.clone());
        r.register(
            "rotation_failures",
            "key-store rotation attempts failed since the last success",
            m.rotation_failures.clone(),
        );
        r.register("key_store_epochs", "key-store epochs held", m.key_store_epochs.clone());
        r.register(
            "reclaim_backlog_records",
            "queued reclaim work items (counted up to 10,000)",
            m.reclaim_backlog_records.clone(),
        );
        r.register("value_log_dead_bytes", "value-log bytes no record points at", m.value_log_dead_bytes.clone());
        r.register("groups_packed", "groups of messages packed into one record", m.groups_packed.clone());
        r.register(
            "groups_left_unpacked",
            "queued groups of messages left unpacked because they could not be read (damage)",
            m.groups_left_unpacked.clone(),
        );
        r.register("disk_bytes", "bytes on disk, by area", m.disk_bytes.clone());
        r.register("retention_purged", "transcripts purged by retention", m.retention_purged.clone());
        r.register("retention_closed", "idle transcripts closed by retention", m.retention_closed.clone());
        r.register(
            "retention_backlog",
            "transcripts due that the last tenant run left for the next",
            m.retention_backlog.clone(),
        );
        r.register("retention_runs", "retention runs of one tenant", m.retention_runs.clone());
        Metrics { registry, ..m }
    }

    /// The families as Prometheus text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn observe_request(&self, rpc: &str, code: tonic::Code, took: Duration) {
        let labels = RpcLabels { rpc: rpc.to_owned(), code: code_name(code).to_owned() };
        self.requests.get_or_create(&labels).inc();
        self.request_seconds.get_or_create(&labels).observe(took.as_secs_f64());
    }

    pub fn auth_failure(&self, reason: &str) {
        self.auth_failures.get_or_create(&ReasonLabels { reason: reason.to_owned() }).inc();
    }

    pub fn retention_run(&self, purged: u64, closed: u64, backlog: u64) {
        self.retention_purged.inc_by(purged);
        self.retention_closed.inc_by(closed);
        self.retention_backlog.set(i64::try_from(backlog).unwrap_or(i64::MAX));
        self.retention_runs.inc();
    }

    pub fn limit_hit(&self, limit: &str) {
        self.limits_hit.get_or_create(&ReasonLabels { reason: limit.to_owned() }).inc();
    }

    pub fn connection_refused(&self, listener: &str, reason: &str) {
        let labels = RefusedLabels { listener: listener.to_owned(), reason: reason.to_owned() };
        self.connections_refused.get_or_create(&labels).inc();
    }

    pub fn connections(&self, listener: &str) -> Gauge {
        self.connections_open.get_or_create(&ListenerLabels { listener: listener.to_owned() }).clone()
    }

    pub fn commit_round(&self, batch: u64, took: Duration) {
        self.commit_batch_size.observe(batch as f64);
        self.commit_sync_seconds.observe(took.as_secs_f64());
    }

    pub fn key_cache(&self, hit: bool) {
        let outcome = if hit { CacheOutcome::Hit } else { CacheOutcome::Miss };
        self.key_cache.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    pub fn disk(&self, area: Area, bytes: u64) {
        self.disk_bytes.get_or_create(&AreaLabels { area }).set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }
}

/// Counts one of something while it lives (an export stream, a connection).
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    pub fn inc(g: &Gauge) -> Self {
        g.inc();
        GaugeGuard(g.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The process's families.
pub fn get() -> &'static Arc<Metrics> {
    static METRICS: OnceLock<Arc<Metrics>> = OnceLock::new();
    METRICS.get_or_init(|| Arc::new(Metrics::new()))
}

/// The gRPC status name for a code, as the spec spells it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_uses_grpc_code_names_and_lower_case_label_values() {
        let m = Metrics::new();
        m.observe_request(
            "/chatvault.v1.TranscriptService/GetTranscript",
            tonic::Code::NotFound,
            Duration::from_millis(2),
        );
        m.commit_round(3, Duration::from_micros(300));
        m.disk(Area::Values, 42);
        let text = m.encode();
        for family in [
            "chatvault_requests_total",
            "chatvault_request_seconds_bucket",
            "chatvault_commit_batch_size",
            "chatvault_disk_bytes{area=\"values\"} 42",
            "chatvault_erasures_pending",
            "chatvault_argon2_waiting",
        ] {
            assert!(text.contains(family), "{family} missing:\n{text}");
        }
        assert!(text.contains("code=\"NOT_FOUND\""), "{text}");
    }
}
