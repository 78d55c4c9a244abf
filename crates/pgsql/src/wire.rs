//! The PostgreSQL protocol v3 wire format without I/O: parsers for what a client sends (the
//! startup packet and the regular messages, separable so they can be fuzzed) and encoders for
//! what the server answers.
//!
//! Every parser takes the bytes of one message (after its length word) and returns a typed
//! message or a [`WireError`]; none of them panics or allocates more than its input.

use crate::error::{PgError, Severity};

/// Protocol code of an SSLRequest.
pub const SSL_REQUEST: u32 = 80_877_103;
/// Protocol code of a GSSENCRequest.
pub const GSSENC_REQUEST: u32 = 80_877_104;
/// Protocol code of a CancelRequest (1234/5678).
pub const CANCEL_REQUEST: u32 = 80_877_102;
/// Protocol code of a CancelRequest that a front end passed on to its peers because it knew
/// neither the session nor the spliced connection it belongs to (1234/5699, kagi's own; same
/// body as a CancelRequest). It is served like one but never passed on again.
pub const PASSED_CANCEL_REQUEST: u32 = 80_877_123;
/// Major protocol version 3 (the only one spoken), in the high 16 bits of the code.
pub const PROTOCOL_MAJOR: u16 = 3;
/// The largest startup packet accepted (PostgreSQL's `MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_LEN: usize = 10_000;
/// The largest body of the messages that are always small (Sync, Flush, Terminate, Close,
/// Describe, Execute): PostgreSQL's `PQ_SMALL_MESSAGE_LIMIT`.
pub const SMALL_MESSAGE_LIMIT: usize = 10_000;

/// Why bytes from a client are not a valid message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The message ended before a field it announces.
    #[error("message is shorter than its fields")]
    Truncated,
    /// Bytes were left after the last field.
    #[error("message has {0} bytes after its last field")]
    Trailing(usize),
    /// A string field is not valid UTF-8.
    #[error("invalid byte sequence for encoding \"UTF8\"")]
    NotUtf8,
    /// A length or count field is negative or out of range.
    #[error("invalid {0} in message")]
    BadCount(&'static str),
    /// The message type byte is not one a client sends.
    #[error("invalid frontend message type {0}")]
    UnknownType(u8),
    /// A startup packet with a protocol this server does not speak.
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0")]
    UnsupportedProtocol {
        /// Major version.
        major: u16,
        /// Minor version.
        minor: u16,
    },
    /// A format code other than 0 (text) or 1 (binary).
    #[error("invalid format code {0}")]
    BadFormat(i16),
    /// A Describe or Close target other than 'S' or 'P'.
    #[error("invalid {0} target")]
    BadTarget(&'static str),
}

impl From<WireError> for PgError {
    fn from(e: WireError) -> Self {
        let code = match e {
            WireError::NotUtf8 => crate::sqlstate::CHARACTER_NOT_IN_REPERTOIRE,
            WireError::UnsupportedProtocol { .. } => crate::sqlstate::FEATURE_NOT_SUPPORTED,
            _ => crate::sqlstate::PROTOCOL_VIOLATION,
        };
        PgError::new(Severity::Fatal, code, e.to_string())
    }
}

/// The first packet of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Startup {
    /// SSLRequest: the client wants TLS.
    SslRequest,
    /// GSSENCRequest: the client wants GSSAPI encryption (always refused).
    GssEncRequest,
    /// CancelRequest for the backend with this process id and secret key.
    Cancel {
        /// Process id from BackendKeyData.
        pid: u32,
        /// Secret key from BackendKeyData.
        key: u32,
        /// Sent with [`PASSED_CANCEL_REQUEST`]: another front end passed it on, so it must
        /// not be passed on again.
        passed_on: bool,
    },
    /// StartupMessage.
    Startup {
        /// Minor protocol version the client asks for (3.x).
        minor: u16,
        /// Parameters in order (user, database, options, application_name, ...).
        params: Vec<(String, String)>,
    },
}

/// Parses a startup packet: `body` is everything after the length word (the 4-byte code
/// first). The caller enforces [`MAX_STARTUP_LEN`] on the length word.
pub fn parse_startup(body: &[u8]) -> Result<Startup, WireError> {
    let mut r = Reader::new(body);
    let code = r.u32()?;
    match code {
        SSL_REQUEST | GSSENC_REQUEST => {
            r.finish()?;
            Ok(if code == SSL_REQUEST {
                Startup::SslRequest
            } else {
                Startup::GssEncRequest
            })
        }
        CANCEL_REQUEST | PASSED_CANCEL_REQUEST => {
            let pid = r.u32()?;
            let key = r.u32()?;
            r.finish()?;
            Ok(Startup::Cancel {
                pid,
                key,
                passed_on: code == PASSED_CANCEL_REQUEST,
            })
        }
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xffff) as u16;
            if major != PROTOCOL_MAJOR {
                return Err(WireError::UnsupportedProtocol { major, minor });
            }
            let mut params = Vec::new();
            loop {
                let name = r.cstr()?;
                if name.is_empty() {
                    break;
                }
                let value = r.cstr()?;
                params.push((name.to_owned(), value.to_owned()));
            }
            r.finish()?;
            Ok(Startup::Startup { minor, params })
        }
    }
}

/// Describe and Close address a prepared statement or a portal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// 'S': a prepared statement.
    Statement,
    /// 'P': a portal.
    Portal,
}

/// A message a client sends after startup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frontend {
    /// 'Q' simple query (one or more statements).
    Query(String),
    /// 'P' Parse.
    Parse {
        /// Statement name ("" is the unnamed statement).
        name: String,
        /// The SQL text.
        sql: String,
        /// Parameter type OIDs the client specified (0 = unspecified).
        param_types: Vec<u32>,
    },
    /// 'B' Bind.
    Bind {
        /// Portal name.
        portal: String,
        /// Statement name.
        statement: String,
        /// Parameter format codes (none: all text; one: for all; else one each).
        param_formats: Vec<i16>,
        /// Parameter values (None is SQL NULL).
        params: Vec<Option<Vec<u8>>>,
        /// Result column format codes, same convention as `param_formats`.
        result_formats: Vec<i16>,
    },
    /// 'D' Describe.
    Describe {
        /// Statement or portal.
        target: Target,
        /// Its name.
        name: String,
    },
    /// 'E' Execute.
    Execute {
        /// Portal name.
        portal: String,
        /// Row limit (0 = all).
        max_rows: u32,
    },
    /// 'C' Close.
    Close {
        /// Statement or portal.
        target: Target,
        /// Its name.
        name: String,
    },
    /// 'S' Sync.
    Sync,
    /// 'H' Flush.
    Flush,
    /// 'X' Terminate.
    Terminate,
    /// 'p': PasswordMessage, SASLInitialResponse or SASLResponse (the authentication
    /// exchange decides which).
    Password(Vec<u8>),
    /// 'd' CopyData (ignored outside COPY, as PostgreSQL does).
    CopyData,
    /// 'c' CopyDone.
    CopyDone,
    /// 'f' CopyFail.
    CopyFail,
    /// 'F' FunctionCall (not supported).
    FunctionCall,
}

impl Frontend {
    /// Whether a message of this type byte is always small ([`SMALL_MESSAGE_LIMIT`]).
    pub fn is_small(tag: u8) -> bool {
        matches!(tag, b'S' | b'H' | b'X' | b'C' | b'D' | b'E' | b'c')
    }
}

/// Parses one regular message: `tag` is its type byte, `body` the bytes after its length
/// word.
pub fn parse_message(tag: u8, body: &[u8]) -> Result<Frontend, WireError> {
    let mut r = Reader::new(body);
    let msg = match tag {
        b'Q' => Frontend::Query(r.cstr()?.to_owned()),
        b'P' => {
            let name = r.cstr()?.to_owned();
            let sql = r.cstr()?.to_owned();
            let n = r.count("parameter count")?;
            let mut param_types = Vec::with_capacity(n.min(body.len() / 4));
            for _ in 0..n {
                param_types.push(r.u32()?);
            }
            Frontend::Parse {
                name,
                sql,
                param_types,
            }
        }
        b'B' => {
            let portal = r.cstr()?.to_owned();
            let statement = r.cstr()?.to_owned();
            let param_formats = r.formats()?;
            let n = r.count("parameter count")?;
            let mut params = Vec::with_capacity(n.min(body.len() / 4));
            for _ in 0..n {
                let len = r.i32()?;
                if len == -1 {
                    params.push(None);
                } else if len < 0 {
                    return Err(WireError::BadCount("parameter length"));
                } else {
                    params.push(Some(r.bytes(len as usize)?.to_vec()));
                }
            }
            let result_formats = r.formats()?;
            Frontend::Bind {
                portal,
                statement,
                param_formats,
                params,
                result_formats,
            }
        }
        b'D' | b'C' => {
            let what = if tag == b'D' { "Describe" } else { "Close" };
            let target = match r.u8()? {
                b'S' => Target::Statement,
                b'P' => Target::Portal,
                _ => return Err(WireError::BadTarget(what)),
            };
            let name = r.cstr()?.to_owned();
            if tag == b'D' {
                Frontend::Describe { target, name }
            } else {
                Frontend::Close { target, name }
            }
        }
        b'E' => {
            let portal = r.cstr()?.to_owned();
            let max_rows = r.i32()?;
            Frontend::Execute {
                portal,
                // PostgreSQL treats a negative limit as "all rows".
                max_rows: u32::try_from(max_rows).unwrap_or(0),
            }
        }
        b'S' => Frontend::Sync,
        b'H' => Frontend::Flush,
        b'X' => Frontend::Terminate,
        b'p' => {
            let all = r.rest();
            Frontend::Password(all.to_vec())
        }
        b'd' => {
            r.rest();
            Frontend::CopyData
        }
        b'c' => Frontend::CopyDone,
        b'f' => {
            r.cstr()?;
            Frontend::CopyFail
        }
        b'F' => {
            r.rest();
            Frontend::FunctionCall
        }
        other => return Err(WireError::UnknownType(other)),
    };
    r.finish()?;
    Ok(msg)
}

/// The parts of a SASLInitialResponse: mechanism and initial client response.
pub fn parse_sasl_initial(body: &[u8]) -> Result<(String, Vec<u8>), WireError> {
    let mut r = Reader::new(body);
    let mechanism = r.cstr()?.to_owned();
    let len = r.i32()?;
    let data = if len < 0 {
        Vec::new()
    } else {
        r.bytes(len as usize)?.to_vec()
    };
    r.finish()?;
    Ok((mechanism, data))
}

/// The password of a PasswordMessage (a null-terminated string).
pub fn parse_password(body: &[u8]) -> Result<String, WireError> {
    let mut r = Reader::new(body);
    let s = r.cstr()?.to_owned();
    r.finish()?;
    Ok(s)
}

/// A cursor over a message body.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self.pos.checked_add(n).ok_or(WireError::Truncated)?;
        let s = self.buf.get(self.pos..end).ok_or(WireError::Truncated)?;
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.bytes(1)?[0])
    }

    fn i16(&mut self) -> Result<i16, WireError> {
        let b = self.bytes(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        let b = self.bytes(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn i32(&mut self) -> Result<i32, WireError> {
        Ok(self.u32()? as i32)
    }

    /// A 16-bit count, checked against what is left so a hostile count cannot make us reserve
    /// memory the message does not carry.
    fn count(&mut self, what: &'static str) -> Result<usize, WireError> {
        let n = self.i16()?;
        let n = usize::try_from(n).map_err(|_| WireError::BadCount(what))?;
        Ok(n)
    }

    fn formats(&mut self) -> Result<Vec<i16>, WireError> {
        let n = self.count("format count")?;
        let mut v = Vec::with_capacity(n.min(self.buf.len()));
        for _ in 0..n {
            let f = self.i16()?;
            if f != 0 && f != 1 {
                return Err(WireError::BadFormat(f));
            }
            v.push(f);
        }
        Ok(v)
    }

    fn cstr(&mut self) -> Result<&'a str, WireError> {
        let rest = self.buf.get(self.pos..).ok_or(WireError::Truncated)?;
        let nul = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(WireError::Truncated)?;
        let s = std::str::from_utf8(&rest[..nul]).map_err(|_| WireError::NotUtf8)?;
        self.pos += nul + 1;
        Ok(s)
    }

    fn rest(&mut self) -> &'a [u8] {
        let s = self.buf.get(self.pos..).unwrap_or_default();
        self.pos = self.buf.len();
        s
    }

    fn finish(&self) -> Result<(), WireError> {
        match self.buf.len().saturating_sub(self.pos) {
            0 => Ok(()),
            n => Err(WireError::Trailing(n)),
        }
    }
}

/// Transaction status in ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStatus {
    /// 'I': not in a transaction block.
    Idle,
    /// 'T': in a transaction block.
    InBlock,
    /// 'E': in a failed transaction block.
    Failed,
}

/// A column of a RowDescription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldDesc {
    /// Column name.
    pub name: String,
    /// Type OID.
    pub type_oid: u32,
    /// Format code (0 text, 1 binary).
    pub format: i16,
}

/// Encoders for backend messages, appended to a byte buffer.
pub mod backend {
    use super::{FieldDesc, TxStatus};
    use crate::error::PgError;

    /// Starts a message of type `tag`; returns the offset to pass to [`end`].
    pub fn begin(buf: &mut Vec<u8>, tag: u8) -> usize {
        buf.push(tag);
        let at = buf.len();
        buf.extend_from_slice(&[0, 0, 0, 0]);
        at
    }

    /// Writes the length word of the message started at `at`.
    pub fn end(buf: &mut [u8], at: usize) {
        let len = (buf.len() - at) as u32;
        buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
    }

    /// Appends a null-terminated string (an interior NUL would cut it: they are dropped).
    pub fn cstr(buf: &mut Vec<u8>, s: &str) {
        buf.extend(s.bytes().filter(|&b| b != 0));
        buf.push(0);
    }

    /// Authentication request of `kind` with `data`.
    pub fn auth(buf: &mut Vec<u8>, kind: u32, data: &[u8]) {
        let at = begin(buf, b'R');
        buf.extend_from_slice(&kind.to_be_bytes());
        buf.extend_from_slice(data);
        end(buf, at);
    }

    /// AuthenticationSASL listing `mechanisms`.
    pub fn auth_sasl(buf: &mut Vec<u8>, mechanisms: &[&str]) {
        let mut data = Vec::new();
        for m in mechanisms {
            cstr(&mut data, m);
        }
        data.push(0);
        auth(buf, 10, &data);
    }

    /// ParameterStatus.
    pub fn parameter_status(buf: &mut Vec<u8>, name: &str, value: &str) {
        let at = begin(buf, b'S');
        cstr(buf, name);
        cstr(buf, value);
        end(buf, at);
    }

    /// BackendKeyData.
    pub fn backend_key(buf: &mut Vec<u8>, pid: u32, key: u32) {
        let at = begin(buf, b'K');
        buf.extend_from_slice(&pid.to_be_bytes());
        buf.extend_from_slice(&key.to_be_bytes());
        end(buf, at);
    }

    /// ReadyForQuery.
    pub fn ready(buf: &mut Vec<u8>, status: TxStatus) {
        let at = begin(buf, b'Z');
        buf.push(match status {
            TxStatus::Idle => b'I',
            TxStatus::InBlock => b'T',
            TxStatus::Failed => b'E',
        });
        end(buf, at);
    }

    /// NegotiateProtocolVersion: newest minor version and the options not recognised.
    pub fn negotiate_protocol(buf: &mut Vec<u8>, minor: u32, unknown: &[String]) {
        let at = begin(buf, b'v');
        buf.extend_from_slice(&minor.to_be_bytes());
        buf.extend_from_slice(&(unknown.len() as u32).to_be_bytes());
        for o in unknown {
            cstr(buf, o);
        }
        end(buf, at);
    }

    /// A message with no body ('1' ParseComplete, '2' BindComplete, '3' CloseComplete,
    /// 'n' NoData, 'I' EmptyQueryResponse, 's' PortalSuspended).
    pub fn empty(buf: &mut Vec<u8>, tag: u8) {
        let at = begin(buf, tag);
        end(buf, at);
    }

    /// CommandComplete.
    pub fn command_complete(buf: &mut Vec<u8>, tag: &str) {
        let at = begin(buf, b'C');
        cstr(buf, tag);
        end(buf, at);
    }

    /// ParameterDescription.
    pub fn parameter_description(buf: &mut Vec<u8>, types: &[u32]) {
        let at = begin(buf, b't');
        buf.extend_from_slice(&(types.len() as u16).to_be_bytes());
        for t in types {
            buf.extend_from_slice(&t.to_be_bytes());
        }
        end(buf, at);
    }

    /// RowDescription.
    pub fn row_description(buf: &mut Vec<u8>, fields: &[FieldDesc]) {
        let at = begin(buf, b'T');
        buf.extend_from_slice(&(fields.len() as u16).to_be_bytes());
        for f in fields {
            cstr(buf, &f.name);
            buf.extend_from_slice(&0u32.to_be_bytes()); // table oid
            buf.extend_from_slice(&0i16.to_be_bytes()); // column number
            buf.extend_from_slice(&f.type_oid.to_be_bytes());
            buf.extend_from_slice(&crate::types::typlen(f.type_oid).to_be_bytes());
            buf.extend_from_slice(&(-1i32).to_be_bytes()); // type modifier
            buf.extend_from_slice(&f.format.to_be_bytes());
        }
        end(buf, at);
    }

    /// ErrorResponse (severity ERROR or FATAL) or NoticeResponse (WARNING, NOTICE).
    pub fn error(buf: &mut Vec<u8>, e: &PgError) {
        let tag = match e.severity() {
            crate::Severity::Error | crate::Severity::Fatal => b'E',
            crate::Severity::Warning | crate::Severity::Notice => b'N',
        };
        let at = begin(buf, tag);
        for (field, value) in [
            (b'S', Some(e.severity().as_str())),
            (b'V', Some(e.severity().as_str())),
            (b'C', Some(e.code())),
            (b'M', Some(e.message())),
            (b'D', e.detail()),
            (b'H', e.hint()),
        ] {
            if let Some(v) = value {
                buf.push(field);
                cstr(buf, v);
            }
        }
        buf.push(0);
        end(buf, at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup_bytes(code: u32, params: &[(&str, &str)]) -> Vec<u8> {
        let mut b = code.to_be_bytes().to_vec();
        for (k, v) in params {
            b.extend_from_slice(k.as_bytes());
            b.push(0);
            b.extend_from_slice(v.as_bytes());
            b.push(0);
        }
        b.push(0);
        b
    }

    #[test]
    fn startup_packets() {
        assert_eq!(
            parse_startup(&SSL_REQUEST.to_be_bytes()),
            Ok(Startup::SslRequest)
        );
        let b = startup_bytes(196_608, &[("user", "alice@srv"), ("database", "db1")]);
        assert_eq!(
            parse_startup(&b),
            Ok(Startup::Startup {
                minor: 0,
                params: vec![
                    ("user".into(), "alice@srv".into()),
                    ("database".into(), "db1".into())
                ]
            })
        );
        assert!(matches!(
            parse_startup(&startup_bytes(2 << 16, &[])),
            Err(WireError::UnsupportedProtocol { major: 2, .. })
        ));
        // Missing terminator, trailing bytes, truncated cancel.
        assert!(parse_startup(&196_608u32.to_be_bytes()).is_err());
        let mut b = startup_bytes(196_608, &[]);
        b.push(1);
        assert!(parse_startup(&b).is_err());
        assert!(parse_startup(&CANCEL_REQUEST.to_be_bytes()).is_err());
    }

    #[test]
    fn cancel_requests_plain_and_passed_on() {
        assert_eq!(PASSED_CANCEL_REQUEST, (1234 << 16) | 5699);
        let body = |code: u32| {
            let mut b = code.to_be_bytes().to_vec();
            b.extend_from_slice(&77u32.to_be_bytes());
            b.extend_from_slice(&0xdead_beefu32.to_be_bytes());
            b
        };
        assert_eq!(
            parse_startup(&body(CANCEL_REQUEST)),
            Ok(Startup::Cancel {
                pid: 77,
                key: 0xdead_beef,
                passed_on: false
            })
        );
        assert_eq!(
            parse_startup(&body(PASSED_CANCEL_REQUEST)),
            Ok(Startup::Cancel {
                pid: 77,
                key: 0xdead_beef,
                passed_on: true
            })
        );
        // Truncated or with trailing bytes, as a CancelRequest.
        let b = body(PASSED_CANCEL_REQUEST);
        assert_eq!(parse_startup(&b[..11]), Err(WireError::Truncated));
        let mut long = b.clone();
        long.push(0);
        assert_eq!(parse_startup(&long), Err(WireError::Trailing(1)));
    }

    #[test]
    fn messages_reject_lies() {
        // A Bind announcing a parameter longer than the message.
        let mut b = b"\0\0".to_vec();
        b.extend_from_slice(&0i16.to_be_bytes());
        b.extend_from_slice(&1i16.to_be_bytes());
        b.extend_from_slice(&1000i32.to_be_bytes());
        assert_eq!(parse_message(b'B', &b), Err(WireError::Truncated));
        // A negative parameter count.
        let mut p = b"s\0select 1\0".to_vec();
        p.extend_from_slice(&(-1i16).to_be_bytes());
        assert!(parse_message(b'P', &p).is_err());
        assert_eq!(parse_message(b'Z', b""), Err(WireError::UnknownType(b'Z')));
        assert_eq!(
            parse_message(b'Q', b"select 1\0"),
            Ok(Frontend::Query("select 1".into()))
        );
        assert_eq!(parse_message(b'Q', b"\xff\0"), Err(WireError::NotUtf8));
    }
}
