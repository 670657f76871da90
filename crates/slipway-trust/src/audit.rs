//! Audit entries and their hash chain.
//!
//! Each entry's `hash` is sha256 over a canonical encoding of its sequence number, the previous
//! entry's hash and every field. Editing a field, deleting an entry or reordering entries
//! breaks the chain at the first affected entry, which [`verify_chain`] names. The chain does
//! not stop someone who can rewrite every later entry too; the head hash (the last entry's
//! `hash`) is what to copy elsewhere to make that detectable as well.

use sha2::{Digest, Sha256};

/// The `prev_hash` of the first entry.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// An entry to append. Timestamps are milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewAuditEntry {
    pub ts: i64,
    /// `operator`, `agent` or `system`.
    pub actor_kind: String,
    /// The token id of the actor (`None` for the system).
    pub actor_id: Option<String>,
    pub agent_id: Option<String>,
    /// `gate.request`, `gate.approve`, `deploy.start`, `rollout.refused`, … (see docs/trust.md).
    pub action: String,
    /// The domain, run or object acted on.
    pub target: Option<String>,
    /// The snapshot content hash (or commit) involved.
    pub snapshot_hash: Option<String>,
    /// `ok`, `refused`, `failed`, `denied`, …
    pub outcome: String,
    pub reason: Option<String>,
    pub gate_id: Option<String>,
    pub run_id: Option<String>,
}

impl NewAuditEntry {
    /// An entry with the required fields; set the others with struct update syntax.
    pub fn new(
        ts: i64,
        actor_kind: &str,
        actor_id: Option<&str>,
        action: &str,
        outcome: &str,
    ) -> Self {
        Self {
            ts,
            actor_kind: actor_kind.to_string(),
            actor_id: actor_id.map(str::to_string),
            action: action.to_string(),
            outcome: outcome.to_string(),
            ..Default::default()
        }
    }
}

/// A stored entry: its place in the chain and its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    /// 1, 2, 3, … with no gaps.
    pub seq: u64,
    pub entry: NewAuditEntry,
    pub prev_hash: String,
    pub hash: String,
}

impl AuditEntry {
    /// Builds the entry that follows `prev` (`None`: the first entry).
    pub fn chain(prev: Option<(u64, &str)>, entry: NewAuditEntry) -> Self {
        let (seq, prev_hash) = match prev {
            Some((seq, hash)) => (seq + 1, hash.to_string()),
            None => (1, GENESIS_HASH.to_string()),
        };
        let hash = entry_hash(seq, &prev_hash, &entry);
        Self {
            seq,
            entry,
            prev_hash,
            hash,
        }
    }
}

/// The canonical bytes of an entry: a version line, then one `name:len:value` line per field
/// (`name:-` for an absent one), so no two different entries encode the same.
pub fn canonical(seq: u64, prev_hash: &str, e: &NewAuditEntry) -> Vec<u8> {
    let mut out = String::from("slipway-audit-v1\n");
    let mut field = |name: &str, value: Option<&str>| match value {
        Some(v) => out.push_str(&format!("{name}:{}:{v}\n", v.len())),
        None => out.push_str(&format!("{name}:-\n")),
    };
    field("seq", Some(&seq.to_string()));
    field("prev", Some(prev_hash));
    field("ts", Some(&e.ts.to_string()));
    field("actor_kind", Some(&e.actor_kind));
    field("actor_id", e.actor_id.as_deref());
    field("agent_id", e.agent_id.as_deref());
    field("action", Some(&e.action));
    field("target", e.target.as_deref());
    field("snapshot_hash", e.snapshot_hash.as_deref());
    field("outcome", Some(&e.outcome));
    field("reason", e.reason.as_deref());
    field("gate_id", e.gate_id.as_deref());
    field("run_id", e.run_id.as_deref());
    out.into_bytes()
}

/// Lower-case hex sha256 of the canonical encoding.
pub fn entry_hash(seq: u64, prev_hash: &str, e: &NewAuditEntry) -> String {
    hex::encode(Sha256::digest(canonical(seq, prev_hash, e)))
}

/// The first entry at which the chain is broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit entry {seq} is bad: {reason}")]
pub struct ChainError {
    pub seq: u64,
    pub reason: String,
}

/// Walks entries in `seq` order. `head` is the last `(seq, hash)` the store recorded on append,
/// which catches entries deleted from the end. Returns the number of entries checked.
///
/// # Errors
/// The first bad entry: a gap (deleted entry), a `prev_hash` that is not the previous entry's
/// hash, a hash that does not match the fields (edited entry), or a missing tail.
pub fn verify_chain<'a>(
    entries: impl IntoIterator<Item = &'a AuditEntry>,
    head: Option<(u64, &str)>,
) -> Result<u64, ChainError> {
    let mut expected_seq = 1u64;
    let mut prev = GENESIS_HASH.to_string();
    for e in entries {
        if e.seq != expected_seq {
            return Err(ChainError {
                seq: expected_seq,
                reason: if e.seq > expected_seq {
                    format!(
                        "missing (deleted?): entry {} follows entry {}",
                        e.seq,
                        expected_seq - 1
                    )
                } else {
                    format!(
                        "out of order: found entry {} where {} was expected",
                        e.seq, expected_seq
                    )
                },
            });
        }
        if e.prev_hash != prev {
            return Err(ChainError {
                seq: e.seq,
                reason: "its prev_hash is not the hash of the entry before it".into(),
            });
        }
        let actual = entry_hash(e.seq, &e.prev_hash, &e.entry);
        if actual != e.hash {
            return Err(ChainError {
                seq: e.seq,
                reason: "its contents do not match its hash (edited?)".into(),
            });
        }
        prev = e.hash.clone();
        expected_seq += 1;
    }
    let last = expected_seq - 1;
    if let Some((head_seq, head_hash)) = head {
        if head_seq > last {
            return Err(ChainError {
                seq: last + 1,
                reason: format!("missing (deleted?): the log ends at entry {last} but entry {head_seq} was written"),
            });
        }
        if head_seq == last && last > 0 && head_hash != prev {
            return Err(ChainError {
                seq: last,
                reason: "it is not the entry that was last written (replaced?)".into(),
            });
        }
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(n: u64) -> Vec<AuditEntry> {
        let mut out: Vec<AuditEntry> = Vec::new();
        for i in 0..n {
            let prev = out.last().map(|e| (e.seq, e.hash.as_str()));
            let e = NewAuditEntry {
                reason: Some(format!("r{i}")),
                ..NewAuditEntry::new(i as i64, "system", None, "x", "ok")
            };
            let next = AuditEntry::chain(prev, e);
            out.push(next);
        }
        out
    }

    #[test]
    fn edits_deletions_and_truncations_name_the_first_bad_entry() {
        let entries = log(5);
        let head = Some((5, entries[4].hash.as_str()));
        assert_eq!(verify_chain(&entries, head), Ok(5));

        let mut edited = entries.clone();
        edited[2].entry.outcome = "refused".into();
        assert_eq!(verify_chain(&edited, head).unwrap_err().seq, 3);

        let mut deleted = entries.clone();
        deleted.remove(1);
        assert_eq!(verify_chain(&deleted, head).unwrap_err().seq, 2);

        let truncated = &entries[..4];
        assert_eq!(verify_chain(truncated, head).unwrap_err().seq, 5);

        // Same length, same fields: the encoding keeps field boundaries.
        let a = NewAuditEntry {
            target: Some("a:1".into()),
            ..Default::default()
        };
        let b = NewAuditEntry {
            target: Some("a".into()),
            reason: Some("1".into()),
            ..Default::default()
        };
        assert_ne!(
            entry_hash(1, GENESIS_HASH, &a),
            entry_hash(1, GENESIS_HASH, &b)
        );
    }
}
