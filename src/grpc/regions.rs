//! Which region's gate a data call passes. The API key names its region
//! (`cvk_<region>_...`), so the call goes to that region's shard, or is told where that
//! region is served; it never falls back to another region.

use std::collections::BTreeMap;
use std::sync::Arc;

use tonic::{Code, Request, Status};
use tonic_types::{ErrorDetails, StatusExt};

use super::credentials::bearer;
use super::gate::Gate;
use crate::tenancy::{Principal, region_of_key};

/// The gates of the regions this node hosts.
pub struct Regions {
    gates: BTreeMap<String, Arc<Gate>>,
    /// Where keys that name no region (issued before regions) are checked: the region
    /// whose key directory was migrated from a single-region release, else the first.
    unnamed: String,
    /// Where the regions this node does not host are served.
    endpoints: BTreeMap<String, String>,
    /// The bounded pools every region's calls draw on.
    pub work: Arc<super::limits::Work>,
}

impl Regions {
    /// `gates` must not be empty.
    pub fn new(
        gates: BTreeMap<String, Arc<Gate>>,
        endpoints: BTreeMap<String, String>,
        work: Arc<super::limits::Work>,
    ) -> Self {
        let unnamed = gates
            .iter()
            .find(|(_, g)| g.vault.binding().reads_legacy())
            .or_else(|| gates.iter().next())
            .map(|(name, _)| name.clone())
            .unwrap_or_default();
        Regions { gates, unnamed, endpoints, work }
    }

    /// Authenticates the call in the region its key names; answers FAILED_PRECONDITION
    /// naming the region (and its endpoint) if this node does not host it.
    pub async fn admit<T>(&self, req: &Request<T>) -> Result<(Arc<Gate>, Principal), Status> {
        let token: Option<&str> = bearer(req.metadata()).ok().flatten();
        let gate = match token.and_then(region_of_key) {
            Some(region) => self.gates.get(region).ok_or_else(|| self.elsewhere(region))?,
            // Malformed keys are refused (and recorded) by this gate too.
            None => self.gates.get(&self.unnamed).ok_or_else(|| Status::internal("no region hosted"))?,
        };
        let who = gate.admit(req).await?;
        Ok((gate.clone(), who))
    }

    /// The answer for a tenant of a region served elsewhere.
    pub fn elsewhere(&self, region: &str) -> Status {
        wrong_region(region, self.endpoints.get(region).map(String::as_str), self.gates.keys())
    }

    /// Writes the aggregates of refusals whose window closed (all of them at shutdown).
    pub fn flush_denials(&self, all: bool) {
        for g in self.gates.values() {
            g.flush_denials(all);
        }
    }
}

/// FAILED_PRECONDITION for a region this node does not host, with an `ErrorInfo`
/// (reason `WRONG_REGION`, metadata `region` and, when configured, `endpoint`) that a
/// client or the router can act on without parsing the message.
pub fn wrong_region<'a>(region: &str, endpoint: Option<&str>, hosted: impl Iterator<Item = &'a String>) -> Status {
    let hosted: Vec<&str> = hosted.map(String::as_str).collect();
    let mut message = format!("region {region:?} is not served here (this node serves {})", hosted.join(", "));
    let mut meta = std::collections::HashMap::from([("region".to_string(), region.to_string())]);
    if let Some(url) = endpoint {
        message.push_str(&format!("; region {region} is served at {url}"));
        meta.insert("endpoint".into(), url.into());
    }
    Status::with_error_details(
        Code::FailedPrecondition,
        message,
        ErrorDetails::with_error_info("WRONG_REGION", "chatvault", meta),
    )
}
