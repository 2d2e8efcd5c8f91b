//! Gossamer's membership core: SWIM (foca) without I/O.
//!
//! The agent and the simulator drive the same [`Membership`]: time comes in as
//! an argument (a `Duration` since the caller's epoch), randomness from a
//! seed, and effects come out as data: datagrams to send
//! ([`Membership::poll_transmit`]), the next timer deadline
//! ([`Membership::poll_timeout`]) and membership events
//! ([`Membership::poll_event`]). Nothing here reads a clock, opens a socket
//! or asks the OS for randomness.
//!
//! # Layout
//! - [`identity`]: [`NodeId`] (name, address, generation) and name rules.
//! - [`catalog`]: catalog entries, their merge, and the sync protocol messages.
//! - [`codec`]: the versioned, size-capped wire codec (bincode behind one module).
//! - [`config`]: [`SwimConfig`], SWIM timing shared with the simulator.
//! - [`gossip`]: custom broadcasts piggybacked on SWIM (leave notices).
//! - [`lifeguard`]: local health score and late-ack grace (Lifeguard on foca).
//! - [`links`]: which peer connections to keep open ([`LinkPolicy`]).
//! - [`sync`]: push-pull exchange of whole member lists.
//! - [`core`]: [`Membership`], SWIM itself.
//! - [`driver`]: [`Driver`], the agent's policy around the core (joins,
//!   member syncs, catalog replication), shared with the simulator.
//! - [`replica`]: catalog replication bookkeeping for the driver.
//! - [`docs`]: configuration document replication bookkeeping for the
//!   driver.
//! - [`duration`]: `"2s"`-style durations for config files.

pub mod catalog;
pub mod codec;
pub mod config;
pub mod core;
pub mod docs;
pub mod driver;
pub mod duration;
pub mod gossip;
pub mod identity;
pub mod lifeguard;
pub mod links;
pub mod replica;
pub mod sync;

pub use crate::config::SwimConfig;
pub use crate::core::{Event, MemberState, MemberView, Membership, MembershipError, Transmit};
pub use crate::driver::{Action, Driver, JoinPlan};
pub use crate::identity::{NameKey, NodeId};
pub use crate::links::{Link, LinkPolicy};
pub use crate::replica::ReplicaConfig;
