//! The rules of SQL backups that need no files or keys (docs/SQL.md, "Backups and point-in-time
//! restore"): whether the write-ahead log still continues the last log backup, which backups a
//! restore to a point needs, and which backups retention removes.

/// One generation of a database's write-ahead log: SQLite starts a new one (new salts, salt-1
/// one more than before) each time the log restarts from its first frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct WalGen {
    /// Salt-1 of the WAL header.
    pub(crate) salt1: u32,
    /// Salt-2 of the WAL header.
    pub(crate) salt2: u32,
    /// The checkpoint sequence number of the WAL header.
    pub(crate) checkpoint_seq: u32,
}

impl WalGen {
    /// Whether both are the same generation (the salts say so; the checkpoint sequence
    /// number is per connection in SQLite, so it is not compared).
    pub(crate) fn same(&self, other: &WalGen) -> bool {
        (self.salt1, self.salt2) == (other.salt1, other.salt2)
    }
}

/// How far the backups of a database go in its write-ahead log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Cursor {
    /// The generation of the last frame backed up (`None`: the log had no frames then).
    pub(crate) generation: Option<WalGen>,
    /// The last frame backed up in that generation.
    pub(crate) frames: u32,
    /// Whether, at the pass's checkpoint, every frame of the log was both backed up and
    /// checkpointed: only then may the log restart without losing a frame no backup holds.
    /// Known in memory only (false after a start).
    pub(crate) drained: bool,
}

/// What a backup pass does with the log it finds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Copy frames `first..=last` of the current generation (none when `last < first`).
    Copy {
        /// The first frame to copy.
        first: u32,
        /// The last frame to copy (the last committed one).
        last: u32,
    },
    /// The log no longer continues the backups (or there are none yet): a full backup
    /// starts a new chain.
    Break(&'static str),
}

/// What to do with a log of generation `generation` (`None`: no frames) holding `frames` committed
/// frames, after the backups reached `cursor`.
pub(crate) fn next_step(cursor: Option<&Cursor>, generation: Option<WalGen>, frames: u32) -> Step {
    let Some(c) = cursor else {
        return Step::Break("no full backup yet");
    };
    let Some(g) = generation.filter(|_| frames > 0) else {
        return if c.frames == 0 || c.drained {
            Step::Copy { first: 1, last: 0 }
        } else {
            Step::Break("the log was emptied before all its frames were backed up")
        };
    };
    match c.generation {
        Some(old) if old.same(&g) => {
            if frames >= c.frames {
                Step::Copy {
                    first: c.frames + 1,
                    last: frames,
                }
            } else {
                Step::Break("the log is shorter than its backups")
            }
        }
        old => {
            // A legitimate restart follows a checkpoint of every frame backed up, once: salt-1
            // goes up by one (from a log with no generation, a fresh log has sequence 0).
            let once = match old {
                Some(o) => g.salt1 == o.salt1.wrapping_add(1),
                None => g.checkpoint_seq == 0,
            };
            if c.drained && once {
                Step::Copy {
                    first: 1,
                    last: frames,
                }
            } else {
                Step::Break("the log restarted over frames no backup holds")
            }
        }
    }
}

/// Whether a log of `generation` ending at frame `frames` is behind the backups at `cursor`:
/// the same generation, fewer frames. Nothing but an older copy of the database's files (a
/// data directory put back from an earlier snapshot) makes that: a generation's salts are
/// random, and its frames only grow.
pub(crate) fn is_behind(cursor: Option<&Cursor>, generation: Option<WalGen>, frames: u32) -> bool {
    match (
        cursor.and_then(|c| c.generation.map(|g| (g, c.frames))),
        generation,
    ) {
        (Some((at, backed_up)), Some(g)) => at.same(&g) && frames < backed_up,
        _ => false,
    }
}

/// Where the backups stand once frames up to `frames` of `generation` are backed up.
pub(crate) fn cursor_after(generation: Option<WalGen>, frames: u32) -> Cursor {
    Cursor {
        generation: generation.filter(|_| frames > 0),
        frames,
        drained: false,
    }
}

/// A recorded backup, as far as choosing a chain and retention are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Taken {
    /// Its sequence number (one counter per database, full and log backups alike).
    pub(crate) seq: u64,
    /// A full backup (else a log backup).
    pub(crate) full: bool,
    /// The sequence number of the full backup its chain starts with (its own for a full).
    pub(crate) chain: u64,
    /// When it was taken (platform clock, Unix seconds).
    pub(crate) taken: i64,
}

/// The sequence numbers of the backups a restore to `point` replays, in order: the full backup
/// that starts the chain, then its log backups up to the last one taken at or before `point`.
/// `None` when no backup at or before `point` can be restored (`backups` sorted by `seq`). Only a
/// chain whose backups follow each other without a gap counts: a point past a missing log backup
/// is served by the last backup before the hole.
pub(crate) fn chain_for(backups: &[Taken], point: i64) -> Option<Vec<u64>> {
    let mut candidates = backups.iter().rev().filter(|b| b.taken <= point);
    candidates.find_map(|last| {
        let base = backups.iter().find(|b| b.full && b.seq == last.chain)?;
        let chain: Vec<u64> = backups
            .iter()
            .filter(|b| b.seq == base.seq || (!b.full && b.chain == base.seq))
            .filter(|b| b.seq <= last.seq)
            .map(|b| b.seq)
            .collect();
        let whole = chain.iter().zip(base.seq..).all(|(s, want)| *s == want);
        whole.then_some(chain)
    })
}

/// The earliest point a restore can go back to: the oldest full backup.
pub(crate) fn earliest_restore_point(backups: &[Taken]) -> Option<i64> {
    backups.iter().filter(|b| b.full).map(|b| b.taken).min()
}

/// The latest point a restore reaches.
pub(crate) fn latest_restore_point(backups: &[Taken]) -> Option<i64> {
    let last = *chain_for(backups, i64::MAX)?.last()?;
    backups.iter().find(|b| b.seq == last).map(|b| b.taken)
}

/// The backups retention removes at `now`: those older than the newest full backup taken at or
/// before `now - retention` (which stays, as the base of the oldest restore point kept), so that
/// no log backup is left without its full backup. A dropped database keeps its backups for
/// `retention` after it was dropped, then loses them all.
pub(crate) fn expired(
    backups: &[Taken],
    now: i64,
    retention: i64,
    dropped: Option<i64>,
) -> Vec<u64> {
    if dropped.is_some_and(|d| now.saturating_sub(d) >= retention) {
        return backups.iter().map(|b| b.seq).collect();
    }
    let cutoff = now.saturating_sub(retention);
    let Some(base) = backups
        .iter()
        .filter(|b| b.full && b.taken <= cutoff)
        .max_by_key(|b| b.seq)
    else {
        return Vec::new();
    };
    backups
        .iter()
        .filter(|b| b.seq < base.seq)
        .map(|b| b.seq)
        .collect()
}

/// A piece of a database's live log in the bucket (`crate::live`): frames `first..=last` of
/// one generation, shipped before the commit that wrote them was acknowledged. A fence (an
/// empty piece a takeover put where the old home would ship next) has no generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LivePiece {
    /// Its number (one counter per database).
    pub(crate) seq: u64,
    /// The generation of its frames (`None`: a fence).
    pub(crate) generation: Option<WalGen>,
    /// Its first frame.
    pub(crate) first: u32,
    /// Its last frame (a commit).
    pub(crate) last: u32,
    /// A fence's takeover number (0 for a piece of frames).
    pub(crate) fenced_by: u64,
}

/// The pieces (by number) that carry a database on from where its backups stand (`cursor`,
/// the last backup's; `None`: no backup), in order: pieces of older generations and pieces
/// the backups hold whole are left out. Every frame after the cursor must be in a piece: a
/// generation continues without a hole, and a new one (salt-1 one more, as after a
/// legitimate restart) starts at its first frame. `pieces` sorted by number.
pub(crate) fn live_tail(cursor: Option<&Cursor>, pieces: &[LivePiece]) -> Result<Vec<u64>, String> {
    let mut at = cursor.and_then(|c| c.generation.map(|g| (g, c.frames)));
    let mut out = Vec::new();
    for p in pieces {
        let Some(g) = p.generation else { continue };
        match at {
            Some((cur, last)) if cur.same(&g) => {
                if p.last <= last {
                    continue;
                }
                if p.first > last + 1 {
                    return Err(format!(
                        "the live log misses frames {} to {} of its generation",
                        last + 1,
                        p.first - 1
                    ));
                }
                at = Some((cur, p.last));
            }
            // An older generation: its frames are in the backups.
            Some((cur, _)) if (g.salt1.wrapping_sub(cur.salt1) as i32) < 0 => continue,
            Some((cur, _)) if g.salt1 != cur.salt1.wrapping_add(1) || p.first != 1 => {
                return Err(format!(
                    "piece {} of the live log does not follow the log before it",
                    p.seq
                ));
            }
            None if p.first != 1 => {
                return Err(format!(
                    "piece {} of the live log does not start its generation",
                    p.seq
                ));
            }
            _ => at = Some((g, p.last)),
        }
        out.push(p.seq);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wgen(salt1: u32, checkpoint_seq: u32) -> Option<WalGen> {
        Some(WalGen {
            salt1,
            salt2: 77,
            checkpoint_seq,
        })
    }

    fn at(g: Option<WalGen>, frames: u32, drained: bool) -> Cursor {
        Cursor {
            generation: g,
            frames,
            drained,
        }
    }

    fn piece(seq: u64, g: Option<WalGen>, first: u32, last: u32) -> LivePiece {
        LivePiece {
            seq,
            generation: g,
            first,
            last,
            fenced_by: 0,
        }
    }

    #[test]
    fn the_live_log_carries_on_from_the_backups_without_a_hole() {
        let c = at(wgen(5, 1), 10, false);
        // Held whole by the backups, overlapping them, after them; a fence says nothing.
        let pieces = [
            piece(0, wgen(4, 0), 1, 30),
            piece(1, wgen(5, 1), 1, 8),
            piece(2, wgen(5, 1), 9, 12),
            piece(3, wgen(5, 1), 13, 13),
            piece(4, None, 0, 0),
        ];
        assert_eq!(live_tail(Some(&c), &pieces), Ok(vec![2, 3]));
        // The next generation starts at its first frame.
        let next = [piece(5, wgen(6, 2), 1, 4), piece(6, wgen(6, 2), 5, 9)];
        assert_eq!(live_tail(Some(&c), &next), Ok(vec![5, 6]));
        assert_eq!(
            live_tail(
                Some(&c),
                &[piece(2, wgen(5, 1), 9, 12), piece(5, wgen(6, 2), 1, 4)]
            ),
            Ok(vec![2, 5])
        );
        // Holes: within the generation, a new one not at its start, one skipped.
        assert!(live_tail(Some(&c), &[piece(2, wgen(5, 1), 12, 14)]).is_err());
        assert!(live_tail(Some(&c), &[piece(5, wgen(6, 2), 2, 4)]).is_err());
        assert!(live_tail(Some(&c), &[piece(5, wgen(7, 2), 1, 4)]).is_err());
        // Nothing after the backups.
        assert_eq!(live_tail(Some(&c), &pieces[..2]), Ok(vec![]));
        // Salt-1 wraps.
        let w = at(wgen(u32::MAX, 1), 3, false);
        assert_eq!(
            live_tail(Some(&w), &[piece(9, wgen(0, 2), 1, 1)]),
            Ok(vec![9])
        );
    }

    #[test]
    fn the_log_continues_its_backups_or_breaks_the_chain() {
        let copy = |first, last| Step::Copy { first, last };
        // No backup yet: a full one first.
        assert!(matches!(next_step(None, wgen(5, 1), 3), Step::Break(_)));
        // The same generation, longer: the new frames.
        let c = at(wgen(5, 1), 10, false);
        assert_eq!(next_step(Some(&c), wgen(5, 1), 14), copy(11, 14));
        assert_eq!(next_step(Some(&c), wgen(5, 1), 10), copy(11, 10));
        // Shorter: frames vanished.
        assert!(matches!(next_step(Some(&c), wgen(5, 1), 9), Step::Break(_)));
        // A restart after a checkpoint of everything backed up: the new generation whole.
        let drained = at(wgen(5, 1), 10, true);
        assert_eq!(next_step(Some(&drained), wgen(6, 2), 4), copy(1, 4));
        // A restart nobody saw coming, or two restarts: frames may be lost.
        assert!(matches!(next_step(Some(&c), wgen(6, 2), 4), Step::Break(_)));
        assert!(matches!(
            next_step(Some(&drained), wgen(7, 3), 4),
            Step::Break(_)
        ));
        // Salt-1 wraps around.
        let top = at(wgen(u32::MAX, 1), 3, true);
        assert_eq!(next_step(Some(&top), wgen(0, 2), 1), copy(1, 1));
        // An empty log: nothing to copy, unless frames went without a backup.
        assert_eq!(next_step(Some(&drained), None, 0), copy(1, 0));
        assert_eq!(next_step(Some(&drained), wgen(6, 2), 0), copy(1, 0));
        assert!(matches!(next_step(Some(&c), None, 0), Step::Break(_)));
        // From a backup of a database without a log: only a fresh log (sequence 0) follows.
        let none = at(None, 0, true);
        assert_eq!(next_step(Some(&none), wgen(123, 0), 2), copy(1, 2));
        assert!(matches!(
            next_step(Some(&none), wgen(123, 1), 2),
            Step::Break(_)
        ));
        assert!(matches!(
            next_step(Some(&at(None, 0, false)), wgen(123, 0), 2),
            Step::Break(_)
        ));
        assert_eq!(cursor_after(wgen(5, 1), 0).generation, None);
        assert_eq!(cursor_after(wgen(5, 1), 3), at(wgen(5, 1), 3, false));
    }

    fn full(seq: u64, taken: i64) -> Taken {
        Taken {
            seq,
            full: true,
            chain: seq,
            taken,
        }
    }

    fn log(seq: u64, chain: u64, taken: i64) -> Taken {
        Taken {
            seq,
            full: false,
            chain,
            taken,
        }
    }

    /// Full 1 at 100, logs at 110, 120 and 130; full 5 at 135 (log 4 at 130 just before it,
    /// in the pass that took it); log 6 at 140; a break: full 7 at 150; log 8 at 160.
    fn history() -> Vec<Taken> {
        vec![
            full(1, 100),
            log(2, 1, 110),
            log(3, 1, 120),
            log(4, 1, 130),
            full(5, 135),
            log(6, 5, 140),
            full(7, 150),
            log(8, 7, 160),
        ]
    }

    #[test]
    fn a_restore_replays_the_full_backup_before_its_point_and_the_logs_up_to_it() {
        let h = history();
        assert_eq!(chain_for(&h, 99), None);
        assert_eq!(chain_for(&h, 100), Some(vec![1]));
        assert_eq!(chain_for(&h, 109), Some(vec![1]));
        assert_eq!(chain_for(&h, 110), Some(vec![1, 2]));
        assert_eq!(chain_for(&h, 125), Some(vec![1, 2, 3]));
        assert_eq!(chain_for(&h, 130), Some(vec![1, 2, 3, 4]));
        assert_eq!(chain_for(&h, 135), Some(vec![5]));
        assert_eq!(chain_for(&h, 149), Some(vec![5, 6]));
        assert_eq!(chain_for(&h, 155), Some(vec![7]));
        assert_eq!(chain_for(&h, 1_000), Some(vec![7, 8]));
        assert_eq!(earliest_restore_point(&h), Some(100));
        assert_eq!(latest_restore_point(&h), Some(160));
        // Logs whose full backup is gone are not restore points.
        let orphans = vec![log(3, 1, 120), full(5, 135), log(6, 5, 140)];
        assert_eq!(chain_for(&orphans, 130), None);
        assert_eq!(chain_for(&orphans, 141), Some(vec![5, 6]));
        assert_eq!(earliest_restore_point(&orphans), Some(135));
        assert_eq!(latest_restore_point(&[log(3, 1, 120)]), None);
        // A chain with a log backup missing ends before the hole.
        let holed = vec![full(1, 100), log(2, 1, 110), log(4, 1, 130)];
        assert_eq!(chain_for(&holed, 140), Some(vec![1, 2]));
        assert_eq!(chain_for(&[], 10), None);
    }

    #[test]
    fn retention_keeps_the_full_backup_under_the_oldest_point_kept() {
        let h = history();
        // Nothing is old enough yet.
        assert!(expired(&h, 150, 100, None).is_empty());
        // The cutoff (136) passed full 5: everything before it goes, the chain of 5 stays.
        assert_eq!(expired(&h, 236, 100, None), vec![1, 2, 3, 4]);
        // Logs older than the cutoff stay while no newer full backup is old enough.
        assert!(expired(&h, 134, 10, None).is_empty());
        assert_eq!(expired(&h, 149, 10, None), vec![1, 2, 3, 4]);
        assert_eq!(expired(&h, 165, 10, None), vec![1, 2, 3, 4, 5, 6]);
        // A log chain never loses its base: with one full backup, nothing goes.
        let one = vec![full(1, 100), log(2, 1, 110), log(3, 1, 5_000)];
        assert!(expired(&one, 10_000, 10, None).is_empty());
        // A dropped database: kept for the retention after the drop, then all gone.
        assert_eq!(
            expired(&one, 10_000, 10_000, Some(5_000)),
            Vec::<u64>::new()
        );
        assert_eq!(expired(&one, 15_000, 10_000, Some(5_000)), vec![1, 2, 3]);
    }
}
