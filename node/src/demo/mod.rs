//! `gossamer demo`, the demo service it runs, and a small load generator.

mod certs;
mod gateway;
pub mod loadgen;
pub mod run;
pub mod service;
