//! The workload's seccomp filter: default allow, and deny what container runtimes deny by
//! default. Compiled once per sandbox by init; installed by each command's process as the last
//! step before `execve`, with no_new_privs set.

use super::StepError;

#[cfg(not(target_arch = "x86_64"))]
compile_error!("the slipway sandbox's seccomp filter is written for x86_64 only");

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use std::collections::BTreeMap;

/// Denied outright with EPERM.
const DENIED: &[i64] = &[
    // kernel modules and kexec
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    // kernel programs, tracing and other processes' memory
    libc::SYS_bpf,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_perf_event_open,
    libc::SYS_kcmp,
    libc::SYS_userfaultfd,
    // kernel keyring
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    // mounts and namespaces
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_fsopen,
    libc::SYS_fsmount,
    libc::SYS_fsconfig,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_chroot,
    // machine-wide state
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_sethostname,
    libc::SYS_setdomainname,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_quotactl_fd,
    libc::SYS_syslog,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_lookup_dcookie,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_vhangup,
    libc::SYS_uselib,
    // file handles bypass path-based access checks
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
];

/// Answered with ENOSYS so that libc and runtimes fall back: clone3's flags live in memory the
/// filter cannot inspect (libc then uses clone, whose flags it can), and io_uring bypasses
/// seccomp for the operations it performs.
const UNAVAILABLE: &[i64] = &[
    libc::SYS_clone3,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
];

/// Namespace flags that clone may not carry (clone's first argument on x86_64). CLONE_NEWTIME
/// is absent on purpose: in clone's flags its bit is part of the exit signal.
const CLONE_NAMESPACE_FLAGS: [i32; 7] = [
    libc::CLONE_NEWNS,
    libc::CLONE_NEWCGROUP,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
];

/// personality() values allowed: the default, 32-bit mode (some build tools use it), the
/// UNAME26 variants, and the query value.
const PERSONALITY_ALLOWED: [u64; 5] = [0, 0x0008, 0x0002_0000, 0x0002_0008, 0xffff_ffff];

/// Terminal ioctls that inject input into, or control, another process's terminal.
const IOCTL_DENIED: [u64; 2] = [libc::TIOCSTI, libc::TIOCLINUX];

fn cond(arg: u8, len: SeccompCmpArgLen, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    // The argument index is a constant below 6, the only way `new` can fail.
    SeccompCondition::new(arg, len, op, value).expect("valid seccomp condition")
}

fn rule(conditions: Vec<SeccompCondition>) -> SeccompRule {
    SeccompRule::new(conditions).expect("non-empty seccomp rule")
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    on_match: SeccompAction,
) -> Result<BpfProgram, StepError> {
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, on_match, TargetArch::x86_64)
        .map_err(|e| StepError::new("build seccomp filter", e))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| StepError::new("compile seccomp filter", e))
}

/// The two programs: EPERM for denied calls, ENOSYS for unavailable ones. Two filters, because
/// a seccompiler filter has one match action; the kernel runs both and the non-allow one wins.
pub(crate) fn programs() -> Result<[BpfProgram; 2], StepError> {
    let mut deny: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED.iter().map(|&nr| (nr, Vec::new())).collect();
    deny.insert(
        libc::SYS_clone,
        CLONE_NAMESPACE_FLAGS
            .iter()
            .map(|&flag| {
                let flag = flag as u64;
                rule(vec![cond(
                    0,
                    SeccompCmpArgLen::Qword,
                    SeccompCmpOp::MaskedEq(flag),
                    flag,
                )])
            })
            .collect(),
    );
    deny.insert(
        libc::SYS_personality,
        vec![rule(
            PERSONALITY_ALLOWED
                .iter()
                .map(|&p| cond(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, p))
                .collect(),
        )],
    );
    deny.insert(
        libc::SYS_ioctl,
        IOCTL_DENIED
            .iter()
            .map(|&req| {
                rule(vec![cond(
                    1,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::Eq,
                    req,
                )])
            })
            .collect(),
    );
    let unavailable = UNAVAILABLE.iter().map(|&nr| (nr, Vec::new())).collect();
    Ok([
        compile(deny, SeccompAction::Errno(libc::EPERM as u32))?,
        compile(unavailable, SeccompAction::Errno(libc::ENOSYS as u32))?,
    ])
}

/// Installs both programs on the calling thread (no_new_privs must be set already).
pub(super) fn apply(programs: &[BpfProgram; 2]) -> Result<(), StepError> {
    for program in programs {
        seccompiler::apply_filter(program)
            .map_err(|e| StepError::new("install seccomp filter", e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile() {
        let [deny, unavailable] = programs().unwrap();
        assert!(deny.len() > DENIED.len());
        assert!(unavailable.len() > UNAVAILABLE.len());
    }
}
