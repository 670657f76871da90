//! slipway's domain core: the vocabulary of `DESIGN.md` as plain types, the run state machine,
//! and the validation rules of seed 004.
//!
//! This crate does no I/O: no files, no clock, no randomness, no HTTP, no serialization. Callers
//! pass in the current time and fresh random bytes; everything here can be tested in
//! microseconds.

pub mod detect;
pub mod id;
pub mod path;
pub mod run;
pub mod spec;

pub use id::IdKind;
pub use path::{AgentRootTemplate, PathError, TemplateError};
pub use run::{DeploymentStatus, DeploymentTarget, TransitionError};
pub use spec::{
    AgentName, DeploymentKind, DeploymentSpec, SpecDraft, SpecError, SpecPolicy, ValidSpec,
    DEFAULT_ALLOWED_ROOTS, DEFAULT_RUNTIME_PORT,
};

/// Milliseconds since the Unix epoch, the timestamp unit of seed 004.
pub type Millis = i64;
