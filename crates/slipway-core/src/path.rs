//! Sandbox paths: normalisation, allowed roots, and the agent-path → host-path mapping.
//!
//! These are pure string operations. They never touch the filesystem; the host capture path
//! re-checks the resolved host path against symlinks when it actually opens it.

use std::path::PathBuf;

/// Why a sandbox path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path must not be empty")]
    Empty,
    #[error("path must be absolute (start with '/'): {0:?}")]
    NotAbsolute(String),
    #[error("path must not contain '..' (path traversal): {0:?}")]
    Traversal(String),
    #[error("path must not contain control characters or NUL")]
    ControlChar,
    #[error("path is longer than {max} bytes")]
    TooLong { max: usize },
}

/// Longest sandbox path accepted, in bytes (Linux `PATH_MAX`).
pub const MAX_PATH_LEN: usize = 4096;

/// Normalises an absolute sandbox path: collapses repeated `/`, drops `.` components and a
/// trailing `/`. Refuses `..` anywhere (even when it would stay inside the root, so that no
/// reader has to reason about it) and control characters.
///
/// # Errors
/// [`PathError`] naming the problem.
pub fn normalize_absolute(raw: &str) -> Result<String, PathError> {
    if raw.is_empty() {
        return Err(PathError::Empty);
    }
    if raw.len() > MAX_PATH_LEN {
        return Err(PathError::TooLong { max: MAX_PATH_LEN });
    }
    if raw.chars().any(char::is_control) {
        return Err(PathError::ControlChar);
    }
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute(raw.to_string()));
    }
    let mut parts: Vec<&str> = Vec::new();
    for comp in raw.split('/') {
        match comp {
            "" | "." => {}
            ".." => return Err(PathError::Traversal(raw.to_string())),
            c => parts.push(c),
        }
    }
    Ok(format!("/{}", parts.join("/")))
}

/// True when normalised `path` is strictly inside normalised `root`, compared by whole
/// components (`/config/miniapps-evil` is not inside `/config/miniapps`).
pub fn is_strictly_under(path: &str, root: &str) -> bool {
    let root = root.trim_end_matches('/');
    match path.strip_prefix(root) {
        Some(rest) => rest.starts_with('/') && rest.len() > 1,
        None => false,
    }
}

/// The placeholder an agent-root template must contain.
pub const AGENT_ID_PLACEHOLDER: &str = "{agentId}";

/// Maps an agent's sandbox paths to host paths, e.g. `/srv/agents/{agentId}` makes
/// `/config/miniapps/app` of agent `a1` the host path `/srv/agents/a1/config/miniapps/app`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRootTemplate(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("agent root template must be an absolute path: {0:?}")]
    NotAbsolute(String),
    #[error("agent root template must contain {AGENT_ID_PLACEHOLDER} so agents cannot read each other's files: {0:?}")]
    MissingPlaceholder(String),
    #[error("agent root template must not contain '..': {0:?}")]
    Traversal(String),
}

impl AgentRootTemplate {
    /// # Errors
    /// [`TemplateError`] when the template is relative, contains `..`, or lacks `{agentId}`.
    pub fn parse(raw: &str) -> Result<Self, TemplateError> {
        if !raw.starts_with('/') {
            return Err(TemplateError::NotAbsolute(raw.to_string()));
        }
        if raw.split('/').any(|c| c == "..") {
            return Err(TemplateError::Traversal(raw.to_string()));
        }
        if !raw.contains(AGENT_ID_PLACEHOLDER) {
            return Err(TemplateError::MissingPlaceholder(raw.to_string()));
        }
        Ok(Self(raw.trim_end_matches('/').to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The host directory that stands for the agent's sandbox `/`.
    pub fn agent_root(&self, agent_id: &str) -> PathBuf {
        PathBuf::from(self.0.replace(AGENT_ID_PLACEHOLDER, agent_id))
    }

    /// Host path of a normalised sandbox path. `sandbox_path` must already have passed
    /// [`normalize_absolute`]; the result is therefore inside [`Self::agent_root`] lexically.
    pub fn host_path(&self, agent_id: &str, sandbox_path: &str) -> PathBuf {
        let mut p = self.agent_root(agent_id);
        for comp in sandbox_path.split('/').filter(|c| !c.is_empty()) {
            p.push(comp);
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes() {
        assert_eq!(
            normalize_absolute("/config//miniapps/./app/").unwrap(),
            "/config/miniapps/app"
        );
        assert_eq!(normalize_absolute("/").unwrap(), "/");
    }

    #[test]
    fn refuses_bad_paths() {
        assert_eq!(normalize_absolute(""), Err(PathError::Empty));
        assert!(matches!(
            normalize_absolute("config/app"),
            Err(PathError::NotAbsolute(_))
        ));
        assert!(matches!(
            normalize_absolute("/config/miniapps/../../etc"),
            Err(PathError::Traversal(_))
        ));
        assert!(matches!(
            normalize_absolute("/config/miniapps/a/.."),
            Err(PathError::Traversal(_))
        ));
        assert_eq!(
            normalize_absolute("/config/\0x"),
            Err(PathError::ControlChar)
        );
        assert_eq!(
            normalize_absolute("/config/\nx"),
            Err(PathError::ControlChar)
        );
        let long = format!("/{}", "a".repeat(MAX_PATH_LEN));
        assert_eq!(
            normalize_absolute(&long),
            Err(PathError::TooLong { max: MAX_PATH_LEN })
        );
    }

    #[test]
    fn under_compares_whole_components() {
        assert!(is_strictly_under(
            "/config/miniapps/app",
            "/config/miniapps"
        ));
        assert!(is_strictly_under(
            "/config/miniapps/app",
            "/config/miniapps/"
        ));
        assert!(!is_strictly_under("/config/miniapps", "/config/miniapps"));
        assert!(!is_strictly_under(
            "/config/miniapps-evil/app",
            "/config/miniapps"
        ));
        assert!(!is_strictly_under("/etc", "/config/miniapps"));
    }

    #[test]
    fn maps_agent_paths() {
        let t = AgentRootTemplate::parse("/srv/agents/{agentId}").unwrap();
        assert_eq!(
            t.host_path("a1", "/config/miniapps/app"),
            PathBuf::from("/srv/agents/a1/config/miniapps/app")
        );
        assert!(matches!(
            AgentRootTemplate::parse("srv/{agentId}"),
            Err(TemplateError::NotAbsolute(_))
        ));
        assert!(matches!(
            AgentRootTemplate::parse("/srv/agents"),
            Err(TemplateError::MissingPlaceholder(_))
        ));
        assert!(matches!(
            AgentRootTemplate::parse("/srv/../{agentId}"),
            Err(TemplateError::Traversal(_))
        ));
    }
}
