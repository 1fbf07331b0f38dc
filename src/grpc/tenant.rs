//! Which tenant a request acts for. Until authenticated tenancy lands this is the
//! `x-tenant-id` header; the tenancy issue replaces this one function.

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
