//! Restoring a recovery point (whole, or a sub-path) into a folder.
//!
//! Nothing in a recovery point, and nothing already in the target, makes a restore write
//! outside its target: every tree is loaded and checked (entry names are single path
//! components, none repeats) before anything is written; entries are created relative to an
//! open directory, one path component at a time, never following a symbolic link
//! (`O_NOFOLLOW`, `O_DIRECTORY`); a file or link already where an entry goes is removed and
//! the entry created anew (`O_EXCL`), so neither a symbolic link nor a hard link in the target
//! is written through. Setuid and setgid bits come back only with the recorded owner
//! ([`RestoreOptions::owners`], as root).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant, UNIX_EPOCH};

use rustix::fs::{AtFlags, FileType, Gid, Mode, OFlags, Uid};
use rustix::io::Errno;

use crate::backup::Progress;
use crate::repo::{Repository, parse_id};
use crate::tree::{Node, NodeKind, Tree};
use crate::{BackupError, Result, io_err};

/// Granularity of hole detection (a file-system block).
const HOLE_BLOCK: usize = 4096;
/// Chunks of a file loaded at once while restoring it (at most this many, decompressed, in
/// memory per restoring thread: 16 MiB at the largest chunk size).
const RESTORE_BATCH: usize = 16;
/// The most bytes read with one request when neighbouring chunks are read together.
const RESTORE_RUN_BYTES: u64 = 8 << 20;

/// Deeper trees are refused rather than recursed into: a backup cannot produce one (paths are
/// limited to 4096 bytes), and a crafted one must not exhaust the stack.
const MAX_DEPTH: usize = 2048;

/// The entries a restore plans at most unless asked otherwise ([`RestoreOptions::max_entries`]):
/// the plan holds each in memory (a few hundred bytes), and a crafted recovery point whose
/// directories share subtrees level after level names more entries than any disk holds.
pub const DEFAULT_MAX_RESTORE_ENTRIES: u64 = 10_000_000;

const S_ISUID: u32 = 0o4000;
const S_ISGID: u32 = 0o2000;
const S_ISVTX: u32 = 0o1000;

/// What a restore did.
#[derive(Clone, Debug, Default)]
pub struct RestoreStats {
    /// Files written.
    pub files: u64,
    /// Directories created.
    pub dirs: u64,
    /// Symbolic links created.
    pub symlinks: u64,
    /// Bytes of file content restored.
    pub bytes: u64,
    /// Wall-clock milliseconds.
    pub duration_ms: u64,
}

/// How to restore.
#[derive(Clone, Debug)]
pub struct RestoreOptions {
    /// Write into a target that is not empty. A file or symbolic link already where an entry
    /// goes is replaced (removed, never written through); a directory is reused; a directory
    /// where a file or link goes is an error.
    pub overwrite: bool,
    /// Workers (each runs four writer threads).
    pub workers: usize,
    /// Give each entry its recorded owner and group, as restic does when run as root. Only
    /// root can, so asking as another user is an error. Without it, entries belong to whoever
    /// restores, and setuid and setgid bits are dropped: a user's setuid file must not come
    /// back as a setuid file of the restoring user (the server's, or root for the agent).
    pub owners: bool,
    /// The most entries (files, directories, links) one restore creates: a recovery point with
    /// more is refused before anything is written. Defaults to [`DEFAULT_MAX_RESTORE_ENTRIES`].
    pub max_entries: u64,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        Self {
            overwrite: false,
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            owners: false,
            max_entries: DEFAULT_MAX_RESTORE_ENTRIES,
        }
    }
}

fn mtime(node: &Node) -> std::time::SystemTime {
    if node.mtime_ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(node.mtime_ns as u64)
    } else {
        UNIX_EPOCH
    }
}

/// The mode an entry gets. Setuid and setgid only with the recorded owner; the sticky bit only
/// on directories (where it limits deletion; on files Linux ignores it and BSDs refuse it).
fn restored_mode(node: &Node, owned: bool) -> u32 {
    let mut mode = node.mode & 0o7777;
    if !owned {
        mode &= !(S_ISUID | S_ISGID);
    }
    if node.kind != NodeKind::Dir {
        mode &= !S_ISVTX;
    }
    mode
}

/// The recorded owner, when restoring owners. `u32::MAX` is no id (it means "unchanged" to
/// `chown`), so an entry with it counts as unowned.
fn owner(node: &Node, opts: &RestoreOptions) -> Option<(Uid, Gid)> {
    match (node.uid, node.gid) {
        (Some(u), Some(g)) if opts.owners && u != u32::MAX && g != u32::MAX => {
            Some((Uid::from_raw(u), Gid::from_raw(g)))
        }
        _ => None,
    }
}

/// Sets owner (when restoring owners) and then mode: `chown` may clear setuid, so it goes
/// first.
fn set_owner_and_mode(f: &File, node: &Node, opts: &RestoreOptions) -> io::Result<()> {
    let owned = match owner(node, opts) {
        Some((u, g)) => {
            rustix::fs::fchown(f, Some(u), Some(g))?;
            true
        }
        None => false,
    };
    f.set_permissions(fs::Permissions::from_mode(restored_mode(node, owned)))
}

/// An entry to create, at `rel` (relative to the target; every component a checked name).
struct Planned {
    rel: PathBuf,
    node: Node,
}

struct Plan {
    /// Directories and symbolic links, each directory before what it holds.
    creates: Vec<Planned>,
    files: Vec<Planned>,
    stats: RestoreStats,
    bytes_total: u64,
}

/// Loaded trees by id, each with the number of entries at and below it.
type Trees = HashMap<String, (Tree, u64)>;

fn too_deep() -> BackupError {
    BackupError::Corrupt(format!("directories nested more than {MAX_DEPTH} deep"))
}

fn subtree_of(node: &Node) -> Result<&str> {
    node.subtree
        .as_deref()
        .ok_or_else(|| BackupError::Corrupt("a directory has no subtree".into()))
}

/// The target folder, open: every entry is reached from it one component at a time.
struct Target<'a> {
    dir: OwnedFd,
    path: &'a Path,
}

fn not_a_directory() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotADirectory,
        "not a directory (restore never follows a symbolic link)",
    )
}

impl Target<'_> {
    fn err(&self, rel: &Path) -> impl FnOnce(io::Error) -> BackupError {
        let path = self.path.join(rel).display().to_string();
        move |source| BackupError::Io { path, source }
    }

    /// Opens the directory at `rel`, never following a symbolic link on the way.
    fn open_dir(&self, rel: &Path) -> io::Result<OwnedFd> {
        let mut dir = self.dir.try_clone()?;
        for c in rel.components() {
            let Component::Normal(name) = c else {
                return Err(not_a_directory());
            };
            dir = rustix::fs::openat(
                &dir,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| match e {
                Errno::LOOP | Errno::NOTDIR => not_a_directory(),
                e => e.into(),
            })?;
        }
        Ok(dir)
    }
}

/// The parent directory of the last entry, kept open: entries come in tree order, so most
/// share it with the one before.
struct Parents<'t, 'a> {
    target: &'t Target<'a>,
    last: Option<(PathBuf, OwnedFd)>,
}

impl Parents<'_, '_> {
    fn new<'t, 'a>(target: &'t Target<'a>) -> Parents<'t, 'a> {
        Parents { target, last: None }
    }

    /// The open parent of `rel`, and `rel`'s last component.
    fn of<'r>(&mut self, rel: &'r Path) -> io::Result<(&OwnedFd, &'r OsStr)> {
        let name = rel.file_name().ok_or_else(not_a_directory)?;
        let parent = rel.parent().unwrap_or(Path::new(""));
        if self.last.as_ref().is_none_or(|(p, _)| p != parent) {
            self.last = Some((parent.to_path_buf(), self.target.open_dir(parent)?));
        }
        match &self.last {
            Some((_, fd)) => Ok((fd, name)),
            None => Err(not_a_directory()),
        }
    }
}

fn is_dir_at(parent: &OwnedFd, name: &OsStr) -> io::Result<bool> {
    let st = rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW)?;
    Ok(FileType::from_raw_mode(st.st_mode) == FileType::Directory)
}

/// Removes the file or symbolic link (itself, not what it points to) at `name`; a directory
/// there is an error: a restore never deletes a directory.
fn clear(parent: &OwnedFd, name: &OsStr) -> io::Result<()> {
    if is_dir_at(parent, name)? {
        return Err(io::Error::new(
            io::ErrorKind::IsADirectory,
            "a directory is where the recovery point has a file or link",
        ));
    }
    Ok(rustix::fs::unlinkat(parent, name, AtFlags::empty())?)
}

/// Runs `create` (which must fail with `EEXIST` when something is there); if something is,
/// clears it and runs `create` once more.
fn create_anew<T>(
    parent: &OwnedFd,
    name: &OsStr,
    create: impl Fn() -> rustix::io::Result<T>,
) -> io::Result<T> {
    match create() {
        Err(Errno::EXIST) => {
            clear(parent, name)?;
            Ok(create()?)
        }
        r => Ok(r?),
    }
}

/// Creates the directory `name` (only its owner can enter it until its mode is set, last), or
/// reuses a directory already there; a file or link there is replaced.
fn make_dir(parent: &OwnedFd, name: &OsStr) -> io::Result<()> {
    let mkdir = || rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o700));
    match mkdir() {
        Err(Errno::EXIST) if is_dir_at(parent, name)? => Ok(()),
        Err(Errno::EXIST) => {
            clear(parent, name)?;
            Ok(mkdir()?)
        }
        r => Ok(r?),
    }
}

impl Repository {
    /// Loads every tree under `tree` (each distinct one once, into `trees`) and counts the
    /// entries a restore of it creates, failing as soon as they pass `max`. A subtree's count
    /// is remembered by id: a crafted tree naming one subtree many times, level after level,
    /// is counted in steps linear in its distinct trees, not expanded (2^64 entries from 65
    /// trees).
    fn count_entries(&self, tree: &Tree, depth: usize, max: u64, trees: &mut Trees) -> Result<u64> {
        if depth > MAX_DEPTH {
            return Err(too_deep());
        }
        let mut n = 0u64;
        for node in &tree.nodes {
            n = n.saturating_add(1);
            if node.kind == NodeKind::Dir {
                let sub = subtree_of(node)?;
                let below = match trees.get(sub) {
                    Some((_, count)) => *count,
                    None => {
                        let subtree = self.load_tree(sub)?;
                        let count = self.count_entries(&subtree, depth + 1, max, trees)?;
                        trees.insert(sub.to_string(), (subtree, count));
                        count
                    }
                };
                n = n.saturating_add(below);
            }
            if n > max {
                return Err(BackupError::Invalid(format!(
                    "the recovery point has more than {max} entries to restore: restore a part \
                     of it (a sub-path), or allow more entries"
                )));
            }
        }
        Ok(n)
    }

    /// Lists what to create from `tree`, whose trees [`Self::count_entries`] loaded and
    /// checked; writes nothing, so a damaged or crafted tree anywhere stops the restore before
    /// it starts.
    fn plan(
        &self,
        tree: &Tree,
        rel: &Path,
        depth: usize,
        trees: &Trees,
        plan: &mut Plan,
    ) -> Result<()> {
        if depth > MAX_DEPTH {
            return Err(too_deep());
        }
        for node in &tree.nodes {
            // load_tree checked the names: one valid component each, none repeated.
            let name = node
                .name_bytes()
                .ok_or_else(|| BackupError::Corrupt("a tree entry has no name".into()))?;
            let rel = rel.join(OsStr::from_bytes(&name));
            match node.kind {
                NodeKind::Dir => {
                    let (subtree, _) = trees.get(subtree_of(node)?).ok_or_else(|| {
                        BackupError::Invalid("a subtree was not counted before planning".into())
                    })?;
                    plan.stats.dirs += 1;
                    plan.creates.push(Planned {
                        rel: rel.clone(),
                        node: node.clone(),
                    });
                    self.plan(subtree, &rel, depth + 1, trees, plan)?;
                }
                NodeKind::Symlink => {
                    if node.target_bytes().is_none() {
                        return Err(BackupError::Corrupt("a symlink has no target".into()));
                    }
                    plan.stats.symlinks += 1;
                    plan.creates.push(Planned {
                        rel,
                        node: node.clone(),
                    });
                }
                NodeKind::File => {
                    plan.bytes_total += node.size;
                    plan.files.push(Planned {
                        rel,
                        node: node.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Creates a directory or symbolic link.
    fn create_entry(parents: &mut Parents, p: &Planned, opts: &RestoreOptions) -> io::Result<()> {
        let (parent, name) = parents.of(&p.rel)?;
        match p.node.kind {
            NodeKind::Dir => make_dir(parent, name),
            _ => {
                let target = p.node.target_bytes().unwrap_or_default();
                let target = OsStr::from_bytes(&target);
                create_anew(parent, name, || rustix::fs::symlinkat(target, parent, name))?;
                if let Some((u, g)) = owner(&p.node, opts) {
                    rustix::fs::chownat(parent, name, Some(u), Some(g), AtFlags::SYMLINK_NOFOLLOW)?;
                }
                Ok(())
            }
        }
    }

    fn restore_file(
        &self,
        parents: &mut Parents,
        p: &Planned,
        opts: &RestoreOptions,
    ) -> Result<u64> {
        let target = parents.target;
        let err = || target.err(&p.rel);
        let (parent, name) = parents.of(&p.rel).map_err(err())?;
        // A new file, private until written: whatever was there (a symbolic link, a hard link
        // to another file) is removed, never written through.
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW;
        let mut f = File::from(
            create_anew(parent, name, || {
                rustix::fs::openat(
                    parent,
                    name,
                    flags | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
            })
            .map_err(err())?,
        );
        let node = &p.node;
        let mut written = 0u64;
        let ids = node
            .content
            .iter()
            .map(|c| parse_id(c))
            .collect::<Result<Vec<_>>>()?;
        // A few chunks at a time, neighbours in a pack read together (one request on S3).
        for batch in ids.chunks(RESTORE_BATCH) {
            for chunk in self.load_many(batch, RESTORE_RUN_BYTES)? {
                // Zero blocks become holes: sparse files stay sparse.
                for block in chunk.chunks(HOLE_BLOCK) {
                    if block.iter().all(|b| *b == 0) {
                        f.seek(SeekFrom::Current(block.len() as i64))
                            .map_err(err())?;
                    } else {
                        f.write_all(block).map_err(err())?;
                    }
                }
                written += chunk.len() as u64;
            }
        }
        if written != node.size {
            return Err(BackupError::Corrupt(format!(
                "{}: restored {written} bytes, expected {}",
                target.path.join(&p.rel).display(),
                node.size
            )));
        }
        f.set_len(node.size).map_err(err())?;
        set_owner_and_mode(&f, node, opts).map_err(err())?;
        f.set_modified(mtime(node)).map_err(err())?;
        f.sync_all().map_err(err())?;
        Ok(written)
    }

    /// Restores recovery point `snapshot` (or the part of it at `sub_path`, relative to the
    /// backed-up folder) into `target`, which must be empty unless `overwrite`: as
    /// [`Repository::restore_with`] without restoring owners.
    pub fn restore(
        &self,
        snapshot: &str,
        sub_path: Option<&Path>,
        target: &Path,
        overwrite: bool,
        workers: usize,
        report: &(dyn Fn(&Progress) + Sync),
    ) -> Result<RestoreStats> {
        let opts = RestoreOptions {
            overwrite,
            workers,
            ..RestoreOptions::default()
        };
        self.restore_with(snapshot, sub_path, target, &opts, report)
    }

    /// Restores recovery point `snapshot` (or the part of it at `sub_path`, relative to the
    /// backed-up folder) into `target`, which must be empty unless [`RestoreOptions::overwrite`].
    pub fn restore_with(
        &self,
        snapshot: &str,
        sub_path: Option<&Path>,
        target: &Path,
        opts: &RestoreOptions,
        report: &(dyn Fn(&Progress) + Sync),
    ) -> Result<RestoreStats> {
        let started = Instant::now();
        if opts.owners && !rustix::process::geteuid().is_root() {
            return Err(BackupError::Invalid(
                "restoring owners needs root (run the restore as root, or without owners)".into(),
            ));
        }
        let snap = self.snapshot(snapshot)?;
        if target.exists() {
            let non_empty = fs::read_dir(target)
                .map_err(io_err(target))?
                .next()
                .is_some();
            if non_empty && !opts.overwrite {
                return Err(BackupError::Invalid(format!(
                    "the restore target {} is not empty (ask to overwrite)",
                    target.display()
                )));
            }
        }
        // Find the tree (or single file) at sub_path.
        let mut tree = self.load_tree(&snap.tree)?;
        let mut single: Option<Node> = None;
        if let Some(sub) = sub_path {
            let parts: Vec<&OsStr> = sub
                .iter()
                .filter(|p| *p != OsStr::new("/") && *p != OsStr::new("."))
                .collect();
            for (i, part) in parts.iter().enumerate() {
                let node = tree.find(part.as_bytes()).cloned().ok_or_else(|| {
                    BackupError::Invalid(format!(
                        "{} is not in recovery point {}",
                        sub.display(),
                        snap.id
                    ))
                })?;
                match node.kind {
                    NodeKind::Dir => {
                        tree = self.load_tree(node.subtree.as_deref().unwrap_or(""))?
                    }
                    _ if i + 1 == parts.len() => single = Some(node),
                    _ => {
                        return Err(BackupError::Invalid(format!(
                            "{} is not in recovery point {}",
                            sub.display(),
                            snap.id
                        )));
                    }
                }
            }
        }
        if let Some(node) = single {
            tree = Tree { nodes: vec![node] };
        }
        let mut plan = Plan {
            creates: Vec::new(),
            files: Vec::new(),
            stats: RestoreStats::default(),
            bytes_total: 0,
        };
        let mut trees = Trees::new();
        self.count_entries(&tree, 0, opts.max_entries, &mut trees)?;
        self.plan(&tree, Path::new(""), 0, &trees, &mut plan)?;
        drop(trees);
        let Plan {
            creates,
            files,
            mut stats,
            bytes_total,
        } = plan;

        // The target itself is the caller's choice: a symbolic link there is followed.
        fs::create_dir_all(target).map_err(io_err(target))?;
        let dir = rustix::fs::open(
            target,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io_err(target)(e.into()))?;
        let target = Target { dir, path: target };
        let mut parents = Parents::new(&target);
        for p in &creates {
            Self::create_entry(&mut parents, p, opts).map_err(target.err(&p.rel))?;
        }
        drop(parents);

        let queue = std::sync::Mutex::new(files.iter());
        let done = std::sync::Mutex::new(Progress {
            files_done: 0,
            bytes_done: 0,
            bytes_total,
        });
        let results: Vec<Result<(u64, u64)>> = std::thread::scope(|scope| {
            // Restoring waits on the disk more than it computes (a read per chunk, an fsync
            // per file): four threads per worker keep the CPUs busy while others wait.
            // Measured on 2 vCPUs: 1 GB in 2.0 s, against 3.0 s with one thread per worker.
            let handles: Vec<_> = (0..opts.workers.max(1) * 4)
                .map(|_| {
                    scope.spawn(|| -> Result<(u64, u64)> {
                        let (mut n, mut bytes) = (0, 0);
                        let mut parents = Parents::new(&target);
                        loop {
                            let next = queue
                                .lock()
                                .map_err(|_| BackupError::Invalid("restore worker failed".into()))?
                                .next();
                            let Some(p) = next else { break };
                            let b = self.restore_file(&mut parents, p, opts)?;
                            n += 1;
                            bytes += b;
                            if let Ok(mut p) = done.lock() {
                                p.files_done += 1;
                                p.bytes_done += b;
                                report(&p);
                            }
                        }
                        Ok((n, bytes))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(BackupError::Invalid("restore worker panicked".into()))
                    })
                })
                .collect()
        });
        for r in results {
            let (n, b) = r?;
            stats.files += n;
            stats.bytes += b;
        }
        // Directory owners, modes and times last, once their contents are written; in reverse
        // order every directory comes after all those below it, so none is entered after its
        // mode is set.
        for p in creates
            .iter()
            .rev()
            .filter(|p| p.node.kind == NodeKind::Dir)
        {
            let d = File::from(target.open_dir(&p.rel).map_err(target.err(&p.rel))?);
            set_owner_and_mode(&d, &p.node, opts).map_err(target.err(&p.rel))?;
            d.set_modified(mtime(&p.node)).map_err(target.err(&p.rel))?;
        }
        stats.duration_ms = started.elapsed().as_millis() as u64;
        Ok(stats)
    }
}

#[cfg(test)]
mod tests;
