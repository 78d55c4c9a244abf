//! Fuzzes the regular message parser (the first byte is the message type), the SASL
//! messages, and the decoding of Bind parameters of every type in both formats.
#![no_main]

use kagi_pgsql::{types, wire};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&tag, body)) = data.split_first() else {
        return;
    };
    if let Ok(wire::Frontend::Bind { params, .. }) = wire::parse_message(tag, body) {
        assert!(params.iter().flatten().map(Vec::len).sum::<usize>() <= body.len());
    }
    let _ = wire::parse_sasl_initial(body);
    let _ = wire::parse_password(body);
    for oid in [
        16, 17, 20, 21, 23, 25, 26, 700, 701, 1082, 1083, 1114, 1184, 1700, 2950, 3802, 0, 9999,
    ] {
        let _ = types::decode_param(oid, 0, body);
        let _ = types::decode_param(oid, 1, body);
    }
});
