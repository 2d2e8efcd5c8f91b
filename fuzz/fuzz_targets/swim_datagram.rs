//! Any bytes arriving as a SWIM datagram: the versioned header, member
//! updates and custom broadcasts (catalog and leave notices), all the way
//! through foca. Must never panic or allocate without bound.
#![no_main]

use std::time::Duration;

use gossamer_membership::{Membership, NodeId, SwimConfig, codec};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = codec::peek_header(data);
    let id = NodeId::new("fuzz", ([127, 0, 0, 1], 7946).into(), 1).expect("valid");
    let mut core = Membership::new(id, &SwimConfig::default(), 7).expect("valid config");
    // Attribute the datagram to whoever it claims to be, so it gets past
    // the identity check and into foca.
    let sender = codec::peek_header(data)
        .map(|h| h.src.name)
        .unwrap_or_else(|_| "peer".to_owned());
    let _ = core.handle_datagram(Duration::from_secs(1), &sender, data);
    while core.poll_transmit().is_some() {}
    while core.poll_event().is_some() {}
    core.handle_timeout(Duration::from_secs(60));
    let _ = core.members();
});
