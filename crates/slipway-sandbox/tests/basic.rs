//! Create, exec, output, filesystem view, workspace overlay, destroy.

use crate::require_sandboxes;
use crate::util::*;
use slipway_sandbox::{ExecError, ExecRequest, OutputStream, TerminationReason};
use std::time::Duration;

#[tokio::test]
async fn commands_run_as_the_unprivileged_workload_user_with_a_clean_environment() {
    require_sandboxes!();
    let fx = Fixture::new();
    let sb = fx.sandbox().await;
    let ran = run(&sb, "id -u; id -g; id -G; pwd; env | sort").await.ok();
    let lines: Vec<&str> = ran.stdout.lines().collect();
    assert_eq!(
        &lines[..4],
        ["60000", "60000", "60000", "/workspace/app"],
        "{ran:#?}"
    );
    assert!(ran.stdout.contains("HOME=/home/app\n"), "{ran:#?}");
    assert!(ran.stdout.contains("TMPDIR=/tmp\n"), "{ran:#?}");
    // Nothing of the test process's own environment leaks in.
    assert!(!ran.stdout.contains("CARGO"), "{ran:#?}");
    assert!(
        !ran.stdout.contains("PROXY"),
        "no egress, no proxy variables: {ran:#?}"
    );
    let usage = sb.usage().unwrap();
    assert!(usage.memory_bytes > 0 && usage.pids >= 1, "{usage:?}");
    // The default CPU limit (one core) is in the cgroup: quota = period = 100 ms.
    let dirs = cgroup_dirs(TEST_CGROUP_PARENT, sb.id());
    let cpu = dirs.iter().find_map(|d| {
        let v1 = (
            std::fs::read_to_string(d.join("cpu.cfs_quota_us")),
            std::fs::read_to_string(d.join("cpu.cfs_period_us")),
        );
        match v1 {
            (Ok(q), Ok(p)) => Some(format!("{} {}", q.trim(), p.trim())),
            _ => std::fs::read_to_string(d.join("cpu.max"))
                .ok()
                .map(|m| m.trim().to_string()),
        }
    });
    assert_eq!(cpu.as_deref(), Some("100000 100000"), "{dirs:?}");
    assert!(usage.cpu_ns.is_some_and(|ns| ns > 0), "{usage:?}");
    sb.destroy().await.unwrap();
    assert!(sb.usage().is_err(), "the cgroup is gone after destroy");
}

#[tokio::test]
async fn the_workload_holds_no_privileges() {
    require_sandboxes!();
    let fx = Fixture::new();
    let sb = fx.sandbox().await;
    let ran = run(&sb, "cat /proc/self/status").await.ok();
    let field = |name: &str| {
        ran.stdout
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("{name} missing: {ran:#?}"))
    };
    for caps in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        assert_eq!(field(caps), "0000000000000000", "{caps}");
    }
    assert_eq!(field("NoNewPrivs:"), "1");
    assert_eq!(field("Seccomp:"), "2", "seccomp filter mode");
    assert_eq!(field("Uid:"), "60000\t60000\t60000\t60000");
    assert_eq!(field("Gid:"), "60000\t60000\t60000\t60000");
    assert_eq!(field("Groups:"), "");
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn the_workload_inherits_no_descriptors_but_its_stdio() {
    require_sandboxes!();
    let fx = Fixture::new();
    let sb = fx.sandbox().await;
    // This process may hold descriptors without close-on-exec (the test harness does); none of
    // them may reach the sandbox.
    let ran = run(
        &sb,
        "python3 -c 'import os; print(sorted(int(f) for f in os.listdir(\"/proc/self/fd\")))'",
    )
    .await
    .ok();
    assert_eq!(
        ran.stdout, "[0, 1, 2, 3]\n",
        "3 is the listing itself: {ran:#?}"
    );
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn env_and_cwd_of_the_request_are_applied() {
    require_sandboxes!();
    let fx = Fixture::new();
    let sb = fx.sandbox().await;
    let req = ExecRequest::new("echo \"$GREETING\"; pwd; echo $PATH")
        .env("GREETING", "hi there")
        .env("PATH", "/usr/bin:/bin")
        .cwd("/tmp");
    let ran = run_req(&sb, req).await.ok();
    assert_eq!(ran.stdout, "hi there\n/tmp\n/usr/bin:/bin\n");
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn output_is_streamed_line_by_line_with_its_stream() {
    require_sandboxes!();
    let fx = Fixture::new();
    let sb = fx.sandbox().await;
    let ran = run(
        &sb,
        "echo out1; echo err1 >&2; printf 'out2\\nno-newline'; echo err2 >&2",
    )
    .await
    .ok();
    let of = |stream| {
        ran.lines
            .iter()
            .filter(|l| l.stream == stream)
            .map(|l| l.text.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(of(OutputStream::Stdout), ["out1", "out2", "no-newline"]);
    assert_eq!(of(OutputStream::Stderr), ["err1", "err2"]);
    let ts: Vec<u64> = ran.lines.iter().map(|l| l.ts_ms).collect();
    assert!(
        ts.iter().all(|&t| t > 1_600_000_000_000),
        "timestamps are epoch ms: {ts:?}"
    );
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn exit_codes_signals_and_setup_errors_are_reported() {
    require_sandboxes!();
    let fx = Fixture::new();
    let sb = fx.sandbox().await;
    let ran = run(&sb, "exit 3").await;
    assert_eq!(
        (ran.status.code, ran.status.reason.clone()),
        (Some(3), None)
    );
    let ran = run(&sb, "kill -9 $$").await;
    assert_eq!(ran.status.signal, Some(9), "{ran:#?}");
    assert!(!ran.status.success());
    let err = sb
        .exec(ExecRequest::new("true").cwd("/does/not/exist"), None)
        .await
        .unwrap_err();
    match err {
        ExecError::Setup { message, .. } => assert!(message.contains("chdir"), "{message}"),
        other => panic!("expected a setup error, got {other:?}"),
    }
    // The sandbox is still usable after a failed command.
    run(&sb, "true").await.ok();
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn a_command_past_its_timeout_is_stopped_and_says_so() {
    require_sandboxes!();
    let fx = Fixture::new();
    let sb = fx.sandbox().await;
    let req = ExecRequest::new("sleep 600").timeout(Duration::from_millis(300));
    let ran = run_req(&sb, req).await;
    assert_eq!(
        ran.status.reason,
        Some(TerminationReason::Timeout {
            after: Duration::from_millis(300)
        }),
        "{ran:#?}"
    );
    assert_eq!(
        ran.status.reason.unwrap().to_string(),
        "timeout after 0.3 s"
    );
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn the_root_is_a_minimal_read_only_view() {
    require_sandboxes!();
    let fx = Fixture::new();
    let sb = fx.sandbox().await;
    let ran = run(&sb, "ls -A /; echo ---; ls -A /etc; echo ---; ls -A /dev")
        .await
        .ok();
    let mut parts = ran.stdout.split("---\n");
    let root: Vec<&str> = parts.next().unwrap().lines().collect();
    let etc: Vec<&str> = parts.next().unwrap().lines().collect();
    let dev: Vec<&str> = parts.next().unwrap().lines().collect();
    for expected in [
        "bin",
        "dev",
        "etc",
        "home",
        "lib",
        "proc",
        "tmp",
        "usr",
        "workspace",
    ] {
        assert!(
            root.contains(&expected),
            "{expected} missing from / {root:?}"
        );
    }
    for absent in ["root", "sys", "var", "work", "srv", "mnt", "opt", "boot"] {
        assert!(
            !root.contains(&absent),
            "/{absent} must not exist: {root:?}"
        );
    }
    for secret in [
        "shadow",
        "gshadow",
        "ssh",
        "sudoers",
        "npmrc",
        "pip.conf",
        "machine-id",
    ] {
        assert!(
            !etc.contains(&secret),
            "/etc/{secret} must not exist: {etc:?}"
        );
    }
    assert!(
        etc.contains(&"passwd") && etc.contains(&"resolv.conf"),
        "{etc:?}"
    );
    for node in ["null", "zero", "urandom", "shm", "pts", "fd"] {
        assert!(dev.contains(&node), "/dev/{node} missing: {dev:?}");
    }
    // Toolchain links are links, as on the host.
    let ran = run(
        &sb,
        "readlink /bin; grep '^app:' /etc/passwd; stat -c '%u %a' /home/app /tmp",
    )
    .await
    .ok();
    let host_bin = std::fs::read_link("/bin").map(|p| p.display().to_string());
    if let Ok(target) = host_bin {
        assert!(ran.stdout.starts_with(&format!("{target}\n")), "{ran:#?}");
    }
    assert!(ran.stdout.contains("app:x:60000:60000:"), "{ran:#?}");
    assert!(ran.stdout.contains("60000 700\n0 1777\n"), "{ran:#?}");
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn device_nodes_work_for_the_workload_and_match_the_hosts() {
    require_sandboxes!();
    let fx = Fixture::new();
    let sb = fx.sandbox().await;
    let nodes = ["null", "zero", "full", "random", "urandom", "tty"];
    let mut script = String::from(
        "echo x > /dev/null && echo null-ok; head -c 8 /dev/zero | wc -c; \
         head -c 8 /dev/urandom | wc -c; echo x > /dev/full || echo full-ok; ",
    );
    for node in nodes {
        script.push_str(&format!("stat -c '%n %F %t:%T %a' /dev/{node}; "));
    }
    let ran = run(&sb, &script).await;
    let lines: Vec<&str> = ran.stdout.lines().collect();
    assert_eq!(&lines[..4], ["null-ok", "8", "8", "full-ok"], "{ran:#?}");
    for node in nodes {
        let host = std::process::Command::new("stat")
            .args(["-c", "%n %F %t:%T %a"])
            .arg(format!("/dev/{node}"))
            .output()
            .unwrap();
        if !host.status.success() {
            continue;
        }
        let host = String::from_utf8_lossy(&host.stdout).trim().to_string();
        assert!(lines.contains(&host.as_str()), "{host:?} not in {ran:#?}");
    }
    // The workload cannot make device nodes of its own.
    let ran = run(&sb, "mknod /tmp/mem c 1 1 && echo made").await;
    assert!(!ran.stdout.contains("made"), "{ran:#?}");
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn the_workspace_is_a_writable_overlay_and_the_lower_dir_never_changes() {
    require_sandboxes!();
    let fx = Fixture::new();
    let lower = fx.lower(
        "ws",
        &[
            ("hello.txt", "original\n"),
            ("src/app.js", "console.log(1)\n"),
        ],
    );
    let sb = fx.driver.create(fx.spec(&lower)).await.unwrap();
    let ran = run(
        &sb,
        "cat hello.txt && echo changed > hello.txt && rm src/app.js && mkdir -p dist && \
         echo built > dist/out.txt && ln -s /etc/passwd dist/link && cat hello.txt && ls src | wc -l",
    )
    .await
    .ok();
    assert_eq!(ran.stdout, "original\nchanged\n0\n");
    assert_eq!(
        std::fs::read_to_string(lower.join("hello.txt")).unwrap(),
        "original\n"
    );
    assert!(lower.join("src/app.js").exists());
    assert!(!lower.join("dist").exists());

    let export = fx.dir.path().join("export");
    let summary = sb.export_workspace(&export).await.unwrap();
    assert_eq!(
        std::fs::read_to_string(export.join("hello.txt")).unwrap(),
        "changed\n"
    );
    assert_eq!(
        std::fs::read_to_string(export.join("dist/out.txt")).unwrap(),
        "built\n"
    );
    assert!(!export.join("src/app.js").exists());
    let link = std::fs::symlink_metadata(export.join("dist/link")).unwrap();
    assert!(
        link.file_type().is_symlink(),
        "symlinks are exported as symlinks"
    );
    assert_eq!(summary.files, 2, "{summary:?}");
    // The upper layer holds exactly what changed.
    let upper = sb.upper_layer_path();
    assert!(upper.join("dist/out.txt").exists());
    assert!(!upper.join("src").join("missing").exists());
    sb.destroy().await.unwrap();
}

#[tokio::test]
async fn two_sandboxes_of_one_lower_dir_do_not_see_each_others_writes() {
    require_sandboxes!();
    let fx = Fixture::new();
    let lower = fx.lower("shared", &[("a.txt", "a\n")]);
    let one = fx.driver.create(fx.spec(&lower)).await.unwrap();
    let two = fx.driver.create(fx.spec(&lower)).await.unwrap();
    run(
        &one,
        "echo one > mine.txt && echo one > a.txt && echo one > /tmp/t",
    )
    .await
    .ok();
    let ran = run(&two, "ls; cat a.txt; ls /tmp").await.ok();
    assert_eq!(ran.stdout, "a.txt\na\n");
    one.destroy().await.unwrap();
    two.destroy().await.unwrap();
}

#[tokio::test]
async fn destroy_leaves_no_process_mount_cgroup_or_directory_behind() {
    require_sandboxes!();
    let fx = Fixture::new();
    let sb = fx.sandbox().await;
    let mut long = sb
        .spawn(ExecRequest::new("sleep 600 & sleep 600"), None)
        .await
        .unwrap();
    let id = sb.id().to_string();
    let init = sb.init_pid();
    let workload = long.pid();
    let state = fx.state_dir().join(&id);
    assert!(!cgroup_dirs(TEST_CGROUP_PARENT, &id).is_empty());
    // The sandbox's mounts live in its own mount namespace (the workspace is mounted after
    // `pivot_root`, so no mount names the state dir any more): follow the namespace itself.
    let mnt_ns = std::fs::read_link(format!("/proc/{init}/ns/mnt")).unwrap();
    assert!(!processes_in_mount_ns(&mnt_ns).is_empty());

    sb.destroy().await.unwrap();
    let status = long.wait().await.unwrap();
    assert_eq!(status.signal, Some(9), "{status:?}");
    assert!(
        !std::path::Path::new(&format!("/proc/{init}")).exists(),
        "init is gone"
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{workload}")).exists(),
        "workload is gone"
    );
    assert_eq!(
        cgroup_dirs(TEST_CGROUP_PARENT, &id),
        Vec::<std::path::PathBuf>::new()
    );
    assert!(!state.exists(), "state dir removed");
    // Any path under this fixture's state dir (a recycled state directory has a new name),
    // except in the spare built meanwhile for the next sandbox (its /etc is the template).
    let state_str = fx.state_dir().display().to_string();
    let others = || {
        let spare = fx.driver.spare_stats().ready_init_pid;
        let spare_ns = spare.and_then(|p| std::fs::read_link(format!("/proc/{p}/ns/mnt")).ok());
        processes_with_mount(&state_str)
            .into_iter()
            .filter(|pid| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok() != spare_ns)
            .collect::<Vec<_>>()
    };
    assert!(
        eventually(Duration::from_secs(5), || others().is_empty()).await,
        "no mount namespace still holds the sandbox's mounts: {:?}",
        others()
    );
    // The next sandbox reuses the (empty, renamed) directory; ids stay exclusive.
    let again = fx.sandbox().await;
    let dup = fx
        .driver
        .create(slipway_sandbox::SandboxSpec::new(again.id(), fx.dir.path()))
        .await;
    assert!(
        matches!(dup, Err(slipway_sandbox::CreateError::Exists { .. })),
        "{dup:?}"
    );
    run(&again, "true").await.ok();
    again.destroy().await.unwrap();
    // Destroy is idempotent, and a destroyed sandbox refuses work.
    sb.destroy().await.unwrap();
    assert!(matches!(
        sb.exec(ExecRequest::new("true"), None).await,
        Err(ExecError::Destroyed { .. })
    ));
}

#[tokio::test]
async fn a_bad_lower_dir_is_refused_with_a_clear_error() {
    require_sandboxes!();
    let fx = Fixture::new();
    let spec = fx.spec(&fx.dir.path().join("missing"));
    let err = fx.driver.create(spec).await.unwrap_err().to_string();
    assert!(err.contains("is not a directory"), "{err}");
}
