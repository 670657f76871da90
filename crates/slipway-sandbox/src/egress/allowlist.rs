//! The default egress allowlist, derived from the host's own package-manager configuration so it
//! follows whatever registry or mirror the operator uses (no host names are built in).

use crate::config::EgressConfig;
use std::path::Path;
use std::process::{Command, Stdio};

/// What the host's package managers are configured to use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryConfig {
    /// `npm config get registry`.
    pub npm_registry: Option<String>,
    /// `npm config get cafile`, when set (e.g. for a TLS-inspecting egress).
    pub npm_cafile: Option<String>,
    /// pip's configured index URL, when one is configured (else pip's built-in default).
    pub pip_index_url: Option<String>,
    /// pip's extra index URLs.
    pub pip_extra_index_urls: Vec<String>,
    /// pip's configured CA bundle (`cert`), when set.
    pub pip_cert: Option<String>,
    /// Every host name the above need, deduplicated: the allowlist.
    pub hosts: Vec<String>,
}

/// Host names of the registries the host's npm and pip use. Empty when neither is installed.
pub fn derive_registry_allowlist() -> Vec<String> {
    RegistryConfig::derive().hosts
}

fn run(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The host part of a URL, without user info or port.
pub(crate) fn url_host(url: &str) -> Option<String> {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority
        .rsplit_once('@')
        .map(|(_, h)| h)
        .unwrap_or(authority);
    let host = if authority.starts_with('[') {
        authority.split(']').next().map(|h| format!("{h}]"))?
    } else {
        authority.split(':').next()?.to_string()
    };
    let host = host.trim().trim_end_matches('.').to_ascii_lowercase();
    (!host.is_empty()).then_some(host)
}

fn unset(value: &str) -> bool {
    value.is_empty() || value == "null" || value == "undefined"
}

/// Parses `pip config list` output (`scope.key='value'`) into (key, value), last wins.
fn pip_settings(list: &str) -> Vec<(String, String)> {
    list.lines()
        .filter_map(|line| {
            let (key, value) = line.split_once('=')?;
            let key = key.rsplit('.').next()?.to_string();
            let value = value
                .trim()
                .trim_matches('\'')
                .trim_matches('"')
                .to_string();
            Some((key, value))
        })
        .collect()
}

impl RegistryConfig {
    /// Asks the host's `npm` and `python3 -m pip` for their configuration. Takes about a second
    /// (two Node and two Python start-ups); call it once at start-up.
    pub fn derive() -> Self {
        let mut cfg = RegistryConfig::default();
        if let Some(registry) = run("npm", &["config", "get", "registry"]) {
            if !unset(&registry) {
                cfg.npm_registry = Some(registry);
            }
            cfg.npm_cafile = run("npm", &["config", "get", "cafile"]).filter(|v| !unset(v));
        }
        if let Some(list) = run("python3", &["-m", "pip", "config", "list"]) {
            for (key, value) in pip_settings(&list) {
                match key.as_str() {
                    "index-url" => cfg.pip_index_url = Some(value),
                    "extra-index-url" => cfg
                        .pip_extra_index_urls
                        .extend(value.split_whitespace().map(String::from)),
                    "cert" => cfg.pip_cert = Some(value),
                    _ => {}
                }
            }
            if cfg.pip_index_url.is_none() {
                // pip's own default index and the host it serves files from.
                let code = "from pip._internal.models.index import PyPI; \
                            print(PyPI.netloc); print(PyPI.file_storage_domain)";
                if let Some(out) = run("python3", &["-c", code]) {
                    cfg.hosts.extend(out.lines().filter_map(url_host));
                }
            }
        }
        let urls = cfg
            .npm_registry
            .iter()
            .chain(cfg.pip_index_url.iter())
            .chain(cfg.pip_extra_index_urls.iter());
        let from_urls: Vec<String> = urls.filter_map(|u| url_host(u)).collect();
        cfg.hosts.extend(from_urls);
        let mut seen = std::collections::HashSet::new();
        cfg.hosts.retain(|h| seen.insert(h.clone()));
        cfg
    }

    /// Environment for sandbox commands so npm and pip use the same registries (and CA bundle)
    /// as the host. CA bundles outside /etc/ssl and /usr are not visible in a sandbox and are
    /// left out.
    pub fn sandbox_env(&self) -> Vec<(String, String)> {
        let visible = |p: &String| {
            let p = Path::new(p);
            p.is_absolute() && (p.starts_with("/etc/ssl/certs") || p.starts_with("/usr"))
        };
        let mut env = Vec::new();
        if let Some(registry) = &self.npm_registry {
            env.push(("npm_config_registry".to_string(), registry.clone()));
        }
        if let Some(cafile) = self.npm_cafile.as_ref().filter(|p| visible(p)) {
            env.push(("npm_config_cafile".to_string(), cafile.clone()));
        }
        if let Some(index) = &self.pip_index_url {
            env.push(("PIP_INDEX_URL".to_string(), index.clone()));
        }
        if !self.pip_extra_index_urls.is_empty() {
            env.push((
                "PIP_EXTRA_INDEX_URL".to_string(),
                self.pip_extra_index_urls.join(" "),
            ));
        }
        if let Some(cert) = self.pip_cert.as_ref().filter(|p| visible(p)) {
            env.push(("PIP_CERT".to_string(), cert.clone()));
        }
        env
    }

    /// Egress settings for a build sandbox: these registries plus `extra_hosts`.
    pub fn egress_config(&self, extra_hosts: &[String]) -> EgressConfig {
        let mut cfg = EgressConfig::new(self.hosts.iter().chain(extra_hosts).cloned().collect());
        cfg.env = self.sandbox_env();
        cfg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_taken_from_urls() {
        assert_eq!(
            url_host("https://mirror.example/npm/").as_deref(),
            Some("mirror.example")
        );
        assert_eq!(
            url_host("https://u:p@Mirror.Example:8443/x").as_deref(),
            Some("mirror.example")
        );
        assert_eq!(
            url_host("mirror.example").as_deref(),
            Some("mirror.example")
        );
        assert_eq!(url_host("http://[::1]:80/").as_deref(), Some("[::1]"));
        assert_eq!(url_host("https:///nohost"), None);
    }

    #[test]
    fn pip_config_list_is_parsed() {
        let list = ":env:.cert='/etc/ssl/certs/ca.crt'\nglobal.index-url='https://mirror.example/simple'\n\
                    global.extra-index-url='https://a.example/s https://b.example/s'";
        let settings = pip_settings(list);
        assert!(settings.contains(&("cert".into(), "/etc/ssl/certs/ca.crt".into())));
        assert!(settings.contains(&("index-url".into(), "https://mirror.example/simple".into())));
        assert!(settings.contains(&(
            "extra-index-url".into(),
            "https://a.example/s https://b.example/s".into()
        )));
    }

    #[test]
    fn env_leaves_out_ca_bundles_the_sandbox_cannot_see() {
        let cfg = RegistryConfig {
            npm_registry: Some("https://mirror.example/".into()),
            npm_cafile: Some("/root/private-ca.pem".into()),
            pip_cert: Some("/etc/ssl/certs/ca-certificates.crt".into()),
            ..Default::default()
        };
        let env = cfg.sandbox_env();
        assert!(env.contains(&(
            "npm_config_registry".into(),
            "https://mirror.example/".into()
        )));
        assert!(env.contains(&(
            "PIP_CERT".into(),
            "/etc/ssl/certs/ca-certificates.crt".into()
        )));
        assert!(!env.iter().any(|(k, _)| k == "npm_config_cafile"));
    }
}
