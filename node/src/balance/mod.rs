//! Load balancing: consistent hashing over a service's instances.
//!
//! [`rendezvous`] is what the proxy uses; [`maglev`] is kept as the measured
//! alternative (see docs/benchmarks.md).

pub mod maglev;
pub mod rendezvous;
