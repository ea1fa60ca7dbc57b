//! Shared helpers of the nodemesh eBPF programs. The programs themselves live in `main.rs`;
//! this library target exists so that `mesh-agent`'s build script can depend on the crate and
//! be rebuilt when it changes.
#![no_std]
