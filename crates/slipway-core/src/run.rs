//! Deployment runs: targets, statuses and the state machine of seed 004.
//!
//! ```text
//! queued ─► capturing ─► provisioning ─► building ─► starting ─► ready ─► stopping ─► stopped
//!               │              │             │            │                 ▲
//!               └──────────────┴─────────────┴────────────┴──► failed ──────┘
//! ```

use std::fmt;

/// Where a run is headed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DeploymentTarget {
    #[default]
    Preview,
    Production,
}

impl DeploymentTarget {
    pub const ALL: [DeploymentTarget; 2] =
        [DeploymentTarget::Preview, DeploymentTarget::Production];

    pub fn as_str(self) -> &'static str {
        match self {
            DeploymentTarget::Preview => "preview",
            DeploymentTarget::Production => "production",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

impl fmt::Display for DeploymentTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The status of one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeploymentStatus {
    Queued,
    Capturing,
    Provisioning,
    Building,
    Starting,
    Ready,
    Failed,
    Stopping,
    Stopped,
}

/// An attempt to move a run along an edge the state machine does not have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("illegal run transition from {from} to {to}")]
pub struct TransitionError {
    pub from: DeploymentStatus,
    pub to: DeploymentStatus,
}

impl DeploymentStatus {
    pub const ALL: [DeploymentStatus; 9] = [
        DeploymentStatus::Queued,
        DeploymentStatus::Capturing,
        DeploymentStatus::Provisioning,
        DeploymentStatus::Building,
        DeploymentStatus::Starting,
        DeploymentStatus::Ready,
        DeploymentStatus::Failed,
        DeploymentStatus::Stopping,
        DeploymentStatus::Stopped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeploymentStatus::Queued => "queued",
            DeploymentStatus::Capturing => "capturing",
            DeploymentStatus::Provisioning => "provisioning",
            DeploymentStatus::Building => "building",
            DeploymentStatus::Starting => "starting",
            DeploymentStatus::Ready => "ready",
            DeploymentStatus::Failed => "failed",
            DeploymentStatus::Stopping => "stopping",
            DeploymentStatus::Stopped => "stopped",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// The one legal successor on the happy path, if any.
    pub fn next_in_pipeline(self) -> Option<Self> {
        use DeploymentStatus::*;
        match self {
            Queued => Some(Capturing),
            Capturing => Some(Provisioning),
            Provisioning => Some(Building),
            Building => Some(Starting),
            Starting => Some(Ready),
            Ready | Failed => Some(Stopping),
            Stopping => Some(Stopped),
            Stopped => None,
        }
    }

    /// Whether `self → to` is an edge of the state machine. Nothing else is legal: a run is never
    /// restarted in place, and `stopped` is final.
    pub fn can_transition_to(self, to: Self) -> bool {
        use DeploymentStatus::*;
        matches!(
            (self, to),
            (Queued, Capturing)
                | (Capturing, Provisioning)
                | (Provisioning, Building)
                | (Building, Starting)
                | (Starting, Ready)
                | (Capturing | Provisioning | Building | Starting, Failed)
                | (Ready | Failed, Stopping)
                | (Stopping, Stopped)
        )
    }

    /// Checks one transition.
    ///
    /// # Errors
    /// [`TransitionError`] when the edge does not exist.
    pub fn transition(self, to: Self) -> Result<Self, TransitionError> {
        if self.can_transition_to(to) {
            Ok(to)
        } else {
            Err(TransitionError { from: self, to })
        }
    }

    /// Between `queued` and `starting`: the run holds the agent's one pipeline slot.
    pub fn is_active_pipeline(self) -> bool {
        use DeploymentStatus::*;
        matches!(
            self,
            Queued | Capturing | Provisioning | Building | Starting
        )
    }

    /// `stopped` is the only state nothing leaves.
    pub fn is_final(self) -> bool {
        self == DeploymentStatus::Stopped
    }

    /// `ready`, `failed` and `stopped`: no pipeline work is pending for the run.
    pub fn is_settled(self) -> bool {
        matches!(
            self,
            DeploymentStatus::Ready | DeploymentStatus::Failed | DeploymentStatus::Stopped
        )
    }
}

impl fmt::Display for DeploymentStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::DeploymentStatus::*;
    use super::*;

    /// The complete edge list. Every pair not in it must be rejected.
    const LEGAL: &[(DeploymentStatus, DeploymentStatus)] = &[
        (Queued, Capturing),
        (Capturing, Provisioning),
        (Provisioning, Building),
        (Building, Starting),
        (Starting, Ready),
        (Capturing, Failed),
        (Provisioning, Failed),
        (Building, Failed),
        (Starting, Failed),
        (Ready, Stopping),
        (Failed, Stopping),
        (Stopping, Stopped),
    ];

    #[test]
    fn exactly_the_legal_edges_are_accepted() {
        let mut accepted = 0;
        for from in DeploymentStatus::ALL {
            for to in DeploymentStatus::ALL {
                let legal = LEGAL.contains(&(from, to));
                assert_eq!(from.can_transition_to(to), legal, "{from} -> {to}");
                match from.transition(to) {
                    Ok(s) => {
                        assert!(legal);
                        assert_eq!(s, to);
                        accepted += 1;
                    }
                    Err(e) => {
                        assert!(!legal);
                        assert_eq!(
                            e.to_string(),
                            format!("illegal run transition from {from} to {to}")
                        );
                    }
                }
            }
        }
        assert_eq!(accepted, LEGAL.len());
    }

    #[test]
    fn no_restart_in_place() {
        for s in [Ready, Failed, Stopping, Stopped] {
            assert!(!s.can_transition_to(Queued));
            assert!(!s.can_transition_to(Building));
            assert!(!s.can_transition_to(Starting));
        }
        assert!(Stopped.is_final());
        assert!(DeploymentStatus::ALL
            .iter()
            .all(|s| !Stopped.can_transition_to(*s)));
    }

    #[test]
    fn happy_path_walks_to_stopped() {
        let mut s = Queued;
        let mut seen = vec![s];
        while let Some(n) = s.next_in_pipeline() {
            s = s.transition(n).unwrap();
            seen.push(s);
        }
        assert_eq!(
            seen,
            vec![
                Queued,
                Capturing,
                Provisioning,
                Building,
                Starting,
                Ready,
                Stopping,
                Stopped
            ]
        );
    }

    #[test]
    fn names_round_trip() {
        for s in DeploymentStatus::ALL {
            assert_eq!(DeploymentStatus::parse(s.as_str()), Some(s));
        }
        for t in DeploymentTarget::ALL {
            assert_eq!(DeploymentTarget::parse(t.as_str()), Some(t));
        }
        assert_eq!(DeploymentStatus::parse("READY"), None);
        assert_eq!(DeploymentTarget::parse("staging"), None);
    }

    #[test]
    fn active_pipeline_is_queued_to_starting() {
        let active: Vec<_> = DeploymentStatus::ALL
            .into_iter()
            .filter(|s| s.is_active_pipeline())
            .collect();
        assert_eq!(
            active,
            vec![Queued, Capturing, Provisioning, Building, Starting]
        );
    }
}
