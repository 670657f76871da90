//! Test support: stands in for the `slipway` binary's hidden sandbox-helper subcommands in this
//! crate's integration tests (a test binary cannot name another package's binary).

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    slipway_sandbox::helper_main(&args)
}
