//! Where kagi's storage services keep their objects (backup repositories, backup agents'
//! objects): [`BlobLocation`] names the place, [`BlobRoot`] opens it.
//!
//! - **Local** (the default): files below the data directory, written by each service with
//!   its own durable file code (temporary name, fsync, rename, directory fsync). A root of
//!   this kind hands out no object store ([`BlobRoot::remote`] answers `None`).
//! - **S3** (`s3://bucket/prefix`): one bucket shared by every node. An object's key is its
//!   path below the data directory under the prefix (`{prefix}/backupVaults/…`), so the layout
//!   is the same in both places. Credentials, region and endpoint come from the usual AWS
//!   environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
//!   `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`).
//!
//! S3 has no folders and no rename: [`BlobRoot::remove_all`] deletes every key under a folder
//! (the services do not rename folders of a bucket). [`BlobRoot::probe`] checks at start that the bucket answers and honours
//! conditional writes (`If-None-Match: *`), which the services rely on where two nodes could
//! race to create the same object.

#![forbid(unsafe_code)]

/// The object_store crate this one is built on (its types appear in this API).
pub use object_store;

pub mod folder;
pub use folder::BlockingFolder;

use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The location given (`--blobs`) is not one this crate understands.
    #[error("invalid blob location '{0}': use `local` or `s3://bucket/prefix`")]
    Location(String),
    /// The object store refused or failed a call.
    #[error("object storage: {0}")]
    Store(String),
    /// A path handed in is not below the data directory.
    #[error("{0} is not below the data directory")]
    OutsideDataDir(PathBuf),
    /// A local file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The object store does not honour conditional writes.
    #[error(
        "the object store does not refuse a write over an existing object (If-None-Match: *); \
         several nodes cannot share it safely"
    )]
    NoConditionalWrites,
}

impl From<object_store::Error> for BlobError {
    fn from(e: object_store::Error) -> Self {
        BlobError::Store(e.to_string())
    }
}

/// Results of this crate.
pub type Result<T, E = BlobError> = std::result::Result<T, E>;

/// Where objects live, as given on the command line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum BlobLocation {
    /// Files below the data directory.
    #[default]
    Local,
    /// An S3 bucket (any S3-compatible server), under a key prefix (possibly empty).
    S3 {
        /// Bucket name.
        bucket: String,
        /// Key prefix, without leading or trailing `/`.
        prefix: String,
    },
}

impl BlobLocation {
    /// Parses `local` (or `file`, or an empty string) and `s3://bucket[/prefix]`.
    pub fn parse(s: &str) -> Result<Self> {
        let t = s.trim();
        if t.is_empty() || t.eq_ignore_ascii_case("local") || t.eq_ignore_ascii_case("file") {
            return Ok(BlobLocation::Local);
        }
        let Some(rest) = t.strip_prefix("s3://") else {
            return Err(BlobError::Location(s.to_owned()));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        let prefix = prefix.trim_matches('/');
        let prefix_ok = prefix.split('/').all(|p| {
            prefix.is_empty() || (!p.is_empty() && p != "." && p != ".." && !p.contains('\\'))
        });
        if !bucket_ok || !prefix_ok {
            return Err(BlobError::Location(s.to_owned()));
        }
        Ok(BlobLocation::S3 {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
        })
    }

    /// Whether objects are local files.
    pub fn is_local(&self) -> bool {
        matches!(self, BlobLocation::Local)
    }
}

impl fmt::Display for BlobLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlobLocation::Local => f.write_str("local"),
            BlobLocation::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            BlobLocation::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

/// An opened [`BlobLocation`] for a data directory. Cheap to clone; two roots are equal when
/// they name the same place.
#[derive(Clone)]
pub struct BlobRoot {
    location: BlobLocation,
    data_dir: PathBuf,
    /// The bucket (under its prefix); `None` for local files.
    remote: Option<Arc<dyn ObjectStore>>,
}

impl fmt::Debug for BlobRoot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlobRoot")
            .field("location", &self.location)
            .field("data_dir", &self.data_dir)
            .finish()
    }
}

impl PartialEq for BlobRoot {
    fn eq(&self, other: &Self) -> bool {
        self.location == other.location && self.data_dir == other.data_dir
    }
}
impl Eq for BlobRoot {}

impl BlobRoot {
    /// Local files below `data_dir`.
    pub fn local(data_dir: &Path) -> Self {
        Self {
            location: BlobLocation::Local,
            data_dir: data_dir.to_owned(),
            remote: None,
        }
    }

    /// Opens `location` for `data_dir`; an S3 bucket is configured from the AWS environment
    /// variables (nothing is sent yet: see [`BlobRoot::probe`]).
    pub fn open(location: &BlobLocation, data_dir: &Path) -> Result<Self> {
        let BlobLocation::S3 { bucket, .. } = location else {
            return Ok(Self::local(data_dir));
        };
        let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
        // `AWS_ENDPOINT_URL` is the name the AWS CLI and SDKs read; object_store reads
        // `AWS_ENDPOINT`. Honour both, as a user of either would expect.
        if std::env::var_os("AWS_ENDPOINT").is_none()
            && let Ok(url) = std::env::var("AWS_ENDPOINT_URL")
        {
            b = b.with_endpoint(url);
        }
        if std::env::var_os("AWS_REGION").is_none()
            && std::env::var_os("AWS_DEFAULT_REGION").is_none()
        {
            b = b.with_region("us-east-1");
        }
        let s3: Arc<dyn ObjectStore> = Arc::new(b.build()?);
        Ok(Self::with_store(location.clone(), data_dir, s3))
    }

    /// A root over any object store (tests use an in-memory one), with `location`'s prefix
    /// applied.
    pub fn with_store(
        location: BlobLocation,
        data_dir: &Path,
        store: Arc<dyn ObjectStore>,
    ) -> Self {
        let store = match &location {
            BlobLocation::S3 { prefix, .. } if !prefix.is_empty() => {
                Arc::new(PrefixStore::new(store, prefix.as_str())) as Arc<dyn ObjectStore>
            }
            _ => store,
        };
        Self {
            location,
            data_dir: data_dir.to_owned(),
            remote: Some(store),
        }
    }

    /// Where the objects are.
    pub fn location(&self) -> &BlobLocation {
        &self.location
    }

    /// The data directory whose paths name the objects.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Whether objects are local files (the caller then writes them itself).
    pub fn is_local(&self) -> bool {
        self.remote.is_none()
    }

    /// The key of the folder `dir` (a path below the data directory): its components joined
    /// with `/`.
    pub fn key_of(&self, dir: &Path) -> Result<ObjectPath> {
        let rel = dir
            .strip_prefix(&self.data_dir)
            .map_err(|_| BlobError::OutsideDataDir(dir.to_owned()))?;
        let mut parts = Vec::new();
        for c in rel.components() {
            match c {
                Component::Normal(p) => parts.push(
                    p.to_str()
                        .ok_or_else(|| BlobError::OutsideDataDir(dir.to_owned()))?
                        .to_owned(),
                ),
                Component::CurDir => {}
                _ => return Err(BlobError::OutsideDataDir(dir.to_owned())),
            }
        }
        ObjectPath::parse(parts.join("/")).map_err(|e| BlobError::Store(e.to_string()))
    }

    /// The objects of the folder `dir` as an object store of their own (names relative to
    /// the folder), or `None` when objects are local files.
    pub fn remote(&self, dir: &Path) -> Result<Option<Arc<dyn ObjectStore>>> {
        let Some(store) = &self.remote else {
            return Ok(None);
        };
        let key = self.key_of(dir)?;
        Ok(Some(if key.as_ref().is_empty() {
            store.clone()
        } else {
            Arc::new(PrefixStore::new(store.clone(), key))
        }))
    }

    /// The folder `dir` with blocking calls (see [`BlockingFolder`]), or `None` when objects
    /// are local files.
    pub fn blocking_folder(&self, dir: &Path) -> Result<Option<BlockingFolder>> {
        Ok(self.remote(dir)?.map(BlockingFolder::new))
    }

    /// Whether the folder `dir` holds any object (remote roots only; `None` when local).
    pub async fn has_objects(&self, dir: &Path) -> Result<Option<bool>> {
        let Some(store) = self.remote(dir)? else {
            return Ok(None);
        };
        Ok(Some(store.list(None).next().await.transpose()?.is_some()))
    }

    /// Deletes every object in the folder `dir` (remote roots only: `false` when local, and
    /// the caller removes its files).
    pub async fn remove_all(&self, dir: &Path) -> Result<bool> {
        let Some(store) = self.remote(dir)? else {
            return Ok(false);
        };
        let names = store.list(None).map_ok(|m| m.location).boxed();
        store
            .delete_stream(names)
            .try_for_each(|_| futures::future::ready(Ok(())))
            .await
            .or_else(|e| match e {
                object_store::Error::NotFound { .. } => Ok(()),
                e => Err(e),
            })?;
        Ok(true)
    }

    /// Copies the local file `dir/name` to the object `name` of the folder `dir`, streaming
    /// (a large file goes up in parts); `false` when objects are local files (nothing to do).
    pub async fn upload_file(&self, dir: &Path, name: &str) -> Result<bool> {
        let Some(store) = self.remote(dir)? else {
            return Ok(false);
        };
        let path = dir.join(name);
        let io = |source| BlobError::Io {
            path: path.clone(),
            source,
        };
        let mut file = tokio::fs::File::open(&path).await.map_err(io)?;
        let mut w = object_store::buffered::BufWriter::new(store, ObjectPath::from(name));
        let sent = match tokio::io::copy(&mut file, &mut w).await {
            Ok(_) => tokio::io::AsyncWriteExt::shutdown(&mut w).await,
            Err(e) => Err(e),
        };
        if let Err(e) = sent {
            // A multipart upload begun and not finished would stay in the bucket, unseen.
            let _ = w.abort().await;
            return Err(io(e));
        }
        Ok(true)
    }

    /// Copies the object `name` of the folder `dir` into the local file `dir/name` (written
    /// under a temporary name, synced, then renamed); `false` when objects are local files or
    /// there is no such object.
    pub async fn download_file(&self, dir: &Path, name: &str) -> Result<bool> {
        use tokio::io::AsyncWriteExt;
        let Some(store) = self.remote(dir)? else {
            return Ok(false);
        };
        let got = match store.get(&ObjectPath::from(name)).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        // A name of its own per download: two downloads of one object never share a file.
        static DOWNLOADS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = DOWNLOADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (path, part) = (
            dir.join(name),
            dir.join(format!("{name}.{:x}-{n}.part", std::process::id())),
        );
        let io = |source| BlobError::Io {
            path: path.clone(),
            source,
        };
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent).await.map_err(io)?;
        }
        let mut out = tokio::fs::File::create(&part).await.map_err(io)?;
        let mut stream = got.into_stream();
        while let Some(chunk) = stream.next().await {
            out.write_all(&chunk?).await.map_err(io)?;
        }
        out.sync_all().await.map_err(io)?;
        tokio::fs::rename(&part, &path).await.map_err(io)?;
        Ok(true)
    }

    /// Deletes the object `name` of the folder `dir` (gone already is fine); `false` when
    /// objects are local files.
    pub async fn remove(&self, dir: &Path, name: &str) -> Result<bool> {
        let Some(store) = self.remote(dir)? else {
            return Ok(false);
        };
        match store.delete(&ObjectPath::from(name)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(true),
            Err(e) => Err(e.into()),
        }
    }

    /// Checks that a remote root answers and refuses a second create of one object (the
    /// conditional writes the services rely on). Writes and deletes one probe object under
    /// `.kagi-probe/`. Nothing to check for local files.
    pub async fn probe(&self) -> Result<()> {
        let Some(store) = &self.remote else {
            return Ok(());
        };
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let name = ObjectPath::from(format!(".kagi-probe/{}-{nonce}", std::process::id()));
        let create = || PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        store
            .put_opts(&name, PutPayload::from_static(b"probe"), create())
            .await?;
        let second = store
            .put_opts(&name, PutPayload::from_static(b"again"), create())
            .await;
        let _ = store.delete(&name).await;
        match second {
            Err(object_store::Error::AlreadyExists { .. }) => Ok(()),
            Err(object_store::Error::Precondition { .. }) => Ok(()),
            Ok(_) => Err(BlobError::NoConditionalWrites),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse_and_print() {
        assert_eq!(BlobLocation::parse("local").ok(), Some(BlobLocation::Local));
        assert_eq!(BlobLocation::parse("").ok(), Some(BlobLocation::Local));
        let s3 = BlobLocation::parse("s3://kagi-blobs/prod/eu/").ok();
        assert_eq!(
            s3,
            Some(BlobLocation::S3 {
                bucket: "kagi-blobs".into(),
                prefix: "prod/eu".into()
            })
        );
        assert_eq!(
            s3.map(|l| l.to_string()).as_deref(),
            Some("s3://kagi-blobs/prod/eu")
        );
        assert_eq!(
            BlobLocation::parse("s3://bucket")
                .map(|l| l.to_string())
                .ok(),
            Some("s3://bucket".into())
        );
        for bad in [
            "gs://x/y",
            "s3://",
            "s3://A_B",
            "s3://ok-bucket/a/../b",
            "/tmp/x",
        ] {
            assert!(BlobLocation::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_are_paths_below_the_data_dir() {
        let root = BlobRoot::local(Path::new("/data"));
        assert_eq!(
            root.key_of(Path::new("/data/backupVaults/s/g/v/items/i"))
                .map(|k| k.to_string())
                .ok(),
            Some("backupVaults/s/g/v/items/i".into())
        );
        assert!(root.key_of(Path::new("/elsewhere/x")).is_err());
        assert!(root.key_of(Path::new("/data/../x")).is_err());
        assert!(root.remote(Path::new("/data/x")).ok().flatten().is_none());
    }
}
