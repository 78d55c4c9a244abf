//! Fuzzes the startup packet parser (SSLRequest, GSSENCRequest, CancelRequest,
//! StartupMessage with its parameters).
#![no_main]

use kagi_pgsql::wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(wire::Startup::Startup { params, .. }) = wire::parse_startup(data) {
        // Every parameter came out of the packet.
        let total: usize = params.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
        assert!(total < data.len());
    }
});
