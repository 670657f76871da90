//! Spares: sandboxes pre-built by the driver (namespaces, root, cgroup) and handed to exactly
//! one `create`. A spare must not carry anything from another sandbox, must match the
//! configuration it is used for, and the limits written when it is assigned must bite.

use crate::require_sandboxes;
use crate::util::*;
use slipway_sandbox::{ExecRequest, Limits, Sandbox, SandboxSpec, TerminationReason};
use std::path::Path;
use std::time::Duration;

/// Waits until the driver has a spare ready and returns its init's host pid.
async fn spare_ready(fx: &Fixture) -> i32 {
    let mut pid = None;
    assert!(
        eventually(Duration::from_secs(10), || {
            pid = fx.driver.spare_stats().ready_init_pid;
            pid.is_some()
        })
        .await,
        "a spare is built in the background after a create"
    );
    pid.unwrap()
}

/// Creates `spec` and checks that it was made from the spare whose init is `spare_init`.
async fn create_from_spare(fx: &Fixture, spec: SandboxSpec, spare_init: i32) -> Sandbox {
    let before = fx.driver.spare_stats();
    let sb = fx.driver.create(spec).await.expect("create");
    let after = fx.driver.spare_stats();
    assert_eq!(after.used, before.used + 1, "{before:?} → {after:?}");
    assert_eq!(
        sb.init_pid(),
        spare_init,
        "the ready spare became this sandbox"
    );
    sb
}

fn ns(pid: i32, kind: &str) -> std::path::PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

#[tokio::test]
async fn sandboxes_made_from_spares_back_to_back_share_nothing() {
    require_sandboxes!();
    let fx = Fixture::new();
    let first = fx.sandbox().await;
    run(
        &first,
        "echo mine > /workspace/app/first.txt && echo mine > /tmp/first-tmp && \
         echo mine > /home/app/first-home && echo mine > /dev/shm/first-shm",
    )
    .await
    .ok();
    let mut sleeper = first
        .spawn(ExecRequest::new("exec sleep 6001"), None)
        .await
        .unwrap();

    let spare = spare_ready(&fx).await;
    let lower = fx.lower("second", &[("second.txt", "second snapshot\n")]);
    let second = create_from_spare(&fx, fx.spec(&lower), spare).await;
    assert_ne!(second.init_pid(), first.init_pid());
    for kind in ["mnt", "pid", "net", "ipc", "uts", "cgroup"] {
        assert_ne!(
            ns(first.init_pid(), kind),
            ns(second.init_pid(), kind),
            "{kind} namespace"
        );
    }
    // Its own workspace (its own snapshot), tmp, home and shm; none of the first's processes.
    let ran = run(
        &second,
        "ls -A /workspace/app /tmp /home/app /dev/shm; \
         for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f; echo; done",
    )
    .await
    .ok();
    assert!(ran.stdout.contains("second.txt"), "{ran:#?}");
    assert!(!ran.stdout.contains("first"), "{ran:#?}");
    assert!(!ran.stdout.contains("6001"), "{ran:#?}");
    // The cgroup carries the sandbox's name and holds only its own processes.
    let dirs = cgroup_dirs(TEST_CGROUP_PARENT, second.id());
    assert!(!dirs.is_empty());
    for dir in &dirs {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
        assert!(
            !procs.lines().any(|p| p.trim() == sleeper.pid().to_string()),
            "{procs}"
        );
    }

    // And the other way round: the first sees nothing of the second.
    run(&second, "echo secret > /workspace/app/second-wrote.txt")
        .await
        .ok();
    let ran = run(&first, "ls -A /workspace/app /tmp").await.ok();
    assert!(!ran.stdout.contains("second"), "{ran:#?}");

    // A third, again from a spare (a new one: a spare is never handed out twice).
    let spare3 = spare_ready(&fx).await;
    assert_ne!(spare3, second.init_pid());
    let third = create_from_spare(&fx, fx.spec(&lower), spare3).await;
    let ran = run(&third, "ls -A /workspace/app /tmp /home/app")
        .await
        .ok();
    assert_eq!(ran.stdout.matches("second.txt").count(), 1, "{ran:#?}");
    assert!(!ran.stdout.contains("second-wrote"), "{ran:#?}");

    sleeper.kill(Duration::from_millis(100)).await.ok();
    for sb in [first, second, third] {
        sb.destroy().await.unwrap();
    }
}

#[tokio::test]
async fn a_spare_built_for_another_configuration_is_not_used() {
    require_sandboxes!();
    let fx = Fixture::new();
    let first = fx.sandbox().await;
    let stale = spare_ready(&fx).await;
    let before = fx.driver.spare_stats();

    // Another hostname (so another /etc), another /tmp size and an extra toolchain path.
    // Outside /tmp, which is the sandbox's own.
    let tool_dir = tempfile::Builder::new()
        .prefix("slipway-spare-tool-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let tool = tool_dir.path().to_path_buf();
    std::fs::create_dir_all(tool.join("bin")).unwrap();
    std::fs::write(tool.join("bin/marker"), "tool\n").unwrap();
    let lower = fx.lower("other", &[]);
    let mut spec = fx.spec(&lower);
    spec.hostname = "other-host".into();
    spec.limits.tmp_bytes = 8 << 20;
    spec.toolchain_paths = vec![tool.clone()];
    let second = fx.driver.create(spec.clone()).await.unwrap();
    assert_ne!(second.init_pid(), stale, "the stale spare is not used");
    let after = fx.driver.spare_stats();
    assert_eq!(after.used, before.used, "{after:?}");
    assert_eq!(after.discarded, before.discarded + 1, "{after:?}");
    let gone = move || !Path::new(&format!("/proc/{stale}")).exists();
    assert!(
        eventually(Duration::from_secs(5), gone).await,
        "the stale spare is destroyed"
    );
    let check = format!(
        "hostname; cat /etc/hostname; df -k /tmp | tail -1; cat {}/bin/marker",
        tool.display()
    );
    let ran = run(&second, &check).await.ok();
    let lines: Vec<&str> = ran.stdout.lines().collect();
    assert_eq!(lines[0], "other-host", "{ran:#?}");
    assert_eq!(lines[1], "other-host", "{ran:#?}");
    assert_eq!(lines[2].split_whitespace().nth(1), Some("8192"), "{ran:#?}");
    assert_eq!(lines[3], "tool", "{ran:#?}");

    // The next spare is built for the new configuration, and used for it.
    let fresh = spare_ready(&fx).await;
    let mut spec3 = spec.clone();
    spec3.id = unique_id("t");
    let third = create_from_spare(&fx, spec3, fresh).await;
    let ran = run(&third, &check).await.ok();
    assert!(
        ran.stdout.starts_with("other-host\nother-host\n"),
        "{ran:#?}"
    );
    for sb in [first, second, third] {
        sb.destroy().await.unwrap();
    }
}

#[tokio::test]
async fn limits_written_at_create_bite_in_a_sandbox_from_a_spare() {
    require_sandboxes!();
    let fx = Fixture::new();
    let first = fx.sandbox().await;
    let spare = spare_ready(&fx).await;
    let lower = fx.lower("limited", &[]);
    let mut spec = fx.spec(&lower);
    spec.limits = Limits {
        memory_bytes: 128 << 20,
        pids_max: 32,
        workspace_bytes: 4 << 20,
        ..Limits::default()
    };
    let sb = create_from_spare(&fx, spec, spare).await;

    // The cgroup has the limits. On cgroup v1 it was renamed after the sandbox, so it can be
    // found and must be checked; v2 keeps the spare's cgroup name, and only the bites below
    // show the limits there.
    let (mut pids_checked, mut memory_checked) = (false, false);
    for dir in cgroup_dirs(TEST_CGROUP_PARENT, sb.id()) {
        if let Ok(v) = std::fs::read_to_string(dir.join("pids.max")) {
            assert_eq!(v.trim(), "32");
            pids_checked = true;
        }
        if let Ok(v) = std::fs::read_to_string(dir.join("memory.limit_in_bytes")) {
            assert_eq!(v.trim(), (128u64 << 20).to_string());
            memory_checked = true;
        }
    }
    if Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists() {
        assert!(
            pids_checked && memory_checked,
            "cgroup v1: the sandbox's cgroup holds both limits"
        );
    }
    let bomb = ExecRequest::new("f() { f | f; }; f").timeout(Duration::from_secs(60));
    let ran = run_req(&sb, bomb).await;
    assert_eq!(
        ran.status.reason,
        Some(TerminationReason::ProcessLimit),
        "{ran:#?}"
    );
    let hog = ExecRequest::new("python3 -c 'a = []\nwhile True: a.append(bytearray(16 << 20))'")
        .timeout(Duration::from_secs(60));
    let ran = run_req(&sb, hog).await;
    assert_eq!(
        ran.status.reason,
        Some(TerminationReason::OutOfMemory),
        "{ran:#?}"
    );
    // The workspace quota is the one asked for at create, not the spare's.
    let ran = run(
        &sb,
        "dd if=/dev/zero of=/workspace/app/big bs=1M count=8 2>&1; df -k /workspace/app | tail -1",
    )
    .await;
    assert!(ran.stdout.contains("No space left"), "{ran:#?}");
    let df = ran.stdout.lines().last().unwrap_or_default();
    assert_eq!(df.split_whitespace().nth(1), Some("4096"), "{ran:#?}");
    run(&sb, "echo alive").await.ok();
    sb.destroy().await.unwrap();
    first.destroy().await.unwrap();
}

#[tokio::test]
async fn a_dead_spare_is_discarded_and_create_still_works() {
    require_sandboxes!();
    let fx = Fixture::new();
    let first = fx.sandbox().await;
    let spare = spare_ready(&fx).await;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(spare), nix::sys::signal::SIGKILL).unwrap();
    let before = fx.driver.spare_stats();
    let second = fx.sandbox().await;
    let after = fx.driver.spare_stats();
    assert_ne!(second.init_pid(), spare);
    assert_eq!(after.discarded, before.discarded + 1, "{after:?}");
    assert_eq!(
        after.built_on_demand,
        before.built_on_demand + 1,
        "{after:?}"
    );
    run(&second, "cat /workspace/app/hello.txt").await.ok();
    // The same id twice: refused, and the spare it would have used stays for the next one.
    let spare = spare_ready(&fx).await;
    let dup = fx
        .driver
        .create(SandboxSpec::new(second.id(), fx.dir.path()))
        .await;
    assert!(
        matches!(dup, Err(slipway_sandbox::CreateError::Exists { .. })),
        "{dup:?}"
    );
    let third = create_from_spare(&fx, fx.spec(fx.dir.path()), spare).await;
    for sb in [first, second, third] {
        sb.destroy().await.unwrap();
    }
}
