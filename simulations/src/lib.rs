//! Deterministic simulations of Gossamer's membership core.
//!
//! The simulator drives the very [`gossamer_membership::Membership`] the
//! agent runs (SWIM through foca, the same wire codec, catalog notices as
//! custom broadcasts, the same [`gossamer_membership::SwimConfig`]) on
//! virtual time, through a simulated network with latency, loss and
//! partitions, and with crashes, restarts, stalls and graceful leaves.
//! Nothing reads the wall clock or opens a socket: one seed determines a
//! whole run, and the same seed gives byte-identical output.
//!
//! The catalog is modelled at the level of entry versions: a change is a
//! notice piggybacked on SWIM (the real broadcast), followed by one fetch
//! round trip to the owner over a simulated stream; joins and restarts
//! trigger fetches, and anti-entropy exchanges digests every 5 s, as in
//! the agent.
//!
//! # Layout
//! - [`sim`]: the discrete-event engine: [`sim::Sim`], its configuration
//!   and run loop, in modules by concern:
//!   - `sim::queue`: the event queue keyed by time and sequence, and
//!     dispatch of each event to its handler;
//!   - `sim::io`: datagrams and timers into each node's driver, and its
//!     actions carried out;
//!   - `sim::stream`: stream messages (catalog fetches and digests,
//!     member syncs);
//!   - `sim::host`: per-node handlers for the CPU model (input and output
//!     costs, finished jobs) and sends routed over links;
//!   - `sim::dials`: the connection model's handshakes, failed dials and
//!     link sweeps;
//!   - `sim::lifecycle`: scenario actions and each process's start, stop,
//!     crash, leave and stall;
//!   - `sim::observe`: beliefs, suspicions and downs against ground truth,
//!     agreement over time, samples.
//! - [`net`]: latency with jitter, loss, partitions.
//! - [`cpu`]: what work costs, and machines whose cores serve their
//!   nodes' work ([`cpu::Costs`]).
//! - [`conns`]: the links each node holds, dials and handshakes.
//! - [`view`]: ground truth against each node's event-derived view.
//! - [`catalog`]: entry versions held per node and how each change spread.
//! - [`metrics`]: counters, time-series samples, crash detection.
//! - [`scenario`]: `join`, `crash`, `partition`, `loss`, `slow`, `churn`.
//! - [`formation`]: N agents started back to back on one machine with
//!   the CPU and connection models, and what forming cost them.
//! - [`compare`]: the experiments `tests/sim_vs_real.rs` runs against real
//!   agents, and the figures both sides report.
//! - [`report`]: the measured figures and the stdout summary table.
//! - [`output`]: JSON, CSV and SVG files for `--out`.
//! - [`plot`]: a small SVG line-chart writer.
//! - [`progress`]: the progress bar on stderr.

pub mod catalog;
pub mod compare;
pub mod conns;
pub mod cpu;
pub mod formation;
pub mod metrics;
pub mod net;
pub mod output;
pub mod plot;
pub mod progress;
pub mod report;
pub mod scenario;
pub mod sim;
pub mod view;

pub use crate::report::Report;
pub use crate::scenario::{Options, Scenario, run};
