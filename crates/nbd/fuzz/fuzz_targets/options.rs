//! Fuzzes what a client sends during the handshake: client flags, option headers and the data
//! of every option the server parses.
#![no_main]

use kagi_nbd::proto;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = proto::parse_client_flags(data);
    if let Ok(h) = proto::parse_option_header(data) {
        assert_eq!(data.len(), proto::OPTION_HEADER_LEN);
        let _ = (h.option, h.length);
    }
    if let Ok(r) = proto::parse_info_request(data) {
        assert!(r.name.len() <= proto::MAX_STRING_LEN);
        assert_eq!(data.len(), 6 + r.name.len() + 2 * r.requests.len());
    }
    if let Ok(r) = proto::parse_meta_context_request(data, 128) {
        assert!(r.queries.len() <= 128);
        assert!(r.queries.iter().all(|q| q.len() <= proto::MAX_STRING_LEN));
    }
    if let Ok(name) = proto::parse_export_name(data) {
        assert_eq!(name.len(), data.len());
    }
});
