//! Gate tokens: `slw_gate_` followed by 64 lower-case hex characters (32 random bytes).
//!
//! The secret is shown once, to the requester of the gate; the store keeps only its sha256.
//! A presented token is checked for shape before anything is looked up, and the stored hash is
//! compared in constant time.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub const GATE_TOKEN_PREFIX: &str = "slw_gate_";
const SECRET_HEX_LEN: usize = 64;

/// A freshly minted gate token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MintedToken {
    /// The secret, to be shown exactly once.
    pub secret: String,
    /// Lower-case hex sha256 of the secret, the only thing stored.
    pub hash: String,
}

/// Mints a token from 32 random bytes (the caller owns the randomness).
pub fn mint(random: [u8; 32]) -> MintedToken {
    let secret = format!("{GATE_TOKEN_PREFIX}{}", hex::encode(random));
    let hash = hash(&secret);
    MintedToken { secret, hash }
}

/// Lower-case hex sha256 of a token secret.
pub fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Whether `secret` has the shape of a gate token; a truncated, padded or re-cased token does not.
pub fn is_well_formed(secret: &str) -> bool {
    secret.strip_prefix(GATE_TOKEN_PREFIX).is_some_and(|rest| {
        rest.len() == SECRET_HEX_LEN
            && rest
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Whether `secret` hashes to `stored_hash`, compared in constant time.
pub fn matches(secret: &str, stored_hash: &str) -> bool {
    let h = hash(secret);
    h.len() == stored_hash.len() && bool::from(h.as_bytes().ct_eq(stored_hash.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_are_well_formed_and_only_match_themselves() {
        let a = mint([7; 32]);
        let b = mint([8; 32]);
        assert!(is_well_formed(&a.secret));
        assert!(matches(&a.secret, &a.hash));
        assert!(!matches(&b.secret, &a.hash));
        assert_ne!(a.hash, a.secret);
        assert!(!is_well_formed(&a.secret[..a.secret.len() - 1]));
        assert!(!is_well_formed(&format!("{}0", a.secret)));
        assert!(!is_well_formed(&a.secret.to_uppercase()));
        assert!(!is_well_formed(&a.secret.replace("slw_gate_", "slw_ag_")));
        assert!(!is_well_formed(""));
    }
}
