use super::*;

fn be32(v: u32) -> [u8; 4] {
    v.to_be_bytes()
}

fn option_header(option: u32, len: u32) -> Vec<u8> {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend(be32(option));
    v.extend(be32(len));
    v
}

fn request(magic: u32, flags: u16, cmd: u16, cookie: u64, offset: u64, len: &[u8]) -> Vec<u8> {
    let mut v = be32(magic).to_vec();
    v.extend(flags.to_be_bytes());
    v.extend(cmd.to_be_bytes());
    v.extend(cookie.to_be_bytes());
    v.extend(offset.to_be_bytes());
    v.extend(len);
    v
}

fn compact_request(flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    request(
        REQUEST_MAGIC,
        flags,
        cmd,
        cookie,
        offset,
        &len.to_be_bytes(),
    )
}

fn extended_request(flags: u16, cmd: u16, cookie: u64, offset: u64, len: u64) -> Vec<u8> {
    request(
        EXTENDED_REQUEST_MAGIC,
        flags,
        cmd,
        cookie,
        offset,
        &len.to_be_bytes(),
    )
}

fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut v = be32(name.len() as u32).to_vec();
    v.extend(name.as_bytes());
    v.extend((infos.len() as u16).to_be_bytes());
    for i in infos {
        v.extend(i.to_be_bytes());
    }
    v
}

fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = be32(name.len() as u32).to_vec();
    v.extend(name.as_bytes());
    v.extend(be32(queries.len() as u32));
    for q in queries {
        v.extend(be32(q.len() as u32));
        v.extend(q.as_bytes());
    }
    v
}

#[test]
fn greeting_is_magic_ihaveopt_and_flags() {
    let g = encode_greeting();
    assert_eq!(&g[..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], b"IHAVEOPT");
    assert_eq!(&g[16..], &[0, 3]);
}

#[test]
fn client_side_greeting_options_and_replies_round_trip() {
    assert_eq!(parse_greeting(&encode_greeting()), Ok(3));
    let mut bad = encode_greeting();
    bad[9] ^= 1;
    assert!(matches!(parse_greeting(&bad), Err(ProtoError::BadMagic(_))));
    assert_eq!(
        parse_greeting(&encode_greeting()[..17]),
        Err(ProtoError::Truncated)
    );
    let opt = encode_option(OPT_GO, b"abc");
    assert_eq!(
        parse_option_header(&opt[..OPTION_HEADER_LEN]),
        Ok(OptionHeader {
            option: OPT_GO,
            length: 3
        })
    );
    assert_eq!(&opt[OPTION_HEADER_LEN..], b"abc");
    let reply = encode_option_error(OPT_GO, REP_ERR_UNKNOWN, "gone");
    assert_eq!(
        parse_option_reply_header(&reply[..OPTION_REPLY_HEADER_LEN]),
        Ok(OptionReplyHeader {
            option: OPT_GO,
            reply_type: REP_ERR_UNKNOWN,
            length: 4
        })
    );
    assert!(matches!(
        parse_option_reply_header(&opt[..OPTION_HEADER_LEN]),
        Err(ProtoError::BadMagic(_))
    ));
}

#[test]
fn client_flags_known_and_unknown() {
    assert_eq!(
        parse_client_flags(&be32(3)),
        Ok(ClientFlags {
            fixed_newstyle: true,
            no_zeroes: true
        })
    );
    assert_eq!(
        parse_client_flags(&be32(4)),
        Err(ProtoError::UnknownClientFlags(4))
    );
    assert_eq!(parse_client_flags(&[0, 0, 1]), Err(ProtoError::Truncated));
}

#[test]
fn option_header_parses_and_rejects_bad_magic() {
    assert_eq!(
        parse_option_header(&option_header(OPT_GO, 12)),
        Ok(OptionHeader {
            option: OPT_GO,
            length: 12
        })
    );
    let mut bad = option_header(OPT_GO, 0);
    bad[0] ^= 1;
    assert!(matches!(
        parse_option_header(&bad),
        Err(ProtoError::BadMagic(_))
    ));
    assert_eq!(
        parse_option_header(&option_header(OPT_GO, 0)[..15]),
        Err(ProtoError::Truncated)
    );
}

#[test]
fn info_request_round_trip_and_errors() {
    let d = info_data("disk-1", &[INFO_BLOCK_SIZE, INFO_NAME]);
    assert_eq!(
        parse_info_request(&d),
        Ok(InfoRequest {
            name: "disk-1".into(),
            requests: vec![INFO_BLOCK_SIZE, INFO_NAME]
        })
    );
    // One info request short.
    assert_eq!(
        parse_info_request(&d[..d.len() - 2]),
        Err(ProtoError::Truncated)
    );
    // Trailing garbage.
    let mut t = d.clone();
    t.push(0);
    assert_eq!(parse_info_request(&t), Err(ProtoError::TrailingBytes));
    // Name length beyond the data.
    let mut long = d.clone();
    long[..4].copy_from_slice(&be32(1000));
    assert_eq!(parse_info_request(&long), Err(ProtoError::Truncated));
    // Name longer than the protocol allows.
    long[..4].copy_from_slice(&be32(5000));
    assert_eq!(
        parse_info_request(&long),
        Err(ProtoError::StringTooLong(5000))
    );
    // Not UTF-8.
    let bad = info_data("\u{0}", &[]);
    let mut bad = bad;
    bad[4] = 0xff;
    assert_eq!(parse_info_request(&bad), Err(ProtoError::NotUtf8));
    // A count of 65535 with no items is truncated, not a huge allocation.
    let mut huge = be32(0).to_vec();
    huge.extend(u16::MAX.to_be_bytes());
    assert_eq!(parse_info_request(&huge), Err(ProtoError::Truncated));
}

#[test]
fn meta_context_request_parses_and_limits_queries() {
    let d = meta_data("x", &["base:allocation", "qemu:dirty-bitmap:a"]);
    assert_eq!(
        parse_meta_context_request(&d, 16),
        Ok(MetaContextRequest {
            name: "x".into(),
            queries: vec!["base:allocation".into(), "qemu:dirty-bitmap:a".into()]
        })
    );
    assert_eq!(
        parse_meta_context_request(&d, 1),
        Err(ProtoError::TooManyItems(2))
    );
    let mut huge = meta_data("", &[]);
    huge[4..8].copy_from_slice(&be32(u32::MAX));
    assert_eq!(
        parse_meta_context_request(&huge, 128),
        Err(ProtoError::TooManyItems(u64::from(u32::MAX)))
    );
    assert_eq!(
        parse_meta_context_request(&d[..d.len() - 1], 16),
        Err(ProtoError::Truncated)
    );
}

#[test]
fn compact_and_extended_requests() {
    let r = parse_request(&compact_request(1, CMD_WRITE, 7, 4096, 512), false).unwrap();
    assert_eq!(
        r,
        Request {
            flags: 1,
            command: CMD_WRITE,
            cookie: 7,
            offset: 4096,
            length: 512
        }
    );
    assert_eq!(r.payload_len(false), 512);
    let r = parse_request(
        &extended_request(CMD_FLAG_PAYLOAD_LEN, CMD_WRITE, 9, 0, 1 << 20),
        true,
    )
    .unwrap();
    assert_eq!(r.payload_len(true), 1 << 20);
    let r = parse_request(&extended_request(0, CMD_TRIM, 9, 0, 1 << 40), true).unwrap();
    assert_eq!((r.length, r.payload_len(true)), (1 << 40, 0));
    // The wrong magic for the negotiated style is refused.
    assert!(matches!(
        parse_request(&compact_request(0, CMD_READ, 1, 0, 1), true),
        Err(ProtoError::Truncated | ProtoError::BadMagic(_))
    ));
    assert!(matches!(
        parse_request(&extended_request(0, CMD_READ, 1, 0, 1), false),
        Err(ProtoError::TrailingBytes | ProtoError::BadMagic(_))
    ));
    assert_eq!(
        parse_request(&compact_request(0, CMD_READ, 1, 0, 1)[..27], false),
        Err(ProtoError::Truncated)
    );
}

#[test]
fn option_replies_encode() {
    let ack = encode_option_reply(OPT_GO, REP_ACK, &[]);
    assert_eq!(ack.len(), 20);
    assert_eq!(&ack[..8], &OPTION_REPLY_MAGIC.to_be_bytes());
    assert_eq!(&ack[8..12], &be32(OPT_GO));
    assert_eq!(&ack[12..16], &be32(REP_ACK));
    assert_eq!(&ack[16..20], &be32(0));

    let e = encode_info_export(OPT_GO, 1 << 30, 0x1234);
    assert_eq!(&e[16..20], &be32(12));
    assert_eq!(&e[20..22], &INFO_EXPORT.to_be_bytes());
    assert_eq!(&e[22..30], &(1u64 << 30).to_be_bytes());
    assert_eq!(&e[30..32], &0x1234u16.to_be_bytes());

    let b = encode_info_block_size(OPT_INFO, 1, 4096, 32 << 20);
    assert_eq!(&b[16..20], &be32(14));
    assert_eq!(&b[30..34], &be32(32 << 20));

    let n = encode_info_string(OPT_GO, INFO_DESCRIPTION, "a disk");
    assert_eq!(&n[16..20], &be32(8));
    assert_eq!(&n[22..], b"a disk");

    let s = encode_rep_server("n", "desc");
    assert_eq!(&s[12..16], &be32(REP_SERVER));
    assert_eq!(&s[16..20], &be32(9));
    assert_eq!(&s[20..24], &be32(1));
    assert_eq!(&s[24..], b"ndesc");

    let m = encode_meta_context(OPT_SET_META_CONTEXT, 1, BASE_ALLOCATION);
    assert_eq!(&m[20..24], &be32(1));
    assert_eq!(&m[24..], BASE_ALLOCATION.as_bytes());

    let err = encode_option_error(OPT_GO, REP_ERR_UNKNOWN, &"é".repeat(3000));
    let len = u32::from_be_bytes(err[16..20].try_into().unwrap()) as usize;
    assert!(len <= MAX_STRING_LEN && len.is_multiple_of(2));
    assert!(std::str::from_utf8(&err[20..]).is_ok());

    assert_eq!(encode_export_name_reply(5, 1, false).len(), 134);
    assert_eq!(encode_export_name_reply(5, 1, true).len(), 10);
}

#[test]
fn transmission_replies_encode() {
    let s = encode_simple_reply(0xabcd, NBD_EIO);
    assert_eq!(&s[..4], &be32(SIMPLE_REPLY_MAGIC));
    assert_eq!(&s[4..8], &be32(5));
    assert_eq!(&s[8..], &0xabcdu64.to_be_bytes());

    let n = encode_none_chunk(ReplyStyle::Structured, 3, 99);
    assert_eq!(n.len(), 20);
    assert_eq!(&n[4..6], &REPLY_FLAG_DONE.to_be_bytes());
    let n = encode_none_chunk(ReplyStyle::Extended, 3, 99);
    assert_eq!(n.len(), 32);
    assert_eq!(&n[..4], &be32(EXTENDED_REPLY_MAGIC));
    assert_eq!(&n[16..24], &99u64.to_be_bytes());

    let e = encode_error_chunk(ReplyStyle::Structured, 3, 0, NBD_EIO, "key revoked");
    assert_eq!(&e[6..8], &REPLY_TYPE_ERROR.to_be_bytes());
    assert_eq!(&e[16..20], &be32(6 + 11));
    assert_eq!(&e[20..24], &be32(NBD_EIO));
    assert_eq!(&e[24..26], &11u16.to_be_bytes());
    assert_eq!(&e[26..], b"key revoked");
    // Error 0 is never sent in an error chunk.
    let e = encode_error_chunk(ReplyStyle::Extended, 3, 0, 0, "");
    assert_eq!(&e[32..36], &be32(NBD_EIO));

    let d = encode_offset_data_header(ReplyStyle::Structured, 1, 512, 512, 4096, true);
    assert_eq!(&d[6..8], &REPLY_TYPE_OFFSET_DATA.to_be_bytes());
    assert_eq!(&d[16..20], &be32(4104));
    assert_eq!(&d[20..28], &512u64.to_be_bytes());

    let h = encode_offset_hole(ReplyStyle::Extended, 1, 0, 0, 65536, true);
    assert_eq!(&h[24..32], &12u64.to_be_bytes());
    assert_eq!(&h[40..44], &be32(65536));

    let b = encode_block_status(ReplyStyle::Structured, 1, 0, 1, &[(4096, 0), (8192, 3)]);
    assert_eq!(&b[6..8], &REPLY_TYPE_BLOCK_STATUS.to_be_bytes());
    assert_eq!(&b[16..20], &be32(4 + 16));
    assert_eq!(&b[28..32], &be32(0));
    assert_eq!(&b[32..36], &be32(8192));
    assert_eq!(&b[36..40], &be32(3));
    let b = encode_block_status(ReplyStyle::Extended, 1, 0, 1, &[(1 << 33, STATE_HOLE)]);
    assert_eq!(&b[6..8], &REPLY_TYPE_BLOCK_STATUS_EXT.to_be_bytes());
    assert_eq!(&b[24..32], &24u64.to_be_bytes());
    assert_eq!(&b[36..40], &be32(1));
    assert_eq!(&b[40..48], &(1u64 << 33).to_be_bytes());
    assert_eq!(&b[48..56], &1u64.to_be_bytes());
}

/// A small deterministic generator (xorshift64*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Mutates a valid message: flip, set, insert, delete or truncate bytes, or plant a big
/// length.
fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..=rng.below(4) {
        match rng.below(6) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            2 => {
                let i = rng.below(v.len() + 1);
                v.insert(i, rng.next() as u8);
            }
            3 if !v.is_empty() => {
                let i = rng.below(v.len());
                v.remove(i);
            }
            4 => {
                let n = rng.below(v.len() + 1);
                v.truncate(n);
            }
            _ if v.len() >= 4 => {
                let i = rng.below(v.len() - 3);
                let big = [0xffu8, 0xff, 0xff, 0xf0 | rng.below(16) as u8];
                v[i..i + 4].copy_from_slice(&big);
            }
            _ => v.push(rng.next() as u8),
        }
    }
    v
}

/// Every parser, fed random and mutated inputs, returns without panicking; accepted inputs
/// are consistent with what was parsed.
#[test]
fn parsers_never_panic_on_random_and_mutated_input() {
    let seeds: Vec<Vec<u8>> = vec![
        option_header(OPT_GO, 10),
        info_data("disk", &[INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION]),
        meta_data("disk", &["base:allocation", "base:"]),
        compact_request(CMD_FLAG_FUA, CMD_WRITE, 1, 4096, 4096),
        extended_request(CMD_FLAG_PAYLOAD_LEN, CMD_WRITE, 1, 0, 1 << 20),
        be32(3).to_vec(),
    ];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for round in 0..200_000 {
        let input = if round % 4 == 0 {
            let n = rng.below(80);
            (0..n).map(|_| rng.next() as u8).collect()
        } else {
            let seed = &seeds[rng.below(seeds.len())];
            mutate(&mut rng, seed)
        };
        parse_all(&input);
    }
}

/// Runs every parser over `input` (shared with the fuzz target's logic).
fn parse_all(input: &[u8]) {
    let _ = parse_client_flags(input);
    if let Ok(h) = parse_option_header(input) {
        assert_eq!(input.len(), OPTION_HEADER_LEN);
        let _ = h;
    }
    if let Ok(r) = parse_info_request(input) {
        assert!(r.name.len() <= MAX_STRING_LEN);
        assert_eq!(input.len(), 4 + r.name.len() + 2 + 2 * r.requests.len());
    }
    if let Ok(r) = parse_meta_context_request(input, 128) {
        assert!(r.queries.len() <= 128);
    }
    let _ = parse_export_name(input);
    if parse_greeting(input).is_ok() {
        assert_eq!(input.len(), 18);
    }
    if parse_option_reply_header(input).is_ok() {
        assert_eq!(input.len(), OPTION_REPLY_HEADER_LEN);
    }
    if let Ok(r) = parse_request(input, false) {
        assert_eq!(input.len(), COMPACT_REQUEST_LEN);
        assert!(r.length <= u64::from(u32::MAX));
    }
    if parse_request(input, true).is_ok() {
        assert_eq!(input.len(), EXTENDED_REQUEST_LEN);
    }
}
