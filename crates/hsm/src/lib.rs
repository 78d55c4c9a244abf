//! Key material inside a PKCS#11 token (filled in by the next commits).
#![forbid(unsafe_code)]
