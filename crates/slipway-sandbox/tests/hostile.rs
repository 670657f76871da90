//! A hostile workload: each attack must fail, and the host and this test process stay unharmed.

use crate::require_sandboxes;
use crate::util::*;
use slipway_sandbox::{ExecRequest, Limits, OutputLine, TerminationReason};
use std::path::Path;
use std::time::Duration;

/// Runs a Python script in the sandbox that may call `sys(name, *args)` to make a raw libc
/// call; each call prints `<name> <errno name or ok>`.
fn python(script: &str) -> String {
    format!(
        "python3 - <<'PYEOF'\nimport ctypes, errno, os\nlibc = ctypes.CDLL(None, use_errno=True)\n\
         def sys(name, fn, *args):\n    r = fn(*args)\n    \
         print(name, errno.errorcode.get(ctypes.get_errno(), '?') if r == -1 else 'ok')\n{script}\nPYEOF"
    )
}

/// Content hash of a tree (paths, modes and contents), to prove it did not change.
fn tree_digest(dir: &Path) -> Vec<(String, u32, Vec<u8>)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let content = if meta.is_file() {
                std::fs::read(&path).unwrap()
            } else {
                Vec::new()
            };
            out.push((
                path.display().to_string(),
                meta.permissions().mode(),
                content,
            ));
            if meta.is_dir() {
                stack.push(path);
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn host_secrets_and_private_files_are_invisible() {
    require_sandboxes!();
    let fx = Fixture::new();
    let host = tempfile::tempdir().unwrap();
    std::fs::create_dir(host.path().join("data")).unwrap();
    std::fs::write(host.path().join("data/secret.txt"), "top secret").unwrap();
    std::fs::write(host.path().join("admin.token"), "token-123").unwrap();
    let sb = fx.sandbox().await;
    let h = host.path().display();
    let ran = run(
        &sb,
        &format!(
            "cat {h}/data/secret.txt; cat {h}/admin.token; ls {h}; cat /etc/shadow; ls /root; \
             ls {state}; find / -name admin.token -not -path '/proc/*' -not -path '/usr/*' 2>/dev/null; \
             grep -rl token-123 /etc /tmp /home /workspace /dev 2>/dev/null; echo done",
            state = fx.state_dir().display()
        ),
    )
    .await;
    assert_eq!(ran.stdout, "done\n", "nothing readable: {ran:#?}");
    assert_eq!(
        ran.stderr.matches("No such file or directory").count(),
        6,
        "{ran:#?}"
    );
    assert!(!ran.stdout.contains("secret") && !ran.stdout.contains("token-123"));
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn writes_outside_the_workspace_fail_and_the_lower_dir_is_unchanged() {
    require_sandboxes!();
    let fx = Fixture::new();
    let lower = fx.lower("lower", &[("app.js", "ok\n"), ("lib/x.js", "x\n")]);
    let before = tree_digest(&lower);
    let sb = fx.driver.create(fx.spec(&lower)).await.unwrap();
    let targets = [
        "/usr/evil",
        "/etc/evil",
        "/evil",
        "/usr/bin/evil",
        "/etc/passwd",
        "/proc/evil",
        "/dev/evil",
    ];
    let mut cmd = String::new();
    for t in targets {
        cmd.push_str(&format!(
            "if echo pwned >> {t} 2>/dev/null; then echo WROTE {t}; fi; "
        ));
    }
    cmd.push_str(&format!(
        "if echo pwned > {l}/app.js 2>/dev/null; then echo WROTE lower; fi; \
         echo changed > app.js; chmod 777 lib; rm lib/x.js; echo done",
        l = lower.display()
    ));
    let ran = run(&sb, &cmd).await.ok();
    assert_eq!(ran.stdout, "done\n", "{ran:#?}");
    assert!(!Path::new("/usr/evil").exists() && !Path::new("/etc/evil").exists());
    assert!(!Path::new("/evil").exists() && !Path::new("/usr/bin/evil").exists());
    assert_eq!(
        tree_digest(&lower),
        before,
        "the cached extraction must never change"
    );
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn host_processes_are_invisible() {
    require_sandboxes!();
    let fx = Fixture::new();
    let sb = fx.sandbox().await;
    let ran = run(
        &sb,
        "for p in /proc/[0-9]*; do echo \"${p#/proc/} $(tr '\\0' ' ' < $p/cmdline)\"; done",
    )
    .await
    .ok();
    let me = std::env::current_exe().unwrap();
    let my_name = me.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        !ran.stdout.contains(&my_name),
        "the test process is visible: {ran:#?}"
    );
    // Only init (the helper binary, pid 1) and the command itself; the exec helpers live in
    // the host's pid namespace.
    assert_eq!(ran.stdout.matches("__sandbox-exec").count(), 0, "{ran:#?}");
    let pids: Vec<&str> = ran.stdout.lines().collect();
    assert!(
        pids.len() <= 4,
        "only init, the shell and its children: {ran:#?}"
    );
    assert!(
        pids[0].starts_with("1 "),
        "pid 1 is the sandbox's init: {ran:#?}"
    );
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn mounting_fails() {
    require_sandboxes!();
    let fx = Fixture::new();
    let sb = fx.sandbox().await;
    let script = python(
        "sys('mount', libc.mount, b'none', b'/tmp', b'tmpfs', 0, None)\n\
         sys('umount2', libc.umount2, b'/workspace/app', 2)\n\
         sys('pivot_root', libc.syscall, 155, b'/tmp', b'/tmp')",
    );
    let ran = run(
        &sb,
        &format!("{script}\nmount -t tmpfs none /tmp 2>/dev/null || echo mount-binary-failed"),
    )
    .await
    .ok();
    assert_eq!(
        ran.stdout,
        "mount EPERM\numount2 EPERM\npivot_root EPERM\nmount-binary-failed\n"
    );
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn ptrace_and_reading_other_processes_memory_fail() {
    require_sandboxes!();
    let fx = Fixture::new();
    let sb = fx.sandbox().await;
    let mut sleeper = sb
        .spawn(ExecRequest::new("exec sleep 600"), None)
        .await
        .unwrap();
    let script = python(
        "import subprocess\n\
         child = subprocess.Popen(['sleep', '600'])\n\
         sys('ptrace-init', libc.ptrace, 16, 1, None, None)\n\
         sys('ptrace-own-child', libc.ptrace, 16, child.pid, None, None)\n\
         buf = ctypes.create_string_buffer(8)\n\
         sys('process_vm_readv', libc.syscall, 310, child.pid, None, 0, None, 0, 0)\n\
         child.kill()",
    );
    let ran = run(&sb, &script).await.ok();
    assert_eq!(
        ran.stdout, "ptrace-init EPERM\nptrace-own-child EPERM\nprocess_vm_readv EPERM\n",
        "{ran:#?}"
    );
    sleeper.kill(Duration::from_secs(1)).await.unwrap();
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn new_namespaces_cannot_be_created_to_regain_privileges() {
    require_sandboxes!();
    let fx = Fixture::new();
    let sb = fx.sandbox().await;
    let script = python(
        "sys('unshare-user', libc.unshare, 0x10000000)\n\
         sys('unshare-mnt', libc.unshare, 0x00020000)\n\
         sys('clone-newuser', libc.syscall, 56, 0x10000000 | 17, 0, 0, 0, 0)\n\
         sys('clone-newnet', libc.syscall, 56, 0x40000000 | 17, 0, 0, 0, 0)\n\
         fd = os.open('/proc/self/ns/net', os.O_RDONLY)\n\
         sys('setns', libc.setns, fd, 0)\n\
         sys('clone3', libc.syscall, 435, None, 0)",
    );
    let ran = run(
        &sb,
        &format!("{script}\nunshare -U true 2>/dev/null || echo unshare-binary-failed"),
    )
    .await
    .ok();
    assert_eq!(
        ran.stdout,
        "unshare-user EPERM\nunshare-mnt EPERM\nclone-newuser EPERM\nclone-newnet EPERM\n\
         setns EPERM\nclone3 ENOSYS\nunshare-binary-failed\n",
        "{ran:#?}"
    );
    // Plain fork and threads (clone without namespace flags) still work.
    run(&sb, "python3 -c 'import threading, os; t = threading.Thread(target=print); t.start(); t.join(); os.wait() if os.fork() else os._exit(0)'")
        .await
        .ok();
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn kernel_modules_cannot_be_loaded() {
    require_sandboxes!();
    let fx = Fixture::new();
    let sb = fx.sandbox().await;
    let script = python(
        "image = ctypes.create_string_buffer(b'\\x7fELF' + b'\\0' * 60)\n\
         sys('init_module', libc.syscall, 175, image, 64, b'')\n\
         fd = os.open('/dev/null', os.O_RDONLY)\n\
         sys('finit_module', libc.syscall, 313, fd, b'', 0)\n\
         sys('delete_module', libc.syscall, 176, b'overlay', 0)\n\
         sys('kexec_load', libc.syscall, 246, 0, 0, None, 0)\n\
         sys('bpf', libc.syscall, 321, 0, None, 0)",
    );
    let ran = run(&sb, &script).await.ok();
    assert_eq!(
        ran.stdout,
        "init_module EPERM\nfinit_module EPERM\ndelete_module EPERM\nkexec_load EPERM\nbpf EPERM\n",
        "{ran:#?}"
    );
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn the_hostname_cannot_be_changed() {
    require_sandboxes!();
    let fx = Fixture::new();
    let host_before = nix::unistd::gethostname().unwrap();
    let sb = fx.sandbox().await;
    let script = python("sys('sethostname', libc.sethostname, b'pwned', 5)");
    let ran = run(&sb, &format!("{script}\nhostname pwned 2>/dev/null || echo binary-failed; cat /proc/sys/kernel/hostname"))
        .await
        .ok();
    assert_eq!(
        ran.stdout, "sethostname EPERM\nbinary-failed\nsandbox\n",
        "{ran:#?}"
    );
    assert_eq!(nix::unistd::gethostname().unwrap(), host_before);
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn a_fork_bomb_hits_the_process_limit_and_the_host_is_fine() {
    require_sandboxes!();
    let fx = Fixture::new();
    let lower = fx.lower("bomb", &[]);
    let mut spec = fx.spec(&lower);
    spec.limits = Limits {
        pids_max: 64,
        ..Limits::default()
    };
    let sb = fx.driver.create(spec).await.unwrap();
    let req = ExecRequest::new("f() { f | f; }; f").timeout(Duration::from_secs(60));
    let ran = run_req(&sb, req).await;
    assert_eq!(
        ran.status.reason,
        Some(TerminationReason::ProcessLimit),
        "{:?}",
        ran.status
    );
    // The host can still fork, and the sandbox recovers once the bomb is gone.
    assert!(std::process::Command::new("true")
        .status()
        .unwrap()
        .success());
    run(&sb, "echo alive").await.ok();
    let usage = sb.usage().unwrap();
    assert!(usage.pids <= 8, "{usage:?}");
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn a_memory_bomb_is_killed_and_reported_as_out_of_memory() {
    require_sandboxes!();
    let fx = Fixture::new();
    let lower = fx.lower("mem", &[]);
    let mut spec = fx.spec(&lower);
    spec.limits = Limits {
        memory_bytes: 128 << 20,
        ..Limits::default()
    };
    let sb = fx.driver.create(spec).await.unwrap();
    let req = ExecRequest::new("python3 -c 'a = []\nwhile True: a.append(bytearray(16 << 20))'")
        .timeout(Duration::from_secs(60));
    let ran = run_req(&sb, req).await;
    assert_eq!(
        ran.status.reason,
        Some(TerminationReason::OutOfMemory),
        "{ran:#?}"
    );
    assert!(
        ran.status.to_string().ends_with("(out of memory)"),
        "{}",
        ran.status
    );
    assert!(sb.usage().unwrap().oom_kills >= 1);
    // Init survived: the sandbox still runs commands.
    run(&sb, "echo alive").await.ok();
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn filling_the_disk_hits_the_quota_inside_only() {
    require_sandboxes!();
    let fx = Fixture::new();
    let lower = fx.lower("disk", &[]);
    let mut spec = fx.spec(&lower);
    spec.limits = Limits {
        workspace_bytes: 16 << 20,
        tmp_bytes: 8 << 20,
        ..Limits::default()
    };
    let sb = fx.driver.create(spec).await.unwrap();
    let ran = run(
        &sb,
        "head -c 64M /dev/zero > big; echo rc=$?; stat -c %s big; \
         head -c 64M /dev/zero > /tmp/big; echo rc=$?; stat -c %s /tmp/big",
    )
    .await;
    let out: Vec<&str> = ran.stdout.lines().collect();
    assert_eq!(out.len(), 4, "{ran:#?}");
    assert_eq!(out[0], "rc=1");
    assert!(out[1].parse::<u64>().unwrap() <= 16 << 20, "{ran:#?}");
    assert_eq!(out[2], "rc=1");
    assert!(out[3].parse::<u64>().unwrap() <= 8 << 20, "{ran:#?}");
    assert_eq!(
        ran.stderr.matches("No space left on device").count(),
        2,
        "{ran:#?}"
    );
    assert!(
        std::fs::read_dir(&lower).unwrap().next().is_none(),
        "nothing reached the host"
    );
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn a_slow_consumer_blocks_the_workload_instead_of_buffering() {
    require_sandboxes!();
    let fx = Fixture::new();
    let sb = fx.sandbox().await;
    let (tx, rx) = tokio::sync::mpsc::channel::<OutputLine>(4);
    let mut yes = sb
        .spawn(ExecRequest::new("exec yes"), Some(tx))
        .await
        .unwrap();
    let wchan = format!("/proc/{}/wchan", yes.pid());
    // The channel fills to its capacity, then the pipe fills, then the writer blocks, and it
    // stays that way: nothing reads more than the channel can hold.
    let blocked = eventually(Duration::from_secs(20), || {
        rx.len() == 4 && std::fs::read_to_string(&wchan).is_ok_and(|w| w.contains("pipe_write"))
    })
    .await;
    assert!(
        blocked,
        "the writer must end up blocked on the full pipe (channel holds {})",
        rx.len()
    );
    drop(rx);
    let status = yes.kill(Duration::from_secs(10)).await.unwrap();
    assert_eq!(
        status.reason,
        Some(TerminationReason::Stopped { forced: false })
    );
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn a_process_that_ignores_sigterm_is_killed_after_the_grace_period() {
    require_sandboxes!();
    let fx = Fixture::new();
    let sb = fx.sandbox().await;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<OutputLine>(4);
    let mut stubborn = sb
        .spawn(
            ExecRequest::new("trap '' TERM; echo ready; sleep 600; echo survived"),
            Some(tx),
        )
        .await
        .unwrap();
    // Only once the trap is set: a SIGTERM that came first would end the shell politely.
    let first = tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("the shell prints `ready` within 30 s");
    assert_eq!(first.map(|line| line.text), Some("ready".to_string()));
    let status = stubborn.kill(Duration::from_millis(300)).await.unwrap();
    assert_eq!(
        status.reason,
        Some(TerminationReason::Stopped { forced: true }),
        "{status:?}"
    );
    assert_eq!(status.signal, Some(9));
    let mut polite = sb
        .spawn(ExecRequest::new("exec sleep 600"), None)
        .await
        .unwrap();
    let status = polite.kill(Duration::from_secs(30)).await.unwrap();
    assert_eq!(
        status.reason,
        Some(TerminationReason::Stopped { forced: false }),
        "{status:?}"
    );
    assert_eq!(status.signal, Some(15));
    sb.destroy().await.unwrap();
}
