//! `gossamer demo` and the demo service it runs.

pub mod service;
