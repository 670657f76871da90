//! The Linux namespace driver: create, exec, connect, usage, export, destroy.

use crate::config::{DriverConfig, ExecRequest, SandboxSpec, SpecError, HOME_PATH};
use crate::egress::{self, EgressPolicy};
use crate::output::{self, OutputSink, OutputStream};
use crate::privileged::cgroup::{self, Cgroup, CgroupError, CgroupLimits};
use crate::privileged::netns::NetnsSockets;
use crate::privileged::proto::{self, ExecConfig, InitConfig};
use crate::privileged::{EXEC_SUBCOMMAND, INIT_SUBCOMMAND};
use crate::process::{pidfd_kill, pidfd_open, ExecError, ExitStatus, Process};
use std::collections::HashMap;
use std::fs;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Resource usage of a sandbox, read from its cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Current memory use, including files in its tmpfs mounts.
    pub memory_bytes: u64,
    /// Highest memory use seen, when the kernel reports it.
    pub memory_peak_bytes: Option<u64>,
    /// Processes in the sandbox, including init and the helpers.
    pub pids: u64,
    /// CPU time used, in nanoseconds, when the kernel reports it.
    pub cpu_ns: Option<u64>,
    /// Processes killed by the OOM killer so far.
    pub oom_kills: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("cgroups unusable: {0}")]
    Cgroup(#[from] CgroupError),
    #[error("helper executable {path:?} does not exist")]
    MissingHelper { path: PathBuf },
    #[error("cgroup parent {name:?} must be letters, digits, '.', '_' or '-'")]
    BadCgroupParent { name: String },
    #[error("state dir {path:?} must be an absolute path free of ',', ':' and '\\'")]
    BadStateDir { path: PathBuf },
}

#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("sandbox {id} already exists")]
    Exists { id: String },
    #[error("sandbox {id}: state directory {path:?}: {source}")]
    StateDir {
        id: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("sandbox {id}: {source}")]
    Cgroup { id: String, source: CgroupError },
    #[error("sandbox {id}: cannot start the helper: {source}")]
    Spawn { id: String, source: io::Error },
    #[error("sandbox {id}: set-up failed: {message}")]
    Setup { id: String, message: String },
    #[error("sandbox {id}: set-up did not finish within {timeout:?}")]
    SetupTimeout { id: String, timeout: Duration },
    #[error("sandbox {id}: {source}; and cleaning up failed too: {cleanup}")]
    CleanupFailed {
        id: String,
        source: Box<CreateError>,
        cleanup: Box<DestroyError>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("sandbox {id} is destroyed")]
    Destroyed { id: String },
    #[error("sandbox {id}: port {port}: {source}")]
    Io {
        id: String,
        port: u16,
        source: io::Error,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum DestroyError {
    #[error("sandbox {id}: {source}")]
    Cgroup { id: String, source: CgroupError },
    #[error("sandbox {id}: removing {path:?}: {source}")]
    StateDir {
        id: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("sandbox {id}: the helper did not exit: {source}")]
    Helper { id: String, source: io::Error },
}

/// The default sandbox driver: Linux namespaces, cgroups, overlayfs and seccomp.
#[derive(Debug, Clone)]
pub struct LinuxDriver {
    config: Arc<DriverConfig>,
    layout: cgroup::Layout,
    /// Ready-made /etc directories, one per (uid, gid, hostname), built on first use.
    etc_templates: Arc<tokio::sync::Mutex<EtcTemplates>>,
    /// Name prefix of this driver's /etc templates inside the state dir.
    etc_prefix: String,
}

/// /etc template directories by (uid, gid, hostname).
type EtcTemplates = HashMap<(u32, u32, String), PathBuf>;

/// Name prefix of every /etc template in a state dir.
pub(crate) const ETC_TEMPLATE_PREFIX: &str = ".etc-";

impl LinuxDriver {
    /// # Errors
    /// When the helper executable is missing or the cgroup controllers are not available.
    /// Call [`crate::check_support`] first for a full diagnosis.
    pub fn new(config: DriverConfig) -> Result<Self, DriverError> {
        if !config.helper_exe.is_file() {
            return Err(DriverError::MissingHelper {
                path: config.helper_exe.clone(),
            });
        }
        let parent_ok = !config.cgroup_parent.is_empty()
            && !config.cgroup_parent.starts_with('.')
            && config
                .cgroup_parent
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !parent_ok {
            return Err(DriverError::BadCgroupParent {
                name: config.cgroup_parent.clone(),
            });
        }
        // Sandbox roots live in the state dir and end up in overlayfs mount options.
        if !crate::privileged::path_is_mount_safe(&config.state_dir) {
            return Err(DriverError::BadStateDir {
                path: config.state_dir.clone(),
            });
        }
        let layout = cgroup::detect()?;
        crate::spawner::start();
        let etc_prefix = format!(
            "{ETC_TEMPLATE_PREFIX}{}-{:08x}-",
            std::process::id(),
            rand::random::<u32>()
        );
        Ok(Self {
            config: Arc::new(config),
            layout,
            etc_templates: Arc::default(),
            etc_prefix,
        })
    }

    pub(crate) fn etc_prefix(&self) -> &str {
        &self.etc_prefix
    }

    /// This driver's /etc template for `spec`, built the first time it is needed.
    async fn etc_template(&self, spec: &SandboxSpec) -> Result<PathBuf, CreateError> {
        let key = (spec.uid, spec.gid, spec.hostname.clone());
        let mut templates = self.etc_templates.lock().await;
        if let Some(dir) = templates.get(&key) {
            return Ok(dir.clone());
        }
        let dir = self.config.state_dir.join(format!(
            "{}{}-{}-{}",
            self.etc_prefix, spec.uid, spec.gid, spec.hostname
        ));
        let (build_dir, uid, gid, host) = (dir.clone(), spec.uid, spec.gid, spec.hostname.clone());
        let built = tokio::task::spawn_blocking(move || {
            let _ = fs::remove_dir_all(&build_dir);
            crate::privileged::build_etc_template(&build_dir, uid, gid, &host)
        })
        .await
        .expect("etc template task panicked");
        built.map_err(|source| CreateError::StateDir {
            id: spec.id.clone(),
            path: dir.clone(),
            source,
        })?;
        templates.insert(key, dir.clone());
        Ok(dir)
    }

    pub fn config(&self) -> &DriverConfig {
        &self.config
    }

    pub(crate) fn layout(&self) -> &cgroup::Layout {
        &self.layout
    }

    /// Builds a fresh sandbox. Its `/workspace/app` is an overlay on `spec.lower_dir`.
    ///
    /// # Errors
    /// A bad spec, an id already in use, or a failed privileged step (named in the message).
    /// Whatever was set up before the failure is torn down again.
    pub async fn create(&self, spec: SandboxSpec) -> Result<Sandbox, CreateError> {
        spec.validate()?;
        let id = spec.id.clone();
        let state_dir = self.config.state_dir.join(&id);
        let state_err = |path: &Path| {
            let (id, path) = (id.clone(), path.to_path_buf());
            move |source| CreateError::StateDir { id, path, source }
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.config.state_dir)
            .map_err(state_err(&self.config.state_dir))?;
        match fs::DirBuilder::new().mode(0o700).create(&state_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(CreateError::Exists { id });
            }
            Err(e) => return Err(state_err(&state_dir)(e)),
        }
        let etc_dir = match self.etc_template(&spec).await {
            Ok(dir) => dir,
            Err(e) => {
                let _ = fs::remove_dir_all(&state_dir);
                return Err(e);
            }
        };
        let root_dir = state_dir.join("root");
        if let Err(e) = fs::DirBuilder::new().mode(0o755).create(&root_dir) {
            let _ = fs::remove_dir_all(&state_dir);
            return Err(state_err(&root_dir)(e));
        }

        let limits = CgroupLimits {
            memory_bytes: spec.limits.memory_bytes,
            pids_max: spec.limits.pids_max,
            cpu_millis: spec.limits.cpu_millis,
        };
        let cgroup = match Cgroup::create(&self.layout, &self.config.cgroup_parent, &id, limits) {
            Ok(cg) => cg,
            Err(source) => {
                let cg = Cgroup::at(&self.layout, &self.config.cgroup_parent, &id);
                let _ = cg.remove(Duration::from_secs(1));
                let _ = fs::remove_dir_all(&state_dir);
                return Err(CreateError::Cgroup { id, source });
            }
        };

        let init = InitConfig {
            parent_pid: std::process::id() as i32,
            cgroup_procs: cgroup.procs_files(),
            root_dir: root_dir.clone(),
            lower_dir: spec.lower_dir.clone(),
            etc_dir,
            toolchain_paths: spec.toolchain_paths.clone(),
            uid: spec.uid,
            gid: spec.gid,
            hostname: spec.hostname.clone(),
            workspace_bytes: spec.limits.workspace_bytes,
            tmp_bytes: spec.limits.tmp_bytes,
            home_bytes: spec.limits.home_bytes,
            shm_bytes: spec.limits.shm_bytes,
        };
        let mut inner = Inner {
            id: id.clone(),
            spec,
            config: self.config.clone(),
            state_dir,
            cgroup,
            init_pid: 0,
            init_pidfd: None,
            mnt_ns: (0, 0),
            helper: Mutex::new(None),
            netns: Mutex::new(None),
            proxy: Mutex::new(None),
            egress_policy: Mutex::new(None),
            destroyed: AtomicBool::new(false),
        };
        match inner.start_init(&init).await {
            Ok(()) => {}
            Err(e) => return Err(fail_create(inner, e)),
        }
        let sandbox = Sandbox {
            inner: Arc::new(inner),
        };
        if let Some(egress) = sandbox.inner.spec.egress.clone() {
            let listener = match sandbox.listen(egress.proxy_port).await {
                Ok(l) => l,
                Err(e) => {
                    let err = CreateError::Setup {
                        id: id.clone(),
                        message: e.to_string(),
                    };
                    return Err(match sandbox.destroy().await {
                        Ok(()) => err,
                        Err(cleanup) => CreateError::CleanupFailed {
                            id,
                            source: Box::new(err),
                            cleanup: Box::new(cleanup),
                        },
                    });
                }
            };
            let policy = Arc::new(EgressPolicy::new(egress.allow_hosts.iter().cloned()));
            *lock(&sandbox.inner.egress_policy) = Some(policy.clone());
            let task = tokio::spawn(egress::serve(listener, policy, id.clone()));
            *lock(&sandbox.inner.proxy) = Some(task);
        }
        Ok(sandbox)
    }

    /// Removes what sandboxes of a dead slipway process left behind: their processes (if any
    /// survived), cgroups and state directories. Call it once at start-up, before creating
    /// sandboxes with this driver's state dir and cgroup parent.
    ///
    /// # Errors
    /// Never for a single leftover: failures are listed in the report.
    pub fn cleanup_leftovers(&self) -> crate::cleanup::CleanupReport {
        crate::cleanup::cleanup_leftovers(self)
    }
}

fn fail_create(inner: Inner, err: CreateError) -> CreateError {
    let id = inner.id.clone();
    match inner.destroy_blocking() {
        Ok(()) => err,
        Err(cleanup) => CreateError::CleanupFailed {
            id,
            source: Box::new(err),
            cleanup: Box::new(cleanup),
        },
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind; keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A live sandbox. Cheap to clone; every clone refers to the same sandbox. When the last clone
/// is dropped without `destroy`, the sandbox is destroyed (blocking) then.
#[derive(Debug, Clone)]
pub struct Sandbox {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    id: String,
    spec: SandboxSpec,
    config: Arc<DriverConfig>,
    state_dir: PathBuf,
    cgroup: Cgroup,
    /// Host pid of the sandbox's init (pid 1 inside).
    init_pid: i32,
    init_pidfd: Option<OwnedFd>,
    /// Device and inode of init's mount namespace, to recognise it later.
    mnt_ns: (u64, u64),
    /// The init helper (init's parent in the host pid namespace).
    helper: Mutex<Option<std::process::Child>>,
    netns: Mutex<Option<NetnsSockets>>,
    proxy: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The build egress policy while egress is open; closing it cuts every proxied connection.
    egress_policy: Mutex<Option<Arc<EgressPolicy>>>,
    destroyed: AtomicBool,
}

/// Name of the file in a sandbox's state directory that records its init.
pub(crate) const INIT_RECORD: &str = "init";

impl Inner {
    async fn start_init(&mut self, init: &InitConfig) -> Result<(), CreateError> {
        let id = self.id.clone();
        let mut cmd = Command::new(&self.config.helper_exe);
        cmd.arg(INIT_SUBCOMMAND)
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0);
        let mut child = crate::spawner::spawn(cmd)
            .await
            .map_err(|source| CreateError::Spawn {
                id: id.clone(),
                source,
            })?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        *lock(&self.helper) = Some(child);

        let config = serde_json::to_vec(init).expect("init config serializes");
        let talk = async {
            let mut stdin = tokio::process::ChildStdin::from_std(stdin.expect("piped stdin"))?;
            stdin.write_all(&config).await?;
            drop(stdin);
            let mut stdout = tokio::process::ChildStdout::from_std(stdout.expect("piped stdout"))?;
            let mut text = String::new();
            stdout.read_to_string(&mut text).await?;
            Ok::<_, io::Error>(text)
        };
        let timeout = self.config.setup_timeout;
        let text = match tokio::time::timeout(timeout, talk).await {
            Err(_) => return Err(CreateError::SetupTimeout { id, timeout }),
            Ok(Err(e)) => {
                return Err(CreateError::Setup {
                    id,
                    message: e.to_string(),
                })
            }
            Ok(Ok(text)) => text,
        };
        let status = proto::parse_status(&text);
        let (Some(pid), true) = (status.pid, status.ready) else {
            let message = status
                .error
                .unwrap_or_else(|| "the helper exited early".to_string());
            return Err(CreateError::Setup { id, message });
        };
        self.init_pid = pid;
        let setup_err = |what: &str, e: io::Error| CreateError::Setup {
            id: id.clone(),
            message: format!("{what}: {e}"),
        };
        self.init_pidfd = Some(pidfd_open(pid).map_err(|e| setup_err("pidfd_open init", e))?);
        let mnt = fs::metadata(format!("/proc/{pid}/ns/mnt"))
            .map_err(|e| setup_err("stat init mount namespace", e))?;
        self.mnt_ns = (mnt.dev(), mnt.ino());
        fs::write(
            self.state_dir.join(INIT_RECORD),
            format!("{pid} {} {}\n", mnt.dev(), mnt.ino()),
        )
        .map_err(|e| setup_err("record init", e))?;
        let netns: OwnedFd = fs::File::open(format!("/proc/{pid}/ns/net"))
            .map_err(|e| setup_err("open init network namespace", e))?
            .into();
        let sockets = NetnsSockets::start(netns, &id)
            .map_err(|e| setup_err("network namespace thread", e))?;
        *lock(&self.netns) = Some(sockets);
        Ok(())
    }

    fn destroy_blocking(&self) -> Result<(), DestroyError> {
        if self.destroyed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let id = self.id.clone();
        if let Some(task) = lock(&self.proxy).take() {
            task.abort();
        }
        lock(&self.netns).take();
        // Killing pid 1 of the pid namespace kills every process in it.
        if let Some(pidfd) = &self.init_pidfd {
            let _ = pidfd_kill(pidfd, libc::SIGKILL);
        }
        let mut first_err: Option<DestroyError> = None;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        if let Some(pidfd) = &self.init_pidfd {
            // A pidfd turns readable when its process has exited; for a pid namespace's init
            // that is after every other process of the namespace is gone.
            wait_readable(pidfd, Duration::from_secs(5));
        }
        if let Some(mut helper) = lock(&self.helper).take() {
            if self.init_pidfd.is_none() {
                // Before init existed (failed create) only the helper can be killed.
                let _ = helper.kill();
            }
            loop {
                match helper.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_micros(50));
                    }
                    Ok(None) => {
                        let _ = helper.kill();
                        let _ = helper.wait();
                        break;
                    }
                    Err(source) => {
                        first_err.get_or_insert(DestroyError::Helper {
                            id: id.clone(),
                            source,
                        });
                        break;
                    }
                }
            }
        }
        // Exec helpers live in the host pid namespace but in the sandbox's cgroup.
        let timeout = Duration::from_secs(5);
        if let Err(source) = self
            .cgroup
            .kill_all(timeout)
            .and_then(|()| self.cgroup.remove(timeout))
        {
            first_err.get_or_insert(DestroyError::Cgroup {
                id: id.clone(),
                source,
            });
        }
        if let Err((path, source)) = remove_state_dir(&self.state_dir) {
            first_err.get_or_insert(DestroyError::StateDir { id, path, source });
        }
        match first_err {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }
}

/// Waits until `fd` is readable or `timeout` passes.
fn wait_readable(fd: &OwnedFd, timeout: Duration) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let ms =
            PollTimeout::try_from(left.as_millis().min(60_000) as u32).unwrap_or(PollTimeout::ZERO);
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, ms) {
            Ok(n) if n > 0 => return true,
            Ok(_) => return false,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return false,
        }
    }
}

/// Removes a sandbox's state directory without ever recursing into its root mount point: if
/// something were still mounted there, `remove_dir` fails instead of deleting through it.
pub(crate) fn remove_state_dir(dir: &Path) -> Result<(), (PathBuf, io::Error)> {
    let root = dir.join("root");
    match fs::remove_dir(&root) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err((root, e)),
    }
    let record = dir.join(INIT_RECORD);
    match fs::remove_file(&record) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err((record, e)),
    }
    match fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err((dir.to_path_buf(), e)),
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if !self.destroyed.load(Ordering::SeqCst) {
            if let Err(e) = self.destroy_blocking() {
                tracing::warn!(sandbox = %self.id, error = %e, "destroying a dropped sandbox failed");
            }
        }
    }
}

impl Sandbox {
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// Host pid of the sandbox's init (pid 1 inside it).
    pub fn init_pid(&self) -> i32 {
        self.inner.init_pid
    }

    /// Host path through which the platform (as root) reaches the sandbox's root. Files under it
    /// are the workload's: never follow symlinks there (see `export_workspace`).
    pub fn root_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.inner.init_pid))
    }

    fn check_alive(&self) -> Result<(), ExecError> {
        if self.inner.destroyed.load(Ordering::SeqCst) {
            return Err(ExecError::Destroyed {
                id: self.inner.id.clone(),
            });
        }
        Ok(())
    }

    /// The workload's environment: defaults, then egress settings, then the request's own.
    fn environment(&self, req: &ExecRequest) -> Vec<String> {
        let spec = &self.inner.spec;
        let mut path = String::new();
        for tool in &spec.toolchain_paths {
            let bin = tool.join("bin");
            if bin.is_dir() {
                path.push_str(&bin.to_string_lossy());
                path.push(':');
            }
        }
        path.push_str("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
        let mut env: Vec<(String, String)> = vec![
            ("PATH".into(), path),
            ("HOME".into(), HOME_PATH.into()),
            ("TMPDIR".into(), "/tmp".into()),
            ("LANG".into(), "C.UTF-8".into()),
            ("USER".into(), "app".into()),
            ("LOGNAME".into(), "app".into()),
            ("HOSTNAME".into(), spec.hostname.clone()),
        ];
        let egress_open = lock(&self.inner.egress_policy)
            .as_ref()
            .is_some_and(|p| !p.is_closed());
        if let Some(egress) = spec.egress.as_ref().filter(|_| egress_open) {
            let proxy = format!("http://127.0.0.1:{}", egress.proxy_port);
            for key in [
                "HTTP_PROXY",
                "HTTPS_PROXY",
                "http_proxy",
                "https_proxy",
                "npm_config_proxy",
                "npm_config_https_proxy",
            ] {
                env.push((key.into(), proxy.clone()));
            }
            for key in ["NO_PROXY", "no_proxy"] {
                env.push((key.into(), "localhost,127.0.0.1".into()));
            }
            env.extend(egress.env.iter().cloned());
        }
        env.extend(req.env.iter().cloned());
        // Later entries win; keep one entry per name, in first-seen order.
        let mut out: Vec<(String, String)> = Vec::with_capacity(env.len());
        for (k, v) in env {
            match out.iter_mut().find(|(ok, _)| *ok == k) {
                Some(slot) => slot.1 = v,
                None => out.push((k, v)),
            }
        }
        out.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
    }

    /// Starts `req.command` as `/bin/sh -c` inside the sandbox, as the workload user, with
    /// every privilege dropped. Output lines go to `output` (bounded: a slow consumer slows
    /// the workload down); `None` discards them.
    ///
    /// # Errors
    /// A bad request, a destroyed sandbox, or a failed set-up step (named in the message).
    pub async fn spawn(
        &self,
        req: ExecRequest,
        output: Option<OutputSink>,
    ) -> Result<Process, ExecError> {
        req.validate()?;
        self.check_alive()?;
        let inner = &self.inner;
        let id = inner.id.clone();
        let cfg = ExecConfig {
            parent_pid: std::process::id() as i32,
            init_pid: inner.init_pid,
            mnt_ns: inner.mnt_ns,
            cgroup_procs: inner.cgroup.procs_files(),
            uid: inner.spec.uid,
            gid: inner.spec.gid,
            cwd: req.cwd.clone(),
            argv: vec!["/bin/sh".into(), "-c".into(), req.command.clone()],
            env: self.environment(&req),
        };
        let spawn_err = |source| ExecError::Spawn {
            id: id.clone(),
            source,
        };
        let (status_r, status_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| spawn_err(e.into()))?;
        let mut cmd = Command::new(&inner.config.helper_exe);
        cmd.arg(EXEC_SUBCOMMAND)
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let raw = status_w.as_raw_fd();
        // SAFETY: runs in the forked child before exec and only calls async-signal-safe
        // functions (dup2, fcntl); it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                if raw == proto::EXEC_STATUS_FD {
                    if libc::fcntl(raw, libc::F_SETFD, 0) == -1 {
                        return Err(io::Error::last_os_error());
                    }
                } else if libc::dup2(raw, proto::EXEC_STATUS_FD) == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let oom_before = inner.cgroup.oom_kills();
        let pids_hits_before = inner.cgroup.pids_limit_hits();
        let mut child = crate::spawner::spawn(cmd).await.map_err(spawn_err)?;
        drop(status_w);
        let helper_pidfd = match pidfd_open(child.id() as i32) {
            Ok(fd) => fd,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(spawn_err(e));
            }
        };
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");

        let config = serde_json::to_vec(&cfg).expect("exec config serializes");
        let talk = async {
            let mut stdin = tokio::process::ChildStdin::from_std(stdin)?;
            stdin.write_all(&config).await?;
            drop(stdin);
            let mut status = tokio::net::unix::pipe::Receiver::from_owned_fd(status_r)?;
            let mut text = String::new();
            status.read_to_string(&mut text).await?;
            Ok::<_, io::Error>(text)
        };
        let timeout = inner.config.setup_timeout;
        let outcome = tokio::time::timeout(timeout, talk).await;
        let status = match outcome {
            Ok(Ok(text)) => proto::parse_status(&text),
            Ok(Err(e)) => proto::Status {
                error: Some(e.to_string()),
                ..Default::default()
            },
            Err(_) => proto::Status {
                error: Some(format!("did not start within {timeout:?}")),
                ..Default::default()
            },
        };
        let pid = match (status.pid, status.error) {
            (Some(pid), None) => pid,
            (_, error) => {
                let _ = pidfd_kill(&helper_pidfd, libc::SIGKILL);
                let _ = child.wait();
                let message = error.unwrap_or_else(|| "the helper exited early".to_string());
                return Err(ExecError::Setup { id, message });
            }
        };

        let max_line = inner.config.max_line_bytes;
        let pumps = vec![
            tokio::spawn(output::pump(
                tokio::process::ChildStdout::from_std(stdout).map_err(spawn_err)?,
                OutputStream::Stdout,
                output.clone(),
                max_line,
            )),
            tokio::spawn(output::pump(
                tokio::process::ChildStderr::from_std(stderr).map_err(spawn_err)?,
                OutputStream::Stderr,
                output,
                max_line,
            )),
        ];
        Process::new(
            id.clone(),
            pid,
            child,
            helper_pidfd,
            inner.cgroup.clone(),
            oom_before,
            pids_hits_before,
            req.timeout,
            req.kill_grace,
            pumps,
        )
        .map_err(spawn_err)
    }

    /// Runs a command to its end (or its timeout): `spawn` then `wait`.
    ///
    /// # Errors
    /// As `spawn`; a command that fails is an `Ok` with a non-success status.
    pub async fn exec(
        &self,
        req: ExecRequest,
        output: Option<OutputSink>,
    ) -> Result<ExitStatus, ExecError> {
        let mut process = self.spawn(req, output).await?;
        process.wait().await
    }

    fn net_err(&self, port: u16) -> impl FnOnce(io::Error) -> NetError + '_ {
        move |source| NetError::Io {
            id: self.inner.id.clone(),
            port,
            source,
        }
    }

    async fn netns_socket(&self, port: u16) -> Result<socket2::Socket, NetError> {
        let request = {
            let guard = lock(&self.inner.netns);
            let sockets = guard.as_ref().ok_or_else(|| NetError::Destroyed {
                id: self.inner.id.clone(),
            })?;
            sockets.request_socket().map_err(self.net_err(port))?
        };
        request
            .await
            .map_err(|_| NetError::Destroyed {
                id: self.inner.id.clone(),
            })?
            .map_err(self.net_err(port))
    }

    /// Connects to `127.0.0.1:port` inside the sandbox's network namespace.
    ///
    /// # Errors
    /// The sandbox is destroyed, or nothing accepts on that port.
    pub async fn connect(&self, port: u16) -> Result<TcpStream, NetError> {
        let socket = self.netns_socket(port).await?;
        let socket = TcpSocket::from_std_stream(socket.into());
        socket
            .connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
            .await
            .map_err(self.net_err(port))
    }

    /// Listens on `127.0.0.1:port` inside the sandbox's network namespace, served from this
    /// process (the build egress proxy uses it).
    ///
    /// # Errors
    /// The sandbox is destroyed, or the port is taken.
    pub async fn listen(&self, port: u16) -> Result<TcpListener, NetError> {
        let socket = self.netns_socket(port).await?;
        socket.set_reuse_address(true).map_err(self.net_err(port))?;
        socket
            .bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)).into())
            .map_err(self.net_err(port))?;
        socket.listen(1024).map_err(self.net_err(port))?;
        TcpListener::from_std(socket.into()).map_err(self.net_err(port))
    }

    /// Closes build egress for good: the proxy on the sandbox's loopback stops listening, every
    /// connection it holds is cut, and later commands get no proxy settings. The engine calls it
    /// when the build is over, so a running app has no way out. Idempotent.
    pub fn close_egress(&self) {
        if let Some(policy) = lock(&self.inner.egress_policy).take() {
            policy.close();
        }
        if let Some(task) = lock(&self.inner.proxy).take() {
            task.abort();
        }
    }

    /// Memory, processes and CPU used so far, from the sandbox's cgroup.
    ///
    /// # Errors
    /// When the cgroup files cannot be read (e.g. after destroy).
    pub fn usage(&self) -> Result<Usage, CgroupError> {
        self.inner.cgroup.usage()
    }

    /// Copies the merged `/workspace/app` (snapshot plus everything the commands changed) into
    /// `dest`, which must not exist. Reads through the sandbox's root without following any
    /// symlink the workload made; symlinks are copied as symlinks.
    ///
    /// # Errors
    /// See [`crate::export::ExportError`].
    pub async fn export_workspace(
        &self,
        dest: &Path,
    ) -> Result<crate::export::ExportSummary, crate::export::ExportError> {
        let src = self.root_path().join(crate::privileged::WORKSPACE_REL);
        let dest = dest.to_path_buf();
        let id = self.inner.id.clone();
        tokio::task::spawn_blocking(move || crate::export::copy_tree(&id, &src, &dest))
            .await
            .expect("export task panicked")
    }

    /// Host path of the workspace's upper layer (files the commands created or changed; deleted
    /// ones appear as overlayfs whiteouts), readable by root while the sandbox is alive.
    pub fn upper_layer_path(&self) -> PathBuf {
        self.root_path()
            .join(crate::privileged::LAYERS_REL)
            .join("upper")
    }

    /// Kills every process of the sandbox, then removes its cgroup and state directory. Mounts
    /// vanish with the sandbox's mount namespace. Idempotent.
    ///
    /// # Errors
    /// When a cgroup or directory could not be removed (`cleanup_leftovers` retries later).
    pub async fn destroy(&self) -> Result<(), DestroyError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.destroy_blocking())
            .await
            .expect("destroy task panicked")
    }
}
