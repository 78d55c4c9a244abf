//! SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks it: stored verifiers, and the
//! server side of the exchange. No channel binding (`SCRAM-SHA-256-PLUS` is not advertised).

use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;

use aws_lc_rs::{constant_time, digest, hmac, pbkdf2, rand};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// The mechanism name.
pub const MECHANISM: &str = "SCRAM-SHA-256";
/// Iterations of a verifier made by [`ScramVerifier::from_password`] (PostgreSQL's default
/// `scram_iterations`).
pub const DEFAULT_ITERATIONS: u32 = 4096;
/// The most iterations a verifier may ask of a client (a stored verifier above this is
/// refused, so that a bad record cannot make libpq spin).
pub const MAX_ITERATIONS: u32 = 10_000_000;
const SALT_LEN: usize = 16;
const NONCE_LEN: usize = 18;

/// Why a verifier or an exchange failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    /// A verifier string is not `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
    #[error("malformed SCRAM-SHA-256 verifier")]
    BadVerifier,
    /// Iterations are 0 or above [`MAX_ITERATIONS`].
    #[error("SCRAM iteration count out of range")]
    BadIterations,
    /// A client message is not valid SCRAM.
    #[error("malformed SCRAM message: {0}")]
    BadMessage(&'static str),
    /// The client asks for channel binding, which this server does not offer.
    #[error("channel binding is not supported")]
    ChannelBinding,
    /// The proof does not match: wrong password (or no such login).
    #[error("SCRAM proof does not match")]
    WrongProof,
    /// The system random generator failed.
    #[error("random generator failed")]
    Random,
}

/// A stored SCRAM-SHA-256 verifier: what a server keeps instead of a password.
///
/// Its text form is PostgreSQL's (`pg_authid.rolpassword`):
/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (base64), via [`fmt::Display`]
/// and [`FromStr`]. Debug output hides the keys.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct ScramVerifier {
    iterations: u32,
    salt: Vec<u8>,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramVerifier")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

impl ScramVerifier {
    /// A verifier for `password` with a random 16-byte salt and [`DEFAULT_ITERATIONS`].
    /// The password is normalised with SASLprep first, as libpq does.
    pub fn from_password(password: &str) -> Result<Self, ScramError> {
        let mut salt = vec![0u8; SALT_LEN];
        rand::fill(&mut salt).map_err(|_| ScramError::Random)?;
        Self::from_password_with(password, &salt, DEFAULT_ITERATIONS)
    }

    /// A verifier for `password` with the given salt and iterations.
    pub fn from_password_with(
        password: &str,
        salt: &[u8],
        iterations: u32,
    ) -> Result<Self, ScramError> {
        let n = checked_iterations(iterations)?;
        let prepared = saslprep(password);
        let mut salted = [0u8; 32];
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            n,
            salt,
            prepared.as_bytes(),
            &mut salted,
        );
        let client_key = hmac_sha256(&salted, b"Client Key");
        let stored_key = sha256(&client_key);
        let server_key = hmac_sha256(&salted, b"Server Key");
        salted.zeroize();
        Ok(Self {
            iterations,
            salt: salt.to_vec(),
            stored_key,
            server_key,
        })
    }

    /// A verifier from its parts (as a service stores them).
    pub fn from_parts(
        iterations: u32,
        salt: Vec<u8>,
        stored_key: [u8; 32],
        server_key: [u8; 32],
    ) -> Result<Self, ScramError> {
        checked_iterations(iterations)?;
        if salt.is_empty() {
            return Err(ScramError::BadVerifier);
        }
        Ok(Self {
            iterations,
            salt,
            stored_key,
            server_key,
        })
    }

    /// PBKDF2 iterations.
    pub fn iterations(&self) -> u32 {
        self.iterations
    }

    /// Salt.
    pub fn salt(&self) -> &[u8] {
        &self.salt
    }

    /// StoredKey = SHA-256(HMAC(SaltedPassword, "Client Key")).
    pub fn stored_key(&self) -> &[u8; 32] {
        &self.stored_key
    }

    /// ServerKey = HMAC(SaltedPassword, "Server Key").
    pub fn server_key(&self) -> &[u8; 32] {
        &self.server_key
    }
}

impl fmt::Display for ScramVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{MECHANISM}${}:{}${}:{}",
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(self.stored_key),
            B64.encode(self.server_key)
        )
    }
}

impl FromStr for ScramVerifier {
    type Err = ScramError;

    fn from_str(s: &str) -> Result<Self, ScramError> {
        let rest = s
            .strip_prefix(MECHANISM)
            .and_then(|r| r.strip_prefix('$'))
            .ok_or(ScramError::BadVerifier)?;
        let (params, keys) = rest.split_once('$').ok_or(ScramError::BadVerifier)?;
        let (iter, salt) = params.split_once(':').ok_or(ScramError::BadVerifier)?;
        let (stored, server) = keys.split_once(':').ok_or(ScramError::BadVerifier)?;
        let iterations: u32 = iter.parse().map_err(|_| ScramError::BadVerifier)?;
        let salt = B64.decode(salt).map_err(|_| ScramError::BadVerifier)?;
        let key = |k: &str| -> Result<[u8; 32], ScramError> {
            B64.decode(k)
                .ok()
                .and_then(|v| <[u8; 32]>::try_from(v.as_slice()).ok())
                .ok_or(ScramError::BadVerifier)
        };
        Self::from_parts(iterations, salt, key(stored)?, key(server)?)
    }
}

fn checked_iterations(iterations: u32) -> Result<NonZeroU32, ScramError> {
    if iterations > MAX_ITERATIONS {
        return Err(ScramError::BadIterations);
    }
    NonZeroU32::new(iterations).ok_or(ScramError::BadIterations)
}

/// SASLprep (RFC 4013) as libpq applies it: a password that fails the profile (or is not
/// UTF-8) is used as it is, so both sides agree either way.
fn saslprep(password: &str) -> std::borrow::Cow<'_, str> {
    stringprep::saslprep(password).unwrap_or(std::borrow::Cow::Borrowed(password))
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let k = hmac::Key::new(hmac::HMAC_SHA256, key);
    let tag = hmac::sign(&k, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The server side of one SCRAM exchange.
///
/// With `verifier: None` (unknown login) it runs a mock exchange with a deterministic salt
/// so that the client cannot tell a missing login from a wrong password; it always fails.
pub(crate) struct ScramServer {
    verifier: ScramVerifier,
    real: bool,
    state: State,
}

enum State {
    Initial,
    FirstSent {
        client_first_bare: String,
        server_first: String,
        nonce: String,
        gs2_header: String,
    },
    Done,
}

impl ScramServer {
    /// An exchange against `verifier`, or a mock one seeded by `mock_seed` (the same seed
    /// gives the same salt, as a real login's would stay the same).
    pub(crate) fn new(verifier: Option<ScramVerifier>, mock_seed: &[u8]) -> Self {
        match verifier {
            Some(v) => Self {
                verifier: v,
                real: true,
                state: State::Initial,
            },
            None => {
                let salt = hmac_sha256(mock_seed, b"kagi mock SCRAM salt")[..SALT_LEN].to_vec();
                let mut k = [0u8; 32];
                // Keys nobody can match: a proof is checked against random bytes.
                let _ = rand::fill(&mut k);
                Self {
                    verifier: ScramVerifier {
                        iterations: DEFAULT_ITERATIONS,
                        salt,
                        stored_key: k,
                        server_key: k,
                    },
                    real: false,
                    state: State::Initial,
                }
            }
        }
    }

    /// Handles client-first-message; returns server-first-message.
    pub(crate) fn client_first(&mut self, msg: &[u8]) -> Result<String, ScramError> {
        let msg = std::str::from_utf8(msg).map_err(|_| ScramError::BadMessage("not UTF-8"))?;
        // gs2-header: cbind-flag "," [authzid] ","
        let (flag, rest) = msg
            .split_once(',')
            .ok_or(ScramError::BadMessage("no GS2 header"))?;
        match flag {
            "n" | "y" => {}
            f if f.starts_with("p=") => return Err(ScramError::ChannelBinding),
            _ => return Err(ScramError::BadMessage("bad channel-binding flag")),
        }
        let (authzid, bare) = rest
            .split_once(',')
            .ok_or(ScramError::BadMessage("no GS2 header"))?;
        if !authzid.is_empty() {
            return Err(ScramError::BadMessage(
                "authorization identity not supported",
            ));
        }
        let gs2_header = format!("{flag},,");
        // client-first-message-bare: [reserved-mext ","] username "," nonce ["," extensions]
        let mut parts = bare.split(',');
        let user = parts.next().unwrap_or_default();
        if user.starts_with("m=") {
            return Err(ScramError::BadMessage("mandatory extension not supported"));
        }
        if !user.starts_with("n=") {
            return Err(ScramError::BadMessage("no user name attribute"));
        }
        let client_nonce = parts
            .next()
            .and_then(|p| p.strip_prefix("r="))
            .ok_or(ScramError::BadMessage("no nonce"))?;
        if client_nonce.is_empty()
            || !client_nonce
                .bytes()
                .all(|b| (0x21..=0x7e).contains(&b) && b != b',')
        {
            return Err(ScramError::BadMessage("bad nonce"));
        }
        let mut raw = [0u8; NONCE_LEN];
        rand::fill(&mut raw).map_err(|_| ScramError::Random)?;
        let nonce = format!("{client_nonce}{}", B64.encode(raw));
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&self.verifier.salt),
            self.verifier.iterations
        );
        self.state = State::FirstSent {
            client_first_bare: bare.to_owned(),
            server_first: server_first.clone(),
            nonce,
            gs2_header,
        };
        Ok(server_first)
    }

    /// Handles client-final-message; returns server-final-message (`v=…`) when the proof
    /// matches a real verifier.
    pub(crate) fn client_final(&mut self, msg: &[u8]) -> Result<String, ScramError> {
        let State::FirstSent {
            client_first_bare,
            server_first,
            nonce,
            gs2_header,
        } = std::mem::replace(&mut self.state, State::Done)
        else {
            return Err(ScramError::BadMessage("unexpected message"));
        };
        let msg = std::str::from_utf8(msg).map_err(|_| ScramError::BadMessage("not UTF-8"))?;
        let (without_proof, proof) = msg
            .rsplit_once(",p=")
            .ok_or(ScramError::BadMessage("no proof"))?;
        let mut parts = without_proof.split(',');
        let cbind = parts
            .next()
            .and_then(|p| p.strip_prefix("c="))
            .ok_or(ScramError::BadMessage("no channel binding attribute"))?;
        if B64.decode(cbind).ok().as_deref() != Some(gs2_header.as_bytes()) {
            return Err(ScramError::BadMessage(
                "channel binding data does not match",
            ));
        }
        let r = parts
            .next()
            .and_then(|p| p.strip_prefix("r="))
            .ok_or(ScramError::BadMessage("no nonce"))?;
        if r != nonce {
            return Err(ScramError::BadMessage("nonce does not match"));
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| ScramError::BadMessage("proof is not base64"))?;
        if proof.len() != 32 {
            return Err(ScramError::BadMessage("proof has the wrong length"));
        }
        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let signature = hmac_sha256(&self.verifier.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for (i, k) in client_key.iter_mut().enumerate() {
            *k = proof[i] ^ signature[i];
        }
        let computed = sha256(&client_key);
        client_key.zeroize();
        let matches =
            constant_time::verify_slices_are_equal(&computed, &self.verifier.stored_key).is_ok();
        if !matches || !self.real {
            return Err(ScramError::WrongProof);
        }
        let server_signature = hmac_sha256(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

/// A SCRAM client for tests (what libpq does), kept here so the unit tests can run the
/// exchange end to end.
#[cfg(test)]
pub(crate) fn client_proof(
    password: &str,
    salt: &[u8],
    iterations: u32,
    auth_message: &str,
) -> [u8; 32] {
    let v = ScramVerifier::from_password_with(password, salt, iterations).expect("verifier");
    let mut salted = [0u8; 32];
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        checked_iterations(iterations).expect("iterations"),
        salt,
        saslprep(password).as_bytes(),
        &mut salted,
    );
    let client_key = hmac_sha256(&salted, b"Client Key");
    let sig = hmac_sha256(&v.stored_key, auth_message.as_bytes());
    let mut proof = [0u8; 32];
    for i in 0..32 {
        proof[i] = client_key[i] ^ sig[i];
    }
    proof
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc7677_vector() {
        // RFC 7677 section 3: user "user", password "pencil".
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").expect("salt");
        let v = ScramVerifier::from_password_with("pencil", &salt, 4096).expect("verifier");
        let mut s = ScramServer::new(Some(v), b"");
        let first = s
            .client_first(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO")
            .expect("first");
        let nonce = first
            .strip_prefix("r=")
            .and_then(|r| r.split(',').next())
            .expect("nonce")
            .to_owned();
        let without_proof = format!("c=biws,r={nonce}");
        let auth = format!("n=user,r=rOprNGfwEbeRWgbNEkqO,{first},{without_proof}");
        let proof = client_proof("pencil", &salt, 4096, &auth);
        let fin = format!("{without_proof},p={}", B64.encode(proof));
        assert!(
            s.client_final(fin.as_bytes())
                .expect("final")
                .starts_with("v=")
        );
    }

    #[test]
    fn wrong_password_and_mock_fail() {
        let v = ScramVerifier::from_password("right").expect("verifier");
        for server in [Some(v.clone()), None] {
            let real = server.is_some();
            let mut s = ScramServer::new(server, b"seed");
            let first = s.client_first(b"n,,n=,r=abc").expect("first");
            let nonce = first[2..].split(',').next().expect("nonce").to_owned();
            let without_proof = format!("c=biws,r={nonce}");
            let auth = format!("n=,r=abc,{first},{without_proof}");
            let pw = if real { "wrong" } else { "right" };
            let proof = client_proof(pw, v.salt(), v.iterations(), &auth);
            let fin = format!("{without_proof},p={}", B64.encode(proof));
            assert_eq!(s.client_final(fin.as_bytes()), Err(ScramError::WrongProof));
        }
    }

    #[test]
    fn verifier_text_round_trip() {
        let v = ScramVerifier::from_password("secret").expect("verifier");
        let text = v.to_string();
        assert!(text.starts_with("SCRAM-SHA-256$4096:"));
        assert_eq!(text.parse::<ScramVerifier>(), Ok(v.clone()));
        assert!(!format!("{v:?}").contains(&B64.encode(v.stored_key())));
        assert!(
            "SCRAM-SHA-256$0:AA==$AA==:AA=="
                .parse::<ScramVerifier>()
                .is_err()
        );
        assert!("md5abc".parse::<ScramVerifier>().is_err());
    }

    #[test]
    fn channel_binding_refused() {
        let mut s = ScramServer::new(None, b"");
        assert_eq!(
            s.client_first(b"p=tls-server-end-point,,n=,r=abc"),
            Err(ScramError::ChannelBinding)
        );
    }
}
