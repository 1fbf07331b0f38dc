//! The operator token that guards the admin API. Only its SHA-256 is kept in memory;
//! presented tokens are compared in constant time.

use std::fmt;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Shortest token accepted: 128 bits as hex.
pub const MIN_TOKEN_LEN: usize = 32;

pub struct OperatorToken {
    digest: [u8; 32],
}

impl OperatorToken {
    pub fn new(token: &str) -> Result<Self, String> {
        let token = token.trim();
        if token.len() < MIN_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!("operator token must be at least {MIN_TOKEN_LEN} printable characters without spaces"));
        }
        Ok(OperatorToken { digest: Sha256::digest(token.as_bytes()).into() })
    }

    pub fn matches(&self, presented: &str) -> bool {
        let d: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        d.ct_eq(&self.digest).into()
    }
}

impl fmt::Debug for OperatorToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OperatorToken(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_same_token_matches_and_short_ones_are_refused() {
        let t = OperatorToken::new("0123456789abcdef0123456789abcdef").unwrap();
        assert!(t.matches("0123456789abcdef0123456789abcdef"));
        assert!(!t.matches("0123456789abcdef0123456789abcdeF"));
        assert!(!t.matches(""));
        assert!(OperatorToken::new("short").is_err());
        assert_eq!(format!("{t:?}"), "OperatorToken(<redacted>)");
    }
}
