//! Unit tests of the codec.

use super::*;
use crate::key::DatabaseKey;

fn cipher(id: u8) -> PageCipher {
    PageCipher::for_database(&DatabaseKey::new([9; 32], [id; 16])).expect("cipher")
}

fn nonce() -> [u8; NONCE_LEN] {
    fresh_nonce().expect("nonce")
}

/// A plaintext page 1 as SQLite writes it: header, 28 reserved bytes, zeros at 72..92.
fn page_one(size: usize) -> Vec<u8> {
    let mut p = vec![0u8; size];
    p[..16].copy_from_slice(&SQLITE_MAGIC);
    let field = if size == MAX_PAGE_SIZE {
        1
    } else {
        size as u16
    };
    p[16..18].copy_from_slice(&field.to_be_bytes());
    p[18] = 2;
    p[19] = 2;
    p[20] = RESERVE as u8;
    p[21..24].copy_from_slice(&[64, 32, 32]);
    for (i, b) in p[24..72].iter_mut().enumerate() {
        *b = i as u8 + 1;
    }
    for (i, b) in p[92..size - RESERVE].iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    p
}

fn data_page(size: usize, seed: u8) -> Vec<u8> {
    let mut p: Vec<u8> = (0..size).map(|i| (i as u8) ^ seed).collect();
    p[size - RESERVE..].fill(0);
    p
}

#[test]
fn main_pages_round_trip_and_hide_their_contents() {
    let c = cipher(1);
    for size in [512, 4096, 65536] {
        let plain = data_page(size, 3);
        let mut page = plain.clone();
        seal_main_page(&c, 7, &mut page, nonce()).expect("seal");
        assert_ne!(page[..size - RESERVE], plain[..size - RESERVE]);
        open_main_page(&c, 7, &mut page).expect("open");
        assert_eq!(page, plain);
    }
}

#[test]
fn page_one_keeps_a_clear_header_and_round_trips() {
    let c = cipher(1);
    for size in [512, 4096, 65536] {
        let plain = page_one(size);
        let mut page = plain.clone();
        seal_main_page(&c, 1, &mut page, nonce()).expect("seal");
        assert_eq!(page[..16], FILE_MAGIC);
        assert_eq!(page[16..24], plain[16..24]);
        assert_eq!(page[72..88], [1; 16]);
        assert_ne!(page[24..72], plain[24..72]);
        assert_ne!(page[92..200], plain[92..200]);
        match classify_header(&page[..HEADER_LEN]) {
            HeaderKind::Kagi(h) => {
                assert_eq!(h.page_size, size);
                assert_eq!(h.database_id, [1; 16]);
                assert_eq!(h.reserve, RESERVE);
            }
            other => panic!("{other:?}"),
        }
        open_main_page(&c, 1, &mut page).expect("open");
        assert_eq!(page, plain);
    }
}

#[test]
fn pages_sqlite_would_lose_bytes_of_are_refused() {
    let c = cipher(1);
    let mut used_reserve = data_page(4096, 1);
    used_reserve[4095] = 1;
    assert!(seal_main_page(&c, 2, &mut used_reserve, nonce()).is_err());
    let mut small_reserve = page_one(4096);
    small_reserve[20] = 8;
    assert!(seal_main_page(&c, 1, &mut small_reserve, nonce()).is_err());
    let mut expansion_used = page_one(4096);
    expansion_used[80] = 1;
    assert!(seal_main_page(&c, 1, &mut expansion_used, nonce()).is_err());
    let mut not_sqlite = page_one(4096);
    not_sqlite[0] = b'x';
    assert!(seal_main_page(&c, 1, &mut not_sqlite, nonce()).is_err());
    let mut odd = vec![0u8; 1000];
    assert!(seal_main_page(&c, 2, &mut odd, nonce()).is_err());
}

#[test]
fn a_page_opens_only_at_its_place_in_its_database_under_its_key() {
    let c = cipher(1);
    let mut sealed = data_page(4096, 5);
    seal_main_page(&c, 9, &mut sealed, nonce()).expect("seal");
    let attempts: [(&PageCipher, u32); 3] = [(&c, 10), (&cipher(2), 9), (&c, 8)];
    for (who, pgno) in attempts {
        let mut p = sealed.clone();
        assert_eq!(
            open_main_page(who, pgno, &mut p),
            Err(CodecError::Authentication)
        );
        assert!(
            p.iter().all(|&b| b == 0),
            "nothing of a failed page is returned"
        );
    }
    let other_key = PageCipher::for_database(&DatabaseKey::new([8; 32], [1; 16])).expect("key");
    assert!(open_main_page(&other_key, 9, &mut sealed.clone()).is_err());
    // The same bytes as a journal record of page 9 do not open either.
    let mut p = sealed.clone();
    assert!(open_page(&c, PageKind::Journal, 9, 8 * 4096, &[], &mut p).is_err());
    // Every single bit flip is caught.
    for i in (0..4096).step_by(97) {
        let mut p = sealed.clone();
        p[i] ^= 0x10;
        assert!(open_main_page(&c, 9, &mut p).is_err(), "flip at {i}");
    }
}

/// A WAL frame: header (page number, commit size, salts, checksum) and page.
fn frame(pgno: u32, page: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; WAL_FRAME_HEADER_LEN];
    f[..4].copy_from_slice(&pgno.to_be_bytes());
    f[4..8].copy_from_slice(&77u32.to_be_bytes());
    f[8..16].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
    f[16..24].copy_from_slice(&[0xaa, 0xbb, 0xcc, 0xdd, 0x11, 0x22, 0x33, 0x44]);
    f.extend_from_slice(page);
    f
}

#[test]
fn wal_frames_seal_the_page_and_mask_the_checksum() {
    let c = cipher(1);
    let plain = frame(3, &data_page(4096, 9));
    let mut f = plain.clone();
    seal_wal_frame(&c, &mut f, 32, nonce()).expect("seal");
    assert_eq!(
        f[..16],
        plain[..16],
        "page number, commit size and salts stay clear"
    );
    assert_ne!(f[16..24], plain[16..24], "the checksum is masked");
    let mut out = vec![0u8; 4096];
    open_wal_page_into(&c, &f, 32, &mut out).expect("page");
    assert_eq!(out, plain[24..]);
    let mut whole = f.clone();
    open_wal_frame(&c, &mut whole, 32).expect("frame");
    assert_eq!(whole, plain);
    // Another offset, or a changed header field, does not open.
    assert!(open_wal_frame(&c, &mut f.clone(), 32 + 4120).is_err());
    let mut changed = f.clone();
    changed[7] ^= 1;
    assert!(open_wal_frame(&c, &mut changed, 32).is_err());
    assert!(changed.iter().all(|&b| b == 0));
    // Replacing the page keeps the checksum and changes the nonce.
    let newer = data_page(4096, 10);
    let mut replaced = f.clone();
    replace_wal_page(&c, &mut replaced, 32, &newer, nonce()).expect("replace");
    assert_ne!(page_nonce(&replaced[24..]), page_nonce(&f[24..]));
    open_wal_frame(&c, &mut replaced, 32).expect("open");
    assert_eq!(replaced[..24], plain[..24]);
    assert_eq!(replaced[24..], newer[..]);
}

#[test]
fn headers_are_classified() {
    assert_eq!(classify_header(&[]), HeaderKind::Empty);
    assert_eq!(classify_header(&[0; 100]), HeaderKind::Empty);
    assert_eq!(
        classify_header(&page_one(4096)[..100]),
        HeaderKind::PlainSqlite
    );
    assert_eq!(classify_header(b"hello, world"), HeaderKind::Unknown);
    let mut bad_size = vec![0u8; 100];
    bad_size[..16].copy_from_slice(&FILE_MAGIC);
    bad_size[16..18].copy_from_slice(&1000u16.to_be_bytes());
    bad_size[20] = RESERVE as u8;
    assert_eq!(classify_header(&bad_size), HeaderKind::Unknown);
}

#[test]
fn malformed_input_never_panics() {
    let c = cipher(1);
    for len in [0, 1, 27, 28, 29, 100, 511, 513, 4095, 4096 + 24, 70000] {
        let mut b = vec![0x5a; len];
        let _ = open_main_page(&c, 1, &mut b);
        let _ = open_main_page(&c, 2, &mut b);
        let _ = open_wal_frame(&c, &mut b, 32);
        let _ = open_page(&c, PageKind::Journal, 2, 4, &[], &mut b);
        let mut out = vec![0; len.saturating_sub(WAL_FRAME_HEADER_LEN)];
        let _ = open_wal_page_into(&c, &b, 32, &mut out);
        let _ = classify_header(&b);
    }
}
