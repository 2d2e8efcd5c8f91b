//! The `gossamer` agent and CLI.
//!
//! `main.rs` is a thin shell over this library: parse ([`cli`]), validate
//! ([`config`]), bind ([`agent::Sockets`]), run ([`agent::run`]) and drain.
//!
//! # Layout
//! - [`cli`]: clap definitions of every subcommand.
//! - [`config`]: flags > env > file > defaults, validated before binding.
//! - [`identity`]: the node's mesh identity, `--dev` generation.
//! - [`agent`]: wiring of one agent: sockets, tasks, shutdown. Nothing
//!   imports it but `main` and the demo.
//! - [`members`]: the membership [`members::Snapshot`] everyone reads and
//!   the [`members::Command`]s the mesh task takes.
//! - [`mesh`]: the task that owns the membership driver (joins, member
//!   syncs, catalog replication) and carries out its I/O.
//! - [`catalog`]: registrations, health checks, the catalog sync and view.
//! - [`admin`]: the admin HTTP API; [`client`]: the CLI's side of it.
//! - [`proxy`]: the data plane (outbound listener, QUIC forwarding, inbound).
//! - [`gateway`]: ingress listeners for clients outside the mesh.
//! - [`observe`]: access logs.
//! - [`listener`]: HTTP listeners with connection caps and timeouts.
//! - [`balance`]: consistent hashing.
//! - [`demo`]: `gossamer demo` and the demo HTTP service.
//! - [`metrics`]: Prometheus exposition.
//! - [`store`]: the data dir (atomic writes).
//! - [`tasks`]: the tracker every task runs on, and the drain/stop signals.
//! - [`logging`]: tracing setup.
//! - [`memory`]: the allocator, and memory given back after a burst.

/// mimalloc, without transparent huge pages; see [`memory`].
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod admin;
pub mod agent;
pub mod balance;
pub mod ca;
pub mod catalog;
pub mod certs;
pub mod cli;
pub mod client;
pub mod config;
pub mod console;
pub mod demo;
pub mod documents;
pub mod events;
pub mod gateway;
pub mod identity;
pub mod listener;
pub mod logging;
pub mod members;
pub mod memory;
pub mod mesh;
pub mod metrics;
pub mod observe;
pub mod proxy;
pub mod store;
pub mod tasks;
pub mod upstreams;
