//! Empty on purpose: the programs are the `mesh` binary target (see main.rs). This library
//! target lets mesh-userspace declare a build-dependency on this crate, so that cargo rebuilds
//! the programs when they change.
#![no_std]
