//! Bearer credentials on the wire: read on the server, added by client stubs.

use tonic::metadata::{Ascii, MetadataMap, MetadataValue};
use tonic::{Request, Status};

pub const AUTHORIZATION: &str = "authorization";
pub const FORWARDED_FOR: &str = "x-forwarded-for";

/// The token of `authorization: Bearer <token>`; `Err(())` when the header is there
/// but not a bearer token.
pub fn bearer(md: &MetadataMap) -> Result<Option<&str>, ()> {
    let Some(v) = md.get(AUTHORIZATION) else { return Ok(None) };
    bearer_token(v.to_str().map_err(|_| ())?).map(Some).ok_or(())
}

/// The token of an `authorization` header's text, the scheme in any case: one reading,
/// for the node and the router alike.
pub fn bearer_token(text: &str) -> Option<&str> {
    let (scheme, token) = text.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Every `x-forwarded-for` header, joined as one list (proxies may send several).
pub fn forwarded_for(md: &MetadataMap) -> Option<String> {
    let parts: Vec<&str> = md.get_all(FORWARDED_FOR).iter().filter_map(|v| v.to_str().ok()).collect();
    (!parts.is_empty()).then(|| parts.join(","))
}

/// Client side: sends a bearer token (an API key or the operator token) on every call.
/// `Debug` does not show it.
#[derive(Clone)]
pub struct Bearer(MetadataValue<Ascii>);

impl Bearer {
    pub fn new(token: &str) -> Result<Self, Status> {
        // The header value itself cannot be zeroized (tonic owns it); the copy made here is.
        let mut v: MetadataValue<Ascii> = zeroize::Zeroizing::new(format!("Bearer {token}"))
            .parse()
            .map_err(|_| Status::invalid_argument("credential: not a valid header value"))?;
        v.set_sensitive(true);
        Ok(Bearer(v))
    }
}

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Bearer(<redacted>)")
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert(AUTHORIZATION, self.0.clone());
        Ok(req)
    }
}
