//! Builds the eBPF programs of `mesh-ebpf` (nightly, bpfel-unknown-none, bpf-linker) and
//! places the object in OUT_DIR, where `capture` embeds it. `cargo xtask setup` installs the
//! toolchain pieces this needs.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    // Relative relocations as a bitmap (DT_RELR; GNU ld 2.38+, loaded by glibc 2.36+): the
    // plain table was 600 KB the loader reads once and that then stayed resident.
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    let ebpf = Package {
        name: "mesh-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../mesh-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], Toolchain::default())
        .context("building the eBPF programs failed; run `cargo xtask setup` to install the nightly rust-src and bpf-linker")
        .map_err(|e| anyhow!("{e:#}"))
}
