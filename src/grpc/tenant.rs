//! Which tenant a request acts for. Until authenticated tenancy lands this is the
//! `x-tenant-id` header; the tenancy issue replaces this one function.

use tonic::metadata::{Ascii, MetadataValue};
use tonic::{Request, Status};

use crate::vault::TenantId;

pub const TENANT_HEADER: &str = "x-tenant-id";

pub fn tenant_of<T>(req: &Request<T>) -> Result<TenantId, Status> {
    let raw = req
        .metadata()
        .get(TENANT_HEADER)
        .ok_or_else(|| Status::unauthenticated(format!("missing {TENANT_HEADER} header")))?;
    let text = raw.to_str().map_err(|_| Status::invalid_argument(format!("{TENANT_HEADER}: not ASCII")))?;
    TenantId::parse(text).map_err(|e| Status::invalid_argument(format!("{TENANT_HEADER}: {e}")))
}

/// Client side: adds the tenant header to every request of a client stub.
#[derive(Clone, Debug)]
pub struct TenantHeader(MetadataValue<Ascii>);

impl TenantHeader {
    pub fn new(tenant: &str) -> Result<Self, Status> {
        let v = tenant
            .parse()
            .map_err(|_| Status::invalid_argument(format!("{TENANT_HEADER}: not a valid header value")))?;
        Ok(TenantHeader(v))
    }
}

impl tonic::service::Interceptor for TenantHeader {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert(TENANT_HEADER, self.0.clone());
        Ok(req)
    }
}
