//! Pruning: removing the data no recovery point references any more (after `forget`, or left
//! by an interrupted backup), like `restic prune`.
//!
//! Crash safety comes from the order of the writes and deletions, never from a rollback:
//!
//! 1. the blobs still used in packs that are repacked are copied into new packs;
//! 2. one new index file is written, listing every kept pack and every new pack;
//! 3. the index files read at the start are deleted;
//! 4. the packs no longer listed (unused, repacked, unindexed) are deleted.
//!
//! After 1 the new packs are merely unreferenced; after 2 the old and new index files both
//! describe packs that exist (a blob may have two valid locations); during 3 every remaining
//! index file still does; in 4 only packs that no index file lists are deleted. A process
//! killed at any point leaves a repository whose recovery points all restore; at worst
//! `check` warns about unreferenced packs, and the next prune removes them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::backend::ObjectInfo;
use crate::backup::Progress;
use crate::pack::{self, BlobEntry, KIND_TREE, PackHeader, Packer};
use crate::repo::{Location, Repository, parse_id};
use crate::{BackupError, Result};

/// How to prune.
#[derive(Clone, Debug)]
pub struct PruneOptions {
    /// Unused space tolerated after the prune, in percent of the pack data (0–100), like
    /// restic's `--max-unused` (default 5). Packs with no used blob are always deleted; packs
    /// that are partly used are repacked, most wasteful first, until the unused blobs left
    /// are at most this share of what is stored. 0 repacks every partly used pack; 100 never
    /// repacks. Repacking costs reading and rewriting the used part of a pack, so a little
    /// waste is cheaper than rewriting most of the repository after every `forget`.
    pub max_unused_percent: f64,
    /// Packs that no index file references are deleted only when the store's modification
    /// time says they are at least this old; `None` never deletes them. Such packs are left
    /// by a killed backup, but a backup that is running writes its packs before its index, so
    /// they look the same until it finishes: the grace period keeps a concurrent backup's
    /// fresh packs. A backend that does not report times ([`crate::BlobBackend::list_meta`])
    /// keeps all of them unless the grace is zero. Default: one hour.
    pub unindexed_grace: Option<Duration>,
    /// Plan only: compute the statistics (the bytes are estimates) and change nothing.
    pub dry_run: bool,
}

impl Default for PruneOptions {
    fn default() -> Self {
        Self {
            max_unused_percent: 5.0,
            unindexed_grace: Some(Duration::from_secs(3600)),
            dry_run: false,
        }
    }
}

/// What a prune did (or, with [`PruneOptions::dry_run`], would do).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PruneStats {
    /// Recovery points whose data was kept.
    pub snapshots: u64,
    /// Indexed packs deleted whole (no recovery point uses any of their blobs), including
    /// indexed packs that were already missing from storage and are dropped from the index.
    pub packs_deleted: u64,
    /// Partly used packs whose used blobs were copied into new packs, then deleted.
    pub packs_repacked: u64,
    /// New packs written by repacking.
    pub packs_written: u64,
    /// Packs no index referenced (interrupted backups), deleted.
    pub unindexed_packs_deleted: u64,
    /// Packs no index referenced, kept because they are younger than the grace period.
    pub unindexed_packs_kept: u64,
    /// Blobs dropped from the index (unused, or duplicates of a kept copy).
    pub blobs_removed: u64,
    /// Used blobs copied into new packs.
    pub blobs_repacked: u64,
    /// Bytes of the objects deleted (packs and index files).
    pub bytes_deleted: u64,
    /// Bytes of the objects written (new packs and the new index).
    pub bytes_written: u64,
    /// Space given back: `bytes_deleted - bytes_written`.
    pub bytes_freed: u64,
    /// Bytes of unused blobs left in kept packs (within [`PruneOptions::max_unused_percent`]).
    pub bytes_unused_remaining: u64,
    /// Whether this was a dry run.
    pub dry_run: bool,
    /// Wall-clock milliseconds.
    pub duration_ms: u64,
}

/// An indexed pack, merged over the index files that list it.
struct Pack {
    name: Arc<str>,
    blobs: Vec<BlobEntry>,
    ids: Vec<[u8; 32]>,
    stored: Option<ObjectInfo>,
    /// Whether each blob is the copy kept of a used blob.
    keep: Vec<bool>,
}

impl Pack {
    fn blob_bytes(&self, keep: bool) -> u64 {
        self.blobs
            .iter()
            .zip(&self.keep)
            .filter(|(_, k)| **k == keep)
            .map(|(b, _)| b.len)
            .sum()
    }

    /// The stored size, or the sum of its blobs when the backend does not say.
    fn size(&self) -> u64 {
        self.stored
            .as_ref()
            .and_then(|s| s.size)
            .unwrap_or_else(|| self.blobs.iter().map(|b| b.len).sum())
    }

    fn kept(&self) -> usize {
        self.keep.iter().filter(|k| **k).count()
    }

    fn header(&self) -> PackHeader {
        PackHeader {
            pack: self.name.to_string(),
            blobs: self.blobs.clone(),
        }
    }
}

/// What to do with an indexed pack.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fate {
    Keep,
    Repack,
    Delete,
    /// Listed in the index but not stored: dropped from the index.
    Missing,
}

impl Repository {
    /// The blobs the recovery points use: every tree reachable from a snapshot and every chunk
    /// those trees name. Anything missing stops the prune before it changes anything: a
    /// missing tree hides which chunks its files need, so nothing could be deleted safely.
    fn used_blobs(&self) -> Result<(u64, HashSet<[u8; 32]>)> {
        let snapshots = self.snapshots()?;
        let mut used = HashSet::new();
        let mut seen_trees = HashSet::new();
        let damaged = |s: &str, m: String| {
            BackupError::Corrupt(format!(
                "recovery point {s}: {m}; prune changed nothing (run check)"
            ))
        };
        for s in &snapshots {
            let mut stack = vec![s.tree.clone()];
            while let Some(t) = stack.pop() {
                let id = parse_id(&t)?;
                if !seen_trees.insert(id) {
                    continue;
                }
                used.insert(id);
                let tree = match self.load_tree(&t) {
                    Ok(tree) => tree,
                    Err(BackupError::Corrupt(m)) => return Err(damaged(&s.id, m)),
                    Err(e) => return Err(e),
                };
                for n in tree.nodes {
                    if let Some(sub) = n.subtree {
                        stack.push(sub);
                    }
                    for c in n.content {
                        let id = parse_id(&c)?;
                        if !self.has(&id) {
                            return Err(damaged(&s.id, format!("chunk {c} is missing")));
                        }
                        used.insert(id);
                    }
                }
            }
        }
        Ok((snapshots.len() as u64, used))
    }

    /// Removes what no recovery point references: packs none of whose blobs are used are
    /// deleted, partly used packs are repacked when the unused space exceeds
    /// [`PruneOptions::max_unused_percent`], and packs no index references (left by a killed
    /// backup) are deleted once older than [`PruneOptions::unindexed_grace`]. The index is
    /// reloaded from storage first and consolidated into one file when anything changes.
    ///
    /// Progress is reported as for a backup: `files_done` counts the packs handled,
    /// `bytes_done` / `bytes_total` the bytes of the packs being repacked.
    ///
    /// Prune needs the repository to itself while it runs, apart from the grace period's
    /// protection of fresh packs: a backup that started earlier may deduplicate against
    /// blobs this prune deletes. The backup service guarantees this by running the jobs of
    /// one protected item one at a time.
    ///
    /// The order of its writes keeps the repository consistent if it is killed or storage
    /// fails at any point (see `docs/BACKUP_FORMAT.md`); running it again finishes the work.
    pub fn prune(
        &mut self,
        opts: &PruneOptions,
        report: &(dyn Fn(&Progress) + Sync),
    ) -> Result<PruneStats> {
        let started = Instant::now();
        let mut stats = PruneStats {
            dry_run: opts.dry_run,
            ..PruneStats::default()
        };
        // The index before the pack listing: a backup that stores a pack and its index in
        // between leaves a pack that looks unindexed (and the grace period keeps it), rather
        // than an index entry whose pack looks missing.
        let index_files = self.read_index_files()?;
        let mut stored: HashMap<String, ObjectInfo> = self
            .backend
            .list_meta("data")?
            .into_iter()
            .map(|o| (o.name.clone(), o))
            .collect();

        // A pack may be listed by several index files (after an interrupted prune); the index
        // is then rewritten even if nothing else changes, which finishes that prune's work.
        let mut merged: BTreeMap<String, Vec<BlobEntry>> = BTreeMap::new();
        let mut listed_twice = false;
        for f in &index_files {
            for h in &f.packs {
                let blobs = merged.entry(h.pack.clone()).or_default();
                if blobs.is_empty() {
                    blobs.extend(h.blobs.iter().cloned());
                } else {
                    listed_twice = true;
                    for b in &h.blobs {
                        if !blobs.iter().any(|x| x.offset == b.offset && x.id == b.id) {
                            blobs.push(b.clone());
                        }
                    }
                }
            }
        }
        let mut packs = Vec::with_capacity(merged.len());
        for (name, blobs) in merged {
            let ids = blobs
                .iter()
                .map(|b| parse_id(&b.id))
                .collect::<Result<Vec<_>>>()?;
            let stored = stored.remove(&name);
            packs.push(Pack {
                name: Arc::from(name.as_str()),
                keep: vec![false; blobs.len()],
                blobs,
                ids,
                stored,
            });
        }
        // What is left in `stored` no index references.
        let unindexed: Vec<ObjectInfo> = stored.into_values().collect();

        // Only copies in stored packs count from here on: the tree walk must not read from,
        // nor a later backup of this repository deduplicate against, a pack that is gone.
        self.index.clear();
        self.indexed_packs.clear();
        for p in packs.iter().filter(|p| p.stored.is_some()) {
            self.indexed_packs.insert(p.name.clone());
            for (b, id) in p.blobs.iter().zip(&p.ids) {
                self.index.insert(
                    *id,
                    Location {
                        pack: p.name.clone(),
                        kind: b.kind as u8,
                        offset: b.offset,
                        len: b.len,
                    },
                );
            }
        }
        let (snapshots, used) = self.used_blobs()?;
        stats.snapshots = snapshots;

        // Keep one copy of each used blob, preferring the packs that are most used: duplicates
        // then fall in packs that go away anyway, and fewer packs need repacking.
        let used_share = |p: &Pack| {
            let total: u64 = p.blobs.iter().map(|b| b.len).sum();
            let in_use: u64 = p
                .blobs
                .iter()
                .zip(&p.ids)
                .filter(|(_, id)| used.contains(*id))
                .map(|(b, _)| b.len)
                .sum();
            in_use as f64 / total.max(1) as f64
        };
        let mut order: Vec<(f64, usize)> = packs
            .iter()
            .enumerate()
            .filter(|(_, p)| p.stored.is_some())
            .map(|(i, p)| (used_share(p), i))
            .collect();
        order.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut placed: HashSet<[u8; 32]> = HashSet::with_capacity(used.len());
        for (_, i) in order {
            let p = &mut packs[i];
            for (j, id) in p.ids.iter().enumerate() {
                if used.contains(id) && placed.insert(*id) {
                    p.keep[j] = true;
                }
            }
        }
        if placed.len() != used.len() {
            // `used_blobs` saw every used blob in the index of stored packs; this is a bug
            // guard, not a data condition.
            return Err(BackupError::Corrupt(
                "a used blob is in no stored pack; prune changed nothing (run check)".into(),
            ));
        }

        let mut fates: Vec<Fate> = packs
            .iter()
            .map(|p| match (&p.stored, p.kept()) {
                (None, _) => Fate::Missing,
                (Some(_), 0) => Fate::Delete,
                // Fully or partly used: partly used ones may be repacked below.
                _ => Fate::Keep,
            })
            .collect();
        let used_bytes: u64 = packs.iter().map(|p| p.blob_bytes(true)).sum();
        let mut partly: Vec<(f64, usize, u64)> = packs
            .iter()
            .enumerate()
            .filter(|(i, p)| fates[*i] == Fate::Keep && p.kept() < p.blobs.len())
            .map(|(i, p)| {
                let unused = p.blob_bytes(false);
                let total = unused + p.blob_bytes(true);
                (unused as f64 / total.max(1) as f64, i, unused)
            })
            .collect();
        // Most wasteful first: the fewest bytes copied for the most space given back.
        partly.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut unused_left: u64 = partly.iter().map(|(_, _, u)| u).sum();
        // unused / (used + unused) <= p  <=>  unused <= used * p / (100 - p).
        let pct = opts.max_unused_percent;
        let limit = if pct >= 100.0 {
            f64::INFINITY
        } else {
            used_bytes as f64 * pct.max(0.0) / (100.0 - pct.max(0.0))
        };
        for (_, i, unused) in partly {
            if unused_left as f64 <= limit {
                break;
            }
            fates[i] = Fate::Repack;
            unused_left -= unused;
        }
        stats.bytes_unused_remaining = unused_left;

        let now = SystemTime::now();
        let (old_unindexed, young_unindexed): (Vec<ObjectInfo>, Vec<ObjectInfo>) = unindexed
            .into_iter()
            .partition(|o| match opts.unindexed_grace {
                None => false,
                Some(g) if g.is_zero() => true,
                Some(g) => o
                    .modified
                    .and_then(|m| now.duration_since(m).ok())
                    .is_some_and(|age| age >= g),
            });
        stats.unindexed_packs_kept = young_unindexed.len() as u64;

        for (p, fate) in packs.iter().zip(&fates) {
            match fate {
                Fate::Keep => {}
                Fate::Delete | Fate::Missing => {
                    stats.packs_deleted += 1;
                    stats.blobs_removed += p.blobs.len() as u64;
                }
                Fate::Repack => {
                    stats.packs_repacked += 1;
                    stats.blobs_repacked += p.kept() as u64;
                    stats.blobs_removed += (p.blobs.len() - p.kept()) as u64;
                }
            }
        }
        let index_changes = listed_twice || fates.iter().any(|f| *f != Fate::Keep);

        if opts.dry_run {
            stats.unindexed_packs_deleted = old_unindexed.len() as u64;
            for (p, fate) in packs.iter().zip(&fates) {
                match fate {
                    Fate::Delete => stats.bytes_deleted += p.size(),
                    Fate::Repack => {
                        stats.bytes_deleted += p.size();
                        stats.bytes_written += p.blob_bytes(true);
                    }
                    Fate::Keep | Fate::Missing => {}
                }
            }
            stats.bytes_deleted += old_unindexed
                .iter()
                .map(|o| o.size.unwrap_or(0))
                .sum::<u64>();
            stats.bytes_freed = stats.bytes_deleted.saturating_sub(stats.bytes_written);
            stats.duration_ms = started.elapsed().as_millis() as u64;
            return Ok(stats);
        }

        // 1. Copy the used blobs of the packs being repacked into new packs.
        let repack: Vec<&Pack> = packs
            .iter()
            .zip(&fates)
            .filter(|(_, f)| **f == Fate::Repack)
            .map(|(p, _)| p)
            .collect();
        let mut progress = Progress {
            files_done: 0,
            bytes_done: 0,
            bytes_total: repack.iter().map(|p| p.size()).sum(),
        };
        report(&progress);
        let mut packer = Packer::new();
        for p in &repack {
            let data = self.backend.get(&p.name)?;
            for ((b, id), keep) in p.blobs.iter().zip(&p.ids).zip(&p.keep) {
                if !*keep {
                    continue;
                }
                let sealed = usize::try_from(b.offset)
                    .ok()
                    .zip(
                        b.offset
                            .checked_add(b.len)
                            .and_then(|end| usize::try_from(end).ok()),
                    )
                    .and_then(|(start, end)| data.get(start..end))
                    .ok_or_else(|| {
                        BackupError::Corrupt(format!(
                            "{}: blob {} lies outside the pack; prune stopped (run check)",
                            p.name, b.id
                        ))
                    })?;
                let kind = b.kind as u8;
                // Authenticate before copying: a damaged blob must not be given a fresh pack
                // (and the damaged original deleted) as if it were sound.
                let max = if kind == KIND_TREE {
                    256 * 1024 * 1024
                } else {
                    self.config.chunk_max as usize + 1024
                };
                pack::open_blob(&self.key, kind, id, sealed, max)?;
                packer.add(self.backend.as_ref(), &self.key, kind, id, sealed)?;
            }
            progress.files_done += 1;
            progress.bytes_done += p.size();
            report(&progress);
        }
        packer.flush(self.backend.as_ref(), &self.key)?;
        stats.packs_written = packer.written.len() as u64;
        stats.bytes_written = packer.bytes_written;

        if index_changes {
            // 2. One index for everything kept, written before any old one goes.
            let mut headers: Vec<PackHeader> = packs
                .iter()
                .zip(&fates)
                .filter(|(_, f)| **f == Fate::Keep)
                .map(|(p, _)| p.header())
                .collect();
            headers.extend(packer.written.iter().cloned());
            stats.bytes_written += self.write_index(&headers)?;
            // From here the repacked and deleted packs are gone for this repository object
            // too, so a backup through it never deduplicates against them.
            self.index.clear();
            self.indexed_packs.clear();
            self.add_to_index(&headers)?;
            // 3. The index files read at the start (not any written since by someone else).
            for f in &index_files {
                self.backend.delete(&f.name)?;
                stats.bytes_deleted += f.size;
            }
        }

        // 4. Packs that no index lists any more.
        for (p, fate) in packs.iter().zip(&fates) {
            if matches!(fate, Fate::Delete | Fate::Repack) {
                self.backend.delete(&p.name)?;
                stats.bytes_deleted += p.size();
                // A repacked pack was counted when it was copied.
                if *fate == Fate::Delete {
                    progress.files_done += 1;
                    report(&progress);
                }
            }
        }
        for o in &old_unindexed {
            self.backend.delete(&o.name)?;
            stats.bytes_deleted += o.size.unwrap_or(0);
            stats.unindexed_packs_deleted += 1;
            progress.files_done += 1;
            report(&progress);
        }
        stats.bytes_freed = stats.bytes_deleted.saturating_sub(stats.bytes_written);
        stats.duration_ms = started.elapsed().as_millis() as u64;
        Ok(stats)
    }
}
