//! Auto-detection of install/build/start commands from the shape of a source tree.
//!
//! Pure: the caller lists the top-level file names and, when there is a `package.json`, the
//! names of its scripts and whether it names a `main`. Detection never guesses silently: the
//! result says what it found and why, and the CLI prints that.

/// What the tree looks like to the detector.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TreeShape {
    /// Names of the files at the root of the source directory.
    pub root_files: Vec<String>,
    /// Script names from `package.json` (`scripts` keys), if there is one.
    pub package_scripts: Vec<String>,
    /// `package.json`'s `main`, if any.
    pub package_main: Option<String>,
}

/// Commands chosen for a tree, with the reason in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detection {
    /// e.g. "node (npm)", "python (pip)", "static site".
    pub framework: String,
    pub install_command: String,
    pub build_command: String,
    pub start_command: Option<String>,
    /// One sentence per decision, e.g. "package-lock.json → npm ci".
    pub reasons: Vec<String>,
}

impl TreeShape {
    fn has(&self, name: &str) -> bool {
        self.root_files.iter().any(|f| f == name)
    }

    fn has_script(&self, name: &str) -> bool {
        self.package_scripts.iter().any(|s| s == name)
    }
}

/// Detects commands for a tree, or `None` when its shape is not recognised.
pub fn detect(tree: &TreeShape) -> Option<Detection> {
    let mut reasons = Vec::new();
    if tree.has("package.json") {
        let (pm, install) = if tree.has("pnpm-lock.yaml") {
            ("pnpm", "pnpm install --frozen-lockfile")
        } else if tree.has("yarn.lock") {
            ("yarn", "yarn install --frozen-lockfile")
        } else if tree.has("bun.lockb") || tree.has("bun.lock") {
            ("bun", "bun install --frozen-lockfile")
        } else if tree.has("package-lock.json") {
            ("npm", "npm ci")
        } else {
            ("npm", "npm install")
        };
        reasons.push(format!(
            "package.json → node project, installed with {pm} (`{install}`)"
        ));
        let build = if tree.has_script("build") {
            reasons.push(format!(
                "package.json has a build script → `{pm} run build`"
            ));
            format!("{pm} run build")
        } else {
            reasons.push("package.json has no build script → no build step".into());
            "true".to_string()
        };
        let start = if tree.has_script("start") {
            reasons.push(format!(
                "package.json has a start script → `{pm} run start`"
            ));
            Some(format!("{pm} run start"))
        } else if let Some(main) = &tree.package_main {
            reasons.push(format!("package.json main is {main} → `node {main}`"));
            Some(format!("node {main}"))
        } else if tree.has("server.js") {
            reasons.push("server.js → `node server.js`".into());
            Some("node server.js".into())
        } else {
            None
        };
        return Some(Detection {
            framework: format!("node ({pm})"),
            install_command: install.to_string(),
            build_command: build,
            start_command: start,
            reasons,
        });
    }
    if tree.has("requirements.txt") || tree.has("pyproject.toml") {
        let install = if tree.has("requirements.txt") {
            reasons.push("requirements.txt → pip install into a venv in the workspace".into());
            "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt"
        } else {
            reasons.push(
                "pyproject.toml → pip install of the project into a venv in the workspace".into(),
            );
            "python3 -m venv .venv && .venv/bin/pip install ."
        };
        let start = ["app.py", "main.py", "server.py"]
            .iter()
            .find(|f| tree.has(f))
            .map(|f| {
                reasons.push(format!("{f} → `.venv/bin/python {f}`"));
                format!(".venv/bin/python {f}")
            });
        return Some(Detection {
            framework: "python (pip)".into(),
            install_command: install.into(),
            build_command: "true".into(),
            start_command: start,
            reasons,
        });
    }
    if tree.has("index.html") {
        reasons.push("index.html and no package manager files → static site".into());
        return Some(Detection {
            framework: "static site".into(),
            install_command: String::new(),
            build_command: "true".into(),
            start_command: None,
            reasons,
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(files: &[&str], scripts: &[&str]) -> TreeShape {
        TreeShape {
            root_files: files.iter().map(|s| s.to_string()).collect(),
            package_scripts: scripts.iter().map(|s| s.to_string()).collect(),
            package_main: None,
        }
    }

    #[test]
    fn lockfiles_pick_the_package_manager() {
        let d = detect(&shape(
            &["package.json", "package-lock.json"],
            &["build", "start"],
        ))
        .unwrap();
        assert_eq!(d.install_command, "npm ci");
        assert_eq!(d.build_command, "npm run build");
        assert_eq!(d.start_command.as_deref(), Some("npm run start"));
        let d = detect(&shape(&["package.json", "pnpm-lock.yaml"], &[])).unwrap();
        assert_eq!(d.install_command, "pnpm install --frozen-lockfile");
        assert_eq!(d.build_command, "true");
        assert_eq!(d.start_command, None);
        let d = detect(&shape(&["package.json", "yarn.lock"], &["build"])).unwrap();
        assert_eq!(d.build_command, "yarn run build");
        let d = detect(&shape(&["package.json", "bun.lockb"], &[])).unwrap();
        assert!(d.install_command.starts_with("bun install"));
        let d = detect(&shape(&["package.json", "server.js"], &[])).unwrap();
        assert_eq!(d.install_command, "npm install");
        assert_eq!(d.start_command.as_deref(), Some("node server.js"));
    }

    #[test]
    fn python_and_static() {
        let d = detect(&shape(&["requirements.txt", "app.py"], &[])).unwrap();
        assert!(d
            .install_command
            .contains("pip install -r requirements.txt"));
        assert_eq!(d.start_command.as_deref(), Some(".venv/bin/python app.py"));
        let d = detect(&shape(&["index.html", "style.css"], &[])).unwrap();
        assert_eq!(d.framework, "static site");
        assert_eq!(d.start_command, None);
        assert!(detect(&shape(&["README.md"], &[])).is_none());
    }
}
