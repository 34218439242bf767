//! The control plane (`docs/protocol.md` §4): `cp serve` stores rollouts and an
//! event log in SQLite (bounded per (host, rollout) by record checkpoints),
//! mirrors every host through the shared state machine, plans waves and
//! serves long-polls; `cp publish` and `cp status` are its operator clients.
//!
//! Reading order: [`planner`] (pure: stored state → decisions), [`store`]
//! (SQLite schema and the one writer), [`longpoll`] (the dispatch board),
//! [`config`], [`conn`] (connection limits, connection-level errors),
//! [`authz`] (who may call what), [`quota`] (per-host quotas),
//! [`route_table`] (every endpoint), [`routes`] (HTTP API), [`actions`]
//! (operator actions and the dry run, with [`preview`]), [`views`] (status
//! JSON), [`web`] (the status page and the API document), [`metrics`],
//! [`server`] (process shell, shutdown), [`transport`] (mutual TLS) and
//! [`cmd`] (operator commands,
//! through [`crate::client`]).

pub mod actions;
pub mod authz;
pub mod cmd;
pub mod config;
pub mod conn;
pub mod longpoll;
pub mod metrics;
pub mod operator_cmd;
pub mod planner;
pub mod preview;
pub mod route_table;
pub mod quota;
pub mod routes;
pub mod server;
pub mod store;
pub mod transport;
pub mod views;
pub mod watch;
pub mod web;

pub use cmd::{run, CpError};
pub use config::ServeLimits;
pub use server::{bind, serve, Acceptor, PlainAcceptor, ServeConfig, ServeReport};
pub use transport::TlsAcceptor;
