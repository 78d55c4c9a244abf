//! Whole-volume copies into another family (re-encrypted under its key) and imports of raw
//! images. Zero blocks stay holes.

use std::io::Read;

use crate::Family;
use crate::error::{DiskError, Result};
use crate::volume::{ExtentKind, Volume};

/// Bytes moved per step.
const STEP: usize = 1 << 20;

/// Copies `src` into a new volume `new_id` of `dst` (for `createOption: Copy` into another
/// family): decrypted with the source family's key, encrypted with the destination's. Holes
/// stay holes. Durable on return; on failure the new volume is removed.
pub fn copy_volume(src: &Volume, dst: &Family, new_id: &str) -> Result<Volume> {
    let size = src.size();
    into_new_volume(dst, new_id, size, |out| {
        let mut buf = vec![0u8; STEP];
        for ext in src.extents(0, size)? {
            if ext.kind != ExtentKind::Data {
                continue;
            }
            let mut at = ext.offset;
            let end = ext.offset + ext.length;
            while at < end {
                let n = ((end - at) as usize).min(STEP);
                src.read(at, &mut buf[..n])?;
                out.write_over_holes(at, &buf[..n])?;
                at += n as u64;
            }
        }
        Ok(())
    })
}

/// Creates volume `new_id` of `size` bytes, fills it, flushes it; removes it on failure.
fn into_new_volume(
    dst: &Family,
    new_id: &str,
    size: u64,
    fill: impl FnOnce(&Volume) -> Result<()>,
) -> Result<Volume> {
    let out = dst.create_volume(new_id, size)?;
    match fill(&out).and_then(|()| out.flush()) {
        Ok(()) => Ok(out),
        Err(e) => {
            let _ = dst.delete_volume(new_id);
            Err(e)
        }
    }
}

/// Imports a raw image of `size` bytes from `reader` into a new volume `new_id` (for
/// `createOption: Import`). The volume's size is `size` rounded up to 4096; a shorter image
/// leaves the rest as holes; a longer one is refused. Durable on return; on failure the new
/// volume is removed.
pub fn import_volume(
    dst: &Family,
    new_id: &str,
    size: u64,
    reader: &mut dyn Read,
) -> Result<Volume> {
    let rounded = size.div_ceil(crate::BLOCK_SIZE) * crate::BLOCK_SIZE;
    into_new_volume(dst, new_id, rounded, |out| {
        let mut buf = vec![0u8; STEP];
        let mut at = 0u64;
        loop {
            let mut filled = 0;
            while filled < STEP {
                match reader.read(&mut buf[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(DiskError::from(e)),
                }
            }
            if filled == 0 {
                break;
            }
            if at + filled as u64 > size {
                return Err(DiskError::InvalidSize {
                    size,
                    reason: "the image is larger than the size given",
                });
            }
            out.write_over_holes(at, &buf[..filled])?;
            at += filled as u64;
        }
        Ok(())
    })
}
