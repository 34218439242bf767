//! The host agent (`nixfleet agent`, issue 5). Only the pieces that do not
//! depend on the queue or the control plane live here so far: activation
//! (nix-store, nix-env, a detached switch) and the probe runners.

pub mod activation;
pub mod probes;
