//! Fuzzes the decoding side of the page codec with whatever bytes a file could hold: header
//! classification, main-file pages (page 1's layout included), WAL frames and journal pages must
//! never panic and never open without the key; pages sealed from the input open back unchanged.
#![no_main]

use std::sync::LazyLock;

use kagi_sqlite_crypt::codec::{self, PageKind, RESERVE};
use kagi_sqlite_crypt::{DatabaseKey, PageCipher};
use libfuzzer_sys::fuzz_target;

static CIPHER: LazyLock<PageCipher> = LazyLock::new(|| {
    PageCipher::for_database(&DatabaseKey::new([7; 32], [1; 16])).expect("cipher")
});

fuzz_target!(|data: &[u8]| {
    let c = &*CIPHER;
    let pgno = data.first().map_or(1, |b| u32::from(b % 4));
    let _ = codec::classify_header(data);
    let mut page = data.to_vec();
    assert!(codec::open_main_page(c, pgno, &mut page).is_err());
    let mut frame = data.to_vec();
    assert!(codec::open_wal_frame(c, &mut frame, 32).is_err());
    let mut out = vec![0; data.len().saturating_sub(codec::WAL_FRAME_HEADER_LEN)];
    assert!(codec::open_wal_page_into(c, data, 32, &mut out).is_err());
    let mut record = data.to_vec();
    assert!(codec::open_page(c, PageKind::Journal, pgno, 4, &[], &mut record).is_err());
    if codec::page_size_ok(data.len()) {
        let mut plain = data.to_vec();
        let n = plain.len();
        plain[n - RESERVE..].fill(0);
        let mut sealed = plain.clone();
        let nonce = codec::fresh_nonce().expect("nonce");
        codec::seal_main_page(c, 2, &mut sealed, nonce).expect("seal");
        codec::open_main_page(c, 2, &mut sealed).expect("open");
        assert_eq!(sealed, plain);
    }
});
