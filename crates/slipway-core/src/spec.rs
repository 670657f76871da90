//! The deployment spec (seed 004 `DeploymentSpec`) and its validation rules.

use std::collections::BTreeMap;

use crate::path::{is_strictly_under, normalize_absolute, PathError};
use crate::run::DeploymentTarget;
use crate::Millis;

/// `runtimePort` when the spec does not give one.
pub const DEFAULT_RUNTIME_PORT: u16 = 3000;

/// Roots a `sourceDir` must lie under unless configured otherwise (seed 004).
pub const DEFAULT_ALLOWED_ROOTS: [&str; 2] = ["/config/miniapps", "/config/memory/projects"];

/// Whether the build output is served as files or by a process (issue 6; `auto` decides from
/// the build output).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DeploymentKind {
    #[default]
    Auto,
    Static,
    Dynamic,
}

impl DeploymentKind {
    pub const ALL: [DeploymentKind; 3] = [
        DeploymentKind::Auto,
        DeploymentKind::Static,
        DeploymentKind::Dynamic,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeploymentKind::Auto => "auto",
            DeploymentKind::Static => "static",
            DeploymentKind::Dynamic => "dynamic",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// A stored, valid spec. Only [`SpecDraft::validate`] builds the validated fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentSpec {
    pub id: String,
    pub agent_id: String,
    pub name: String,
    pub source_dir: String,
    pub install_command: String,
    pub build_command: String,
    pub start_command: String,
    pub runtime_port: u16,
    pub env: BTreeMap<String, String>,
    pub target_default: DeploymentTarget,
    pub kind: DeploymentKind,
    /// Hosts the running app may reach through the run-time egress proxy, each `host` (ports
    /// 80 and 443) or `host:port`, lower-case. Empty: no outbound network at run time.
    pub runtime_egress_allow: Vec<String>,
    pub created_at: Millis,
    pub updated_at: Millis,
}

/// What a client sent, before validation. `None` means the field was absent; string enums are
/// kept raw so that an unknown value is reported by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecDraft {
    pub name: Option<String>,
    pub source_dir: Option<String>,
    pub install_command: Option<String>,
    pub build_command: Option<String>,
    pub start_command: Option<String>,
    /// Kept wide so that an out-of-range number is reported as such rather than as a type error.
    pub runtime_port: Option<i64>,
    pub env: Option<BTreeMap<String, String>>,
    pub target_default: Option<String>,
    pub kind: Option<String>,
    pub runtime_egress_allow: Option<Vec<String>>,
}

/// Validation limits and the allowed roots. Configuration, not constants: an operator may widen
/// the roots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecPolicy {
    pub allowed_roots: Vec<String>,
    pub max_name_len: usize,
    pub max_command_len: usize,
    pub max_env_vars: usize,
    pub max_env_name_len: usize,
    pub max_env_value_len: usize,
    pub max_env_total: usize,
    /// Most entries in `runtimeEgressAllow`.
    pub max_egress_hosts: usize,
}

impl Default for SpecPolicy {
    fn default() -> Self {
        Self {
            allowed_roots: DEFAULT_ALLOWED_ROOTS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            max_name_len: 100,
            max_command_len: 8 * 1024,
            max_env_vars: 200,
            max_env_name_len: 256,
            max_env_value_len: 32 * 1024,
            max_env_total: 256 * 1024,
            max_egress_hosts: 32,
        }
    }
}

/// One broken validation rule. Each rule has its own variant and message, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("{0} is required")]
    Required(&'static str),
    #[error("{field} must not be blank")]
    Blank { field: &'static str },
    #[error("{field} is longer than {max} characters")]
    TooLong { field: &'static str, max: usize },
    #[error("{field} must not contain NUL characters")]
    Nul { field: &'static str },
    #[error("name must not contain control characters")]
    NameControlChar,
    #[error("sourceDir: {0}")]
    SourceDir(PathError),
    #[error("sourceDir {path:?} is not under an allowed root ({roots})")]
    SourceDirNotAllowed { path: String, roots: String },
    #[error("runtimePort must be between 1024 and 65535, got {0}")]
    RuntimePort(i64),
    #[error("env has {count} variables, more than the limit of {max}")]
    TooManyEnv { count: usize, max: usize },
    #[error("env name {0:?} is invalid: it must match [A-Za-z_][A-Za-z0-9_]*")]
    EnvName(String),
    #[error("env name {name:?} is longer than {max} characters")]
    EnvNameTooLong { name: String, max: usize },
    #[error("env value of {name} is longer than {max} bytes")]
    EnvValueTooLong { name: String, max: usize },
    #[error("env value of {0} must not contain NUL characters")]
    EnvValueNul(String),
    #[error("env is {total} bytes in all, more than the limit of {max}")]
    EnvTooLarge { total: usize, max: usize },
    #[error("env name {0} is reserved: slipway sets it for the app")]
    EnvReserved(String),
    #[error("targetDefault must be \"preview\" or \"production\", got {0:?}")]
    TargetDefault(String),
    #[error("kind must be \"auto\", \"static\" or \"dynamic\", got {0:?}")]
    Kind(String),
    #[error("runtimeEgressAllow has {count} entries, more than the limit of {max}")]
    TooManyEgressHosts { count: usize, max: usize },
    #[error("runtimeEgressAllow entry {entry:?} is invalid: {reason}")]
    EgressHost {
        entry: String,
        reason: EgressHostError,
    },
}

/// Why one `runtimeEgressAllow` entry was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EgressHostError {
    #[error("it is empty")]
    Empty,
    #[error("it is longer than {MAX_EGRESS_ENTRY_LEN} characters")]
    TooLong,
    #[error("give a host name such as api.example.com, not a URL")]
    Url,
    #[error("wildcards are not supported; list each host name")]
    Wildcard,
    #[error("IP addresses are not allowed; give a host name")]
    IpAddress,
    #[error("the port must be a number from 1 to 65535")]
    Port,
    #[error(
        "a host name is dot-separated labels of 1-63 letters, digits or '-' (not at a label's \
         start or end), 253 characters at most"
    )]
    Hostname,
    #[error("it is listed more than once")]
    Duplicate,
}

/// Longest `runtimeEgressAllow` entry: a 253-character name plus `:65535`.
pub const MAX_EGRESS_ENTRY_LEN: usize = 259;

/// Validates one `runtimeEgressAllow` entry — `host` or `host:port`, no scheme, path, user info,
/// wildcard or IP literal — and returns it normalised (lower-case, no trailing dot).
///
/// # Errors
/// Why the entry is refused.
pub fn parse_egress_host(entry: &str) -> Result<String, EgressHostError> {
    if entry.is_empty() {
        return Err(EgressHostError::Empty);
    }
    if entry.chars().count() > MAX_EGRESS_ENTRY_LEN {
        return Err(EgressHostError::TooLong);
    }
    if entry.contains("://") || entry.contains(['/', '@', '?', '#']) {
        return Err(EgressHostError::Url);
    }
    if entry.contains('*') {
        return Err(EgressHostError::Wildcard);
    }
    if entry.contains('[') || entry.matches(':').count() > 1 {
        return Err(EgressHostError::IpAddress);
    }
    let (host, port) = match entry.split_once(':') {
        Some((host, port)) => {
            let valid = !port.is_empty()
                && port.len() <= 5
                && port.bytes().all(|b| b.is_ascii_digit())
                && !port.starts_with('0')
                && port.parse::<u32>().is_ok_and(|p| (1..=65535).contains(&p));
            if !valid {
                return Err(EgressHostError::Port);
            }
            (host, Some(port))
        }
        None => (entry, None),
    };
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    if host.parse::<std::net::Ipv4Addr>().is_ok() {
        return Err(EgressHostError::IpAddress);
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
        return Err(EgressHostError::Hostname);
    }
    // An all-digit last label is never a host name (and catches short IPv4 forms like 127.1).
    if host
        .rsplit('.')
        .next()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(EgressHostError::IpAddress);
    }
    Ok(match port {
        Some(p) => format!("{host}:{p}"),
        None => host,
    })
}

/// Env names the platform sets itself and a spec may not override.
pub const RESERVED_ENV: [&str; 1] = ["PORT"];

/// Validated spec fields, ready to be stored with ids and timestamps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidSpec {
    pub name: String,
    pub source_dir: String,
    pub install_command: String,
    pub build_command: String,
    pub start_command: String,
    pub runtime_port: u16,
    pub env: BTreeMap<String, String>,
    pub target_default: DeploymentTarget,
    pub kind: DeploymentKind,
    pub runtime_egress_allow: Vec<String>,
}

impl ValidSpec {
    /// Attaches identity and times.
    pub fn into_spec(
        self,
        id: String,
        agent_id: String,
        created_at: Millis,
        updated_at: Millis,
    ) -> DeploymentSpec {
        DeploymentSpec {
            id,
            agent_id,
            name: self.name,
            source_dir: self.source_dir,
            install_command: self.install_command,
            build_command: self.build_command,
            start_command: self.start_command,
            runtime_port: self.runtime_port,
            env: self.env,
            target_default: self.target_default,
            kind: self.kind,
            runtime_egress_allow: self.runtime_egress_allow,
            created_at,
            updated_at,
        }
    }
}

fn check_text(field: &'static str, value: &str, max: usize) -> Result<(), SpecError> {
    if value.contains('\0') {
        return Err(SpecError::Nul { field });
    }
    if value.chars().count() > max {
        return Err(SpecError::TooLong { field, max });
    }
    Ok(())
}

fn required(field: &'static str, value: Option<&String>, max: usize) -> Result<String, SpecError> {
    let v = value.ok_or(SpecError::Required(field))?;
    if v.trim().is_empty() {
        return Err(SpecError::Blank { field });
    }
    check_text(field, v, max)?;
    Ok(v.clone())
}

/// True when `name` matches `[A-Za-z_][A-Za-z0-9_]*`.
pub fn is_valid_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    match bytes.next() {
        Some(b) if b.is_ascii_alphabetic() || b == b'_' => {}
        _ => return false,
    }
    bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl SpecDraft {
    /// Applies every seed 004 rule. Rules are checked in field order and the first broken one
    /// is returned, so a client fixes problems one message at a time.
    ///
    /// # Errors
    /// The first [`SpecError`] found.
    pub fn validate(&self, policy: &SpecPolicy) -> Result<ValidSpec, SpecError> {
        let name = required("name", self.name.as_ref(), policy.max_name_len)?;
        if name.chars().any(char::is_control) {
            return Err(SpecError::NameControlChar);
        }
        let name = name.trim().to_string();

        let raw_dir = self
            .source_dir
            .as_ref()
            .ok_or(SpecError::Required("sourceDir"))?;
        if raw_dir.trim().is_empty() {
            return Err(SpecError::Blank { field: "sourceDir" });
        }
        let source_dir = normalize_absolute(raw_dir).map_err(SpecError::SourceDir)?;
        if !policy
            .allowed_roots
            .iter()
            .any(|root| is_strictly_under(&source_dir, root))
        {
            return Err(SpecError::SourceDirNotAllowed {
                path: source_dir,
                roots: policy.allowed_roots.join(", "),
            });
        }

        let install_command = self.install_command.clone().unwrap_or_default();
        check_text("installCommand", &install_command, policy.max_command_len)?;
        let build_command = required(
            "buildCommand",
            self.build_command.as_ref(),
            policy.max_command_len,
        )?;
        let start_command = required(
            "startCommand",
            self.start_command.as_ref(),
            policy.max_command_len,
        )?;

        let runtime_port = match self.runtime_port {
            None => DEFAULT_RUNTIME_PORT,
            Some(p) if (1024..=65535).contains(&p) => p as u16,
            Some(p) => return Err(SpecError::RuntimePort(p)),
        };

        let env = self.env.clone().unwrap_or_default();
        if env.len() > policy.max_env_vars {
            return Err(SpecError::TooManyEnv {
                count: env.len(),
                max: policy.max_env_vars,
            });
        }
        let mut total = 0usize;
        for (k, v) in &env {
            if k.len() > policy.max_env_name_len {
                return Err(SpecError::EnvNameTooLong {
                    name: k.chars().take(32).collect(),
                    max: policy.max_env_name_len,
                });
            }
            if !is_valid_env_name(k) {
                return Err(SpecError::EnvName(k.clone()));
            }
            if RESERVED_ENV.contains(&k.as_str()) {
                return Err(SpecError::EnvReserved(k.clone()));
            }
            if v.len() > policy.max_env_value_len {
                return Err(SpecError::EnvValueTooLong {
                    name: k.clone(),
                    max: policy.max_env_value_len,
                });
            }
            if v.contains('\0') {
                return Err(SpecError::EnvValueNul(k.clone()));
            }
            total += k.len() + v.len();
        }
        if total > policy.max_env_total {
            return Err(SpecError::EnvTooLarge {
                total,
                max: policy.max_env_total,
            });
        }

        let target_default = match self.target_default.as_deref() {
            None => DeploymentTarget::Preview,
            Some(t) => {
                DeploymentTarget::parse(t).ok_or_else(|| SpecError::TargetDefault(t.to_string()))?
            }
        };
        let kind = match self.kind.as_deref() {
            None => DeploymentKind::Auto,
            Some(k) => DeploymentKind::parse(k).ok_or_else(|| SpecError::Kind(k.to_string()))?,
        };

        let raw_egress = self.runtime_egress_allow.clone().unwrap_or_default();
        if raw_egress.len() > policy.max_egress_hosts {
            return Err(SpecError::TooManyEgressHosts {
                count: raw_egress.len(),
                max: policy.max_egress_hosts,
            });
        }
        let mut runtime_egress_allow: Vec<String> = Vec::with_capacity(raw_egress.len());
        for entry in &raw_egress {
            let refused = |reason| SpecError::EgressHost {
                entry: entry.chars().take(80).collect(),
                reason,
            };
            let host = parse_egress_host(entry).map_err(refused)?;
            if runtime_egress_allow.contains(&host) {
                return Err(refused(EgressHostError::Duplicate));
            }
            runtime_egress_allow.push(host);
        }

        Ok(ValidSpec {
            name,
            source_dir,
            install_command,
            build_command,
            start_command,
            runtime_port,
            env,
            target_default,
            kind,
            runtime_egress_allow,
        })
    }
}

/// An agent's display name: 1–64 characters, no control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentName(String);

impl AgentName {
    pub const MAX_LEN: usize = 64;

    /// # Errors
    /// A message naming the problem.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let t = raw.trim();
        if t.is_empty() {
            return Err("agent name must not be blank".into());
        }
        if t.chars().count() > Self::MAX_LEN {
            return Err(format!(
                "agent name is longer than {} characters",
                Self::MAX_LEN
            ));
        }
        if t.chars().any(char::is_control) {
            return Err("agent name must not contain control characters".into());
        }
        Ok(Self(t.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok_draft() -> SpecDraft {
        SpecDraft {
            name: Some("my-app".into()),
            source_dir: Some("/config/miniapps/my-app".into()),
            build_command: Some("npm run build".into()),
            start_command: Some("node server.js".into()),
            ..Default::default()
        }
    }

    fn err(f: impl FnOnce(&mut SpecDraft)) -> SpecError {
        let mut d = ok_draft();
        f(&mut d);
        d.validate(&SpecPolicy::default()).unwrap_err()
    }

    #[test]
    fn defaults_apply() {
        let v = ok_draft().validate(&SpecPolicy::default()).unwrap();
        assert_eq!(v.runtime_port, 3000);
        assert_eq!(v.install_command, "");
        assert_eq!(v.target_default, DeploymentTarget::Preview);
        assert_eq!(v.kind, DeploymentKind::Auto);
        assert!(v.env.is_empty());
    }

    #[test]
    fn each_rule_has_its_own_error() {
        assert_eq!(err(|d| d.name = None), SpecError::Required("name"));
        assert_eq!(
            err(|d| d.name = Some("  ".into())),
            SpecError::Blank { field: "name" }
        );
        assert_eq!(
            err(|d| d.name = Some("a\u{7}b".into())),
            SpecError::NameControlChar
        );
        assert_eq!(
            err(|d| d.name = Some("x".repeat(101))),
            SpecError::TooLong {
                field: "name",
                max: 100
            }
        );
        assert_eq!(
            err(|d| d.source_dir = None),
            SpecError::Required("sourceDir")
        );
        assert!(matches!(
            err(|d| d.source_dir = Some("config/miniapps/a".into())),
            SpecError::SourceDir(PathError::NotAbsolute(_))
        ));
        assert!(matches!(
            err(|d| d.source_dir = Some("/config/miniapps/../../etc".into())),
            SpecError::SourceDir(PathError::Traversal(_))
        ));
        assert!(matches!(
            err(|d| d.source_dir = Some("/etc/app".into())),
            SpecError::SourceDirNotAllowed { .. }
        ));
        assert!(matches!(
            err(|d| d.source_dir = Some("/config/miniapps".into())),
            SpecError::SourceDirNotAllowed { .. }
        ));
        assert!(matches!(
            err(|d| d.source_dir = Some("/config/miniapps-x/a".into())),
            SpecError::SourceDirNotAllowed { .. }
        ));
        assert_eq!(
            err(|d| d.build_command = None),
            SpecError::Required("buildCommand")
        );
        assert_eq!(
            err(|d| d.start_command = None),
            SpecError::Required("startCommand")
        );
        assert_eq!(
            err(|d| d.start_command = Some("".into())),
            SpecError::Blank {
                field: "startCommand"
            }
        );
        assert_eq!(
            err(|d| d.install_command = Some("a\0b".into())),
            SpecError::Nul {
                field: "installCommand"
            }
        );
        assert_eq!(
            err(|d| d.runtime_port = Some(80)),
            SpecError::RuntimePort(80)
        );
        assert_eq!(
            err(|d| d.runtime_port = Some(65536)),
            SpecError::RuntimePort(65536)
        );
        assert_eq!(
            err(|d| d.runtime_port = Some(-1)),
            SpecError::RuntimePort(-1)
        );
        assert_eq!(
            err(|d| d.env = Some([("1BAD".into(), "x".into())].into())),
            SpecError::EnvName("1BAD".into())
        );
        assert_eq!(
            err(|d| d.env = Some([("A-B".into(), "x".into())].into())),
            SpecError::EnvName("A-B".into())
        );
        assert_eq!(
            err(|d| d.env = Some([("PORT".into(), "1".into())].into())),
            SpecError::EnvReserved("PORT".into())
        );
        assert_eq!(
            err(|d| d.env = Some([("A".into(), "x".repeat(40_000))].into())),
            SpecError::EnvValueTooLong {
                name: "A".into(),
                max: 32 * 1024
            }
        );
        assert_eq!(
            err(|d| d.env = Some([("A".into(), "\0".into())].into())),
            SpecError::EnvValueNul("A".into())
        );
        let many: BTreeMap<String, String> =
            (0..201).map(|i| (format!("V{i}"), String::new())).collect();
        assert_eq!(
            err(|d| d.env = Some(many)),
            SpecError::TooManyEnv {
                count: 201,
                max: 200
            }
        );
        let big: BTreeMap<String, String> = (0..10)
            .map(|i| (format!("V{i}"), "x".repeat(30_000)))
            .collect();
        assert!(matches!(
            err(|d| d.env = Some(big)),
            SpecError::EnvTooLarge { .. }
        ));
        assert_eq!(
            err(|d| d.target_default = Some("staging".into())),
            SpecError::TargetDefault("staging".into())
        );
        assert_eq!(
            err(|d| d.kind = Some("vm".into())),
            SpecError::Kind("vm".into())
        );
    }

    #[test]
    fn accepts_edges() {
        let mut d = ok_draft();
        d.runtime_port = Some(1024);
        d.env = Some([("_A1".into(), "v".into()), ("a".into(), "".into())].into());
        d.target_default = Some("production".into());
        d.kind = Some("static".into());
        d.source_dir = Some("/config/memory/projects//x/./y/".into());
        let v = d.validate(&SpecPolicy::default()).unwrap();
        assert_eq!(v.runtime_port, 1024);
        assert_eq!(v.source_dir, "/config/memory/projects/x/y");
        assert_eq!(v.target_default, DeploymentTarget::Production);
        assert_eq!(v.kind, DeploymentKind::Static);
        let mut d = ok_draft();
        d.runtime_port = Some(65535);
        assert_eq!(
            d.validate(&SpecPolicy::default()).unwrap().runtime_port,
            65535
        );
    }

    #[test]
    fn runtime_egress_entries_are_host_names_with_an_optional_port() {
        let valid = |entries: &[&str]| {
            let mut d = ok_draft();
            d.runtime_egress_allow = Some(entries.iter().map(|e| e.to_string()).collect());
            d.validate(&SpecPolicy::default())
                .map(|v| v.runtime_egress_allow)
        };
        assert_eq!(valid(&[]), Ok(vec![]));
        assert_eq!(
            ok_draft()
                .validate(&SpecPolicy::default())
                .unwrap()
                .runtime_egress_allow,
            Vec::<String>::new()
        );
        assert_eq!(
            valid(&[
                "API.Example.com.",
                "localhost",
                "x-1.example:8443",
                "a.b:1",
                "a.b:65535"
            ]),
            Ok(vec![
                "api.example.com".to_string(),
                "localhost".into(),
                "x-1.example:8443".into(),
                "a.b:1".into(),
                "a.b:65535".into()
            ])
        );
        let refused = |entry: &str| match valid(&[entry]) {
            Err(SpecError::EgressHost { entry: e, reason }) => {
                assert_eq!(e, entry.chars().take(80).collect::<String>());
                reason
            }
            other => panic!("{entry:?}: expected a refusal, got {other:?}"),
        };
        use EgressHostError as E;
        assert_eq!(refused(""), E::Empty);
        assert_eq!(refused("https://api.example.com"), E::Url);
        assert_eq!(refused("api.example.com/v1"), E::Url);
        assert_eq!(refused("user@api.example.com"), E::Url);
        assert_eq!(refused("*.example.com"), E::Wildcard);
        assert_eq!(refused("api.*"), E::Wildcard);
        assert_eq!(refused("127.0.0.1"), E::IpAddress);
        assert_eq!(refused("127.1"), E::IpAddress);
        assert_eq!(refused("10.0.0.1:443"), E::IpAddress);
        assert_eq!(refused("[::1]:443"), E::IpAddress);
        assert_eq!(refused("::1"), E::IpAddress);
        assert_eq!(refused("api.example.com:0"), E::Port);
        assert_eq!(refused("api.example.com:65536"), E::Port);
        assert_eq!(refused("api.example.com:"), E::Port);
        assert_eq!(refused("api.example.com:08"), E::Port);
        assert_eq!(refused("api.example.com:+1"), E::Port);
        assert_eq!(refused("api.example.com:http"), E::Port);
        assert_eq!(refused(" api.example.com"), E::Hostname);
        assert_eq!(refused("api..example.com"), E::Hostname);
        assert_eq!(refused("-api.example.com"), E::Hostname);
        assert_eq!(refused("api-.example.com"), E::Hostname);
        assert_eq!(refused("api_x.example.com"), E::Hostname);
        assert_eq!(refused("ex\u{e4}mple.com"), E::Hostname);
        assert_eq!(refused("."), E::Hostname);
        assert_eq!(refused(&format!("{}.com", "a".repeat(64))), E::Hostname);
        let long = vec!["a".repeat(63); 4].join("."); // 255 > 253
        assert_eq!(refused(&long), E::Hostname);
        assert_eq!(refused(&"a".repeat(300)), E::TooLong);
        assert_eq!(
            valid(&["a.example", "A.example."]),
            Err(SpecError::EgressHost {
                entry: "A.example.".into(),
                reason: E::Duplicate
            })
        );
        let many: Vec<String> = (0..33).map(|i| format!("h{i}.example")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(
            valid(&many),
            Err(SpecError::TooManyEgressHosts { count: 33, max: 32 })
        );
        // The message names the field, the entry and the rule.
        let msg = SpecError::EgressHost {
            entry: "*.example.com".into(),
            reason: E::Wildcard,
        }
        .to_string();
        assert_eq!(
            msg,
            "runtimeEgressAllow entry \"*.example.com\" is invalid: wildcards are not supported; \
             list each host name"
        );
    }

    #[test]
    fn env_names() {
        assert!(is_valid_env_name("A"));
        assert!(is_valid_env_name("_"));
        assert!(is_valid_env_name("NODE_ENV2"));
        assert!(!is_valid_env_name(""));
        assert!(!is_valid_env_name("2A"));
        assert!(!is_valid_env_name("A B"));
        assert!(!is_valid_env_name("É"));
    }

    #[test]
    fn agent_names() {
        assert_eq!(AgentName::parse(" bot ").unwrap().as_str(), "bot");
        assert!(AgentName::parse("").is_err());
        assert!(AgentName::parse(&"x".repeat(65)).is_err());
        assert!(AgentName::parse("a\nb").is_err());
    }
}
