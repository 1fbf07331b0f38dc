//! Answers to idempotent batch requests (ShredSubjects), kept a day: a client that lost
//! an answer asks again with the same request id and gets the same answer, without a
//! second erasure. The answers hold blind ids and receipts only, never a raw subject id.

use sha2::{Digest, Sha256};

use super::layout;
use super::{TenantId, Vault, VaultError};
use crate::store::Batch;

/// How long an answer is kept for a retry.
pub const KEEP_MICROS: i64 = 24 * 3600 * 1_000_000;

fn slot(tenant: &TenantId, request_id: &str) -> Vec<u8> {
    layout::request(tenant.as_str(), &Sha256::digest(request_id.as_bytes()).into())
}

impl Vault {
    /// The answer kept for `request_id`, if it is younger than a day.
    pub fn recall_request(&self, tenant: &TenantId, request_id: &str) -> Result<Option<Vec<u8>>, VaultError> {
        let Some(v) = self.store.get(&slot(tenant, request_id))? else { return Ok(None) };
        let (at, answer) = v.split_at_checked(8).ok_or(VaultError::Corrupt("request answer"))?;
        let at = i64::from_be_bytes(at.try_into().map_err(|_| VaultError::Corrupt("request answer"))?);
        Ok((self.clock.now().micros() - at < KEEP_MICROS).then(|| answer.to_vec()))
    }

    /// Keeps `answer` for `request_id`, durably (the erasures it reports are already).
    pub async fn keep_request(&self, tenant: &TenantId, request_id: &str, answer: &[u8]) -> Result<(), VaultError> {
        let mut v = self.clock.now().micros().to_be_bytes().to_vec();
        v.extend_from_slice(answer);
        let mut b = Batch::default();
        b.put(slot(tenant, request_id), v);
        self.apply(b)?;
        self.durable(self.commit.ticket()).await
    }

    /// Drops answers older than a day, up to `limit`; returns how many went.
    pub fn prune_requests(&self, limit: usize) -> Result<u64, VaultError> {
        let now = self.clock.now().micros();
        let mut b = Batch::default();
        let mut after: Option<Vec<u8>> = None;
        let mut n = 0;
        loop {
            let page = self.store.scan(&layout::requests_prefix(), after.as_deref(), 512)?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            for (k, v) in &page {
                let at = v.get(..8).and_then(|b| b.try_into().ok()).map(i64::from_be_bytes).unwrap_or(i64::MIN);
                if now - at >= KEEP_MICROS {
                    b.delete(k.clone());
                    n += 1;
                }
            }
            if n as usize >= limit {
                break;
            }
        }
        if !b.is_empty() {
            self.apply(b)?;
        }
        Ok(n)
    }
}
