//! The NBD wire format, without I/O: constants, parsers of what a client sends and encoders of
//! what the server answers.
//!
//! Every parser takes a byte slice and returns [`ProtoError`] on any malformed input; none of
//! them panics or allocates more than the input's own size. Numbers on the wire are big-endian.
//! Reference: `doc/proto.md` of the NetworkBlockDevice/nbd repository (and its
//! `extension-ext-header` branch for extended headers).

use thiserror::Error;

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: sent by the server after [`NBD_MAGIC`] and by the client before each option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply (fixed newstyle).
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a compact (28-byte) request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of an extended (32-byte) request.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic of an extended reply chunk.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Size of a compact request header.
pub const COMPACT_REQUEST_LEN: usize = 28;
/// Size of an extended request header.
pub const EXTENDED_REQUEST_LEN: usize = 32;
/// Size of an option header after its `IHAVEOPT` magic: option (u32) and length (u32).
pub const OPTION_HEADER_LEN: usize = 16;
/// Longest string (export name, description, query, message) the protocol allows.
pub const MAX_STRING_LEN: usize = 4096;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server may omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client wants no zero padding after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag: the flags field is valid.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` is supported.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` is supported.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: the export is rotational (a seek is slow).
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
/// Transmission flag: `NBD_CMD_TRIM` is supported.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` is supported.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: `NBD_CMD_FLAG_DF` is supported.
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: a flush on one connection covers writes of every connection.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: `NBD_CMD_RESIZE` is supported.
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
/// Transmission flag: `NBD_CMD_CACHE` is supported.
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
/// Transmission flag: `NBD_CMD_FLAG_FAST_ZERO` is supported.
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;
/// Transmission flag: `NBD_CMD_BLOCK_STATUS` accepts a payload (extended headers).
pub const FLAG_BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;

/// Option: choose an export and enter transmission (no error possible).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: end the handshake.
pub const OPT_ABORT: u32 = 2;
/// Option: list exports.
pub const OPT_LIST: u32 = 3;
/// Option: upgrade the connection to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: use structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Option: use extended (64-bit) headers.
pub const OPT_EXTENDED_HEADERS: u32 = 11;
/// Option (kagi's own, not in the NBD specification; `"kagi"` in ASCII): the connection was
/// passed on by another server of kagi-nbd, which forwards it here (see docs/NBD.md,
/// "Forwarding"); the server never forwards it again. Other servers answer `REP_ERR_UNSUP`.
pub const OPT_FORWARDED: u32 = 0x6b61_6769;

/// Option reply: success, no more data.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of a list.
pub const REP_SERVER: u32 = 2;
/// Option reply: one piece of information about an export.
pub const REP_INFO: u32 = 3;
/// Option reply: one metadata context.
pub const REP_META_CONTEXT: u32 = 4;
/// Bit set in every error option reply.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// Option error: unknown option.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR + 1;
/// Option error: forbidden by policy.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR + 2;
/// Option error: syntactically or semantically invalid.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR + 3;
/// Option error: not supported on this platform.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR + 4;
/// Option error: TLS is required first.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR + 5;
/// Option error: no such export.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR + 6;
/// Option error: the server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR + 7;
/// Option error: the client must ask for block sizes.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR + 8;
/// Option error: the request or its answer is too large.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR + 9;
/// Option error: extended headers are required (or already negotiated).
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_FLAG_ERROR + 10;

/// Information type: export size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Information type: canonical export name.
pub const INFO_NAME: u16 = 1;
/// Information type: export description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Information type: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write.
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect.
pub const CMD_DISC: u16 = 2;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: trim (discard).
pub const CMD_TRIM: u16 = 4;
/// Command: prefetch into a cache.
pub const CMD_CACHE: u16 = 5;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command: block status.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: write zeroes must not leave a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag: read replies in one content chunk.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag: block status returns one extent.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag: write zeroes fails at once unless it is fast.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Command flag: the length is a payload length (extended headers).
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

/// Reply flag: last chunk of a structured or extended reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk type: nothing (success, final chunk).
pub const REPLY_TYPE_NONE: u16 = 0;
/// Chunk type: data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type: zeroes at an offset.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Chunk type: block status with 32-bit descriptors.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Chunk type: block status with 64-bit descriptors (extended headers).
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// Chunk type: error with an optional message.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
/// Chunk type: error at an offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// `base:allocation` flag: the extent is a hole.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;
/// The only metadata context this server offers.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Error value: operation not permitted.
pub const NBD_EPERM: u32 = 1;
/// Error value: input/output error.
pub const NBD_EIO: u32 = 5;
/// Error value: cannot allocate memory.
pub const NBD_ENOMEM: u32 = 12;
/// Error value: invalid argument.
pub const NBD_EINVAL: u32 = 22;
/// Error value: no space left on device.
pub const NBD_ENOSPC: u32 = 28;
/// Error value: value too large.
pub const NBD_EOVERFLOW: u32 = 75;
/// Error value: operation not supported.
pub const NBD_ENOTSUP: u32 = 95;
/// Error value: server shutting down.
pub const NBD_ESHUTDOWN: u32 = 108;

/// A malformed message from a client.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtoError {
    /// The message is shorter than its fields say.
    #[error("message truncated")]
    Truncated,
    /// Bytes remain after the last field.
    #[error("trailing bytes after the message")]
    TrailingBytes,
    /// A magic number is wrong.
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    /// The client set flags this server does not know.
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    /// A string is longer than the protocol allows.
    #[error("string of {0} bytes is longer than 4096")]
    StringTooLong(usize),
    /// A string is not UTF-8.
    #[error("string is not UTF-8")]
    NotUtf8,
    /// An option carries more queries or information requests than the server accepts.
    #[error("too many items ({0})")]
    TooManyItems(u64),
}

/// A cursor over a client's bytes that never reads past the end.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.buf.len() < n {
            return Err(ProtoError::Truncated);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtoError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u16(&mut self) -> Result<u16, ProtoError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, ProtoError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A string prefixed by its 32-bit length.
    fn string32(&mut self) -> Result<String, ProtoError> {
        let len = self.u32()? as usize;
        if len > MAX_STRING_LEN {
            return Err(ProtoError::StringTooLong(len));
        }
        utf8(self.take(len)?)
    }

    fn finish(&self) -> Result<(), ProtoError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::TrailingBytes)
        }
    }
}

fn utf8(bytes: &[u8]) -> Result<String, ProtoError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| ProtoError::NotUtf8)
}

/// The client's flags after the server's greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    /// The client speaks fixed newstyle.
    pub fixed_newstyle: bool,
    /// The client wants no zero padding after `NBD_OPT_EXPORT_NAME`.
    pub no_zeroes: bool,
}

/// Parses the 4-byte client flags; unknown bits are an error (the server must then hang up).
pub fn parse_client_flags(buf: &[u8]) -> Result<ClientFlags, ProtoError> {
    let mut r = Reader::new(buf);
    let flags = r.u32()?;
    r.finish()?;
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(ProtoError::UnknownClientFlags(flags));
    }
    Ok(ClientFlags {
        fixed_newstyle: flags & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: flags & FLAG_C_NO_ZEROES != 0,
    })
}

/// The server's greeting: `NBDMAGIC`, `IHAVEOPT` and the handshake flags.
pub fn encode_greeting() -> [u8; 18] {
    let mut out = [0u8; 18];
    out[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// Parses a server's 18-byte greeting (`NBDMAGIC`, `IHAVEOPT`, handshake flags) and returns
/// its handshake flags (the client side of the handshake, when forwarding).
pub fn parse_greeting(buf: &[u8]) -> Result<u16, ProtoError> {
    let mut r = Reader::new(buf);
    for magic in [NBD_MAGIC, IHAVEOPT] {
        let got = r.u64()?;
        if got != magic {
            return Err(ProtoError::BadMagic(got));
        }
    }
    let flags = r.u16()?;
    r.finish()?;
    Ok(flags)
}

/// Encodes one option as a client sends it: `IHAVEOPT`, option, length, data.
pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(OPTION_HEADER_LEN + data.len());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&len32(data.len()).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// Length of an option reply's header (magic, option, reply type, length).
pub const OPTION_REPLY_HEADER_LEN: usize = 20;

/// The header of one option reply, as a client reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option answered.
    pub option: u32,
    /// The reply type (`REP_*`).
    pub reply_type: u32,
    /// Length of the reply's data.
    pub length: u32,
}

/// Parses the 20-byte header of an option reply.
pub fn parse_option_reply_header(buf: &[u8]) -> Result<OptionReplyHeader, ProtoError> {
    let mut r = Reader::new(buf);
    let magic = r.u64()?;
    if magic != OPTION_REPLY_MAGIC {
        return Err(ProtoError::BadMagic(magic));
    }
    let option = r.u32()?;
    let reply_type = r.u32()?;
    let length = r.u32()?;
    r.finish()?;
    Ok(OptionReplyHeader {
        option,
        reply_type,
        length,
    })
}

/// The header of one option: which option and how many data bytes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option (`OPT_*`).
    pub option: u32,
    /// Length of the option's data.
    pub length: u32,
}

/// Parses the 16-byte option header (`IHAVEOPT`, option, length).
pub fn parse_option_header(buf: &[u8]) -> Result<OptionHeader, ProtoError> {
    let mut r = Reader::new(buf);
    let magic = r.u64()?;
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic(magic));
    }
    let option = r.u32()?;
    let length = r.u32()?;
    r.finish()?;
    Ok(OptionHeader { option, length })
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name ("" for the default export).
    pub name: String,
    /// Information types the client asked for (`INFO_*`; unknown ones are kept and ignored).
    pub requests: Vec<u16>,
}

/// Parses the data of `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub fn parse_info_request(buf: &[u8]) -> Result<InfoRequest, ProtoError> {
    let mut r = Reader::new(buf);
    let name = r.string32()?;
    let count = r.u16()?;
    let mut requests = Vec::with_capacity(usize::from(count).min(buf.len() / 2));
    for _ in 0..count {
        requests.push(r.u16()?);
    }
    r.finish()?;
    Ok(InfoRequest { name, requests })
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// Export name the contexts are for.
    pub name: String,
    /// The queries (`namespace:leaf`).
    pub queries: Vec<String>,
}

/// Parses a meta context option; more than `max_queries` queries is [`ProtoError::TooManyItems`].
pub fn parse_meta_context_request(
    buf: &[u8],
    max_queries: u32,
) -> Result<MetaContextRequest, ProtoError> {
    let mut r = Reader::new(buf);
    let name = r.string32()?;
    let count = r.u32()?;
    if count > max_queries {
        return Err(ProtoError::TooManyItems(u64::from(count)));
    }
    let mut queries = Vec::with_capacity(count as usize);
    for _ in 0..count {
        queries.push(r.string32()?);
    }
    r.finish()?;
    Ok(MetaContextRequest { name, queries })
}

/// Parses the data of `NBD_OPT_EXPORT_NAME` (the whole data is the name).
pub fn parse_export_name(buf: &[u8]) -> Result<String, ProtoError> {
    if buf.len() > MAX_STRING_LEN {
        return Err(ProtoError::StringTooLong(buf.len()));
    }
    utf8(buf)
}

/// Encodes one option reply: magic, option, reply type, length, data.
pub fn encode_option_reply(option: u32, reply_type: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&len32(data.len()).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// Encodes an error option reply with a message for the user (truncated to 4096 bytes).
pub fn encode_option_error(option: u32, error: u32, message: &str) -> Vec<u8> {
    encode_option_reply(option, error, truncate(message).as_bytes())
}

/// Encodes `NBD_REP_SERVER` for `NBD_OPT_LIST`: name and optional description.
pub fn encode_rep_server(name: &str, description: &str) -> Vec<u8> {
    let name = truncate(name);
    let mut data = Vec::with_capacity(4 + name.len() + description.len());
    data.extend_from_slice(&len32(name.len()).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(truncate(description).as_bytes());
    encode_option_reply(OPT_LIST, REP_SERVER, &data)
}

/// Encodes `NBD_REP_INFO` / `NBD_INFO_EXPORT`: size and transmission flags.
pub fn encode_info_export(option: u32, size: u64, flags: u16) -> Vec<u8> {
    let mut data = [0u8; 12];
    data[..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    data[2..10].copy_from_slice(&size.to_be_bytes());
    data[10..].copy_from_slice(&flags.to_be_bytes());
    encode_option_reply(option, REP_INFO, &data)
}

/// Encodes `NBD_REP_INFO` with a string (`INFO_NAME` or `INFO_DESCRIPTION`).
pub fn encode_info_string(option: u32, info: u16, text: &str) -> Vec<u8> {
    let text = truncate(text);
    let mut data = Vec::with_capacity(2 + text.len());
    data.extend_from_slice(&info.to_be_bytes());
    data.extend_from_slice(text.as_bytes());
    encode_option_reply(option, REP_INFO, &data)
}

/// Encodes `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`: minimum, preferred, maximum payload.
pub fn encode_info_block_size(option: u32, minimum: u32, preferred: u32, maximum: u32) -> Vec<u8> {
    let mut data = [0u8; 14];
    data[..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    data[2..6].copy_from_slice(&minimum.to_be_bytes());
    data[6..10].copy_from_slice(&preferred.to_be_bytes());
    data[10..].copy_from_slice(&maximum.to_be_bytes());
    encode_option_reply(option, REP_INFO, &data)
}

/// Encodes `NBD_REP_META_CONTEXT`: context id and name.
pub fn encode_meta_context(option: u32, id: u32, name: &str) -> Vec<u8> {
    let mut data = Vec::with_capacity(4 + name.len());
    data.extend_from_slice(&id.to_be_bytes());
    data.extend_from_slice(truncate(name).as_bytes());
    encode_option_reply(option, REP_META_CONTEXT, &data)
}

/// Encodes the answer to `NBD_OPT_EXPORT_NAME`: size, flags, and 124 zeroes unless the client
/// negotiated `NO_ZEROES`.
pub fn encode_export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(134);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.resize(out.len() + 124, 0);
    }
    out
}

/// One transmission request, compact or extended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Command (`CMD_*`).
    pub command: u16,
    /// The client's opaque cookie (handle), echoed in the reply.
    pub cookie: u64,
    /// Offset into the export.
    pub offset: u64,
    /// Effect length, or payload length (`WRITE`, or `PAYLOAD_LEN` with extended headers).
    pub length: u64,
}

impl Request {
    /// Bytes of payload that follow this header on the wire. A write always carries its
    /// data: the spec asks for `PAYLOAD_LEN` on extended writes, but qemu (10.0) sends extended
    /// writes without it, and its data follows all the same.
    pub fn payload_len(&self, extended: bool) -> u64 {
        let payload =
            self.command == CMD_WRITE || (extended && self.flags & CMD_FLAG_PAYLOAD_LEN != 0);
        if payload { self.length } else { 0 }
    }
}

/// Length of the request header for this connection.
pub fn request_header_len(extended: bool) -> usize {
    if extended {
        EXTENDED_REQUEST_LEN
    } else {
        COMPACT_REQUEST_LEN
    }
}

/// Parses a request header: 28 bytes (compact) or 32 bytes (extended). The magic must be the
/// one this connection negotiated.
pub fn parse_request(buf: &[u8], extended: bool) -> Result<Request, ProtoError> {
    let mut r = Reader::new(buf);
    let magic = r.u32()?;
    let expected = if extended {
        EXTENDED_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    if magic != expected {
        return Err(ProtoError::BadMagic(u64::from(magic)));
    }
    let flags = r.u16()?;
    let command = r.u16()?;
    let cookie = r.u64()?;
    let offset = r.u64()?;
    let length = if extended {
        r.u64()?
    } else {
        u64::from(r.u32()?)
    };
    r.finish()?;
    Ok(Request {
        flags,
        command,
        cookie,
        offset,
        length,
    })
}

/// Which reply headers a connection uses, as negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyStyle {
    /// Simple replies only (neither structured replies nor extended headers).
    Simple,
    /// Structured reply chunks (20-byte headers).
    Structured,
    /// Extended reply chunks (32-byte headers).
    Extended,
}

/// Encodes a simple reply header (data, if any, follows it).
pub fn encode_simple_reply(cookie: u64, error: u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..].copy_from_slice(&cookie.to_be_bytes());
    out
}

/// Appends a structured (`style` Structured) or extended chunk header to `out`. `offset` is the
/// request's offset (sent only in extended headers). `Simple` is treated as structured: callers
/// choose simple replies with [`encode_simple_reply`].
pub fn put_chunk_header(
    out: &mut Vec<u8>,
    style: ReplyStyle,
    flags: u16,
    chunk_type: u16,
    cookie: u64,
    offset: u64,
    payload_len: u64,
) {
    if style == ReplyStyle::Extended {
        out.extend_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&chunk_type.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&payload_len.to_be_bytes());
    } else {
        out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&chunk_type.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
        out.extend_from_slice(&len32_u64(payload_len).to_be_bytes());
    }
}

/// Encodes a final `NBD_REPLY_TYPE_NONE` chunk.
pub fn encode_none_chunk(style: ReplyStyle, cookie: u64, offset: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(32);
    put_chunk_header(
        &mut out,
        style,
        REPLY_FLAG_DONE,
        REPLY_TYPE_NONE,
        cookie,
        offset,
        0,
    );
    out
}

/// Encodes a final `NBD_REPLY_TYPE_ERROR` chunk with an optional message (truncated to 4096
/// bytes). An error of 0 is sent as `EIO`, since error chunks must carry a nonzero error.
pub fn encode_error_chunk(
    style: ReplyStyle,
    cookie: u64,
    offset: u64,
    error: u32,
    message: &str,
) -> Vec<u8> {
    let message = truncate(message);
    let error = if error == 0 { NBD_EIO } else { error };
    let mut out = Vec::with_capacity(38 + message.len());
    put_chunk_header(
        &mut out,
        style,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        offset,
        6 + message.len() as u64,
    );
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message.as_bytes());
    out
}

/// Encodes the header of a final `NBD_REPLY_TYPE_OFFSET_DATA` chunk whose `data_len` bytes of
/// data follow (sent separately, so the data is not copied). `data_offset` is where the data
/// lies in the export; `request_offset` is the request's offset (extended headers).
pub fn encode_offset_data_header(
    style: ReplyStyle,
    cookie: u64,
    request_offset: u64,
    data_offset: u64,
    data_len: u64,
    done: bool,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(40);
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    put_chunk_header(
        &mut out,
        style,
        flags,
        REPLY_TYPE_OFFSET_DATA,
        cookie,
        request_offset,
        8 + data_len,
    );
    out.extend_from_slice(&data_offset.to_be_bytes());
    out
}

/// Encodes an `NBD_REPLY_TYPE_OFFSET_HOLE` chunk: `hole_len` bytes at `hole_offset` read as
/// zeroes.
pub fn encode_offset_hole(
    style: ReplyStyle,
    cookie: u64,
    request_offset: u64,
    hole_offset: u64,
    hole_len: u32,
    done: bool,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(44);
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    put_chunk_header(
        &mut out,
        style,
        flags,
        REPLY_TYPE_OFFSET_HOLE,
        cookie,
        request_offset,
        12,
    );
    out.extend_from_slice(&hole_offset.to_be_bytes());
    out.extend_from_slice(&hole_len.to_be_bytes());
    out
}

/// Encodes a final block status chunk for one context: `NBD_REPLY_TYPE_BLOCK_STATUS` (32-bit
/// descriptors) for structured replies, `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` for extended headers.
/// Each descriptor is (length, flags); with 32-bit descriptors a length above `u32::MAX` is
/// clipped (callers pass lengths that fit). An empty list yields an invalid chunk: callers
/// always pass at least one descriptor.
pub fn encode_block_status(
    style: ReplyStyle,
    cookie: u64,
    request_offset: u64,
    context_id: u32,
    descriptors: &[(u64, u32)],
) -> Vec<u8> {
    let mut out;
    if style == ReplyStyle::Extended {
        let len = 8 + 16 * descriptors.len() as u64;
        out = Vec::with_capacity(32 + len as usize);
        put_chunk_header(
            &mut out,
            style,
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS_EXT,
            cookie,
            request_offset,
            len,
        );
        out.extend_from_slice(&context_id.to_be_bytes());
        out.extend_from_slice(&len32(descriptors.len()).to_be_bytes());
        for &(length, flags) in descriptors {
            out.extend_from_slice(&length.to_be_bytes());
            out.extend_from_slice(&u64::from(flags).to_be_bytes());
        }
    } else {
        let len = 4 + 8 * descriptors.len() as u64;
        out = Vec::with_capacity(20 + len as usize);
        put_chunk_header(
            &mut out,
            style,
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            cookie,
            request_offset,
            len,
        );
        out.extend_from_slice(&context_id.to_be_bytes());
        for &(length, flags) in descriptors {
            out.extend_from_slice(&len32_u64(length).to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
        }
    }
    out
}

/// The longest prefix of `s` within [`MAX_STRING_LEN`] bytes that ends on a character boundary.
fn truncate(s: &str) -> &str {
    if s.len() <= MAX_STRING_LEN {
        return s;
    }
    let mut end = MAX_STRING_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn len32_u64(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests;
