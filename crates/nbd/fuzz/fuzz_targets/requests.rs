//! Fuzzes transmission request headers, compact and extended, and the payload length the
//! server derives from them.
#![no_main]

use kagi_nbd::proto;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = proto::parse_request(data, false) {
        assert_eq!(data.len(), proto::COMPACT_REQUEST_LEN);
        assert!(r.payload_len(false) <= u64::from(u32::MAX));
    }
    if let Ok(r) = proto::parse_request(data, true) {
        assert_eq!(data.len(), proto::EXTENDED_REQUEST_LEN);
        let _ = r.payload_len(true);
    }
});
