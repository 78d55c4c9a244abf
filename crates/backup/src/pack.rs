//! Pack files: sealed blobs back to back, then a sealed header listing them, then the header's
//! length (u32, little-endian).

use serde::{Deserialize, Serialize};

use crate::backend::BlobBackend;
use crate::{BackupError, Result};
use kagi_crypto::data_key::DataKey;

/// A pack is flushed once it holds this much.
pub(crate) const PACK_TARGET: usize = 16 * 1024 * 1024;

/// Blob kinds.
pub(crate) const KIND_DATA: u8 = b'd';
/// Tree blobs.
pub(crate) const KIND_TREE: u8 = b't';

/// Where a blob is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct BlobEntry {
    /// Blob id, hex.
    #[serde(rename = "i")]
    pub id: String,
    /// `d` or `t`.
    #[serde(rename = "k")]
    pub kind: char,
    /// Offset in the pack.
    #[serde(rename = "o")]
    pub offset: u64,
    /// Sealed length.
    #[serde(rename = "l")]
    pub len: u64,
}

/// Metadata (pack headers, index files) is JSON compressed with zstd before sealing: ids are
/// hex, so this roughly halves what the index costs in storage.
pub(crate) fn pack_metadata<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    let json = serde_json::to_vec(v).map_err(|e| BackupError::Corrupt(e.to_string()))?;
    zstd::bulk::compress(&json, 3).map_err(|e| BackupError::Corrupt(e.to_string()))
}

/// Reverses [`pack_metadata`].
pub(crate) fn unpack_metadata<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &str,
) -> Result<T> {
    let json = zstd::bulk::decompress(bytes, 256 * 1024 * 1024)
        .map_err(|_| BackupError::Corrupt(format!("{what} does not decompress")))?;
    serde_json::from_slice(&json).map_err(|e| BackupError::Corrupt(format!("{what}: {e}")))
}

/// A pack's header and its name.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct PackHeader {
    /// Object name of the pack.
    pub pack: String,
    /// Blobs in it.
    pub blobs: Vec<BlobEntry>,
}

/// The AAD that binds a sealed blob to its id and kind.
pub(crate) fn blob_aad(kind: u8, id: &[u8; 32]) -> Vec<u8> {
    let mut aad = b"kagi/blob/v1/".to_vec();
    aad.push(kind);
    aad.extend_from_slice(id);
    aad
}

/// Seals a blob: one byte of compression (0 none, 1 zstd) then the data, under AES-256-GCM.
pub(crate) fn seal_blob(
    key: &DataKey,
    kind: u8,
    id: &[u8; 32],
    plain: &[u8],
    level: i32,
) -> Result<Vec<u8>> {
    let mut payload = Vec::with_capacity(plain.len() + 1);
    // Compress only when it pays: random data stays as it is.
    match zstd::bulk::compress(plain, level) {
        Ok(c) if c.len() + 64 < plain.len() => {
            payload.push(1);
            payload.extend_from_slice(&c);
        }
        _ => {
            payload.push(0);
            payload.extend_from_slice(plain);
        }
    }
    Ok(key.seal(&blob_aad(kind, id), &payload)?)
}

/// Opens a sealed blob and checks its id.
pub(crate) fn open_blob(
    key: &DataKey,
    kind: u8,
    id: &[u8; 32],
    sealed: &[u8],
    max_len: usize,
) -> Result<Vec<u8>> {
    let payload = key.open(&blob_aad(kind, id), sealed).map_err(|_| {
        BackupError::Corrupt(format!("blob {} failed authentication", hex::encode(id)))
    })?;
    let plain = match payload.split_first() {
        Some((0, rest)) => rest.to_vec(),
        Some((1, rest)) => zstd::bulk::decompress(rest, max_len).map_err(|_| {
            BackupError::Corrupt(format!("blob {} does not decompress", hex::encode(id)))
        })?,
        _ => {
            return Err(BackupError::Corrupt(format!(
                "blob {} has an unknown encoding",
                hex::encode(id)
            )));
        }
    };
    if kind == KIND_DATA && key.blob_id(&plain) != *id {
        return Err(BackupError::Corrupt(format!(
            "blob {} content does not match its id",
            hex::encode(id)
        )));
    }
    Ok(plain)
}

/// Accumulates sealed blobs and writes packs.
pub(crate) struct Packer {
    buf: Vec<u8>,
    blobs: Vec<BlobEntry>,
    /// Packs written so far.
    pub written: Vec<PackHeader>,
    /// Bytes written to storage so far.
    pub bytes_written: u64,
}

impl Packer {
    pub(crate) fn new() -> Self {
        Self {
            buf: Vec::with_capacity(PACK_TARGET + 1024 * 1024),
            blobs: Vec::new(),
            written: Vec::new(),
            bytes_written: 0,
        }
    }

    pub(crate) fn add(
        &mut self,
        backend: &dyn BlobBackend,
        key: &DataKey,
        kind: u8,
        id: &[u8; 32],
        sealed: &[u8],
    ) -> Result<()> {
        self.blobs.push(BlobEntry {
            id: hex::encode(id),
            kind: kind as char,
            offset: self.buf.len() as u64,
            len: sealed.len() as u64,
        });
        self.buf.extend_from_slice(sealed);
        if self.buf.len() >= PACK_TARGET {
            self.flush(backend, key)?;
        }
        Ok(())
    }

    pub(crate) fn flush(&mut self, backend: &dyn BlobBackend, key: &DataKey) -> Result<()> {
        if self.blobs.is_empty() {
            return Ok(());
        }
        let id = hex::encode(kagi_crypto::random_bytes(32)?);
        let name = format!("data/{}/{id}", &id[..2]);
        let header = PackHeader {
            pack: name.clone(),
            blobs: std::mem::take(&mut self.blobs),
        };
        let sealed_header = key.seal(
            format!("kagi/pack-header/v1/{name}").as_bytes(),
            &pack_metadata(&header.blobs)?,
        )?;
        let mut data =
            std::mem::replace(&mut self.buf, Vec::with_capacity(PACK_TARGET + 1024 * 1024));
        data.extend_from_slice(&sealed_header);
        data.extend_from_slice(&(sealed_header.len() as u32).to_le_bytes());
        self.bytes_written += data.len() as u64;
        backend.put(&name, data)?;
        self.written.push(header);
        Ok(())
    }
}
