//! Stand-in for the `slipway` binary's hidden sandbox-helper subcommands, used by this crate's
//! tests and benchmark.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    slipway_sandbox::helper_main(&args)
}
