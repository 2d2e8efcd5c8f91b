//! Any bytes arriving as a push-pull member sync frame, and what decodes
//! merged into a membership core.
#![no_main]

use std::time::Duration;

use gossamer_membership::sync::SyncPayload;
use gossamer_membership::{Membership, NodeId, SwimConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(payload) = SyncPayload::decode(data) else {
        return;
    };
    let id = NodeId::new("fuzz", "127.0.0.1:7946".parse().unwrap(), 5).unwrap();
    let mut core = Membership::new(id, &SwimConfig::default(), 1).unwrap();
    core.merge_sync(Duration::from_secs(1), payload, true);
    while core.poll_transmit().is_some() {}
    while core.poll_event().is_some() {}
    let _ = core.members();
    let _ = core.sync_payload().encode();
});
