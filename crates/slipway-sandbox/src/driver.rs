//! The Linux namespace driver: create, exec, connect, usage, export, destroy.

use crate::config::{DriverConfig, ExecRequest, SandboxSpec, SpecError, HOME_PATH};
use crate::egress::{self, EgressPolicy};
use crate::output::{self, OutputSink, OutputStream};
use crate::privileged::cgroup::{self, Cgroup, CgroupError, CgroupLimits};
use crate::privileged::netns::NetnsSockets;
use crate::privileged::proto::{self, ForkRequest, InitConfig, Reply, Request};
use crate::privileged::INIT_SUBCOMMAND;
use crate::process::{pidfd_kill, pidfd_open, Control, ExecError, ExitStatus, Process};
use crate::spawner::HelperChild;
use std::collections::HashMap;
use std::fs;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncReadExt;
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
    /// A sandbox built ahead of time (see `Spare`).
    spare: Arc<SpareSlot>,
    /// `.spare-<pid>-<random>-`: name prefix of this driver's spares (state dir and cgroup).
    spare_prefix: String,
    spare_next: Arc<std::sync::atomic::AtomicU64>,
    state_dirs: Arc<StateDirs>,
    /// Declared after `spare`: the spare's cgroup is gone before the parents are removed.
    _cgroup_parents: Arc<CgroupParents>,
}

/// The driver's parent cgroups (one per hierarchy), removed when the last clone of the driver
/// is dropped, if they are empty by then (`rmdir` refuses a parent that still holds a
/// sandbox's cgroup), and if `DriverConfig::remove_cgroup_parent_on_drop` asked for it. A
/// server that stopped cleanly leaves no cgroup behind; after a crash, the next start-up's
/// cleanup removes what the dead server left.
#[derive(Debug)]
struct CgroupParents(Vec<PathBuf>);

impl Drop for CgroupParents {
    fn drop(&mut self) {
        for dir in &self.0 {
            let _ = fs::remove_dir(dir);
        }
    }
}

/// How long after a `create` the next spare is started at the latest (it starts at once when
/// the new sandbox is destroyed sooner). Building a spare takes a few milliseconds of CPU and
/// contends for the kernel's mount, cgroup and network-namespace locks; a sandbox's first
/// command (or a whole short life) should not share the machine with it.
const REFILL_DELAY: Duration = Duration::from_millis(20);

/// Name prefix of a spare's state directory and cgroup until it is assigned.
pub(crate) const SPARE_PREFIX: &str = ".spare-";

/// Name prefix of the empty directories a state dir keeps for reuse.
pub(crate) const FREE_DIR_PREFIX: &str = ".free-";

/// Per-sandbox state directories, recycled. Creating and deleting a directory per sandbox is
/// expensive on some filesystems (ext4 looks for an inode that was not freed recently, which
/// under steady churn means scanning inode tables). A destroyed sandbox's empty directory is
/// renamed to a free name instead, and the next sandbox's is renamed from it: a rename
/// allocates nothing. `renameat2(RENAME_NOREPLACE)` keeps the claim of an id atomic.
#[derive(Debug)]
pub(crate) struct StateDirs {
    root: PathBuf,
    /// `.free-<pid>-<random>-`: this driver's free directories.
    prefix: String,
    next: std::sync::atomic::AtomicU64,
    free: Mutex<Vec<PathBuf>>,
}

fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
    };
    let (from, to) = (c(from)?, c(to)?);
    // SAFETY: renameat2 reads two NUL-terminated paths we own.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl StateDirs {
    fn new(root: PathBuf) -> Self {
        Self {
            root,
            prefix: format!(
                "{FREE_DIR_PREFIX}{}-{:08x}-",
                std::process::id(),
                rand::random::<u32>()
            ),
            next: std::sync::atomic::AtomicU64::new(0),
            free: Mutex::default(),
        }
    }

    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Makes the empty directory `dir` (mode 0700): a free one renamed, or a new one.
    /// `AlreadyExists` when the id is taken.
    fn claim(&self, dir: &Path) -> io::Result<()> {
        while let Some(free) = lock(&self.free).pop() {
            match rename_noreplace(&free, dir) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    lock(&self.free).push(free);
                    return Err(e);
                }
                // Gone, or renames unsupported here: do without it.
                Err(_) => {
                    let _ = fs::remove_dir(&free);
                }
            }
        }
        fs::DirBuilder::new().mode(0o700).create(dir)
    }

    /// Takes back a destroyed sandbox's directory: renamed to a free name when it is empty,
    /// else removed (`rmdir` only, see `remove_state_dir`).
    fn release(&self, dir: &Path) -> Result<(), (PathBuf, io::Error)> {
        let empty = fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_none());
        if empty {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            let free = self.root.join(format!("{}{n}", self.prefix));
            if rename_noreplace(dir, &free).is_ok() {
                lock(&self.free).push(free);
                return Ok(());
            }
        }
        remove_state_dir(dir)
    }
}

impl Drop for StateDirs {
    fn drop(&mut self) {
        for dir in lock(&self.free).drain(..) {
            let _ = fs::remove_dir(dir);
        }
    }
}

/// What a spare sandbox was built for. A spare is only used for a spec with the same key;
/// any other is discarded (a spare made before the configuration changed is never used).
/// Everything else about a sandbox (id, snapshot, limits) is applied when it is assigned.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SpareKey {
    uid: u32,
    gid: u32,
    hostname: String,
    toolchain_paths: Vec<PathBuf>,
    tmp_bytes: u64,
    home_bytes: u64,
    shm_bytes: u64,
}

impl SpareKey {
    fn of(spec: &SandboxSpec) -> Self {
        Self {
            uid: spec.uid,
            gid: spec.gid,
            hostname: spec.hostname.clone(),
            toolchain_paths: spec.toolchain_paths.clone(),
            tmp_bytes: spec.limits.tmp_bytes,
            home_bytes: spec.limits.home_bytes,
            shm_bytes: spec.limits.shm_bytes,
        }
    }
}

/// A pre-built sandbox: its helper has made the namespaces, its init has built the whole root
/// but the workspace, pivoted into it and sits in a cgroup of its own (named `.spare-…`, no
/// limits yet) waiting for `Assign`. It becomes exactly one sandbox (`LinuxDriver::assign`);
/// dropped unused it is destroyed like any sandbox.
#[derive(Debug)]
struct Spare {
    key: SpareKey,
    /// The CPU bandwidth already written to its cgroup (that of the spec it was built after).
    cpu_millis: Option<u64>,
    inner: Inner,
}

impl Spare {
    /// Init is still there and has said nothing since `ready` (it only speaks on error or by
    /// hanging up).
    fn alive(&self) -> bool {
        let exited = self
            .inner
            .init_pidfd
            .as_ref()
            .is_none_or(|fd| wait_readable(fd, Duration::ZERO));
        let quiet = self.inner.control.as_ref().is_some_and(|c| !c.has_input());
        !exited && quiet
    }
}

/// What became of the spare when `LinuxDriver::assign` failed.
#[derive(Debug)]
enum Fate {
    /// Nothing was sent to it: it can serve another sandbox.
    Untouched(Box<Spare>),
    /// Its init was gone before it mounted the workspace; destroyed.
    Died,
    /// Destroyed after a failure that was not the spare's.
    Destroyed,
}

/// The driver's spare and what is known about it.
#[derive(Debug, Default)]
struct SpareSlot {
    ready: Mutex<Option<Spare>>,
    /// The key of the spare being built in the background, if one is.
    building: Mutex<Option<SpareKey>>,
    /// A build scheduled but not started (`refill_spare_later`): its number, key and spec.
    pending: Mutex<Option<(u64, SpareKey, SandboxSpec)>>,
    next_pending: std::sync::atomic::AtomicU64,
    /// Woken when a background build ends (with or without a spare).
    built: tokio::sync::Notify,
    used: std::sync::atomic::AtomicU64,
    built_on_demand: std::sync::atomic::AtomicU64,
    discarded: std::sync::atomic::AtomicU64,
}

/// How a driver's spares have fared (for benchmarks and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SpareStats {
    /// Sandboxes made from a spare that was ready (or finished while `create` waited for it).
    pub used: u64,
    /// Sandboxes whose spare had to be built inside `create` (none ready or being built for
    /// the same configuration).
    pub built_on_demand: u64,
    /// Spares thrown away unused: built for another configuration, or dead.
    pub discarded: u64,
    /// Host pid of the ready spare's init, if one is waiting.
    pub ready_init_pid: Option<i32>,
}

/// Starts an init helper with a fresh control socket on its descriptor 3. It waits for its
/// config there.
async fn spawn_helper(helper_exe: &Path) -> io::Result<(HelperChild, OwnedFd)> {
    let (ours, theirs) = proto::socket_pair()?;
    // Replies about commands carry their pid as credentials, translated by the kernel.
    proto::set_sockopt(ours.as_fd(), libc::SOL_SOCKET, libc::SO_PASSCRED, 1)?;
    // Room for the largest request (a command's argv and environment).
    let sndbuf = (proto::MAX_MESSAGE + (64 << 10)) as i32;
    if proto::set_sockopt(ours.as_fd(), libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, sndbuf).is_err() {
        let _ = proto::set_sockopt(ours.as_fd(), libc::SOL_SOCKET, libc::SO_SNDBUF, sndbuf);
    }
    let child = crate::spawner::spawn_helper(helper_exe, INIT_SUBCOMMAND, theirs).await?;
    Ok((child, ours))
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
        let cgroup_parents = Arc::new(CgroupParents(if config.remove_cgroup_parent_on_drop {
            Cgroup::parent_paths(&layout, &config.cgroup_parent)
        } else {
            Vec::new()
        }));
        crate::spawner::start();
        let config_state_dir = config.state_dir.clone();
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
            spare: Arc::default(),
            spare_prefix: format!(
                "{SPARE_PREFIX}{}-{:08x}-",
                std::process::id(),
                rand::random::<u32>()
            ),
            spare_next: Arc::default(),
            state_dirs: Arc::new(StateDirs::new(config_state_dir)),
            _cgroup_parents: cgroup_parents,
        })
    }

    pub(crate) fn etc_prefix(&self) -> &str {
        &self.etc_prefix
    }

    pub(crate) fn free_dir_prefix(&self) -> &str {
        self.state_dirs.prefix()
    }

    pub(crate) fn spare_prefix(&self) -> &str {
        &self.spare_prefix
    }

    /// How this driver's spares have fared so far.
    pub fn spare_stats(&self) -> SpareStats {
        let slot = &self.spare;
        SpareStats {
            used: slot.used.load(Ordering::Relaxed),
            built_on_demand: slot.built_on_demand.load(Ordering::Relaxed),
            discarded: slot.discarded.load(Ordering::Relaxed),
            ready_init_pid: lock(&slot.ready).as_ref().map(|s| s.inner.init_pid),
        }
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
        let state_root = &self.config.state_dir;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_root)
            .map_err(|source| CreateError::StateDir {
                id: id.clone(),
                path: state_root.clone(),
                source,
            })?;
        // A quick refusal; the atomic claim of the id is the rename in `assign`.
        if fs::symlink_metadata(state_root.join(&id)).is_ok() {
            return Err(CreateError::Exists { id });
        }
        let key = SpareKey::of(&spec);
        let (mut taken, was_ready) = self.take_spare(&key).await;
        // No spare was waiting: creates are coming faster than spares are built, so the next
        // one starts at once rather than after `REFILL_DELAY`.
        let burst = !was_ready;
        let mut retried = false;
        let inner = loop {
            let from_spare = taken.is_some();
            let spare = match taken.take() {
                Some(spare) => spare,
                None => {
                    self.spare.built_on_demand.fetch_add(1, Ordering::Relaxed);
                    self.build_spare(&key, &spec, &id).await?
                }
            };
            let assigned = self.assign(spare, spec.clone()).await;
            match assigned {
                Ok(inner) => {
                    if from_spare {
                        self.spare.used.fetch_add(1, Ordering::Relaxed);
                    }
                    // The spare is used up: the next one is built in the background, for
                    // the configuration just asked for, once this sandbox is past its first
                    // moments (see `REFILL_DELAY`), or at once in a burst of creates.
                    if burst {
                        self.refill_spare(&key, &spec);
                    } else {
                        self.refill_spare_later(&key, &spec, inner.gone.clone());
                    }
                    break inner;
                }
                Err((err, Fate::Untouched(spare))) => {
                    self.put_back(*spare);
                    return Err(err);
                }
                // A ready spare that died before it could be used (killed from outside, or
                // its init failed): it is gone; build one for this sandbox instead, once.
                Err((_, Fate::Died)) if from_spare && !retried => {
                    self.spare.discarded.fetch_add(1, Ordering::Relaxed);
                    retried = true;
                }
                Err((err, _)) => {
                    self.refill_spare(&key, &spec);
                    return Err(err);
                }
            }
        };
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

    /// Takes the ready spare if it was built for `key` and is alive; a spare built for
    /// another configuration, or dead, is discarded. When a spare for `key` is being built (or
    /// scheduled: then it is started now), waits for it rather than building a second one.
    /// Also says whether a usable spare was ready at once.
    async fn take_spare(&self, key: &SpareKey) -> (Option<Spare>, bool) {
        let slot = &self.spare;
        let deadline = tokio::time::Instant::now() + self.config.setup_timeout;
        let mut at_once = true;
        loop {
            let notified = slot.built.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(spare) = lock(&slot.ready).take() {
                if spare.key == *key && spare.alive() {
                    return (Some(spare), at_once);
                }
                self.discard(spare);
            }
            at_once = false;
            self.start_pending(key);
            if lock(&slot.building).as_ref() != Some(key) {
                return (None, false);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return (None, false);
            }
        }
    }

    /// Destroys an unused spare, off the caller's path.
    fn discard(&self, spare: Spare) {
        self.spare.discarded.fetch_add(1, Ordering::Relaxed);
        tokio::task::spawn_blocking(move || drop(spare));
    }

    /// Puts back a spare that `assign` did not touch (the id was taken).
    fn put_back(&self, spare: Spare) {
        let mut ready = lock(&self.spare.ready);
        if ready.is_none() && spare.alive() {
            *ready = Some(spare);
        } else {
            drop(ready);
            self.discard(spare);
        }
    }

    /// Starts building the next spare when `gone` is notified (the sandbox that used the last
    /// one was destroyed) or after `REFILL_DELAY`, whichever comes first.
    fn refill_spare_later(
        &self,
        key: &SpareKey,
        spec: &SandboxSpec,
        gone: Arc<tokio::sync::Notify>,
    ) {
        let slot = &self.spare;
        let token = slot.next_pending.fetch_add(1, Ordering::Relaxed);
        *lock(&slot.pending) = Some((token, key.clone(), spec.clone()));
        let driver = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = gone.notified() => {}
                () = tokio::time::sleep(REFILL_DELAY) => {}
            }
            // Unless a `create` has started it already (or a later schedule replaced it).
            let mine = {
                let mut pending = lock(&driver.spare.pending);
                match pending.as_ref() {
                    Some((t, ..)) if *t == token => pending.take(),
                    _ => None,
                }
            };
            if let Some((_, key, spec)) = mine {
                driver.refill_spare(&key, &spec);
            }
        });
    }

    /// Starts the scheduled build now if it is for `key` (a `create` is waiting for it).
    fn start_pending(&self, key: &SpareKey) {
        let started = {
            let mut pending = lock(&self.spare.pending);
            match pending.as_ref() {
                Some((_, k, _)) if k == key => pending.take(),
                _ => None,
            }
        };
        if let Some((_, key, spec)) = started {
            self.refill_spare(&key, &spec);
        }
    }

    /// Starts building a spare for `key` in the background, unless one is being built or one
    /// for `key` is ready.
    fn refill_spare(&self, key: &SpareKey, spec: &SandboxSpec) {
        if lock(&self.spare.ready)
            .as_ref()
            .is_some_and(|s| s.key == *key)
        {
            return;
        }
        {
            let mut building = lock(&self.spare.building);
            if building.is_some() {
                return;
            }
            *building = Some(key.clone());
        }
        let (driver, key, spec) = (self.clone(), key.clone(), spec.clone());
        tokio::spawn(async move {
            let built = driver.build_spare(&key, &spec, "(spare)").await;
            let old = match built {
                Ok(spare) => lock(&driver.spare.ready).replace(spare),
                Err(e) => {
                    tracing::warn!(error = %e, "building a spare sandbox failed");
                    None
                }
            };
            *lock(&driver.spare.building) = None;
            driver.spare.built.notify_waiters();
            if let Some(old) = old {
                driver.discard(old);
            }
        });
    }

    /// Builds a spare for `key`: state directory and cgroup under a `.spare-…` name, the
    /// helper's namespaces, init's root. `err_id` names the sandbox in errors.
    async fn build_spare(
        &self,
        key: &SpareKey,
        spec: &SandboxSpec,
        err_id: &str,
    ) -> Result<Spare, CreateError> {
        let n = self.spare_next.fetch_add(1, Ordering::Relaxed);
        let name = format!("{}{n}", self.spare_prefix);
        let root_dir = self.config.state_dir.join(&name);
        self.state_dirs
            .claim(&root_dir)
            .map_err(|source| CreateError::StateDir {
                id: err_id.to_string(),
                path: root_dir.clone(),
                source,
            })?;
        // From here on, dropping `inner` (an error, or this future cancelled) destroys
        // whatever exists of the spare.
        let mut inner = Inner {
            id: name.clone(),
            spec: spec.clone(),
            config: self.config.clone(),
            state_dir: root_dir.clone(),
            state_dirs: self.state_dirs.clone(),
            cgroup: Cgroup::at(&self.layout, &self.config.cgroup_parent, &name),
            init_pid: 0,
            init_pidfd: None,
            helper: Mutex::new(None),
            control: None,
            netns: Mutex::new(Netns::Gone),
            proxy: Mutex::new(None),
            egress_policy: Mutex::new(None),
            destroyed: AtomicBool::new(false),
            gone: Arc::default(),
        };
        let etc_dir = match self.etc_template(spec).await {
            Ok(dir) => dir,
            Err(e) => return Err(fail_create(inner, e)),
        };
        let cgroup_parents = match Cgroup::parent_dirs(&self.layout, &self.config.cgroup_parent) {
            Ok(dirs) => dirs,
            Err(source) => {
                let id = err_id.to_string();
                return Err(fail_create(inner, CreateError::Cgroup { id, source }));
            }
        };
        // The state directory itself is the root's mount point (in init's mount namespace
        // only; on the host it stays an empty directory).
        let init = InitConfig {
            parent_pid: std::process::id() as i32,
            cgroup_parents,
            cgroup_name: name,
            root_dir,
            etc_dir,
            toolchain_paths: key.toolchain_paths.clone(),
            uid: key.uid,
            gid: key.gid,
            hostname: key.hostname.clone(),
            tmp_bytes: key.tmp_bytes,
            home_bytes: key.home_bytes,
            shm_bytes: key.shm_bytes,
        };
        let cpu_millis = spec.limits.cpu_millis;
        match inner.start_init(&init, cpu_millis, err_id).await {
            Ok(()) => Ok(Spare {
                key: key.clone(),
                cpu_millis,
                inner,
            }),
            Err(e) => Err(fail_create(inner, e)),
        }
    }

    /// Makes `spare` sandbox `spec.id`: claims the id (the spare's state directory renamed),
    /// sends init the lower dir to mount the workspace over, renames the cgroup (v1) and
    /// writes the limits meanwhile. On an error before anything was sent, the spare comes back
    /// untouched.
    async fn assign(&self, spare: Spare, spec: SandboxSpec) -> Result<Inner, (CreateError, Fate)> {
        let id = spec.id.clone();
        let lower = match crate::privileged::detached_tree(&spec.lower_dir) {
            Ok(fd) => fd,
            Err(e) => {
                let message = format!("open lower dir {}: {e}", spec.lower_dir.display());
                return Err((
                    CreateError::Setup { id, message },
                    Fate::Untouched(Box::new(spare)),
                ));
            }
        };
        let state_dir = self.config.state_dir.join(&id);
        match rename_noreplace(&spare.inner.state_dir, &state_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err((CreateError::Exists { id }, Fate::Untouched(Box::new(spare))));
            }
            Err(source) => {
                let path = state_dir.clone();
                return Err((
                    CreateError::StateDir { id, path, source },
                    Fate::Untouched(Box::new(spare)),
                ));
            }
        }
        let Spare {
            mut inner,
            cpu_millis: spare_cpu,
            ..
        } = spare;
        inner.id = id.clone();
        inner.state_dir = state_dir;
        let limits = CgroupLimits {
            memory_bytes: spec.limits.memory_bytes,
            pids_max: spec.limits.pids_max,
            cpu_millis: spec.limits.cpu_millis,
        };
        let assign = proto::Assign {
            workspace_bytes: spec.limits.workspace_bytes,
        };
        inner.spec = spec;
        let control = inner
            .control
            .clone()
            .expect("a spare has its control socket");
        let data = serde_json::to_vec(&assign).expect("assign serializes");
        if let Err(source) = control.send(&data, &[lower.as_raw_fd()]).await {
            let err = CreateError::Spawn { id, source };
            return Err((fail_create(inner, err), Fate::Died));
        }
        drop(lower);
        // While init mounts the workspace: the cgroup gets the sandbox's name (v1; v2 cannot
        // rename, the cgroup keeps its spare name) and its limits, before any command runs.
        let named = inner.cgroup.rename(&id).map(drop);
        let cpu = || match limits.cpu_millis == spare_cpu {
            true => Ok(()),
            false => inner.cgroup.write_cpu(limits.cpu_millis),
        };
        let written = named
            .and_then(|()| inner.cgroup.write_memory_pids(limits))
            .and_then(|()| cpu());
        if let Err(source) = written {
            let err = CreateError::Cgroup { id, source };
            return Err((fail_create(inner, err), Fate::Destroyed));
        }
        let talk = async {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let packet = control.recv(&mut buf).await?;
                if packet.len == 0 {
                    return Err(io::Error::other("the sandbox's init exited early"));
                }
                match std::str::from_utf8(&buf[..packet.len])
                    .ok()
                    .and_then(proto::parse_reply)
                {
                    Some(Reply::Assigned) => return Ok::<_, io::Error>(Ok(())),
                    Some(Reply::Error(message)) => return Ok(Err(message)),
                    _ => {}
                }
            }
        };
        let timeout = self.config.setup_timeout;
        let result = match tokio::time::timeout(timeout, talk).await {
            Err(_) => Err((
                CreateError::SetupTimeout {
                    id: id.clone(),
                    timeout,
                },
                Fate::Destroyed,
            )),
            // The socket hung up or failed: init is gone.
            Ok(Err(e)) => Err((
                CreateError::Setup {
                    id: id.clone(),
                    message: e.to_string(),
                },
                Fate::Died,
            )),
            Ok(Ok(Err(message))) => Err((
                CreateError::Setup {
                    id: id.clone(),
                    message,
                },
                Fate::Destroyed,
            )),
            Ok(Ok(Ok(()))) => Ok(()),
        };
        if let Err((e, fate)) = result {
            return Err((fail_create(inner, e), fate));
        }
        control.start_reader();
        Ok(inner)
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
    state_dirs: Arc<StateDirs>,
    cgroup: Cgroup,
    /// Host pid of the sandbox's init (pid 1 inside).
    init_pid: i32,
    init_pidfd: Option<OwnedFd>,
    /// The init helper (init's parent in the host pid namespace).
    helper: Mutex<Option<HelperChild>>,
    /// The control socket to init, which starts every command.
    control: Option<Arc<Control>>,
    netns: Mutex<Netns>,
    proxy: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The build egress policy while egress is open; closing it cuts every proxied connection.
    egress_policy: Mutex<Option<Arc<EgressPolicy>>>,
    destroyed: AtomicBool,
    /// Notified (one stored permit) when the sandbox is destroyed.
    gone: Arc<tokio::sync::Notify>,
}

/// The sandbox's network namespace, as far as the platform uses it. The socket thread is
/// started on the first `connect` or `listen` (many sandboxes, e.g. builds, never need it).
#[derive(Debug)]
enum Netns {
    /// The namespace (an open `/proc/<init>/ns/net`), no thread yet.
    Idle(OwnedFd),
    Running(NetnsSockets),
    Gone,
}

/// Name of the file in which earlier versions recorded a sandbox's init (`<pid> <mnt-ns dev>
/// <mnt-ns inode>`); start-up cleanup still honours it. Init is in the sandbox's cgroup, which
/// is the record now.
pub(crate) const INIT_RECORD: &str = "init";

impl Inner {
    /// Starts a helper for a spare, sends it `init`, creates the spare's cgroup (no limits)
    /// while the helper makes the namespaces and init builds the root, and waits for `pid`
    /// and `ready`. `err_id` names the sandbox in errors.
    async fn start_init(
        &mut self,
        init: &InitConfig,
        cpu_millis: Option<u64>,
        err_id: &str,
    ) -> Result<(), CreateError> {
        let id = err_id.to_string();
        let spawn_err = |source| CreateError::Spawn {
            id: id.clone(),
            source,
        };
        let config = serde_json::to_vec(init).expect("init config serializes");
        let (child, ours) = spawn_helper(&self.config.helper_exe)
            .await
            .map_err(spawn_err)?;
        // Owned here at once, so that an error below still reaps it (destroy).
        *lock(&self.helper) = Some(child);
        proto::send_packet(ours.as_fd(), &config, &[], None, 0).map_err(spawn_err)?;
        // The helper makes the namespaces and init builds the root meanwhile.
        let cpu = |cg: &Cgroup| match cpu_millis {
            Some(_) => cg.write_cpu(cpu_millis),
            None => Ok(()),
        };
        self.cgroup
            .make_dirs()
            .and_then(|()| cpu(&self.cgroup))
            .map_err(|source| CreateError::Cgroup {
                id: id.clone(),
                source,
            })?;
        proto::send_packet(ours.as_fd(), proto::MSG_CGROUPS.as_bytes(), &[], None, 0)
            .map_err(spawn_err)?;
        let control = Arc::new(Control::new(ours).map_err(spawn_err)?);
        // Owned at once too: dropping it tells init to exit.
        self.control = Some(control.clone());

        let talk = async {
            let mut buf = vec![0u8; 64 << 10];
            let (mut pid, mut ready) = (None, false);
            loop {
                let packet = control.recv(&mut buf).await?;
                if packet.len == 0 {
                    return Ok(Err("the helper exited early".to_string()));
                }
                match std::str::from_utf8(&buf[..packet.len])
                    .ok()
                    .and_then(proto::parse_reply)
                {
                    Some(Reply::Pid(p)) => pid = Some(p),
                    Some(Reply::Ready) => ready = true,
                    Some(Reply::Error(message)) => return Ok(Err(message)),
                    _ => {}
                }
                if let (Some(pid), true) = (pid, ready) {
                    return Ok::<_, io::Error>(Ok(pid));
                }
            }
        };
        let timeout = self.config.setup_timeout;
        let pid = match tokio::time::timeout(timeout, talk).await {
            Err(_) => return Err(CreateError::SetupTimeout { id, timeout }),
            Ok(Err(e)) => {
                return Err(CreateError::Setup {
                    id,
                    message: e.to_string(),
                })
            }
            Ok(Ok(Err(message))) => return Err(CreateError::Setup { id, message }),
            Ok(Ok(Ok(pid))) => pid,
        };
        self.init_pid = pid;
        let setup_err = |what: &str, e: io::Error| CreateError::Setup {
            id: id.clone(),
            message: format!("{what}: {e}"),
        };
        self.init_pidfd = Some(pidfd_open(pid).map_err(|e| setup_err("pidfd_open init", e))?);
        let netns: OwnedFd = fs::File::open(format!("/proc/{pid}/ns/net"))
            .map_err(|e| setup_err("open init network namespace", e))?
            .into();
        *lock(&self.netns) = Netns::Idle(netns);
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
        *lock(&self.netns) = Netns::Gone;
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
            // The helper exits as soon as init has; wait on its pidfd rather than polling.
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let exited = wait_readable(helper.pidfd(), left);
            if !exited {
                let _ = helper.kill();
            }
            if let Err(source) = helper.wait() {
                first_err.get_or_insert(DestroyError::Helper {
                    id: id.clone(),
                    source,
                });
            }
        }
        // Nothing should be left in the cgroup once init is gone; make sure of it.
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
        if let Err((path, source)) = self.state_dirs.release(&self.state_dir) {
            first_err.get_or_insert(DestroyError::StateDir { id, path, source });
        }
        // Only now may the next spare be built (it would compete with the teardown).
        self.gone.notify_one();
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
            env.extend(crate::egress::proxy_env(egress.proxy_port));
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
        let setup_err = |message: String| ExecError::Setup {
            id: id.clone(),
            message,
        };
        let spawn_err = |source| ExecError::Spawn {
            id: id.clone(),
            source,
        };
        let control = inner
            .control
            .clone()
            .ok_or_else(|| ExecError::Destroyed { id: id.clone() })?;
        let registered = control
            .register()
            .ok_or_else(|| setup_err("the sandbox's init is gone".into()))?;
        let command = registered.id;
        let request = Request::Exec(ForkRequest {
            id: command,
            cwd: req.cwd.clone(),
            argv: vec!["/bin/sh".into(), "-c".into(), req.command.clone()],
            env: self.environment(&req),
        });
        let data = serde_json::to_vec(&request).expect("exec request serializes");
        if data.len() > proto::MAX_MESSAGE {
            control.forget(command);
            return Err(setup_err(format!(
                "the command and its environment take {} bytes, more than the {} allowed",
                data.len(),
                proto::MAX_MESSAGE
            )));
        }
        // Started (with the command's pid) comes from init; the status pipe reaches
        // end-of-file when the command's execve succeeded, or carries the failed step.
        let pipes = (|| {
            let flags = nix::fcntl::OFlag::O_CLOEXEC;
            Ok::<_, nix::Error>([
                nix::unistd::pipe2(flags)?,
                nix::unistd::pipe2(flags)?,
                nix::unistd::pipe2(flags)?,
            ])
        })();
        let [(stdout_r, stdout_w), (stderr_r, stderr_w), (status_r, status_w)] = match pipes {
            Ok(p) => p,
            Err(e) => {
                control.forget(command);
                return Err(spawn_err(e.into()));
            }
        };
        let oom_before = inner.cgroup.oom_kills();
        let pids_hits_before = inner.cgroup.pids_limit_hits();
        let sent = control
            .send(
                &data,
                &[
                    stdout_w.as_raw_fd(),
                    stderr_w.as_raw_fd(),
                    status_w.as_raw_fd(),
                ],
            )
            .await;
        drop((stdout_w, stderr_w, status_w));
        if let Err(e) = sent {
            control.forget(command);
            return Err(spawn_err(e));
        }

        let started = registered.started;
        let talk = async {
            let started = started
                .await
                .map_err(|_| "the sandbox's init is gone".to_string())??;
            let mut status = tokio::net::unix::pipe::Receiver::from_owned_fd(status_r)
                .map_err(|e| e.to_string())?;
            let mut text = String::new();
            status
                .read_to_string(&mut text)
                .await
                .map_err(|e| e.to_string())?;
            match text.lines().find_map(|l| l.strip_prefix(proto::MSG_ERROR)) {
                Some(error) => Err(error.to_string()),
                None => Ok(started),
            }
        };
        let timeout = inner.config.setup_timeout;
        let started = match tokio::time::timeout(timeout, talk).await {
            Ok(Ok(started)) => started,
            Ok(Err(message)) => {
                let _ = control.signal(command, libc::SIGKILL);
                control.forget(command);
                return Err(setup_err(message));
            }
            Err(_) => {
                let _ = control.signal(command, libc::SIGKILL);
                control.forget(command);
                return Err(setup_err(format!("did not start within {timeout:?}")));
            }
        };

        let max_line = inner.config.max_line_bytes;
        let reader = |fd: OwnedFd| tokio::net::unix::pipe::Receiver::from_owned_fd(fd);
        let pumps = vec![
            tokio::spawn(output::pump(
                reader(stdout_r).map_err(spawn_err)?,
                OutputStream::Stdout,
                output.clone(),
                max_line,
            )),
            tokio::spawn(output::pump(
                reader(stderr_r).map_err(spawn_err)?,
                OutputStream::Stderr,
                output,
                max_line,
            )),
        ];
        Ok(Process::new(
            command,
            control,
            started,
            registered.exited,
            inner.cgroup.clone(),
            oom_before,
            pids_hits_before,
            req.timeout,
            req.kill_grace,
            pumps,
        ))
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
            let mut guard = lock(&self.inner.netns);
            if matches!(*guard, Netns::Idle(_)) {
                let Netns::Idle(fd) = std::mem::replace(&mut *guard, Netns::Gone) else {
                    unreachable!("checked above")
                };
                *guard = Netns::Running(
                    NetnsSockets::start(fd, &self.inner.id).map_err(self.net_err(port))?,
                );
            }
            let Netns::Running(sockets) = &*guard else {
                return Err(NetError::Destroyed {
                    id: self.inner.id.clone(),
                });
            };
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
