//! The gate: an approval request for one privileged action, and the single-use token its
//! approval mints.
//!
//! ```text
//! pending ──approve──► approved ──action consumes the token──► consumed ──action fails──► invalidated
//!    │                    │  └──────────── action refused/failed before use ──────────────► invalidated
//!    ├──deny──► denied    └──token TTL passes──► expired
//!    └──request TTL passes──► expired
//! ```
//!
//! A gate is bound to exactly one [`Binding`]: agent, action, subject (the snapshot hash, run or
//! version the action is about) and target (the domain it changes). A token is only good for
//! that binding, once, before it expires.

use std::collections::BTreeSet;

/// The actions a policy can put behind a gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum GatedAction {
    /// A run started with target `production`.
    ProductionDeploy,
    /// A run started with target `preview` (not gated by default).
    PreviewDeploy,
    /// A ready preview run becomes a production version.
    Promote,
    /// The production route goes back to an older version.
    Rollback,
    /// A build is given access to secret env values.
    SecretEnv,
}

impl GatedAction {
    pub const ALL: [GatedAction; 5] = [
        GatedAction::ProductionDeploy,
        GatedAction::PreviewDeploy,
        GatedAction::Promote,
        GatedAction::Rollback,
        GatedAction::SecretEnv,
    ];

    /// The name used in the API, the database, the audit log and the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            GatedAction::ProductionDeploy => "production_deploy",
            GatedAction::PreviewDeploy => "preview_deploy",
            GatedAction::Promote => "promote",
            GatedAction::Rollback => "rollback",
            GatedAction::SecretEnv => "secret_env",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == s)
    }

    /// The warning shown to whoever decides the gate.
    pub fn warning(self) -> &'static str {
        match self {
            GatedAction::ProductionDeploy => {
                "High-risk operation: this deploy builds new code and switches production traffic for the target domain to it."
            }
            GatedAction::PreviewDeploy => "This deploy builds and starts new code at a preview URL.",
            GatedAction::Promote => {
                "High-risk operation: this promotes a preview run to production; production traffic for the target domain switches to it."
            }
            GatedAction::Rollback => {
                "High-risk operation: this switches production traffic for the target domain back to an older version."
            }
            GatedAction::SecretEnv => {
                "High-risk operation: this gives the build access to secret environment values."
            }
        }
    }
}

/// Which actions need a gate. Configuration; the default gates production deploy, promote,
/// rollback and secret env access, and not preview deploys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustPolicy {
    pub gated: BTreeSet<GatedAction>,
    /// How long an approval's token stays usable, in milliseconds (default 5 minutes).
    pub token_ttl_ms: i64,
    /// How long a request may stay pending before it expires, in milliseconds (default 1 hour).
    pub request_ttl_ms: i64,
}

impl Default for TrustPolicy {
    fn default() -> Self {
        Self {
            gated: [
                GatedAction::ProductionDeploy,
                GatedAction::Promote,
                GatedAction::Rollback,
                GatedAction::SecretEnv,
            ]
            .into_iter()
            .collect(),
            token_ttl_ms: 5 * 60 * 1000,
            request_ttl_ms: 60 * 60 * 1000,
        }
    }
}

impl TrustPolicy {
    pub fn requires_gate(&self, action: GatedAction) -> bool {
        self.gated.contains(&action)
    }

    /// Parses a list of action names (configuration).
    ///
    /// # Errors
    /// The first name that is not an action, with the valid names.
    pub fn parse_actions<'a>(
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<BTreeSet<GatedAction>, String> {
        names
            .into_iter()
            .map(str::trim)
            .filter(|n| !n.is_empty() && *n != "none")
            .map(|n| {
                GatedAction::parse(n).ok_or_else(|| {
                    let valid: Vec<&str> = GatedAction::ALL.iter().map(|a| a.as_str()).collect();
                    format!(
                        "unknown gated action {n:?}; valid: {}, or none",
                        valid.join(", ")
                    )
                })
            })
            .collect()
    }
}

/// Where a gate is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GateState {
    Pending,
    Approved,
    Denied,
    Expired,
    Consumed,
    Invalidated,
}

impl GateState {
    pub fn as_str(self) -> &'static str {
        match self {
            GateState::Pending => "pending",
            GateState::Approved => "approved",
            GateState::Denied => "denied",
            GateState::Expired => "expired",
            GateState::Consumed => "consumed",
            GateState::Invalidated => "invalidated",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            GateState::Pending,
            GateState::Approved,
            GateState::Denied,
            GateState::Expired,
            GateState::Consumed,
            GateState::Invalidated,
        ]
        .into_iter()
        .find(|g| g.as_str() == s)
    }

    /// No decision or use can change it any more.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            GateState::Denied | GateState::Expired | GateState::Consumed | GateState::Invalidated
        )
    }
}

impl std::fmt::Display for GateState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a gate and its token are good for: this agent, this action, this subject, this target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub agent_id: String,
    pub action: GatedAction,
    /// What the action is about: `snapshot:<contentHash>`, `source:<sourceDir>`, `run:<runId>`,
    /// `version:<n>`.
    pub subject: String,
    /// The domain the action changes.
    pub target: String,
}

/// A stored gate. Only the token's hash is kept, and only once the requester has read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateRecord {
    pub id: String,
    pub binding: Binding,
    /// The framework detected for the agent's app (as far as the server can tell).
    pub framework: Option<String>,
    /// The build command that will run (install and build, as in the spec).
    pub build_command: Option<String>,
    pub warning: String,
    /// Token id and kind (`operator` or `agent`) of the requester.
    pub requested_by: String,
    pub requested_by_kind: String,
    pub requested_at: i64,
    /// As stored; see [`GateRecord::effective_state`] for what it is now.
    pub state: GateState,
    /// Token id of the operator who approved or denied.
    pub decided_by: Option<String>,
    pub decided_at: Option<i64>,
    /// Why it was denied or invalidated.
    pub reason: Option<String>,
    /// Pending: when the request lapses. Approved: when the token expires.
    pub expires_at: i64,
    pub token_hash: Option<String>,
    pub token_issued_at: Option<i64>,
    pub consumed_at: Option<i64>,
    /// What the action made of it (a run id, for a deploy).
    pub used_for: Option<String>,
}

impl GateRecord {
    /// The state at `now`: a pending or approved gate whose time has passed is expired even
    /// before anyone writes that down.
    pub fn effective_state(&self, now: i64) -> GateState {
        match self.state {
            GateState::Pending | GateState::Approved if now >= self.expires_at => {
                GateState::Expired
            }
            s => s,
        }
    }

    /// Whether a presented token (already matched to this gate by its hash) may perform the
    /// action described by `wanted` at `now`. Consuming it is a separate, atomic step.
    ///
    /// # Errors
    /// The first reason it may not, in the order: used, expired, not approved, mismatch.
    pub fn check_use(&self, wanted: &Binding, now: i64) -> Result<(), UseError> {
        match self.effective_state(now) {
            GateState::Approved => {}
            GateState::Consumed | GateState::Invalidated => {
                return Err(UseError::Used { state: self.state })
            }
            GateState::Expired => return Err(UseError::Expired),
            other => return Err(UseError::NotApproved { state: other }),
        }
        let b = &self.binding;
        let field = if b.agent_id != wanted.agent_id {
            Some("agent")
        } else if b.action != wanted.action {
            Some("action")
        } else if b.subject != wanted.subject {
            Some("subject")
        } else if b.target != wanted.target {
            Some("target")
        } else {
            None
        };
        match field {
            Some(field) => Err(UseError::Mismatch {
                field,
                granted: self.describe_field(field),
                wanted: describe(wanted, field),
            }),
            None => Ok(()),
        }
    }

    fn describe_field(&self, field: &str) -> String {
        describe(&self.binding, field)
    }
}

fn describe(b: &Binding, field: &str) -> String {
    match field {
        "agent" => b.agent_id.clone(),
        "action" => b.action.as_str().to_string(),
        "subject" => b.subject.clone(),
        _ => b.target.clone(),
    }
}

/// Why a presented token may not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UseError {
    #[error("the gate token is not a valid token for any gate")]
    Invalid,
    #[error("the gate token has expired; request a new approval")]
    Expired,
    #[error("the gate token was already used ({state}); a new approval is needed")]
    Used { state: GateState },
    #[error("the gate is {state}, not approved")]
    NotApproved { state: GateState },
    #[error("the gate token was granted for {field} {granted:?}, not {wanted:?}")]
    Mismatch {
        field: &'static str,
        granted: String,
        wanted: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(state: GateState) -> GateRecord {
        GateRecord {
            id: "gte-x".into(),
            binding: Binding {
                agent_id: "agt-a".into(),
                action: GatedAction::ProductionDeploy,
                subject: "snapshot:aa".into(),
                target: "app.localhost".into(),
            },
            framework: None,
            build_command: None,
            warning: String::new(),
            requested_by: "tok-a".into(),
            requested_by_kind: "agent".into(),
            requested_at: 0,
            state,
            decided_by: None,
            decided_at: None,
            reason: None,
            expires_at: 100,
            token_hash: None,
            token_issued_at: None,
            consumed_at: None,
            used_for: None,
        }
    }

    #[test]
    fn binding_is_checked_field_by_field() {
        let g = gate(GateState::Approved);
        let ok = g.binding.clone();
        assert_eq!(g.check_use(&ok, 50), Ok(()));
        assert_eq!(g.check_use(&ok, 100), Err(UseError::Expired));
        for (field, change) in [
            (
                "agent",
                Box::new(|b: &mut Binding| b.agent_id = "agt-b".into())
                    as Box<dyn Fn(&mut Binding)>,
            ),
            (
                "action",
                Box::new(|b: &mut Binding| b.action = GatedAction::Promote),
            ),
            (
                "subject",
                Box::new(|b: &mut Binding| b.subject = "snapshot:bb".into()),
            ),
            (
                "target",
                Box::new(|b: &mut Binding| b.target = "evil.localhost".into()),
            ),
        ] {
            let mut w = ok.clone();
            change(&mut w);
            assert!(
                matches!(g.check_use(&w, 50), Err(UseError::Mismatch { field: f, .. }) if f == field)
            );
        }
        assert!(matches!(
            gate(GateState::Consumed).check_use(&ok, 50),
            Err(UseError::Used { .. })
        ));
        assert!(matches!(
            gate(GateState::Pending).check_use(&ok, 50),
            Err(UseError::NotApproved { .. })
        ));
        assert_eq!(
            gate(GateState::Pending).effective_state(100),
            GateState::Expired
        );
        assert_eq!(
            gate(GateState::Denied).effective_state(100),
            GateState::Denied
        );
    }

    #[test]
    fn default_policy_gates_production_and_not_preview() {
        let p = TrustPolicy::default();
        assert!(p.requires_gate(GatedAction::ProductionDeploy));
        assert!(p.requires_gate(GatedAction::Rollback));
        assert!(!p.requires_gate(GatedAction::PreviewDeploy));
        assert_eq!(p.token_ttl_ms, 300_000);
        assert!(TrustPolicy::parse_actions(["promote", "nope"]).is_err());
        assert!(TrustPolicy::parse_actions(["none"]).unwrap().is_empty());
    }
}
