//! Node tokens: each node's own secret, so that no host can speak for
//! another. bin-manager issues a random token on a node's first registration
//! (`data.nodeToken` in the answer), keeps only its sha256, and checks the
//! `X-Node-Token` header of every later request about that node. How a
//! check's outcome is used (refused always, or only when `requireNodeTokens`
//! is set) is the registry's and the routes' business; this module only
//! makes tokens and compares them.

use crate::error::{Error, Result};
use std::io::Read;

/// The header an agent sends its token in (lowercase, as requests store
/// header names).
pub const HEADER: &str = "x-node-token";

/// Longest token header looked at; anything longer cannot be ours.
const MAX_TOKEN: usize = 256;

/// A new token: 32 bytes from the kernel's random source, as 64 hex digits.
pub fn new_token() -> Result<String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| Error::io("reading random bytes from", "/dev/urandom", e))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// What is stored of a token: its sha256 (hex). A stolen state file holds
/// no usable token.
pub fn token_hash(token: &str) -> String {
    let mut sha = crate::hash::Sha256::new();
    sha.update(token.as_bytes());
    sha.hex()
}

/// How a request's token compares with the node's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenCheck {
    /// The node has no token (registered before tokens, or reset by an
    /// admin): nothing to check; its next registration gets one.
    NoneStored,
    /// The node has one and the request carries none (a seed agent, or a
    /// rebuilt host that lost its state file).
    Missing,
    /// The request carries the node's token.
    Verified,
    /// The request carries a token that is not the node's: always refused.
    Wrong,
}

/// Compares a presented token with the stored hash (in constant time).
pub fn check(stored_hash: &str, presented: Option<&str>) -> TokenCheck {
    if stored_hash.is_empty() {
        return TokenCheck::NoneStored;
    }
    match presented {
        None => TokenCheck::Missing,
        Some(t) if t.len() <= MAX_TOKEN && same(&token_hash(t), stored_hash) => {
            TokenCheck::Verified
        }
        Some(_) => TokenCheck::Wrong,
    }
}

impl TokenCheck {
    /// Whether a write (registration, report, failure) with this outcome is
    /// refused: a wrong token always, a missing one when tokens are required.
    pub fn refuses(self, required: bool) -> bool {
        match self {
            TokenCheck::Wrong => true,
            TokenCheck::Missing => required,
            TokenCheck::NoneStored | TokenCheck::Verified => false,
        }
    }

    /// Why a request was refused, for the answer (names the node).
    pub fn refusal(self, node: &str) -> String {
        match self {
            TokenCheck::Wrong => {
                format!("node \"{node}\": the X-Node-Token sent is not this node's token")
            }
            _ => format!(
                "node \"{node}\" has a node token and this server requires it (X-Node-Token)"
            ),
        }
    }
}

fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_only_their_hash_matches() {
        let (a, b) = (new_token().unwrap(), new_token().unwrap());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        let stored = token_hash(&a);
        assert_ne!(stored, a);
        assert_eq!(check(&stored, Some(&a)), TokenCheck::Verified);
        assert_eq!(check(&stored, Some(&b)), TokenCheck::Wrong);
        assert_eq!(check(&stored, Some(&stored)), TokenCheck::Wrong);
        assert_eq!(check(&stored, Some("")), TokenCheck::Wrong);
        assert_eq!(check(&stored, None), TokenCheck::Missing);
        assert_eq!(check("", Some(&a)), TokenCheck::NoneStored);
        assert!(TokenCheck::Wrong.refuses(false));
        assert!(!TokenCheck::Missing.refuses(false));
        assert!(TokenCheck::Missing.refuses(true));
        assert!(!TokenCheck::NoneStored.refuses(true));
    }
}
