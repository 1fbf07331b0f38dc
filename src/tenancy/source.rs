//! Which address a request comes from: the TCP peer, or — only when the peer is a
//! trusted proxy — the address that proxy reports in `x-forwarded-for`.

use std::net::IpAddr;

use super::cidr::{Cidr, canonical};

/// The address the allowlist is checked against, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddress {
    pub ip: IpAddr,
    /// A forwarded-for header was sent by a peer that is not a trusted proxy, and ignored.
    pub forwarded_ignored: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("x-forwarded-for from trusted proxy: {0:?} is not an IP address")]
pub struct BadForwardedFor(pub String);

/// Walks `x-forwarded-for` from the right (the entry the nearest proxy added) past every
/// trusted proxy; the first untrusted address is the client. Entries further left were
/// written by the client itself and prove nothing.
pub fn client_address(
    peer: IpAddr,
    forwarded_for: Option<&str>,
    trusted: &[Cidr],
) -> Result<ClientAddress, BadForwardedFor> {
    let peer = canonical(peer);
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    let Some(header) = forwarded_for.filter(|h| !h.trim().is_empty()) else {
        return Ok(ClientAddress { ip: peer, forwarded_ignored: false });
    };
    if !is_trusted(peer) {
        return Ok(ClientAddress { ip: peer, forwarded_ignored: true });
    }
    let mut client = peer;
    for hop in header.rsplit(',').map(str::trim) {
        let ip: IpAddr = hop.parse().map_err(|_| BadForwardedFor(hop.chars().take(64).collect()))?;
        client = canonical(ip);
        if !is_trusted(client) {
            break;
        }
    }
    Ok(ClientAddress { ip: client, forwarded_ignored: false })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted = vec!["10.0.0.0/8".parse().unwrap()];
        let via_proxy = client_address(ip("10.0.0.5"), Some("198.51.100.7"), &trusted).unwrap();
        assert_eq!(via_proxy, ClientAddress { ip: ip("198.51.100.7"), forwarded_ignored: false });
        let forged = client_address(ip("203.0.113.1"), Some("10.1.1.1"), &trusted).unwrap();
        assert_eq!(forged, ClientAddress { ip: ip("203.0.113.1"), forwarded_ignored: true });
        let plain = client_address(ip("203.0.113.1"), None, &trusted).unwrap();
        assert!(!plain.forwarded_ignored);
    }

    #[test]
    fn client_written_entries_left_of_the_proxies_are_not_believed() {
        let trusted = vec!["10.0.0.0/8".parse().unwrap()];
        // The client claims 192.0.2.1; the outer proxy saw 198.51.100.7; an inner proxy 10.0.0.9.
        let got = client_address(ip("10.0.0.5"), Some("192.0.2.1, 198.51.100.7, 10.0.0.9"), &trusted).unwrap();
        assert_eq!(got.ip, ip("198.51.100.7"));
        assert!(client_address(ip("10.0.0.5"), Some("nonsense"), &trusted).is_err());
    }
}
