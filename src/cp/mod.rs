//! The control plane (`docs/protocol.md` §4): `cp serve` stores rollouts and an
//! append-only event log in SQLite, mirrors every host through the shared
//! state machine, plans waves and serves long-polls; `cp publish` and
//! `cp status` are its operator clients.
//!
//! Reading order: [`planner`] (pure: stored state → decisions), [`store`]
//! (SQLite schema and the one writer), [`longpoll`] (the dispatch board),
//! [`config`], [`conn`] (connection limits, connection-level errors), [`routes`] (HTTP API), [`views`] (status JSON), [`metrics`],
//! [`server`] (process shell, shutdown) and [`cmd`] (operator commands,
//! through [`crate::client`]).

pub mod cmd;
pub mod config;
pub mod conn;
pub mod longpoll;
pub mod metrics;
pub mod planner;
pub mod quota;
pub mod routes;
pub mod server;
pub mod store;
pub mod views;

pub use cmd::{run, CpError};
pub use config::ServeLimits;
pub use server::{bind, serve, Acceptor, PlainAcceptor, ServeConfig, ServeReport};
