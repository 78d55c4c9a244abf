//! Error type shared by every operation in this crate.
//!
//! Messages describe what went wrong in terms of sizes, algorithms and paths; they never carry
//! key material, plaintext or padding details (which would make a decryption oracle).

/// Everything that can go wrong in a cryptographic operation.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The key is malformed, inconsistent or otherwise unusable. The message says what is wrong.
    #[error("invalid key: {0}")]
    InvalidKey(String),
    /// The key size, curve or algorithm is not supported (for this key type).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The input is unusable, e.g. a plaintext too long for the key or a digest of the wrong length.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// Decryption or authentication failed. Deliberately without detail.
    #[error("decryption failed")]
    DecryptionFailed,
    /// The underlying library failed in a way that is not the caller's fault.
    #[error("internal cryptographic failure")]
    Internal,
    /// The key's holder (an HSM token) failed or cannot be reached: the operation may
    /// succeed later. The message says which token.
    #[error("key unavailable: {0}")]
    KeyUnavailable(String),
    /// The key's holder does not hold the key: it was destroyed, it is in another token, or
    /// no HSM is configured. The message says which.
    #[error("key not held: {0}")]
    KeyNotHeld(String),
    /// Reading or writing a key file failed; the message names the path.
    #[error("i/o error: {0}")]
    Io(String),
}

/// Result alias used throughout this crate.
pub type Result<T> = std::result::Result<T, CryptoError>;
