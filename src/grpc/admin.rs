//! AdminService: the operator's API, on its own listener. Every change is recorded in
//! the audit trail, as is every refused operator token.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert::{timestamp_in, timestamp_out};
use super::credentials::bearer;
use super::gate::{audit_status, detached, erasing};
use super::pb::{self, admin_service_server::AdminService};
use super::status::{outcome_of, tenancy_status, to_status};
use crate::audit::{AuditLog, Event, Filter, Operation, Outcome, Record};
use crate::clock::Clock;
use crate::tenancy::{
    self, ApiKeyInfo, KeyHashParams, KeyId, OperatorToken, Registry, RetentionPolicy, Tenant, TenantStatus,
};
use crate::vault::{HoldScope, TenantId, Vault};

/// The admin listener's defence against token guessing: lockout and aggregated records.
pub struct AdminGuard {
    lockout: tenancy::Lockout,
    denials: super::denials::Denials,
}

impl AdminGuard {
    pub fn new(cfg: tenancy::LockoutConfig) -> Arc<Self> {
        Arc::new(AdminGuard { lockout: tenancy::Lockout::new(cfg), denials: Default::default() })
    }
}

/// What the admin API acts on in one hosted region.
pub struct AdminRegion {
    pub name: String,
    pub registry: Arc<Registry>,
    pub vault: Arc<Vault>,
    pub audit: Arc<AuditLog>,
    pub purger: Arc<crate::retention::Purger>,
}

impl AdminRegion {
    /// Whether this region's registry has `tenant` (deleted ones included).
    fn holds(&self, tenant: &str) -> bool {
        TenantId::parse(tenant).ok().and_then(|t| self.registry.status(&t).ok().flatten()).is_some()
    }
}

pub struct Admin {
    pub guard: Arc<AdminGuard>,
    pub work: Arc<super::limits::Work>,
    /// The hosted regions, in name order; never empty.
    pub regions: Vec<Arc<AdminRegion>>,
    /// Where the regions this node does not host are served.
    pub endpoints: std::collections::BTreeMap<String, String>,
    pub token: OperatorToken,
    pub key_hash: KeyHashParams,
    pub clock: Arc<dyn Clock>,
    /// Held while a tenant is created: no two regions take one id at once.
    pub creating: std::sync::Mutex<()>,
}

fn tenant_id(s: &str) -> Result<TenantId, Status> {
    TenantId::parse(s).map_err(to_status)
}

fn allowlist_in(items: &[String]) -> Result<Vec<tenancy::Cidr>, Status> {
    tenancy::parse_list(items).map_err(|e| Status::invalid_argument(format!("allowlist: {e}")))
}

fn retention_in(r: Option<pb::Retention>) -> RetentionPolicy {
    let r = r.unwrap_or_default();
    RetentionPolicy {
        purge_after_close_secs: r.purge_after_close_seconds,
        close_inactive_after_secs: r.close_inactive_after_seconds,
        max_age_secs: r.max_age_seconds,
        purge_on_close: r.purge_on_close,
    }
}

fn hold_out(h: &tenancy::Hold) -> pb::Hold {
    let (scope, subject, transcript) = match h.scope {
        HoldScope::Tenant => ("tenant", String::new(), String::new()),
        HoldScope::Subject(s) => ("subject", hex::encode(s), String::new()),
        HoldScope::Transcript { transcript, subject } => ("transcript", hex::encode(subject), hex::encode(transcript)),
    };
    pb::Hold {
        hold_id: h.id.clone(),
        scope: scope.into(),
        subject,
        transcript,
        reason: h.reason.clone(),
        set_at: crate::vault::Timestamp::from_micros(h.set_at).map(timestamp_out),
    }
}

fn retention_error(e: crate::retention::RetentionError) -> Status {
    match e {
        crate::retention::RetentionError::Vault(v) => to_status(v),
        // The store's own failures are answered as any call's would be (UNAVAILABLE, full).
        crate::retention::RetentionError::Store(s) => to_status(crate::vault::VaultError::Store(s)),
        other => {
            tracing::error!(error = %other, "retention failed");
            Status::internal("retention failed; see the server log")
        }
    }
}

fn tenant_out(region: &str, t: &Tenant) -> pb::Tenant {
    pb::Tenant {
        region: region.to_owned(),
        tenant_id: t.id.as_str().to_owned(),
        display_name: t.display_name.clone(),
        status: match t.status {
            TenantStatus::Active => pb::TenantStatus::Active,
            TenantStatus::Suspended | TenantStatus::Deleted => pb::TenantStatus::Suspended,
        } as i32,
        created_at: Some(timestamp_out(t.created_at)),
        allowlist: t.allowlist.iter().map(ToString::to_string).collect(),
        retention: Some(pb::Retention {
            purge_after_close_seconds: t.retention.purge_after_close_secs,
            close_inactive_after_seconds: t.retention.close_inactive_after_secs,
            max_age_seconds: t.retention.max_age_secs,
            purge_on_close: t.retention.purge_on_close,
        }),
        live_api_keys: t.keys.iter().filter(|k| k.is_live()).count() as u32,
    }
}

fn key_out(k: &ApiKeyInfo) -> pb::ApiKey {
    pb::ApiKey {
        key_id: k.id.as_str().to_owned(),
        created_at: Some(timestamp_out(k.created_at)),
        revoked_at: k.revoked_at.map(timestamp_out),
    }
}

fn record_out(r: Record) -> pb::AuditRecord {
    pb::AuditRecord {
        sequence: r.seq,
        time: crate::vault::Timestamp::from_micros(r.at_micros).map(timestamp_out),
        operation: r.operation.as_str().to_owned(),
        outcome: r.outcome.as_str().to_owned(),
        tenant_id: r.tenant,
        key_id: r.key_id,
        subject_blind_id: r.subject,
        transcript_blind_id: r.transcript,
        source_address: r.source,
        previous_mac: hex::encode(r.prev),
        count: r.count,
        detail: r.detail,
    }
}

async fn record_change<T>(
    audit: &AuditLog,
    vault: &Vault,
    source: String,
    op: Operation,
    tenant: &str,
    key_id: &str,
    result: Result<T, Status>,
) -> Result<T, Status> {
    let ev = Event { tenant: tenant.to_owned(), key_id: key_id.to_owned(), source, ..Event::default() };
    record_event(audit, vault, op, ev, result).await
}

/// Appends `ev` with the call's outcome; a change's record is durable before the reply.
async fn record_event<T>(
    audit: &AuditLog,
    vault: &Vault,
    op: Operation,
    ev: Event,
    result: Result<T, Status>,
) -> Result<T, Status> {
    audit.append(op, outcome_of(&result), ev).map_err(audit_status)?;
    if !op.is_change() {
        return result;
    }
    vault.wait_durable().await.map_err(to_status)?;
    result
}

impl Admin {
    /// Where refusals that concern no tenant are recorded: the first hosted region.
    fn first(&self) -> &Arc<AdminRegion> {
        &self.regions[0]
    }

    /// The hosted region `tenant` is pinned to; for a tenant no hosted region knows, the
    /// first one, whose registry then answers NOT_FOUND (and whose trail records it).
    fn home(&self, tenant: &str) -> Arc<AdminRegion> {
        self.holder(tenant).unwrap_or_else(|| self.first().clone())
    }

    /// `tenant` as region `r`'s trail may record it: only a tenant of that region. A
    /// call about another region's tenant (or none) is recorded without the id, so no
    /// region's files ever hold another's tenant ids.
    fn shown<'a>(r: &AdminRegion, tenant: &'a str) -> &'a str {
        if r.holds(tenant) { tenant } else { "" }
    }

    /// The hosted region whose registry has `tenant`, if any.
    fn holder(&self, tenant: &str) -> Option<Arc<AdminRegion>> {
        self.regions.iter().find(|r| r.holds(tenant)).cloned()
    }

    /// The hosted regions' names, for messages.
    fn hosted(&self) -> String {
        self.regions.iter().map(|r| r.name.as_str()).collect::<Vec<_>>().join(", ")
    }

    /// The hosted region a request names in its `region` field: may be empty only when
    /// this node hosts one region. A region served elsewhere is FAILED_PRECONDITION
    /// naming its endpoint; an unknown one INVALID_ARGUMENT.
    fn named(&self, region: &str) -> Result<Arc<AdminRegion>, Status> {
        if region.is_empty() {
            return match self.regions.as_slice() {
                [only] => Ok(only.clone()),
                _ => Err(Status::invalid_argument(format!("region: required; this node hosts {}", self.hosted()))),
            };
        }
        if let Some(r) = self.regions.iter().find(|r| r.name == region) {
            return Ok(r.clone());
        }
        if let Some(url) = self.endpoints.get(region) {
            let hosted: Vec<String> = self.regions.iter().map(|r| r.name.clone()).collect();
            return Err(super::regions::wrong_region(region, Some(url), hosted.iter()));
        }
        let shown = if crate::region::check_name(region).is_ok() { region } else { "(not a region name)" };
        Err(Status::invalid_argument(format!("region: unknown region {shown:?}; this node hosts {}", self.hosted())))
    }

    /// Checks the operator token. The right token is always let in (it is compared in
    /// constant time, no argon2: locking it out would only let anyone on the admin
    /// network lock the operator out); a source that keeps presenting wrong ones is
    /// locked out as on the data listener, and refusals are recorded in aggregate.
    fn operator<T>(&self, req: &Request<T>) -> Result<String, Status> {
        let ip = req.remote_addr().map(|a| a.ip());
        let source = ip.map(|ip| ip.to_string()).unwrap_or_default();
        let why = match bearer(req.metadata()) {
            Ok(Some(t)) if self.token.matches(t) => return Ok(source),
            Ok(Some(_)) => "operator token not recognised",
            Ok(None) => "operator token required: send `authorization: Bearer <token>`",
            Err(()) => "malformed authorization header: expected `Bearer <token>`",
        };
        let now = std::time::Instant::now();
        let addr = ip.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
        match self.guard.lockout.check(addr, now).and_then(|()| self.guard.lockout.junk(addr, now)) {
            Ok(locked) => {
                if !locked.is_empty() {
                    tracing::warn!(ip = %addr, "admin listener: address locked out after repeated wrong operator tokens");
                }
                Err(self.refuse(addr, source, Outcome::Unauthenticated, why.into(), None))
            }
            Err(refusal) => {
                let retry = match refusal {
                    tenancy::Refusal::Locked(d) | tenancy::Refusal::Throttled(d) => d,
                    tenancy::Refusal::Full => std::time::Duration::from_secs(1),
                };
                let why = crate::tenancy::AuthError::LockedOut { retry_after: retry }.to_string();
                Err(self.refuse(addr, source, Outcome::LockedOut, why, Some(retry)))
            }
        }
    }

    fn refuse(
        &self,
        ip: std::net::IpAddr,
        source: String,
        outcome: Outcome,
        why: String,
        retry: Option<std::time::Duration>,
    ) -> Status {
        let ev = Event { source, ..Event::default() };
        if self.guard.denials.note(ip, outcome, &ev, std::time::Instant::now()) == super::denials::Note::Record
            && let Err(e) = self.first().audit.append(Operation::AdminDenied, outcome, ev)
        {
            tracing::error!(error = %e, "cannot record a refused operator token");
        }
        match retry {
            Some(after) => <Status as tonic_types::StatusExt>::with_error_details(
                tonic::Code::ResourceExhausted,
                why,
                tonic_types::ErrorDetails::with_retry_info(Some(after)),
            ),
            None => Status::unauthenticated(why),
        }
    }

    /// Writes the aggregates of refused operator tokens whose window closed (all of them
    /// when told): for a worker, which outlives no one's borrow of the admin service.
    pub fn flusher(&self) -> Arc<dyn Fn(bool) + Send + Sync> {
        let (guard, audit) = (self.guard.clone(), self.first().audit.clone());
        Arc::new(move |all| {
            for (outcome, ev) in guard.denials.take_closed(std::time::Instant::now(), all) {
                if let Err(e) = audit.append(Operation::AdminDeniedRepeated, outcome, ev) {
                    tracing::error!(error = %e, "cannot record refused operator tokens");
                }
            }
        })
    }

    /// Records an admin change (durably) and passes its result through.
    async fn record<T>(
        &self,
        r: &AdminRegion,
        source: String,
        op: Operation,
        tenant: &str,
        key_id: &str,
        result: Result<T, Status>,
    ) -> Result<T, Status> {
        record_change(&r.audit, &r.vault, source, op, Self::shown(r, tenant), key_id, result).await
    }

    /// Records a hold change with what it covers and the operator's reason.
    async fn record_hold(
        &self,
        r: &AdminRegion,
        source: String,
        op: Operation,
        tenant: &str,
        reason: &str,
        result: Result<tenancy::Hold, Status>,
    ) -> Result<pb::Hold, Status> {
        let (subject, transcript) = match result.as_ref().map(|h| h.scope) {
            Ok(HoldScope::Subject(s)) => (hex::encode(s), String::new()),
            Ok(HoldScope::Transcript { transcript, subject }) => (hex::encode(subject), hex::encode(transcript)),
            _ => (String::new(), String::new()),
        };
        let hold_id = result.as_ref().map(|h| h.id.clone()).unwrap_or_default();
        let tenant = Self::shown(r, tenant);
        // The reason given with this call (a hold set again keeps its first reason).
        let ev = Event {
            tenant: tenant.to_owned(),
            source,
            subject,
            transcript,
            detail: format!("{hold_id}: {reason}"),
            ..Event::default()
        };
        record_event(&r.audit, &r.vault, op, ev, result).await.map(|h| hold_out(&h))
    }

    /// What a SetHold names, resolved to blind ids.
    fn hold_scope(&self, home: &AdminRegion, tid: &TenantId, r: &pb::SetHoldRequest) -> Result<HoldScope, Status> {
        home.registry.get(tid).map_err(tenancy_status)?;
        match (r.subject_id.as_str(), r.transcript_id.as_str()) {
            ("", "") => Ok(HoldScope::Tenant),
            (s, "") => {
                home.vault.limits().id("subject_id", s).map_err(to_status)?;
                Ok(HoldScope::Subject(home.vault.subject_blind(tid, s).map_err(to_status)?))
            }
            ("", t) => {
                home.vault.limits().id("transcript_id", t).map_err(to_status)?;
                let (transcript, subject) = home.vault.transcript_blinds(tid, t).map_err(to_status)?;
                Ok(HoldScope::Transcript { transcript, subject })
            }
            _ => Err(Status::invalid_argument("subject_id, transcript_id: name at most one of them")),
        }
    }

    /// Runs a registry change: it syncs the key volume and the store, so off the
    /// executor's own threads.
    fn tenant_change(
        &self,
        home: &AdminRegion,
        tenant: &str,
        f: impl FnOnce(&TenantId) -> Result<Arc<Tenant>, tenancy::TenancyError>,
    ) -> Result<pb::Tenant, Status> {
        let id = tenant_id(tenant)?;
        tokio::task::block_in_place(|| f(&id)).map(|t| tenant_out(&home.name, &t)).map_err(tenancy_status)
    }
}

#[tonic::async_trait]
impl AdminService for Admin {
    async fn create_tenant(&self, req: Request<pb::CreateTenantRequest>) -> Result<Response<pb::Tenant>, Status> {
        let source = self.operator(&req)?;
        let pb::CreateTenantRequest { tenant_id: id, display_name, allowlist, retention, region } = req.into_inner();
        let now = self.clock.now();
        let home = match (region.as_str(), self.named(&region)) {
            ("", _) => Err(Status::invalid_argument(format!(
                "region: required (the region the tenant is pinned to; this node hosts {})",
                self.hosted()
            ))),
            (_, found) => found,
        };
        let home = match home {
            Ok(h) => h,
            Err(e) => return Err(self.record(self.first(), source, Operation::CreateTenant, &id, "", Err(e)).await?),
        };
        // One tenant id names one tenant on this node, whichever region it is in.
        // The check that no other hosted region has the id and the creation are one step.
        let created = {
            let _one_at_a_time = self.creating.lock().map_err(|_| Status::internal("lock poisoned"))?;
            match self.holder(&id).filter(|r| r.name != home.name) {
                Some(r) => Err(r),
                None => Ok(allowlist_in(&allowlist).and_then(|list| {
                    self.tenant_change(&home, &id, |t| {
                        home.registry.create(t.clone(), display_name, list, retention_in(retention), now)
                    })
                })),
            }
        };
        let result = match created {
            Ok(result) => result,
            Err(r) => {
                // Recorded where the tenant lives: its id is no business of the other region.
                let e = Status::already_exists(format!("tenant {id:?} exists already, in region {}", r.name));
                return Err(self.record(&r, source, Operation::CreateTenant, &id, "", Err(e)).await?);
            }
        };
        Ok(Response::new(self.record(&home, source, Operation::CreateTenant, &id, "", result).await?))
    }

    async fn get_tenant(&self, req: Request<pb::GetTenantRequest>) -> Result<Response<pb::Tenant>, Status> {
        self.operator(&req)?;
        let id = req.into_inner().tenant_id;
        let home = self.home(&id);
        Ok(Response::new(self.tenant_change(&home, &id, |t| home.registry.get(t))?))
    }

    async fn list_tenants(
        &self,
        req: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsResponse>, Status> {
        self.operator(&req)?;
        let region = req.into_inner().region;
        let regions = match region.as_str() {
            "" => self.regions.clone(),
            r => vec![self.named(r)?],
        };
        let mut out = Vec::new();
        for r in regions {
            out.extend(r.registry.list().map_err(tenancy_status)?.iter().map(|t| tenant_out(&r.name, t)));
        }
        Ok(Response::new(pb::ListTenantsResponse { tenants: out }))
    }

    async fn suspend_tenant(&self, req: Request<pb::SuspendTenantRequest>) -> Result<Response<pb::Tenant>, Status> {
        let source = self.operator(&req)?;
        let id = req.into_inner().tenant_id;
        let home = self.home(&id);
        let result = self.tenant_change(&home, &id, |t| home.registry.set_suspended(t, true));
        Ok(Response::new(self.record(&home, source, Operation::SuspendTenant, &id, "", result).await?))
    }

    async fn resume_tenant(&self, req: Request<pb::ResumeTenantRequest>) -> Result<Response<pb::Tenant>, Status> {
        let source = self.operator(&req)?;
        let id = req.into_inner().tenant_id;
        let home = self.home(&id);
        let result = self.tenant_change(&home, &id, |t| home.registry.set_suspended(t, false));
        Ok(Response::new(self.record(&home, source, Operation::ResumeTenant, &id, "", result).await?))
    }

    async fn delete_tenant(
        &self,
        req: Request<pb::DeleteTenantRequest>,
    ) -> Result<Response<pb::DeleteTenantResponse>, Status> {
        let source = self.operator(&req)?;
        let id = req.into_inner().tenant_id;
        let home = self.home(&id);
        let shown = Self::shown(&home, &id).to_owned();
        let (registry, vault, audit, now) =
            (home.registry.clone(), home.vault.clone(), home.audit.clone(), self.clock.now());
        // Detached: a client that goes away mid-erasure leaves neither half an erasure
        // nor an unrecorded one.
        // The operator's erasures have a pool of their own (no tenant id has a space).
        let reply = erasing(&self.work, " operator", async move {
            let result = async {
                let tid = tenant_id(&id)?;
                if registry.status(&tid).map_err(tenancy_status)?.is_none() {
                    return Err(tenancy_status(tenancy::TenancyError::NotFound(id.clone())));
                }
                // First no call is admitted, then the keys go; a retry after a failure
                // finishes the erasure.
                // Checked and marked with every hold-setter waiting: no hold can come in
                // between and leave a tenant deleted but not erasable.
                vault
                    .while_erasures_wait(&tid, &HoldScope::Tenant, || {
                        if let Some(hold) = crate::vault::HoldCheck::any_hold(&*registry, tid.as_str()) {
                            return Err(to_status(crate::vault::VaultError::Held(hold)));
                        }
                        registry.mark_deleted(&tid, now).map_err(tenancy_status)
                    })
                    .map_err(to_status)??;
                let erased = vault.erase_tenant(&tid).await.map_err(to_status)?;
                tracing::info!(tenant = %id, subjects = erased.subjects_shredded, "tenant deleted and shredded");
                Ok(pb::DeleteTenantResponse {
                    subjects_shredded: erased.subjects_shredded,
                    key_epoch: erased.key_epoch,
                })
            }
            .await;
            record_change(&audit, &vault, source, Operation::DeleteTenant, &shown, "", result).await
        });
        Ok(Response::new(reply.await?))
    }

    async fn issue_api_key(
        &self,
        req: Request<pb::IssueApiKeyRequest>,
    ) -> Result<Response<pb::IssueApiKeyResponse>, Status> {
        let source = self.operator(&req)?;
        let id = req.into_inner().tenant_id;
        let home = self.home(&id);
        let shown = Self::shown(&home, &id).to_owned();
        let (registry, params, now) = (home.registry.clone(), self.key_hash, self.clock.now());
        let (vault, audit) = (home.vault.clone(), home.audit.clone());
        let (info, key) = detached(async move {
            let result = match tenant_id(&id) {
                // argon2 hashing is slow on purpose: off the executor.
                Ok(tid) => tokio::task::spawn_blocking(move || registry.issue_key(&tid, params, now))
                    .await
                    .map_err(|_| Status::internal("worker failed"))
                    .and_then(|r| r.map_err(tenancy_status)),
                Err(e) => Err(e),
            };
            let key_id = result.as_ref().map(|(info, _)| info.id.as_str().to_owned()).unwrap_or_default();
            record_change(&audit, &vault, source, Operation::IssueApiKey, &shown, &key_id, result).await
        })
        .await?;
        Ok(Response::new(pb::IssueApiKeyResponse { key: Some(key_out(&info)), api_key: key.expose().to_owned() }))
    }

    async fn list_api_keys(
        &self,
        req: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        self.operator(&req)?;
        let id = req.into_inner().tenant_id;
        let t = self.home(&id).registry.get(&tenant_id(&id)?).map_err(tenancy_status)?;
        Ok(Response::new(pb::ListApiKeysResponse {
            keys: t.keys.iter().map(|k| key_out(&ApiKeyInfo::from(k))).collect(),
        }))
    }

    async fn revoke_api_key(&self, req: Request<pb::RevokeApiKeyRequest>) -> Result<Response<pb::ApiKey>, Status> {
        let source = self.operator(&req)?;
        let pb::RevokeApiKeyRequest { tenant_id: id, key_id } = req.into_inner();
        let home = self.home(&id);
        let result = tenant_id(&id).and_then(|tid| {
            let kid = KeyId::parse(&key_id)
                .ok_or_else(|| Status::invalid_argument("key_id: expected the 16 hex characters of a key id"))?;
            tokio::task::block_in_place(|| home.registry.revoke_key(&tid, &kid, self.clock.now()))
                .map(|k| key_out(&k))
                .map_err(tenancy_status)
        });
        Ok(Response::new(self.record(&home, source, Operation::RevokeApiKey, &id, &key_id, result).await?))
    }

    async fn set_allowlist(&self, req: Request<pb::SetAllowlistRequest>) -> Result<Response<pb::Tenant>, Status> {
        let source = self.operator(&req)?;
        let pb::SetAllowlistRequest { tenant_id: id, allowlist } = req.into_inner();
        let home = self.home(&id);
        let result = allowlist_in(&allowlist)
            .and_then(|list| self.tenant_change(&home, &id, |t| home.registry.set_allowlist(t, list)));
        Ok(Response::new(self.record(&home, source, Operation::SetAllowlist, &id, "", result).await?))
    }

    async fn set_retention(&self, req: Request<pb::SetRetentionRequest>) -> Result<Response<pb::Tenant>, Status> {
        let source = self.operator(&req)?;
        let pb::SetRetentionRequest { tenant_id: id, retention } = req.into_inner();
        let home = self.home(&id);
        let result = self.tenant_change(&home, &id, |t| home.registry.set_retention(t, retention_in(retention)));
        Ok(Response::new(self.record(&home, source, Operation::SetRetention, &id, "", result).await?))
    }

    async fn query_audit(
        &self,
        req: Request<pb::QueryAuditRequest>,
    ) -> Result<Response<pb::QueryAuditResponse>, Status> {
        let source = self.operator(&req)?;
        let q = req.into_inner();
        let home = match (q.region.as_str(), q.tenant_id.as_str()) {
            ("", t) if !t.is_empty() => self.home(t),
            (r, _) => self.named(r)?,
        };
        let mut filter = Filter {
            tenant: (!q.tenant_id.is_empty()).then(|| q.tenant_id.clone()),
            key_id: (!q.key_id.is_empty()).then(|| q.key_id.clone()),
            since_micros: timestamp_in("start_time", q.start_time)?.map(|t| t.micros()),
            until_micros: timestamp_in("end_time", q.end_time)?.map(|t| t.micros()),
            ..Filter::default()
        };
        for name in &q.operations {
            let op = Operation::parse(name).ok_or_else(|| {
                let known: Vec<&str> = Operation::ALL.iter().map(|o| o.as_str()).collect();
                Status::invalid_argument(format!("operations: unknown operation {name:?}; known: {}", known.join(", ")))
            })?;
            filter.operations.push(op);
        }
        if !q.subject_id.is_empty() {
            if q.tenant_id.is_empty() {
                return Err(Status::invalid_argument(
                    "subject_id: needs tenant_id (subject ids are blinded per tenant)",
                ));
            }
            let (blind, _) =
                home.vault.blind_ids(&tenant_id(&q.tenant_id)?, Some(&q.subject_id), None).map_err(to_status)?;
            // A tenant that never wrote has no blind key: nothing can match.
            filter.subject = Some(blind.unwrap_or_else(|| "-".into()));
        }
        let after = match q.page_token.as_str() {
            "" => 0,
            t => t.parse().map_err(|_| Status::invalid_argument("page_token: not a token this server issued"))?,
        };
        let size = if q.page_size == 0 { 100 } else { q.page_size as usize };
        let audit = home.audit.clone();
        let page = tokio::task::spawn_blocking(move || audit.query(&filter, after, size))
            .await
            .map_err(|_| Status::internal("worker failed"))
            .and_then(|r| {
                r.map_err(|e| {
                    tracing::error!(error = %e, "audit query failed");
                    Status::data_loss(e.to_string())
                })
            });
        // Who read the trail is on the trail.
        let page = self.record(&home, source, Operation::QueryAudit, &q.tenant_id, &q.key_id, page).await?;
        Ok(Response::new(pb::QueryAuditResponse {
            records: page.records.into_iter().map(record_out).collect(),
            next_page_token: page.next_after.map(|s| s.to_string()).unwrap_or_default(),
        }))
    }

    async fn verify_audit(
        &self,
        req: Request<pb::VerifyAuditRequest>,
    ) -> Result<Response<pb::VerifyAuditResponse>, Status> {
        let source = self.operator(&req)?;
        let home = self.named(&req.get_ref().region)?;
        let audit = home.audit.clone();
        let v = tokio::task::spawn_blocking(move || audit.verify())
            .await
            .map_err(|_| Status::internal("worker failed"))
            .and_then(|r| r.map_err(|e| Status::unavailable(e.to_string())));
        let v = self.record(&home, source, Operation::VerifyAudit, "", "", v).await?;
        let (first_bad_sequence, problem) = v.broken.clone().unwrap_or_default();
        Ok(Response::new(pb::VerifyAuditResponse {
            intact: v.broken.is_none(),
            records_checked: v.records,
            head_sequence: v.head_seq,
            head_mac: v.head_mac,
            first_bad_sequence,
            problem,
            accepted_gaps: v
                .accepted_gaps
                .iter()
                .map(|g| pb::AuditGap {
                    first_sequence: g.from,
                    last_sequence: g.to,
                    accepted_at: crate::vault::Timestamp::from_micros(g.at_micros).map(timestamp_out),
                })
                .collect(),
            pruned_records: v.pruned,
            first_sequence: v.first_seq,
        }))
    }

    async fn get_erasure_status(
        &self,
        req: Request<pb::GetErasureStatusRequest>,
    ) -> Result<Response<pb::ErasureStatusReport>, Status> {
        self.operator(&req)?;
        let o = self.named(&req.get_ref().region)?.vault.erasure_overview().map_err(to_status)?;
        let ts = |t: Option<crate::vault::Timestamp>| t.map(timestamp_out);
        let (failed_at, failure) = o.rotation.last_failure.clone().unzip();
        Ok(Response::new(pb::ErasureStatusReport {
            pending_erasures: o.pending_erasures,
            oldest_pending_at: ts(o.oldest_pending_at),
            live_epochs: o.live_epochs,
            rotation_due: o.rotation_due,
            last_rotation_at: ts(o.rotation.last_completed_at),
            consecutive_failures: o.rotation.consecutive_failures,
            last_failure_at: ts(failed_at),
            last_failure: failure.unwrap_or_default(),
        }))
    }

    async fn set_hold(&self, req: Request<pb::SetHoldRequest>) -> Result<Response<pb::Hold>, Status> {
        let source = self.operator(&req)?;
        let r = req.into_inner();
        let home = self.home(&r.tenant_id);
        let result = tenant_id(&r.tenant_id).and_then(|tid| {
            tenancy::check_hold_reason(&r.reason).map_err(tenancy_status)?;
            let scope = self.hold_scope(&home, &tid, &r)?;
            tokio::task::block_in_place(|| {
                home.vault.while_erasures_wait(&tid, &scope, || {
                    home.registry.add_hold(&tid, scope, &r.reason, self.clock.now())
                })
            })
            .map_err(to_status)?
            .map(|(_, hold)| hold)
            .map_err(tenancy_status)
        });
        if let Ok(h) = &result {
            tracing::info!(tenant = %r.tenant_id, hold = %h.id, "legal hold set");
        }
        Ok(Response::new(self.record_hold(&home, source, Operation::SetHold, &r.tenant_id, &r.reason, result).await?))
    }

    async fn release_hold(&self, req: Request<pb::ReleaseHoldRequest>) -> Result<Response<pb::Hold>, Status> {
        let source = self.operator(&req)?;
        let r = req.into_inner();
        let home = self.home(&r.tenant_id);
        // The same rule as for setting one: the reason is kept in the audit trail whole.
        let result = tenancy::check_hold_reason(&r.reason).map_err(tenancy_status).and_then(|()| {
            tenant_id(&r.tenant_id).and_then(|tid| {
                tokio::task::block_in_place(|| home.registry.release_hold(&tid, &r.hold_id)).map_err(tenancy_status)
            })
        });
        Ok(Response::new(
            self.record_hold(&home, source, Operation::ReleaseHold, &r.tenant_id, &r.reason, result).await?,
        ))
    }

    async fn list_holds(&self, req: Request<pb::ListHoldsRequest>) -> Result<Response<pb::ListHoldsResponse>, Status> {
        self.operator(&req)?;
        let tid = tenant_id(&req.get_ref().tenant_id)?;
        let t = self.home(tid.as_str()).registry.get(&tid).map_err(tenancy_status)?;
        Ok(Response::new(pb::ListHoldsResponse { holds: t.holds.iter().map(hold_out).collect() }))
    }

    async fn get_retention_status(
        &self,
        req: Request<pb::GetRetentionStatusRequest>,
    ) -> Result<Response<pb::RetentionStatus>, Status> {
        self.operator(&req)?;
        let tid = tenant_id(&req.get_ref().tenant_id)?;
        let home = self.home(tid.as_str());
        home.registry.get(&tid).map_err(tenancy_status)?;
        let s = home.purger.status(&tid).map_err(retention_error)?;
        Ok(Response::new(pb::RetentionStatus {
            tenant_id: tid.as_str().to_owned(),
            last_run_at: (s.last_run_at != 0)
                .then(|| crate::vault::Timestamp::from_micros(s.last_run_at))
                .flatten()
                .map(timestamp_out),
            purged_total: s.purged_total,
            closed_total: s.closed_total,
            last_purged: s.last_purged,
            last_closed: s.last_closed,
            backlog: s.backlog,
            held: s.held,
        }))
    }

    async fn run_retention(
        &self,
        req: Request<pb::RunRetentionRequest>,
    ) -> Result<Response<pb::RunRetentionResponse>, Status> {
        let source = self.operator(&req)?;
        let home = self.named(&req.get_ref().region)?;
        let result = home.purger.run().await.map_err(retention_error).map(|r| pb::RunRetentionResponse {
            purged: r.purged,
            closed: r.closed,
            held: r.held,
        });
        Ok(Response::new(self.record(&home, source, Operation::RunRetention, "", "", result).await?))
    }

    async fn backup(&self, req: Request<pb::BackupRequest>) -> Result<Response<pb::BackupResponse>, Status> {
        let source = self.operator(&req)?;
        let pb::BackupRequest { out_dir, region } = req.into_inner();
        let home = self.named(&region)?;
        let result = if out_dir.is_empty() || !std::path::Path::new(&out_dir).is_absolute() {
            Err(Status::invalid_argument("out_dir: must be an absolute path on the server's machine"))
        } else {
            let (vault, audit, out) = (home.vault.clone(), home.audit.clone(), std::path::PathBuf::from(&out_dir));
            tokio::task::spawn_blocking(move || {
                let files = audit.files_with_lengths().map_err(|e| Status::unavailable(e.to_string()))?;
                vault.backup(&out, &files).map_err(to_status)
            })
            .await
            .map_err(|_| Status::internal("worker failed"))
            .and_then(|r| r)
        };
        let m = self.record(&home, source, Operation::Backup, "", "", result).await?;
        Ok(Response::new(pb::BackupResponse {
            out_dir,
            records: m.records,
            ledger_counter: m.ledger_counter,
            key_epochs: m.key_epochs,
        }))
    }
}
