//! The FFI glue: registers the `kagi-tde` VFS with SQLite, wrapping SQLite's default VFS, and
//! routes each file's methods to its [`Layer`]. All the unsafe code of the crate is here; the
//! logic lives in safe modules.
#![allow(unsafe_code)]

use std::ffi::{CStr, c_char, c_int, c_void};
use std::os::unix::ffi::OsStrExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::ptr;
use std::sync::OnceLock;

use rusqlite::ffi;

use crate::Rc;
use crate::key::PageCipher;
use crate::layers::{Layer, RawFile, ReadStatus};
use crate::registry;

/// The name the VFS is registered under.
pub(crate) const VFS_NAME: &CStr = c"kagi-tde";
/// The URI parameter that carries a database's registry handle.
pub(crate) const HANDLE_PARAM: &CStr = c"kagi";

/// What SQLite allocates for each open file: SQLite's `sqlite3_file` header, our state, and the
/// default VFS's file right after (at [`INNER_OFFSET`]).
#[repr(C)]
struct KagiFile {
    base: ffi::sqlite3_file,
    state: *mut Layer,
}

/// Offset of the default VFS's file inside ours (16-byte aligned).
const INNER_OFFSET: usize = std::mem::size_of::<KagiFile>().next_multiple_of(16);

static REGISTERED: OnceLock<Result<(), Rc>> = OnceLock::new();

/// Registers the VFS once per process.
pub(crate) fn register() -> Result<(), Rc> {
    *REGISTERED.get_or_init(|| {
        // SAFETY: sqlite3_vfs_find(NULL) returns the default VFS (initializing SQLite first);
        // SQLite never frees a registered VFS, and ours is leaked so it lives forever too.
        unsafe {
            let inner = ffi::sqlite3_vfs_find(ptr::null());
            if inner.is_null() {
                return Err(ffi::SQLITE_ERROR);
            }
            let inner_size = usize::try_from((*inner).szOsFile).map_err(|_| ffi::SQLITE_ERROR)?;
            let vfs = Box::leak(Box::new(ffi::sqlite3_vfs {
                iVersion: (*inner).iVersion.min(3),
                szOsFile: c_int::try_from(INNER_OFFSET + inner_size)
                    .map_err(|_| ffi::SQLITE_ERROR)?,
                mxPathname: (*inner).mxPathname,
                pNext: ptr::null_mut(),
                zName: VFS_NAME.as_ptr(),
                pAppData: inner.cast::<c_void>(),
                xOpen: Some(x_open),
                xDelete: Some(x_delete),
                xAccess: Some(x_access),
                xFullPathname: Some(x_full_pathname),
                xDlOpen: Some(x_dl_open),
                xDlError: Some(x_dl_error),
                xDlSym: Some(x_dl_sym),
                xDlClose: Some(x_dl_close),
                xRandomness: Some(x_randomness),
                xSleep: Some(x_sleep),
                xCurrentTime: Some(x_current_time),
                xGetLastError: Some(x_get_last_error),
                xCurrentTimeInt64: Some(x_current_time_int64),
                xSetSystemCall: Some(x_set_system_call),
                xGetSystemCall: Some(x_get_system_call),
                xNextSystemCall: Some(x_next_system_call),
            }));
            match ffi::sqlite3_vfs_register(vfs, 0) {
                ffi::SQLITE_OK => Ok(()),
                rc => Err(rc),
            }
        }
    })
}

/// Runs a callback body, turning a panic into an I/O error (a panic must not cross into C).
fn guard(f: impl FnOnce() -> c_int) -> c_int {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(ffi::SQLITE_IOERR)
}

fn rc_of(r: Result<(), Rc>) -> c_int {
    match r {
        Ok(()) => ffi::SQLITE_OK,
        Err(rc) => rc,
    }
}

/// The default VFS this one wraps.
///
/// # Safety
/// `vfs` must be the VFS registered by [`register`].
unsafe fn inner_vfs(vfs: *mut ffi::sqlite3_vfs) -> *mut ffi::sqlite3_vfs {
    // SAFETY: pAppData was set to the default VFS at registration.
    unsafe { (*vfs).pAppData.cast::<ffi::sqlite3_vfs>() }
}

/// The default VFS's file inside ours.
///
/// # Safety
/// `file` must point to an allocation of our VFS's `szOsFile` bytes.
unsafe fn inner_file(file: *mut ffi::sqlite3_file) -> *mut ffi::sqlite3_file {
    // SAFETY: szOsFile reserves INNER_OFFSET bytes for KagiFile, then the inner file.
    unsafe {
        file.cast::<u8>()
            .add(INNER_OFFSET)
            .cast::<ffi::sqlite3_file>()
    }
}

/// The inner file, as the [`RawFile`] the layers write through.
struct Inner(*mut ffi::sqlite3_file);

impl Inner {
    fn methods(&self) -> &ffi::sqlite3_io_methods {
        // SAFETY: an Inner is made only for an inner file that the default VFS opened
        // successfully, whose pMethods is then non-null and static.
        unsafe { &*(*self.0).pMethods }
    }
}

fn status(rc: c_int) -> Result<(), Rc> {
    if rc == ffi::SQLITE_OK {
        Ok(())
    } else {
        Err(rc)
    }
}

impl RawFile for Inner {
    fn read_at(&mut self, buf: &mut [u8], off: u64) -> Result<ReadStatus, Rc> {
        let (Ok(len), Ok(off)) = (c_int::try_from(buf.len()), i64::try_from(off)) else {
            return Err(ffi::SQLITE_IOERR_READ);
        };
        let Some(read) = self.methods().xRead else {
            return Err(ffi::SQLITE_IOERR_READ);
        };
        // SAFETY: buf is valid for len bytes; the inner file is open.
        match unsafe { read(self.0, buf.as_mut_ptr().cast(), len, off) } {
            ffi::SQLITE_OK => Ok(ReadStatus::Full),
            ffi::SQLITE_IOERR_SHORT_READ => Ok(ReadStatus::Short),
            rc => Err(rc),
        }
    }

    fn write_at(&mut self, buf: &[u8], off: u64) -> Result<(), Rc> {
        let (Ok(len), Ok(off)) = (c_int::try_from(buf.len()), i64::try_from(off)) else {
            return Err(ffi::SQLITE_IOERR_WRITE);
        };
        let Some(write) = self.methods().xWrite else {
            return Err(ffi::SQLITE_IOERR_WRITE);
        };
        // SAFETY: buf is valid for len bytes; the inner file is open.
        status(unsafe { write(self.0, buf.as_ptr().cast(), len, off) })
    }

    fn size(&mut self) -> Result<u64, Rc> {
        let Some(size) = self.methods().xFileSize else {
            return Err(ffi::SQLITE_IOERR_FSTAT);
        };
        let mut n: ffi::sqlite3_int64 = 0;
        // SAFETY: n is a valid out-pointer; the inner file is open.
        status(unsafe { size(self.0, &mut n) })?;
        u64::try_from(n).map_err(|_| ffi::SQLITE_IOERR_FSTAT)
    }

    fn truncate(&mut self, size: u64) -> Result<(), Rc> {
        let (Some(truncate), Ok(size)) = (self.methods().xTruncate, i64::try_from(size)) else {
            return Err(ffi::SQLITE_IOERR_TRUNCATE);
        };
        // SAFETY: the inner file is open.
        status(unsafe { truncate(self.0, size) })
    }
}

/// Our state and the inner file of an open file.
///
/// # Safety
/// `file` must be a file opened by [`x_open`] and not yet closed, used by one thread at a time
/// (SQLite's contract for a connection's files).
unsafe fn parts<'a>(file: *mut ffi::sqlite3_file) -> (&'a mut Layer, Inner) {
    // SAFETY: x_open stored a live Box<Layer> in `state` before setting pMethods, and SQLite
    // calls a file's methods from one thread at a time.
    unsafe {
        let me = file.cast::<KagiFile>();
        (&mut *(*me).state, Inner(inner_file(file)))
    }
}

/// Which layer a file gets: main files, WALs and journals of a registered database are found by
/// the handle in their URI, and must belong to the handle's path; temporary files get a key of
/// their own.
fn choose_layer(name: Option<(&Path, Option<&CStr>)>, flags: c_int) -> Result<Layer, Rc> {
    const TEMPORARY: c_int = ffi::SQLITE_OPEN_TEMP_DB
        | ffi::SQLITE_OPEN_TEMP_JOURNAL
        | ffi::SQLITE_OPEN_TRANSIENT_DB
        | ffi::SQLITE_OPEN_SUBJOURNAL;
    const DATABASE: c_int =
        ffi::SQLITE_OPEN_MAIN_DB | ffi::SQLITE_OPEN_MAIN_JOURNAL | ffi::SQLITE_OPEN_WAL;
    let ephemeral = || match PageCipher::ephemeral() {
        Ok(c) => Ok(Layer::temp(c)),
        Err(_) => Err(ffi::SQLITE_CANTOPEN),
    };
    let Some((db_path, handle)) = name else {
        return ephemeral();
    };
    if flags & TEMPORARY != 0 {
        return ephemeral();
    }
    if flags & DATABASE == 0 {
        return Ok(Layer::Plain);
    }
    let entry = handle
        .and_then(|h| crate::parse_handle(h.to_bytes()))
        .and_then(|h| registry::find_by_handle(&h));
    let Some(entry) = entry.filter(|e| e.path == db_path) else {
        tracing::warn!(
            path = %db_path.display(),
            "refused to open a database file without its kagi key handle"
        );
        return Err(ffi::SQLITE_CANTOPEN);
    };
    Ok(if flags & ffi::SQLITE_OPEN_MAIN_DB != 0 {
        Layer::main(entry)
    } else if flags & ffi::SQLITE_OPEN_WAL != 0 {
        Layer::wal(entry)
    } else {
        Layer::journal(entry)
    })
}

unsafe extern "C" fn x_open(
    vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    guard(|| {
        // SAFETY: SQLite hands a buffer of szOsFile bytes; mark it unopened until we succeed.
        unsafe {
            (*file).pMethods = ptr::null();
            (*file.cast::<KagiFile>()).state = ptr::null_mut();
        }
        const DATABASE: c_int =
            ffi::SQLITE_OPEN_MAIN_DB | ffi::SQLITE_OPEN_MAIN_JOURNAL | ffi::SQLITE_OPEN_WAL;
        let named = if name.is_null() {
            None
        } else if flags & DATABASE != 0 {
            // SAFETY: for main files, journals and WALs SQLite passes a filename it built, which
            // sqlite3_filename_database and sqlite3_uri_parameter accept; both return strings
            // that live as long as the name.
            let (db, handle) = unsafe {
                let db = ffi::sqlite3_filename_database(name);
                let handle = ffi::sqlite3_uri_parameter(name, HANDLE_PARAM.as_ptr());
                (
                    (!db.is_null()).then(|| CStr::from_ptr(db)),
                    (!handle.is_null()).then(|| CStr::from_ptr(handle)),
                )
            };
            let Some(db) = db else {
                return ffi::SQLITE_CANTOPEN;
            };
            Some((
                Path::new(std::ffi::OsStr::from_bytes(db.to_bytes())),
                handle,
            ))
        } else {
            Some((Path::new(""), None))
        };
        let layer = match choose_layer(named, flags) {
            Ok(l) => l,
            Err(rc) => return rc,
        };
        // SAFETY: the default VFS opens its file in the space we reserved for it.
        let rc = unsafe {
            let inner = inner_vfs(vfs);
            match (*inner).xOpen {
                Some(open) => open(inner, name, inner_file(file), flags, out_flags),
                None => ffi::SQLITE_CANTOPEN,
            }
        };
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        // SAFETY: the inner file is open; from now on SQLite will call our methods, and
        // x_close frees the state.
        unsafe {
            (*file.cast::<KagiFile>()).state = Box::into_raw(Box::new(layer));
            (*file).pMethods = &IO_METHODS;
        }
        ffi::SQLITE_OK
    })
}

static IO_METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    // Version 2: shared memory, but no xFetch (memory-mapped pages would be ciphertext).
    iVersion: 2,
    xClose: Some(x_close),
    xRead: Some(x_read),
    xWrite: Some(x_write),
    xTruncate: Some(x_truncate),
    xSync: Some(x_sync),
    xFileSize: Some(x_file_size),
    xLock: Some(x_lock),
    xUnlock: Some(x_unlock),
    xCheckReservedLock: Some(x_check_reserved_lock),
    xFileControl: Some(x_file_control),
    xSectorSize: Some(x_sector_size),
    xDeviceCharacteristics: Some(x_device_characteristics),
    xShmMap: Some(x_shm_map),
    xShmLock: Some(x_shm_lock),
    xShmBarrier: Some(x_shm_barrier),
    xShmUnmap: Some(x_shm_unmap),
    xFetch: None,
    xUnfetch: None,
};

unsafe extern "C" fn x_close(file: *mut ffi::sqlite3_file) -> c_int {
    guard(|| {
        // SAFETY: SQLite closes an opened file once; the state was boxed by x_open.
        let (mut layer, mut inner) = unsafe {
            let me = file.cast::<KagiFile>();
            let state = Box::from_raw((*me).state);
            (*me).state = ptr::null_mut();
            (state, Inner(inner_file(file)))
        };
        let flushed = layer.flush(&mut inner);
        if let Some((db, client)) = layer.main_parts() {
            db.shm().detach(client);
        }
        drop(layer);
        // SAFETY: the inner file is open; it is closed exactly once, here.
        let rc = unsafe {
            match inner.methods().xClose {
                Some(close) => close(inner.0),
                None => ffi::SQLITE_OK,
            }
        };
        match flushed {
            Err(e) => e,
            Ok(()) => rc,
        }
    })
}

unsafe extern "C" fn x_read(
    file: *mut ffi::sqlite3_file,
    buf: *mut c_void,
    amount: c_int,
    offset: ffi::sqlite3_int64,
) -> c_int {
    guard(|| {
        let (Ok(len), Ok(off)) = (usize::try_from(amount), u64::try_from(offset)) else {
            return ffi::SQLITE_IOERR_READ;
        };
        // SAFETY: SQLite passes a buffer of `amount` bytes and an opened file.
        let ((layer, mut inner), out) = unsafe {
            (
                parts(file),
                std::slice::from_raw_parts_mut(buf.cast::<u8>(), len),
            )
        };
        match layer.read(&mut inner, out, off) {
            Ok(ReadStatus::Full) => ffi::SQLITE_OK,
            Ok(ReadStatus::Short) => ffi::SQLITE_IOERR_SHORT_READ,
            Err(rc) => {
                out.fill(0);
                rc
            }
        }
    })
}

unsafe extern "C" fn x_write(
    file: *mut ffi::sqlite3_file,
    buf: *const c_void,
    amount: c_int,
    offset: ffi::sqlite3_int64,
) -> c_int {
    guard(|| {
        let (Ok(len), Ok(off)) = (usize::try_from(amount), u64::try_from(offset)) else {
            return ffi::SQLITE_IOERR_WRITE;
        };
        // SAFETY: SQLite passes a buffer of `amount` bytes and an opened file.
        let ((layer, mut inner), data) = unsafe {
            (
                parts(file),
                std::slice::from_raw_parts(buf.cast::<u8>(), len),
            )
        };
        rc_of(layer.write(&mut inner, data, off))
    })
}

unsafe extern "C" fn x_truncate(file: *mut ffi::sqlite3_file, size: ffi::sqlite3_int64) -> c_int {
    guard(|| {
        let Ok(size) = u64::try_from(size) else {
            return ffi::SQLITE_IOERR_TRUNCATE;
        };
        // SAFETY: an opened file.
        let (layer, mut inner) = unsafe { parts(file) };
        rc_of(layer.truncate(&mut inner, size))
    })
}

unsafe extern "C" fn x_sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    guard(|| {
        // SAFETY: an opened file.
        let (layer, mut inner) = unsafe { parts(file) };
        if let Err(rc) = layer.flush(&mut inner) {
            return rc;
        }
        // SAFETY: the inner file is open.
        unsafe {
            match inner.methods().xSync {
                Some(sync) => sync(inner.0, flags),
                None => ffi::SQLITE_OK,
            }
        }
    })
}

unsafe extern "C" fn x_file_size(
    file: *mut ffi::sqlite3_file,
    out: *mut ffi::sqlite3_int64,
) -> c_int {
    guard(|| {
        // SAFETY: an opened file.
        let (layer, mut inner) = unsafe { parts(file) };
        match layer.size(&mut inner).map(i64::try_from) {
            Ok(Ok(n)) => {
                // SAFETY: SQLite passes a valid out-pointer.
                unsafe { *out = n };
                ffi::SQLITE_OK
            }
            Ok(Err(_)) => ffi::SQLITE_IOERR_FSTAT,
            Err(rc) => rc,
        }
    })
}

/// Forwards a method to the inner file.
macro_rules! forward {
    ($file:expr, $method:ident, $default:expr $(, $arg:expr)*) => {{
        // SAFETY: an opened file; its inner file is open.
        let inner = unsafe { inner_file($file) };
        let inner = Inner(inner);
        match inner.methods().$method {
            // SAFETY: the inner file's own method, with SQLite's arguments.
            Some(f) => unsafe { f(inner.0 $(, $arg)*) },
            None => $default,
        }
    }};
}

unsafe extern "C" fn x_lock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    guard(|| forward!(file, xLock, ffi::SQLITE_OK, level))
}

unsafe extern "C" fn x_unlock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    guard(|| forward!(file, xUnlock, ffi::SQLITE_OK, level))
}

unsafe extern "C" fn x_check_reserved_lock(file: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    guard(|| forward!(file, xCheckReservedLock, ffi::SQLITE_OK, out))
}

unsafe extern "C" fn x_file_control(
    file: *mut ffi::sqlite3_file,
    op: c_int,
    arg: *mut c_void,
) -> c_int {
    guard(|| {
        // SAFETY: an opened file.
        let (layer, _) = unsafe { parts(file) };
        if matches!(layer, Layer::Temp(_))
            && (op == ffi::SQLITE_FCNTL_SIZE_HINT || op == ffi::SQLITE_FCNTL_CHUNK_SIZE)
        {
            // Sizes are logical for a temporary file; the physical file is larger.
            return ffi::SQLITE_OK;
        }
        forward!(file, xFileControl, ffi::SQLITE_NOTFOUND, op, arg)
    })
}

unsafe extern "C" fn x_sector_size(file: *mut ffi::sqlite3_file) -> c_int {
    guard(|| forward!(file, xSectorSize, 4096))
}

unsafe extern "C" fn x_device_characteristics(file: *mut ffi::sqlite3_file) -> c_int {
    // Atomic-write claims would let SQLite skip journaling around writes the layers transform.
    const ATOMIC: c_int = ffi::SQLITE_IOCAP_ATOMIC
        | ffi::SQLITE_IOCAP_ATOMIC512
        | ffi::SQLITE_IOCAP_ATOMIC1K
        | ffi::SQLITE_IOCAP_ATOMIC2K
        | ffi::SQLITE_IOCAP_ATOMIC4K
        | ffi::SQLITE_IOCAP_ATOMIC8K
        | ffi::SQLITE_IOCAP_ATOMIC16K
        | ffi::SQLITE_IOCAP_ATOMIC32K
        | ffi::SQLITE_IOCAP_ATOMIC64K
        | ffi::SQLITE_IOCAP_BATCH_ATOMIC;
    guard(|| forward!(file, xDeviceCharacteristics, 0) & !ATOMIC)
}

unsafe extern "C" fn x_shm_map(
    file: *mut ffi::sqlite3_file,
    region: c_int,
    size: c_int,
    extend: c_int,
    out: *mut *mut c_void,
) -> c_int {
    guard(|| {
        // SAFETY: an opened file.
        let (layer, _) = unsafe { parts(file) };
        // SAFETY: SQLite passes a valid out-pointer.
        unsafe { *out = ptr::null_mut() };
        let (Ok(region), Ok(size)) = (usize::try_from(region), usize::try_from(size)) else {
            return ffi::SQLITE_IOERR_SHMMAP;
        };
        let Some((db, client)) = layer.main_parts() else {
            return ffi::SQLITE_IOERR_SHMMAP;
        };
        match db.shm().map(client, region, size, extend != 0) {
            Ok(p) => {
                // SAFETY: valid out-pointer; the region lives while any connection maps it.
                unsafe { *out = p.cast::<c_void>() };
                ffi::SQLITE_OK
            }
            Err(rc) => rc,
        }
    })
}

unsafe extern "C" fn x_shm_lock(
    file: *mut ffi::sqlite3_file,
    ofst: c_int,
    n: c_int,
    flags: c_int,
) -> c_int {
    guard(|| {
        // SAFETY: an opened file.
        let (layer, _) = unsafe { parts(file) };
        let Some((db, client)) = layer.main_parts() else {
            return ffi::SQLITE_IOERR_SHMLOCK;
        };
        rc_of(db.shm().lock(client, ofst, n, flags))
    })
}

unsafe extern "C" fn x_shm_barrier(_file: *mut ffi::sqlite3_file) {
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
}

unsafe extern "C" fn x_shm_unmap(file: *mut ffi::sqlite3_file, _delete: c_int) -> c_int {
    guard(|| {
        // SAFETY: an opened file.
        let (layer, _) = unsafe { parts(file) };
        if let Some((db, client)) = layer.main_parts() {
            db.shm().detach(client);
        }
        ffi::SQLITE_OK
    })
}

/// Forwards a VFS method to the default VFS.
macro_rules! forward_vfs {
    ($vfs:expr, $method:ident, $default:expr $(, $arg:expr)*) => {{
        // SAFETY: our VFS wraps the default VFS, which lives forever.
        let inner = unsafe { inner_vfs($vfs) };
        // SAFETY: reading a method pointer of that VFS.
        match unsafe { (*inner).$method } {
            // SAFETY: the default VFS's own method, with SQLite's arguments.
            Some(f) => unsafe { f(inner $(, $arg)*) },
            None => $default,
        }
    }};
}

unsafe extern "C" fn x_delete(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    sync: c_int,
) -> c_int {
    forward_vfs!(vfs, xDelete, ffi::SQLITE_IOERR_DELETE, name, sync)
}

unsafe extern "C" fn x_access(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    flags: c_int,
    out: *mut c_int,
) -> c_int {
    forward_vfs!(vfs, xAccess, ffi::SQLITE_IOERR_ACCESS, name, flags, out)
}

unsafe extern "C" fn x_full_pathname(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    n: c_int,
    out: *mut c_char,
) -> c_int {
    forward_vfs!(vfs, xFullPathname, ffi::SQLITE_CANTOPEN, name, n, out)
}

unsafe extern "C" fn x_dl_open(vfs: *mut ffi::sqlite3_vfs, name: *const c_char) -> *mut c_void {
    forward_vfs!(vfs, xDlOpen, ptr::null_mut(), name)
}

unsafe extern "C" fn x_dl_error(vfs: *mut ffi::sqlite3_vfs, n: c_int, out: *mut c_char) {
    forward_vfs!(vfs, xDlError, (), n, out)
}

unsafe extern "C" fn x_dl_sym(
    vfs: *mut ffi::sqlite3_vfs,
    handle: *mut c_void,
    symbol: *const c_char,
) -> Option<unsafe extern "C" fn(*mut ffi::sqlite3_vfs, *mut c_void, *const c_char)> {
    forward_vfs!(vfs, xDlSym, None, handle, symbol)
}

unsafe extern "C" fn x_dl_close(vfs: *mut ffi::sqlite3_vfs, handle: *mut c_void) {
    forward_vfs!(vfs, xDlClose, (), handle)
}

unsafe extern "C" fn x_randomness(vfs: *mut ffi::sqlite3_vfs, n: c_int, out: *mut c_char) -> c_int {
    forward_vfs!(vfs, xRandomness, 0, n, out)
}

unsafe extern "C" fn x_sleep(vfs: *mut ffi::sqlite3_vfs, micros: c_int) -> c_int {
    forward_vfs!(vfs, xSleep, 0, micros)
}

unsafe extern "C" fn x_current_time(vfs: *mut ffi::sqlite3_vfs, out: *mut f64) -> c_int {
    forward_vfs!(vfs, xCurrentTime, ffi::SQLITE_ERROR, out)
}

unsafe extern "C" fn x_get_last_error(
    vfs: *mut ffi::sqlite3_vfs,
    n: c_int,
    out: *mut c_char,
) -> c_int {
    forward_vfs!(vfs, xGetLastError, 0, n, out)
}

unsafe extern "C" fn x_current_time_int64(
    vfs: *mut ffi::sqlite3_vfs,
    out: *mut ffi::sqlite3_int64,
) -> c_int {
    forward_vfs!(vfs, xCurrentTimeInt64, ffi::SQLITE_ERROR, out)
}

unsafe extern "C" fn x_set_system_call(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    call: ffi::sqlite3_syscall_ptr,
) -> c_int {
    forward_vfs!(vfs, xSetSystemCall, ffi::SQLITE_NOTFOUND, name, call)
}

unsafe extern "C" fn x_get_system_call(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
) -> ffi::sqlite3_syscall_ptr {
    forward_vfs!(vfs, xGetSystemCall, None, name)
}

unsafe extern "C" fn x_next_system_call(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
) -> *const c_char {
    forward_vfs!(vfs, xNextSystemCall, ptr::null(), name)
}

/// Sets the reserved bytes per page of a connection's main database (SQLite's
/// `SQLITE_FCNTL_RESERVE_BYTES`), effective for a database that has no page yet.
pub(crate) fn set_reserve_bytes(conn: &rusqlite::Connection, n: c_int) -> Result<(), Rc> {
    let mut value = n;
    // SAFETY: the handle is a live connection owned by `conn`; the argument is an int as the
    // file control expects, read and overwritten during the call only.
    let rc = unsafe {
        ffi::sqlite3_file_control(
            conn.handle(),
            c"main".as_ptr(),
            ffi::SQLITE_FCNTL_RESERVE_BYTES,
            (&raw mut value).cast::<c_void>(),
        )
    };
    status(rc)
}
