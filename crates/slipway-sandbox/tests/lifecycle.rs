//! Start-up cleanup after a crash, support checks.

use crate::require_sandboxes;
use crate::util::*;
use slipway_sandbox::ExecRequest;
use std::path::Path;
use std::time::Duration;

#[tokio::test]
async fn cleanup_leftovers_removes_what_a_crashed_slipway_left() {
    require_sandboxes!();
    // Its own cgroup parent, so that cleaning up cannot touch other tests' sandboxes.
    let parent = format!("slipway-crash-{}", std::process::id());
    let fx = Fixture::with_config(|config| {
        config.cgroup_parent = parent.clone();
        config.remove_cgroup_parent_on_drop = true;
    });

    // One sandbox whose init was killed (the helper crashed) ...
    let crashed = fx.sandbox().await;
    let crashed_id = crashed.id().to_string();
    let crashed_init = crashed.init_pid();
    // ... and one whose init survived with a running command (slipway vanished without its
    // parent-death signal reaching the helpers).
    let orphaned = fx.sandbox().await;
    let orphaned_id = orphaned.id().to_string();
    let orphaned_init = orphaned.init_pid();
    let sleeper = orphaned
        .spawn(ExecRequest::new("exec sleep 600"), None)
        .await
        .unwrap();
    let sleeper_pid = sleeper.pid();

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(crashed_init),
        nix::sys::signal::SIGKILL,
    )
    .unwrap();
    // Forget the handles: their destructors would clean up, which is what a crash skips.
    std::mem::forget(crashed);
    std::mem::forget(orphaned);
    std::mem::forget(sleeper);
    let gone = |pid: i32| move || !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid);
    assert!(eventually(Duration::from_secs(5), gone(crashed_init)).await);
    assert!(
        !cgroup_dirs(&parent, &crashed_id).is_empty(),
        "the crash left a cgroup"
    );
    assert!(
        fx.state_dir().join(&crashed_id).exists(),
        "the crash left a state dir"
    );

    let report = fx.driver.cleanup_leftovers();
    assert_eq!(report.errors, Vec::<String>::new());
    let mut expected = vec![crashed_id.clone(), orphaned_id.clone()];
    expected.sort();
    assert_eq!(report.sandboxes, expected);
    assert!(report.killed_processes >= 1, "{report:?}");
    for id in [&crashed_id, &orphaned_id] {
        assert_eq!(cgroup_dirs(&parent, id), Vec::<std::path::PathBuf>::new());
        assert!(!fx.state_dir().join(id).exists());
    }
    assert!(
        eventually(Duration::from_secs(5), gone(orphaned_init)).await,
        "surviving init killed"
    );
    assert!(
        eventually(Duration::from_secs(5), gone(sleeper_pid)).await,
        "its workload too"
    );
    // A second pass finds nothing.
    assert_eq!(
        fx.driver.cleanup_leftovers().sandboxes,
        Vec::<String>::new()
    );
    // The driver's own spare (a cgroup under the parent) goes with the driver.
    drop(fx);
    for root in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let _ = std::fs::remove_dir(root.path().join(&parent));
    }
    let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(&parent));
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z'))
    })
}

#[test]
fn check_support_passes_here_or_names_what_is_missing() {
    match slipway_sandbox::check_support() {
        Ok(()) => {}
        Err(e) => {
            assert!(!e.missing.is_empty());
            let text = e.to_string();
            assert!(
                text.starts_with("sandboxes are unavailable on this host:"),
                "{text}"
            );
            if std::env::var_os("CI").is_some() {
                panic!("{text}");
            }
            eprintln!("SKIPPED (needs sandbox support): {text}");
        }
    }
}

/// Set in the child process of `nothing_survives_when_slipway_is_killed`.
const CRASH_CHILD_DIR: &str = "SLIPWAY_SANDBOX_TEST_CRASH_CHILD_DIR";
const CRASH_CHILD_PARENT: &str = "SLIPWAY_SANDBOX_TEST_CRASH_CHILD_CGROUP";

/// Not a test by itself: the body of the "slipway" process that
/// `nothing_survives_when_slipway_is_killed` starts (this test binary, re-executed with the
/// variables above) and then kills. Without them it returns at once.
#[tokio::test]
async fn crash_child_process() {
    let (Some(dir), Some(parent)) = (
        std::env::var_os(CRASH_CHILD_DIR),
        std::env::var(CRASH_CHILD_PARENT).ok(),
    ) else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    let mut config = slipway_sandbox::DriverConfig::new(
        env!("CARGO_BIN_EXE_slipway-sandbox-helper"),
        dir.join("state"),
    );
    config.cgroup_parent = parent;
    let driver = slipway_sandbox::LinuxDriver::new(config).unwrap();
    let lower = dir.join("lower");
    std::fs::create_dir_all(&lower).unwrap();
    chown_tree(&lower, slipway_sandbox::DEFAULT_WORKLOAD_ID);
    let sb = driver
        .create(slipway_sandbox::SandboxSpec::new(unique_id("k"), &lower))
        .await
        .unwrap();
    let workload = sb
        .spawn(ExecRequest::new("exec sleep 600"), None)
        .await
        .unwrap();
    println!("READY {} {} {}", sb.init_pid(), workload.pid(), sb.id());
    std::future::pending::<()>().await;
}

#[tokio::test]
async fn nothing_survives_when_slipway_is_killed() {
    require_sandboxes!();
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let parent = format!("slipway-kill-{}", std::process::id());
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "lifecycle::crash_child_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_CHILD_DIR, dir.path())
        .env(CRASH_CHILD_PARENT, &parent)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let ready = stdout
        .lines()
        .map_while(Result::ok)
        // libtest prints the test's name on the same line first.
        .find_map(|l| l.split_once("READY ").map(|(_, rest)| rest.to_string()))
        .expect("the child never reported its sandbox");
    let fields: Vec<&str> = ready.split_whitespace().collect();
    let (init, workload, id) = (
        fields[0].parse::<i32>().unwrap(),
        fields[1].parse::<i32>().unwrap(),
        fields[2].to_string(),
    );
    assert!(Path::new(&format!("/proc/{workload}")).exists());

    child.kill().unwrap();
    child.wait().unwrap();
    let gone = |pid: i32| move || !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid);
    assert!(
        eventually(Duration::from_secs(10), gone(init)).await,
        "init died with slipway"
    );
    assert!(
        eventually(Duration::from_secs(10), gone(workload)).await,
        "the workload too"
    );

    // What remains is bookkeeping, which start-up cleanup removes.
    let fx_config = {
        let mut c = slipway_sandbox::DriverConfig::new(
            env!("CARGO_BIN_EXE_slipway-sandbox-helper"),
            dir.path().join("state"),
        );
        c.cgroup_parent = parent.clone();
        c
    };
    let driver = slipway_sandbox::LinuxDriver::new(fx_config).unwrap();
    let report = driver.cleanup_leftovers();
    assert_eq!(report.sandboxes, vec![id.clone()], "{report:?}");
    assert_eq!(cgroup_dirs(&parent, &id), Vec::<std::path::PathBuf>::new());
    for root in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let _ = std::fs::remove_dir(root.path().join(&parent));
    }
}

#[tokio::test]
async fn a_driver_dropped_after_its_sandboxes_leaves_no_cgroup_behind() {
    require_sandboxes!();
    let parent = format!("slipway-drop-{}", std::process::id());
    let fx = Fixture::with_config(|config| {
        config.cgroup_parent = parent.clone();
        config.remove_cgroup_parent_on_drop = true;
    });
    let sandbox = fx.sandbox().await;
    let id = sandbox.id().to_string();
    assert!(
        !cgroup_dirs(&parent, &id).is_empty(),
        "the sandbox has a cgroup"
    );
    sandbox.destroy().await.unwrap();
    assert_eq!(cgroup_dirs(&parent, &id), Vec::<std::path::PathBuf>::new());
    // The driver builds a spare for the next create meanwhile: dropping the driver (as a
    // server that stops does) removes the spare, and then the now empty parent cgroups.
    drop(fx);
    assert!(
        eventually(Duration::from_secs(10), || cgroup_dirs(&parent, "")
            .is_empty())
        .await,
        "parent cgroups left: {:?}",
        cgroup_dirs(&parent, "")
    );
}
