//! Taking a recovery point of a folder.

use std::collections::HashSet;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::mpsc;
use std::time::Instant;

use crate::pack::{self, KIND_DATA, KIND_TREE, Packer};
use crate::repo::{Repository, SnapshotInfo};
use crate::tree::{Node, NodeKind, Tree, encode_bytes, valid_name};
use crate::{BackupError, Result, io_err};

/// How to back up.
#[derive(Clone, Debug)]
pub struct BackupOptions {
    /// zstd level for compressible chunks.
    pub compression_level: i32,
    /// Threads that compress and encrypt.
    pub workers: usize,
    /// Compare with this recovery point (default: the newest of the same source): files whose
    /// size and modification time are unchanged are not read again.
    pub parent: Option<String>,
}

impl Default for BackupOptions {
    fn default() -> Self {
        Self {
            compression_level: 3,
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            parent: None,
        }
    }
}

/// Progress of a running backup or restore.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    /// Files done.
    pub files_done: u64,
    /// Bytes of file content done.
    pub bytes_done: u64,
    /// Bytes of file content in all.
    pub bytes_total: u64,
}

/// How many skipped entries [`BackupStats`] lists: a tree with a million unreadable files must
/// not make a million-line job report. [`BackupStats::skipped_count`] counts them all.
pub const MAX_SKIPPED_LISTED: usize = 1000;

/// An entry a backup could not read and left out of the recovery point.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SkippedEntry {
    /// The path (as displayed; not exact for names that are not UTF-8).
    pub path: String,
    /// Why it was skipped (the operating system's error, or what kind of entry it is).
    pub reason: String,
}

/// What a backup did.
#[derive(Clone, Debug)]
pub struct BackupStats {
    /// The recovery point written.
    pub snapshot: SnapshotInfo,
    /// Directories seen.
    pub dirs: u64,
    /// Files whose content was read (new or changed).
    pub files_read: u64,
    /// Files reused from the parent recovery point without reading.
    pub files_unchanged: u64,
    /// Bytes read from files.
    pub bytes_read: u64,
    /// New chunks stored.
    pub chunks_new: u64,
    /// Chunks already in the repository (deduplicated).
    pub chunks_dedup: u64,
    /// Plaintext bytes of the new chunks.
    pub bytes_new: u64,
    /// Bytes added to storage (packs and index, compressed and encrypted).
    pub bytes_added: u64,
    /// Entries skipped, as `"path: reason"` (unreadable files and directories, special
    /// files); the same entries as [`BackupStats::skipped_entries`], at most
    /// [`MAX_SKIPPED_LISTED`].
    pub skipped: Vec<String>,
    /// Entries skipped, with path and reason apart; at most [`MAX_SKIPPED_LISTED`].
    pub skipped_entries: Vec<SkippedEntry>,
    /// All entries skipped, including those beyond the listed ones. Non-zero means the
    /// recovery point is incomplete (like restic's exit code 3): the backup itself succeeded.
    pub skipped_count: u64,
    /// Wall-clock milliseconds.
    pub duration_ms: u64,
}

struct Job {
    kind: u8,
    id: [u8; 32],
    plain: Vec<u8>,
}

struct Walker<'a> {
    repo: &'a Repository,
    work: mpsc::SyncSender<Job>,
    pending: HashSet<[u8; 32]>,
    stats: BackupStats,
    progress: Progress,
    report: &'a (dyn Fn(&Progress) + Sync),
    last_report: Instant,
}

fn mtime_ns(m: &fs::Metadata) -> i64 {
    m.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(m.mtime_nsec())
}

fn total_size(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if let Ok(m) = e.path().symlink_metadata() {
                if m.is_dir() {
                    total += total_size(&e.path());
                } else if m.is_file() {
                    total += m.len();
                }
            }
        }
    }
    total
}

impl Walker<'_> {
    /// Records an entry left out of the recovery point. Unreadable entries are skipped with a
    /// warning rather than failing the backup (as restic does): one unreadable file must not
    /// cost the recovery point of everything else.
    fn skip(&mut self, path: &Path, reason: impl std::fmt::Display) {
        self.stats.skipped_count += 1;
        if self.stats.skipped_entries.len() < MAX_SKIPPED_LISTED {
            let entry = SkippedEntry {
                path: path.display().to_string(),
                reason: reason.to_string(),
            };
            self.stats
                .skipped
                .push(format!("{}: {}", entry.path, entry.reason));
            self.stats.skipped_entries.push(entry);
        }
    }

    fn send(&mut self, kind: u8, id: [u8; 32], plain: Vec<u8>) -> Result<bool> {
        if self.repo.has(&id) || !self.pending.insert(id) {
            return Ok(false);
        }
        self.work
            .send(Job { kind, id, plain })
            .map_err(|_| BackupError::Storage("the pack writer stopped".into()))?;
        Ok(true)
    }

    fn file(&mut self, path: &Path, node: &mut Node) -> Result<()> {
        let f = fs::File::open(path).map_err(io_err(path))?;
        let cfg = &self.repo.config;
        let chunker = fastcdc::v2020::StreamCDC::new(
            std::io::BufReader::with_capacity(1024 * 1024, f),
            cfg.chunk_min as usize,
            cfg.chunk_avg as usize,
            cfg.chunk_max as usize,
        );
        let mut size = 0u64;
        for chunk in chunker {
            let chunk = chunk.map_err(|e| BackupError::Io {
                path: path.display().to_string(),
                source: std::io::Error::other(e.to_string()),
            })?;
            let id = self.repo.key.blob_id(&chunk.data);
            let len = chunk.data.len() as u64;
            size += len;
            if self.send(KIND_DATA, id, chunk.data)? {
                self.stats.chunks_new += 1;
                self.stats.bytes_new += len;
            } else {
                self.stats.chunks_dedup += 1;
            }
            node.content.push(hex::encode(id));
            self.stats.bytes_read += len;
            self.progress.bytes_done += len;
            if self.last_report.elapsed().as_millis() > 200 {
                (self.report)(&self.progress);
                self.last_report = Instant::now();
            }
        }
        node.size = size;
        Ok(())
    }

    /// Backs up a directory; returns its tree id, or `None` when it cannot be listed (then it
    /// is skipped and reported, unless it is the source folder itself, which is an error: a
    /// recovery point of nothing is not a backup).
    fn dir(&mut self, dir: &Path, parent: Option<Tree>, root: bool) -> Result<Option<[u8; 32]>> {
        let listing = match fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) if root => return Err(io_err(dir)(e)),
            Err(e) => {
                self.skip(dir, format_args!("cannot list directory: {e}"));
                return Ok(None);
            }
        };
        self.stats.dirs += 1;
        let mut entries: Vec<fs::DirEntry> = Vec::new();
        for e in listing {
            match e {
                Ok(e) => entries.push(e),
                // The entry's name is unknown here: report the directory.
                Err(e) => self.skip(dir, format_args!("an entry cannot be read: {e}")),
            }
        }
        entries.sort_by(|a, b| a.file_name().as_bytes().cmp(b.file_name().as_bytes()));
        let mut tree = Tree::default();
        let mut previous: Option<std::ffi::OsString> = None;
        for e in entries {
            let path = e.path();
            let name = e.file_name();
            // A tree never holds a name restore would refuse. A file system does not list such
            // names (nor one twice), but a faulty one must not make an unrestorable point.
            if !valid_name(name.as_bytes()) || previous.as_ref() == Some(&name) {
                self.skip(&path, "invalid or repeated name in the directory listing");
                continue;
            }
            previous = Some(name.clone());
            let meta = match path.symlink_metadata() {
                Ok(m) => m,
                Err(err) => {
                    self.skip(&path, err);
                    continue;
                }
            };
            let old = parent
                .as_ref()
                .and_then(|t| t.find(name.as_bytes()))
                .cloned();
            let mut node = Node {
                name: None,
                name_b64: None,
                kind: NodeKind::File,
                mode: meta.mode() & 0o7777,
                uid: Some(meta.uid()),
                gid: Some(meta.gid()),
                mtime_ns: mtime_ns(&meta),
                size: 0,
                content: Vec::new(),
                subtree: None,
                target: None,
                target_b64: None,
            };
            node.set_name(&name);
            let ft = meta.file_type();
            if ft.is_dir() {
                node.kind = NodeKind::Dir;
                let old_tree = match old
                    .as_ref()
                    .filter(|o| o.kind == NodeKind::Dir)
                    .and_then(|o| o.subtree.clone())
                {
                    Some(id) => self.repo.load_tree(&id).ok(),
                    None => None,
                };
                match self.dir(&path, old_tree, false)? {
                    Some(id) => node.subtree = Some(hex::encode(id)),
                    None => continue,
                }
            } else if ft.is_symlink() {
                node.kind = NodeKind::Symlink;
                match fs::read_link(&path) {
                    Ok(t) => {
                        let (text, b64) = encode_bytes(t.as_os_str().as_bytes());
                        node.target = text;
                        node.target_b64 = b64;
                    }
                    Err(err) => {
                        self.skip(&path, err);
                        continue;
                    }
                }
            } else if ft.is_file() {
                let unchanged = old.as_ref().filter(|o| {
                    o.kind == NodeKind::File
                        && o.size == meta.len()
                        && o.mtime_ns == node.mtime_ns
                        && o.content
                            .iter()
                            .all(|c| crate::repo::parse_id(c).is_ok_and(|id| self.repo.has(&id)))
                });
                if let Some(o) = unchanged {
                    node.size = o.size;
                    node.content = o.content.clone();
                    self.stats.files_unchanged += 1;
                    self.progress.bytes_done += o.size;
                } else {
                    match self.file(&path, &mut node) {
                        Ok(()) => self.stats.files_read += 1,
                        Err(BackupError::Io { source, .. }) => {
                            // Chunks read before a failure stay stored but unreferenced
                            // (prune removes them); the file is left out whole, never
                            // recorded with part of its content.
                            self.skip(&path, source);
                            continue;
                        }
                        Err(e) => return Err(e),
                    }
                }
                self.progress.files_done += 1;
            } else {
                self.skip(&path, "not a regular file, directory or symlink");
                continue;
            }
            tree.nodes.push(node);
        }
        let json = serde_json::to_vec(&tree).map_err(|e| BackupError::Corrupt(e.to_string()))?;
        let id = self.repo.key.blob_id(&json);
        self.send(KIND_TREE, id, json)?;
        Ok(Some(id))
    }
}

impl Repository {
    /// Backs up `source` into a new recovery point taken at `now` (Unix seconds).
    pub fn backup(
        &mut self,
        source: &Path,
        opts: &BackupOptions,
        now: i64,
        report: &(dyn Fn(&Progress) + Sync),
    ) -> Result<BackupStats> {
        let started = Instant::now();
        let meta = fs::metadata(source).map_err(io_err(source))?;
        if !meta.is_dir() {
            return Err(BackupError::Invalid(format!(
                "{} is not a directory",
                source.display()
            )));
        }
        let source_name = source.display().to_string();
        let parent = match &opts.parent {
            Some(id) => Some(self.snapshot(id)?),
            None => self
                .snapshots()?
                .into_iter()
                .rev()
                .find(|s| s.source == source_name),
        };
        let parent_tree = match &parent {
            Some(p) => Some(self.load_tree(&p.tree)?),
            None => None,
        };
        let bytes_total = total_size(source);
        let workers = opts.workers.max(1);
        let (work_tx, work_rx) = mpsc::sync_channel::<Job>(workers * 4);
        let (sealed_tx, sealed_rx) =
            mpsc::sync_channel::<Result<(u8, [u8; 32], Vec<u8>)>>(workers * 4);
        let work_rx = std::sync::Mutex::new(work_rx);
        let repo: &Repository = self;
        let level = opts.compression_level;
        let (walk, packed) = std::thread::scope(|scope| {
            for _ in 0..workers {
                let sealed_tx = sealed_tx.clone();
                let work_rx = &work_rx;
                scope.spawn(move || {
                    loop {
                        let job = match work_rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => break,
                        };
                        let Ok(job) = job else { break };
                        let r = pack::seal_blob(&repo.key, job.kind, &job.id, &job.plain, level)
                            .map(|s| (job.kind, job.id, s));
                        if sealed_tx.send(r).is_err() {
                            break;
                        }
                    }
                });
            }
            drop(sealed_tx);
            let packer = scope.spawn(move || -> Result<Packer> {
                let mut packer = Packer::pipelined(repo.backend.clone());
                for item in sealed_rx {
                    let (kind, id, sealed) = item?;
                    packer.add(repo.backend.as_ref(), &repo.key, kind, &id, &sealed)?;
                }
                packer.finish(repo.backend.as_ref(), &repo.key)?;
                Ok(packer)
            });
            let mut walker = Walker {
                repo,
                work: work_tx,
                pending: HashSet::new(),
                stats: BackupStats {
                    snapshot: SnapshotInfo {
                        id: String::new(),
                        time: now,
                        source: source_name.clone(),
                        tree: String::new(),
                        parent: None,
                        files: 0,
                        bytes: 0,
                        written_nanos: 0,
                    },
                    dirs: 0,
                    files_read: 0,
                    files_unchanged: 0,
                    bytes_read: 0,
                    chunks_new: 0,
                    chunks_dedup: 0,
                    bytes_new: 0,
                    bytes_added: 0,
                    skipped: Vec::new(),
                    skipped_entries: Vec::new(),
                    skipped_count: 0,
                    duration_ms: 0,
                },
                progress: Progress {
                    files_done: 0,
                    bytes_done: 0,
                    bytes_total,
                },
                report,
                last_report: Instant::now(),
            };
            // `dir` returns `None` only for a directory that is not the root.
            let root = walker.dir(source, parent_tree, true).and_then(|r| {
                r.ok_or_else(|| {
                    BackupError::Invalid(format!("{} cannot be listed", source.display()))
                })
            });
            let Walker {
                work,
                stats,
                progress,
                ..
            } = walker;
            drop(work);
            let packed = packer
                .join()
                .map_err(|_| BackupError::Storage("the pack writer panicked".into()));
            (root.map(|r| (r, stats, progress)), packed)
        });
        let packer = packed??;
        let (root, mut stats, progress) = walk?;
        report(&progress);
        let index_bytes = self.write_index(&packer.written)?;
        self.add_to_index(&packer.written)?;
        let snapshot = SnapshotInfo {
            id: hex::encode(kagi_crypto::random_bytes(16)?),
            time: now,
            source: source_name,
            tree: hex::encode(root),
            parent: parent.map(|p| p.id),
            files: stats.files_read + stats.files_unchanged,
            bytes: progress.bytes_done,
            written_nanos: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        };
        // Written last: until this object exists, the recovery point does not.
        self.write_snapshot(&snapshot)?;
        stats.snapshot = snapshot;
        stats.bytes_added = packer.bytes_written + index_bytes;
        stats.duration_ms = started.elapsed().as_millis() as u64;
        Ok(stats)
    }
}
