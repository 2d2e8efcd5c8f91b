//! `gossamer demo`, the demo service it runs, and a small load generator.

pub mod loadgen;
pub mod run;
pub mod service;
