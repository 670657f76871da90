//! Trust: the pieces of the deploy permission gate, the tamper-evident audit log and artifact
//! signing that need no database, no HTTP and no engine.
//!
//! - [`token`]: gate tokens — random, shown once, stored only as sha256, compared in constant
//!   time;
//! - [`gate`]: the gate record, its lifecycle (`pending → approved → consumed`, …), which actions
//!   the policy gates, and the binding check of a presented token;
//! - [`audit`]: the canonical encoding of an audit entry and its hash chain;
//! - [`signing`]: the server's ed25519 key (created once, 0600) and signatures over an
//!   artifact's sha256, kept beside the artifact as `<artifact>.sig`.
//!
//! Invariants, as absences: no SQL, no HTTP, no clock (callers pass `now`); no token secret is
//! ever kept, only its hash; the signing key never leaves [`signing::Signer`].

pub mod audit;
pub mod gate;
pub mod signing;
pub mod token;

pub use audit::{verify_chain, AuditEntry, ChainError, NewAuditEntry, GENESIS_HASH};
pub use gate::{Binding, GateRecord, GateState, GatedAction, TrustPolicy, UseError};
pub use signing::{ArtifactSignature, Expected, PublicKeyInfo, Signer, VerifyError};
