//! The one integration-test binary: runs the real `nixfleet` executable for
//! CLI, crash and fleet tests, the control plane over real
//! HTTP, and the agent's parts against real Nix, processes and sockets.

mod activation;
mod agent;
mod agent_net;
mod cli;
mod cp;
mod cp_rules;
mod delivery;
mod demo;
mod harness;
mod nixos;
pub mod nixenv;
mod metrics;
mod openapi;
mod pki;
mod probes;
mod protocol_doc;
mod queue;
mod sdnotify;
mod web;
mod tls;
mod workers;
