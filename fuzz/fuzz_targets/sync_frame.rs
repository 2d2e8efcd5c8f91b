//! Any bytes arriving as a catalog sync frame, and sequences of frames fed
//! to the entry assembler.
#![no_main]

use gossamer_membership::catalog::{EntryAssembler, SyncRequest, SyncResponse, decode_sync};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode_sync::<SyncRequest>(data);
    // Split the input into frames at 0xff bytes and assemble an entry.
    let mut frames = data.split(|b| *b == 0xff);
    let Some(Ok(head)) = frames.next().map(decode_sync::<SyncResponse>) else {
        return;
    };
    let Ok(mut asm) = EntryAssembler::start(head) else {
        return;
    };
    for f in frames {
        let Ok(frame) = decode_sync::<SyncResponse>(f) else {
            return;
        };
        if asm.push(frame).is_err() {
            return;
        }
    }
    let _ = asm.finish();
});
