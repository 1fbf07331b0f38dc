//! IPv4 and IPv6 networks in CIDR notation: tenant allowlists and trusted proxies.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// A network such as `10.0.0.0/8` or `2001:db8::/32`; a bare address is a /32 or /128.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CidrError {
    #[error("{0:?} is not an IP address or network (expected e.g. 10.0.0.0/8 or 2001:db8::/32)")]
    Syntax(String),
    #[error("{0:?}: prefix length must be at most {1}")]
    Prefix(String, u8),
    #[error("{given:?} has host bits set; the network is {network}")]
    HostBits { given: String, network: String },
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, canonical(ip)) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                masked(u128::from(u32::from(a)), 32, self.prefix) == u128::from(u32::from(n))
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => masked(u128::from(a), 128, self.prefix) == u128::from(n),
            _ => false,
        }
    }
}

/// An IPv4 client seen through a dual-stack socket arrives as `::ffff:a.b.c.d`; it is
/// the IPv4 address that allowlists name.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

fn masked(bits: u128, width: u8, prefix: u8) -> u128 {
    if prefix == 0 {
        return 0;
    }
    let keep = u32::from(width - prefix);
    let mask = if width == 128 { u128::MAX << keep } else { (u128::from(u32::MAX) << keep) & u128::from(u32::MAX) };
    bits & mask
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(text: &str) -> Result<Self, CidrError> {
        let s = text.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let ip: IpAddr = addr.parse().map_err(|_| CidrError::Syntax(text.to_owned()))?;
        let ip = canonical(ip);
        let width = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => width,
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && p.len() <= 3 => {
                p.parse::<u8>().map_err(|_| CidrError::Prefix(text.to_owned(), width))?
            }
            Some(_) => return Err(CidrError::Syntax(text.to_owned())),
        };
        if prefix > width {
            return Err(CidrError::Prefix(text.to_owned(), width));
        }
        let network = match ip {
            IpAddr::V4(v4) => IpAddr::V4((masked(u128::from(u32::from(v4)), 32, prefix) as u32).into()),
            IpAddr::V6(v6) => IpAddr::V6(masked(u128::from(v6), 128, prefix).into()),
        };
        if network != ip {
            return Err(CidrError::HostBits { given: text.to_owned(), network: format!("{network}/{prefix}") });
        }
        Ok(Cidr { network, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// Parses a list, naming the first entry that is wrong.
pub fn parse_list<S: AsRef<str>>(items: &[S]) -> Result<Vec<Cidr>, CidrError> {
    items.iter().map(|s| s.as_ref().parse()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks_contain_their_addresses_and_nothing_else() {
        let n: Cidr = "127.0.0.0/30".parse().unwrap();
        assert!(n.contains(ip("127.0.0.3")));
        assert!(!n.contains(ip("127.0.0.4")));
        let one: Cidr = "127.0.0.2".parse().unwrap();
        assert_eq!(one.to_string(), "127.0.0.2/32");
        assert!(one.contains(ip("127.0.0.2")) && !one.contains(ip("127.0.0.3")));
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains(ip("2001:db8:ffff::1")));
        assert!(!v6.contains(ip("2001:db9::1")));
        assert!(!v6.contains(ip("10.0.0.1")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("203.0.113.9")));
        assert!(!all.contains(ip("::2")));
    }

    #[test]
    fn ipv4_mapped_ipv6_peers_match_ipv4_networks() {
        let n: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(n.contains(ip("::ffff:10.1.2.3")));
    }

    #[test]
    fn malformed_networks_are_refused_with_the_entry_named() {
        assert!(
            matches!("10.0.0.1/8".parse::<Cidr>(), Err(CidrError::HostBits { network, .. }) if network == "10.0.0.0/8")
        );
        assert!(matches!("10.0.0.0/33".parse::<Cidr>(), Err(CidrError::Prefix(_, 32))));
        assert!(matches!("::/129".parse::<Cidr>(), Err(CidrError::Prefix(_, 128))));
        for bad in ["", "10.0.0", "10.0.0.0/", "10.0.0.0/-1", "10.0.0.0/8/8", "example.com", "10.0.0.0/+8"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?} accepted");
        }
        let err = parse_list(&["10.0.0.0/8", "nope"]).unwrap_err();
        assert!(err.to_string().contains("\"nope\""), "{err}");
    }
}
