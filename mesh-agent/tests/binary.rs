//! The agent binary as linked. Its relative relocations are packed (`-z pack-relative-relocs`,
//! set by the build script): the dynamic loader reads them once at start-up, and as a plain
//! `.rela.dyn` they were 600 KB of the agent's resident memory for good (docs/performance.md).

use std::process::Command;

fn readelf(args: &[&str]) -> String {
    let out = Command::new("readelf")
        .args(args)
        .arg(env!("CARGO_BIN_EXE_mesh-agent"))
        .output()
        .expect("readelf (binutils, which links the agent) runs");
    assert!(out.status.success(), "readelf {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn relative_relocations_are_packed() {
    let dynamic = readelf(&["-d", "-W"]);
    assert!(dynamic.contains("(RELR)"), "no DT_RELR entry:\n{dynamic}");
    // `[ 9] .rela.dyn RELA <addr> <offset> <size> ...`: what is left unpacked is small.
    let sections = readelf(&["-S", "-W"]);
    let rela = sections
        .lines()
        .find(|l| l.contains(" .rela.dyn "))
        .unwrap_or_else(|| panic!("no .rela.dyn:\n{sections}"));
    let fields: Vec<&str> = rela.split_whitespace().collect();
    let at = fields
        .iter()
        .position(|f| *f == "RELA")
        .expect("section type");
    let size = u64::from_str_radix(fields[at + 3], 16).expect("hex size");
    assert!(size < 64 * 1024, ".rela.dyn is {size} bytes: {rela}");
}
