//! The WAL index ("shared memory") of a database, kept in this process's heap instead of a
//! `-shm` file: SQLite's wal-index holds the running checksum of the last frame (computed over
//! plaintext) and the page numbers of the log, and the default VFS would write it to disk.
//!
//! Only one process opens a database (the registry holds an exclusive `flock` on it), so the
//! connections that share the index all live here; the locks mirror those of SQLite's unix VFS.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rusqlite::ffi;

use crate::Rc;

/// Number of wal-index lock slots.
const NLOCK: usize = ffi::SQLITE_SHM_NLOCK as usize;
/// The two copies of SQLite's wal-index header (`WalIndexHdr`, 48 bytes each) at the start of
/// region 0, in 8-byte words.
const HEADER_WORDS: usize = 2 * 48 / 8;

/// The wal-index of one database.
#[derive(Default)]
pub(crate) struct Shm {
    /// Regions of the index. Atomics because SQLite reads and writes them through raw pointers
    /// from several threads; `Arc` so that no `&mut` to their memory is ever formed here.
    regions: Vec<Arc<[AtomicU64]>>,
    /// Per slot: the number of shared holders, or -1 for an exclusive holder.
    locks: [i32; NLOCK],
    /// Number of connections that have mapped the index.
    attached: usize,
}

/// One connection's view of the index: whether it mapped it and the locks it holds.
#[derive(Default)]
pub(crate) struct ShmClient {
    attached: bool,
    shared: u8,
    exclusive: u8,
}

impl Shm {
    /// The address of region `region` of `size` bytes, creating it (zeroed) when `extend`; null
    /// when it does not exist and `extend` is false.
    pub(crate) fn map(
        &mut self,
        client: &mut ShmClient,
        region: usize,
        size: usize,
        extend: bool,
    ) -> Result<*mut u8, Rc> {
        if size == 0 || !size.is_multiple_of(8) {
            return Err(ffi::SQLITE_IOERR_SHMMAP);
        }
        if !client.attached {
            client.attached = true;
            self.attached += 1;
        }
        while self.regions.len() <= region {
            if !extend {
                return Ok(std::ptr::null_mut());
            }
            self.regions
                .push((0..size / 8).map(|_| AtomicU64::new(0)).collect());
        }
        let r = &self.regions[region];
        if r.len() * 8 != size {
            return Err(ffi::SQLITE_IOERR_SHMSIZE);
        }
        Ok(r.as_ptr().cast::<u8>().cast_mut())
    }

    /// Clears both copies of the wal-index header: the next connection that begins a
    /// transaction finds it invalid and rebuilds the index from the WAL file (SQLite's recovery,
    /// under the write lock). Returns whether there was an index.
    pub(crate) fn forget_header(&self) -> bool {
        let Some(region) = self.regions.first() else {
            return false;
        };
        for word in region.iter().take(HEADER_WORDS) {
            word.store(0, Ordering::SeqCst);
        }
        true
    }

    /// Takes or releases locks `ofst..ofst + n` (SQLite's `xShmLock`): `SQLITE_BUSY` when another
    /// connection holds a conflicting lock.
    pub(crate) fn lock(
        &mut self,
        client: &mut ShmClient,
        ofst: i32,
        n: i32,
        flags: i32,
    ) -> Result<(), Rc> {
        let (Ok(first), Ok(count)) = (usize::try_from(ofst), usize::try_from(n)) else {
            return Err(ffi::SQLITE_IOERR_SHMLOCK);
        };
        if count == 0 || first + count > NLOCK {
            return Err(ffi::SQLITE_IOERR_SHMLOCK);
        }
        let slots = first..first + count;
        let mask = slots.clone().fold(0u8, |m, i| m | (1 << i));
        if flags & ffi::SQLITE_SHM_UNLOCK != 0 {
            if (client.shared | client.exclusive) & mask == 0 {
                return Ok(());
            }
            if flags & ffi::SQLITE_SHM_SHARED != 0 && self.locks[first] > 1 {
                self.locks[first] -= 1;
            } else {
                self.locks[slots].fill(0);
            }
            client.shared &= !mask;
            client.exclusive &= !mask;
            return Ok(());
        }
        if flags & ffi::SQLITE_SHM_SHARED != 0 {
            if client.shared & mask != 0 {
                return Ok(());
            }
            if self.locks[first] < 0 {
                return Err(ffi::SQLITE_BUSY);
            }
            self.locks[first] += 1;
            client.shared |= mask;
            return Ok(());
        }
        if client.exclusive & mask == mask {
            return Ok(());
        }
        if self.locks[slots.clone()].iter().any(|&l| l != 0) {
            return Err(ffi::SQLITE_BUSY);
        }
        self.locks[slots].fill(-1);
        client.exclusive |= mask;
        Ok(())
    }

    /// Releases the connection's locks and its mapping; the index goes when the last connection
    /// leaves, as SQLite expects of a fresh `-shm`.
    pub(crate) fn detach(&mut self, client: &mut ShmClient) {
        for i in 0..NLOCK {
            let bit = 1u8 << i;
            if client.exclusive & bit != 0 {
                self.locks[i] = 0;
            } else if client.shared & bit != 0 && self.locks[i] > 0 {
                self.locks[i] -= 1;
            }
        }
        client.shared = 0;
        client.exclusive = 0;
        if client.attached {
            client.attached = false;
            self.attached = self.attached.saturating_sub(1);
            if self.attached == 0 {
                self.regions.clear();
                self.locks = [0; NLOCK];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCK_SHARED: i32 = ffi::SQLITE_SHM_LOCK | ffi::SQLITE_SHM_SHARED;
    const LOCK_EXCL: i32 = ffi::SQLITE_SHM_LOCK | ffi::SQLITE_SHM_EXCLUSIVE;
    const UNLOCK_SHARED: i32 = ffi::SQLITE_SHM_UNLOCK | ffi::SQLITE_SHM_SHARED;
    const UNLOCK_EXCL: i32 = ffi::SQLITE_SHM_UNLOCK | ffi::SQLITE_SHM_EXCLUSIVE;

    #[test]
    fn shared_and_exclusive_locks_conflict_like_sqlites() {
        let mut shm = Shm::default();
        let (mut a, mut b) = (ShmClient::default(), ShmClient::default());
        assert_eq!(shm.lock(&mut a, 3, 1, LOCK_SHARED), Ok(()));
        assert_eq!(shm.lock(&mut b, 3, 1, LOCK_SHARED), Ok(()));
        assert_eq!(shm.lock(&mut b, 3, 1, LOCK_EXCL), Err(ffi::SQLITE_BUSY));
        assert_eq!(shm.lock(&mut a, 3, 1, UNLOCK_SHARED), Ok(()));
        assert_eq!(shm.lock(&mut b, 3, 1, UNLOCK_SHARED), Ok(()));
        assert_eq!(shm.lock(&mut b, 0, 2, LOCK_EXCL), Ok(()));
        assert_eq!(shm.lock(&mut a, 1, 1, LOCK_SHARED), Err(ffi::SQLITE_BUSY));
        assert_eq!(shm.lock(&mut a, 0, 1, LOCK_EXCL), Err(ffi::SQLITE_BUSY));
        assert_eq!(shm.lock(&mut b, 0, 2, UNLOCK_EXCL), Ok(()));
        assert_eq!(shm.lock(&mut a, 0, 1, LOCK_EXCL), Ok(()));
        assert_eq!(
            shm.lock(&mut a, 0, 9, LOCK_EXCL),
            Err(ffi::SQLITE_IOERR_SHMLOCK)
        );
    }

    #[test]
    fn regions_are_zeroed_and_dropped_when_the_last_connection_leaves() {
        let mut shm = Shm::default();
        let (mut a, mut b) = (ShmClient::default(), ShmClient::default());
        assert_eq!(shm.map(&mut a, 0, 32768, false), Ok(std::ptr::null_mut()));
        let p = shm.map(&mut a, 1, 32768, true).expect("map");
        assert!(!p.is_null());
        assert_eq!(shm.regions.len(), 2);
        assert_eq!(shm.map(&mut b, 1, 32768, false), Ok(p));
        assert_eq!(shm.lock(&mut b, 4, 1, LOCK_SHARED), Ok(()));
        shm.detach(&mut a);
        assert_eq!(shm.regions.len(), 2);
        shm.detach(&mut b);
        assert!(shm.regions.is_empty());
        assert_eq!(shm.locks, [0; NLOCK]);
    }
}
