//! Pack files: sealed blobs back to back, then a sealed header listing them, then the header's
//! length (u32, little-endian).

use std::sync::Arc;
use std::sync::mpsc::{self, SyncSender};
use std::thread::JoinHandle;

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

/// Packs stored by a thread of their own, so that sealing goes on while a pack is written and
/// synced (a local repository fsyncs every pack before its put returns). One pack waits at most
/// while another is stored.
struct Uploads {
    tx: Option<SyncSender<(String, Vec<u8>)>>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Uploads {
    fn start(backend: Arc<dyn BlobBackend>) -> Self {
        let (tx, rx) = mpsc::sync_channel::<(String, Vec<u8>)>(1);
        let thread = std::thread::spawn(move || -> Result<()> {
            for (name, data) in rx {
                backend.put(&name, data)?;
            }
            Ok(())
        });
        Self {
            tx: Some(tx),
            thread: Some(thread),
        }
    }

    fn send(&mut self, name: String, data: Vec<u8>) -> Result<()> {
        let sent = self.tx.as_ref().map(|tx| tx.send((name, data)).is_ok());
        match sent {
            Some(true) => Ok(()),
            // The thread stopped at a failed put: that failure is the answer.
            _ => self.finish(),
        }
    }

    /// Waits until every pack sent is stored; the first failure, if any.
    fn finish(&mut self) -> Result<()> {
        self.tx = None;
        match self.thread.take().map(JoinHandle::join) {
            None => Ok(()),
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(BackupError::Storage("the pack writer panicked".into())),
        }
    }
}

impl Drop for Uploads {
    /// A packer given up on (a failed backup) still waits for the pack being stored, so that
    /// nothing writes to the repository after the backup has answered.
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// Accumulates sealed blobs and writes packs.
pub(crate) struct Packer {
    buf: Vec<u8>,
    blobs: Vec<BlobEntry>,
    uploads: Option<Uploads>,
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
            uploads: None,
            written: Vec::new(),
            bytes_written: 0,
        }
    }

    /// A packer whose packs are stored in `backend` by a thread of their own: a pack is only
    /// known stored once [`Self::finish`] has returned.
    pub(crate) fn pipelined(backend: Arc<dyn BlobBackend>) -> Self {
        Self {
            uploads: Some(Uploads::start(backend)),
            ..Self::new()
        }
    }

    /// Writes the last pack and waits until every pack is stored (durable on a local
    /// repository): only then may an index name them.
    pub(crate) fn finish(&mut self, backend: &dyn BlobBackend, key: &DataKey) -> Result<()> {
        self.flush(backend, key)?;
        match &mut self.uploads {
            Some(u) => u.finish(),
            None => Ok(()),
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
        match &mut self.uploads {
            Some(u) => u.send(name, data)?,
            None => backend.put(&name, data)?,
        }
        self.written.push(header);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Stores the first `room` packs, then fails every put.
    struct Filling {
        stored: Mutex<Vec<String>>,
        room: usize,
    }

    impl BlobBackend for Filling {
        fn put(&self, name: &str, _data: Vec<u8>) -> Result<()> {
            let mut stored = self.stored.lock().unwrap();
            if stored.len() == self.room {
                return Err(BackupError::Storage("no space left".into()));
            }
            stored.push(name.to_string());
            Ok(())
        }
        fn get(&self, _: &str) -> Result<Vec<u8>> {
            unreachable!("packing only writes")
        }
        fn get_range(&self, _: &str, _: u64, _: u64) -> Result<Vec<u8>> {
            unreachable!("packing only writes")
        }
        fn list(&self, _: &str) -> Result<Vec<String>> {
            unreachable!("packing only writes")
        }
        fn delete(&self, _: &str) -> Result<()> {
            unreachable!("packing only writes")
        }
    }

    /// Adds `packs` packs' worth of blobs and finishes.
    fn pack(backend: &Arc<Filling>, packs: usize) -> Result<Packer> {
        let key = DataKey::generate()?;
        let mut packer = Packer::pipelined(backend.clone());
        let blob = vec![7u8; PACK_TARGET / 4];
        for i in 0..packs * 4 {
            let id = [i as u8; 32];
            packer.add(backend.as_ref(), &key, KIND_DATA, &id, &blob)?;
        }
        packer.finish(backend.as_ref(), &key)?;
        Ok(packer)
    }

    #[test]
    fn a_pipelined_packer_has_stored_every_pack_when_finish_returns() {
        let backend = Arc::new(Filling {
            stored: Mutex::new(Vec::new()),
            room: usize::MAX,
        });
        let packer = pack(&backend, 5).unwrap();
        let names: Vec<String> = packer.written.iter().map(|h| h.pack.clone()).collect();
        assert_eq!(names.len(), 5);
        assert_eq!(*backend.stored.lock().unwrap(), names);
    }

    #[test]
    fn a_pack_that_cannot_be_stored_fails_the_packer() {
        for room in [0, 2] {
            let backend = Arc::new(Filling {
                stored: Mutex::new(Vec::new()),
                room,
            });
            let e = pack(&backend, 5)
                .err()
                .expect("a failed put must fail packing");
            assert!(e.to_string().contains("no space left"), "{e}");
            assert_eq!(backend.stored.lock().unwrap().len(), room);
        }
    }
}
