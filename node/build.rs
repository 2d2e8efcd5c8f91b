//! Release builds of the `gossamer` binary lay out the code an agent runs
//! together, in the order `layout/symbol-order.txt` gives: the functions a
//! profiled pair of agents ran (`bench/layout.py`), hottest first. Fewer of
//! the binary's pages are then mapped into each agent (docs/benchmarks.md,
//! "The code an agent runs, laid out together"). It only orders code: a
//! name missing from the binary is skipped, and every function not named
//! follows in the linker's own order.
//!
//! The order is a flag of lld, which Rust uses to link
//! `x86_64-unknown-linux-gnu` since 1.90; a build that picks another linker
//! (`-C linker=…`, `-C linker-features=…`) is linked in the default order.

use std::env;
use std::path::Path;

fn main() {
    let order = Path::new(&env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"))
        .join("layout")
        .join("symbol-order.txt");
    println!("cargo:rerun-if-changed={}", order.display());
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER");
    let release = env::var("PROFILE").is_ok_and(|p| p == "release");
    let lld = env::var("TARGET").is_ok_and(|t| t == "x86_64-unknown-linux-gnu")
        && rustc_minor().is_some_and(|minor| minor >= 90)
        && env::var_os("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER").is_none()
        && !env::var("CARGO_ENCODED_RUSTFLAGS")
            .unwrap_or_default()
            .split('\x1f')
            .any(|flag| flag.contains("linker"));
    if release && lld && order.is_file() {
        println!(
            "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
            order.display()
        );
        println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
}

/// The minor version of the compiler building this crate (`rustc 1.95.0`
/// gives 95).
fn rustc_minor() -> Option<u32> {
    let rustc = env::var_os("RUSTC")?;
    let out = std::process::Command::new(rustc).arg("-V").output().ok()?;
    let version = String::from_utf8(out.stdout).ok()?;
    version
        .split_whitespace()
        .nth(1)?
        .split('.')
        .nth(1)?
        .parse()
        .ok()
}
