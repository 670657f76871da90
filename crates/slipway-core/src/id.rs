//! Identifiers.
//!
//! Every id is `<prefix>-<16 lowercase base32 chars>` (80 random bits). Ids are DNS-label safe on
//! purpose: a run id is the first label of its preview host name
//! (`<run-id>.preview.<base-domain>`), so no underscores and no upper case.

/// The kinds of object that have an id, each with its own prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdKind {
    Agent,
    Token,
    Spec,
    Snapshot,
    Run,
    Sandbox,
    Deployment,
    Release,
    Gate,
}

const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// Number of random characters after the prefix.
pub const ID_RANDOM_LEN: usize = 16;

impl IdKind {
    pub fn prefix(self) -> &'static str {
        match self {
            IdKind::Agent => "agt",
            IdKind::Token => "tok",
            IdKind::Spec => "spc",
            IdKind::Snapshot => "snp",
            IdKind::Run => "run",
            IdKind::Sandbox => "sbx",
            IdKind::Deployment => "dep",
            IdKind::Release => "rel",
            IdKind::Gate => "gte",
        }
    }

    /// Builds an id from 10 random bytes (the caller owns the randomness; core does no I/O).
    pub fn make(self, random: [u8; 10]) -> String {
        let mut out = String::with_capacity(4 + ID_RANDOM_LEN);
        out.push_str(self.prefix());
        out.push('-');
        // 80 bits → 16 base32 characters, 5 bits at a time.
        let mut acc: u128 = 0;
        for b in random {
            acc = (acc << 8) | u128::from(b);
        }
        for i in (0..ID_RANDOM_LEN).rev() {
            let idx = ((acc >> (i * 5)) & 0x1f) as usize;
            out.push(ALPHABET[idx] as char);
        }
        out
    }

    /// True when `s` is a well-formed id of this kind. Used to answer 404 early for ids that
    /// cannot exist, and to keep arbitrary strings out of paths and host names.
    pub fn is_valid(self, s: &str) -> bool {
        let Some(rest) = s
            .strip_prefix(self.prefix())
            .and_then(|r| r.strip_prefix('-'))
        else {
            return false;
        };
        rest.len() == ID_RANDOM_LEN && rest.bytes().all(|b| ALPHABET.contains(&b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_ids_are_valid_and_dns_safe() {
        let id = IdKind::Run.make([0xff; 10]);
        assert_eq!(id, "run-7777777777777777");
        assert!(IdKind::Run.is_valid(&id));
        let id = IdKind::Agent.make([0; 10]);
        assert_eq!(id, "agt-aaaaaaaaaaaaaaaa");
        assert!(IdKind::Agent.is_valid(&id));
        let id = IdKind::Sandbox.make([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        assert!(IdKind::Sandbox.is_valid(&id));
        assert!(id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
    }

    #[test]
    fn rejects_malformed_ids() {
        assert!(!IdKind::Run.is_valid("agt-aaaaaaaaaaaaaaaa"));
        assert!(!IdKind::Run.is_valid("run-aaaa"));
        assert!(!IdKind::Run.is_valid("run-AAAAAAAAAAAAAAAA"));
        assert!(!IdKind::Run.is_valid("run-aaaaaaaaaaaaaaa1"));
        assert!(!IdKind::Run.is_valid("run-../../etc/passw"));
        assert!(!IdKind::Run.is_valid(""));
    }
}
