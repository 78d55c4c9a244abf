//! The family's ciphers: AES-256-GCM under the data key (outer layer) and, for families with
//! double encryption, ChaCha20-Poly1305 under the platform's inner key. Nonces are positions
//! (segment number, byte offset), never random; see docs/DISK_FORMAT.md.

use aws_lc_rs::aead::{AES_256_GCM, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use zeroize::Zeroizing;

use crate::error::{DiskError, Result};
use crate::format::{BS, FamilyHeader, KEY_CHECK_LEN, TAG_LEN};

/// The keys a family is opened with. The store never persists them; dropping this zeroizes
/// them.
pub struct FamilyKeys {
    /// The family's AES-256 data key (DEK).
    pub data_key: Zeroizing<[u8; 32]>,
    /// The platform-held key of the inner layer (double encryption, DK-9); `Some` exactly
    /// for families created with the inner layer.
    pub inner_key: Option<Zeroizing<[u8; 32]>>,
}

impl FamilyKeys {
    /// Keys of a family without the inner layer.
    pub fn new(data_key: Zeroizing<[u8; 32]>) -> Self {
        FamilyKeys {
            data_key,
            inner_key: None,
        }
    }

    /// Keys of a family with double encryption.
    pub fn with_inner(data_key: Zeroizing<[u8; 32]>, inner_key: Zeroizing<[u8; 32]>) -> Self {
        FamilyKeys {
            data_key,
            inner_key: Some(inner_key),
        }
    }
}

/// The plaintext sealed in the family header's key checks.
const KEY_CHECK: &[u8; KEY_CHECK_LEN] = b"kagi-disk key check, version 1\0\0";

/// Domain bytes that start every associated data, so a tag made for one purpose never
/// verifies for another even if positions were confused.
const DOMAIN_BLOCK: u8 = b'B';
const DOMAIN_HEADER: u8 = b'H';
const DOMAIN_CHECKPOINT: u8 = b'C';
const DOMAIN_KEYCHECK: u8 = b'K';

/// The 96-bit nonce of the data at `offset` in segment `segment`: 8 bytes of segment number
/// then 4 bytes of offset, big-endian. Segment numbers are never reused in a family and
/// nothing is written twice at one offset of a segment, so no nonce repeats under a key.
pub(crate) fn nonce(segment: u64, offset: u32) -> Nonce {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&segment.to_be_bytes());
    n[8..].copy_from_slice(&offset.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// A family's ciphers, shared by every thread (aws-lc's keys are `Sync`; no lock around
/// cryptography).
pub(crate) struct Cipher {
    outer: LessSafeKey,
    inner: Option<LessSafeKey>,
    uid: [u8; 16],
}

impl Cipher {
    /// Builds the ciphers; the raw keys are zeroized when `keys` drops at the end.
    pub(crate) fn new(keys: FamilyKeys, uid: [u8; 16], inner_layer: bool) -> Result<Cipher> {
        let inner = match (inner_layer, &keys.inner_key) {
            (true, Some(k)) => Some(LessSafeKey::new(
                UnboundKey::new(&CHACHA20_POLY1305, &k[..]).map_err(|_| DiskError::WrongKey)?,
            )),
            (true, None) => {
                return Err(DiskError::InnerKey(
                    "the family has an inner layer and needs its key",
                ));
            }
            (false, Some(_)) => {
                return Err(DiskError::InnerKey(
                    "the family has no inner layer but an inner key was given",
                ));
            }
            (false, None) => None,
        };
        let outer = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &keys.data_key[..]).map_err(|_| DiskError::WrongKey)?,
        );
        Ok(Cipher { outer, inner, uid })
    }

    /// Ciphertext bytes of one block on disk.
    pub(crate) fn block_ct_len(&self) -> usize {
        block_ct_len(self.inner.is_some())
    }

    fn block_aad(&self, block: u64) -> [u8; 25] {
        let mut a = [0u8; 25];
        a[0] = DOMAIN_BLOCK;
        a[1..17].copy_from_slice(&self.uid);
        a[17..25].copy_from_slice(&block.to_le_bytes());
        a
    }

    /// Encrypts in place the block whose plaintext is `buf[..BS]`; `buf` is
    /// [`Self::block_ct_len`] long and receives the tag(s) after the data.
    pub(crate) fn seal_block(&self, segment: u64, offset: u32, block: u64, buf: &mut [u8]) {
        let aad = self.block_aad(block);
        let mut len = BS;
        for key in self.inner.iter().chain(std::iter::once(&self.outer)) {
            // Cannot fail: the input is far below the AEADs' length limits.
            if let Ok(tag) = key.seal_in_place_separate_tag(
                nonce(segment, offset),
                Aad::from(aad),
                &mut buf[..len],
            ) {
                buf[len..len + TAG_LEN].copy_from_slice(tag.as_ref());
            }
            len += TAG_LEN;
        }
    }

    /// Decrypts in place a block sealed at (`segment`, `offset`) for address `block`; the
    /// plaintext is then `buf[..BS]`. Fails if anything was changed, moved or copied.
    pub(crate) fn open_block(
        &self,
        segment: u64,
        offset: u32,
        block: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let corrupt = || DiskError::Corrupt {
            segment,
            offset: offset as u64,
        };
        let aad = self.block_aad(block);
        let ct = self.block_ct_len();
        let buf = buf.get_mut(..ct).ok_or_else(corrupt)?;
        self.outer
            .open_in_place(nonce(segment, offset), Aad::from(aad), buf)
            .map_err(|_| corrupt())?;
        if let Some(inner) = &self.inner {
            inner
                .open_in_place(
                    nonce(segment, offset),
                    Aad::from(aad),
                    &mut buf[..BS + TAG_LEN],
                )
                .map_err(|_| corrupt())?;
        }
        Ok(())
    }

    fn header_aad(&self, fields: &[u8]) -> Vec<u8> {
        let mut a = Vec::with_capacity(17 + fields.len());
        a.push(DOMAIN_HEADER);
        a.extend_from_slice(&self.uid);
        a.extend_from_slice(fields);
        a
    }

    /// The tag (GMAC) of a record header's fields at (`segment`, `offset`).
    pub(crate) fn mac_header(&self, segment: u64, offset: u32, fields: &[u8]) -> [u8; TAG_LEN] {
        let mut out = [0u8; TAG_LEN];
        if let Ok(tag) = self.outer.seal_in_place_separate_tag(
            nonce(segment, offset),
            Aad::from(self.header_aad(fields)),
            &mut [],
        ) {
            out.copy_from_slice(tag.as_ref());
        }
        out
    }

    /// Whether `tag` authenticates the record header `fields` at (`segment`, `offset`).
    pub(crate) fn verify_header(
        &self,
        segment: u64,
        offset: u32,
        fields: &[u8],
        tag: &[u8],
    ) -> bool {
        let mut t = [0u8; TAG_LEN];
        if tag.len() != TAG_LEN {
            return false;
        }
        t.copy_from_slice(tag);
        self.outer
            .open_in_place(
                nonce(segment, offset),
                Aad::from(self.header_aad(fields)),
                &mut t,
            )
            .is_ok()
    }

    fn checkpoint_aad(header: &[u8]) -> Vec<u8> {
        let mut a = Vec::with_capacity(1 + header.len());
        a.push(DOMAIN_CHECKPOINT);
        a.extend_from_slice(header);
        a
    }

    /// Seals a checkpoint body (in place, tag appended) under the nonce of its segment.
    pub(crate) fn seal_checkpoint(
        &self,
        segment: u64,
        offset: u32,
        header: &[u8],
        body: &mut Vec<u8>,
    ) {
        if let Ok(tag) = self.outer.seal_in_place_separate_tag(
            nonce(segment, offset),
            Aad::from(Self::checkpoint_aad(header)),
            body,
        ) {
            body.extend_from_slice(tag.as_ref());
        }
    }

    /// Opens a checkpoint body; returns the plaintext length (the plaintext is
    /// `body[..len]`).
    pub(crate) fn open_checkpoint(
        &self,
        segment: u64,
        offset: u32,
        header: &[u8],
        body: &mut [u8],
    ) -> Result<usize> {
        self.outer
            .open_in_place(
                nonce(segment, offset),
                Aad::from(Self::checkpoint_aad(header)),
                body,
            )
            .map(|p| p.len())
            .map_err(|_| DiskError::CorruptMeta {
                file: "checkpoint",
                reason: "authentication failed".into(),
            })
    }

    /// The key checks of a new family header: the constant sealed at nonce (0, 0) (segment 0
    /// is never a segment) under each key, the header's fields as associated data.
    pub(crate) fn key_checks(&self, fields: &[u8]) -> ([u8; 48], [u8; 48]) {
        let seal = |key: &LessSafeKey| {
            let mut b = [0u8; KEY_CHECK_LEN + TAG_LEN];
            b[..KEY_CHECK_LEN].copy_from_slice(KEY_CHECK);
            if let Ok(tag) = key.seal_in_place_separate_tag(
                nonce(0, 0),
                Aad::from(keycheck_aad(fields)),
                &mut b[..KEY_CHECK_LEN],
            ) {
                b[KEY_CHECK_LEN..].copy_from_slice(tag.as_ref());
            }
            b
        };
        let outer = seal(&self.outer);
        let inner = self.inner.as_ref().map(seal).unwrap_or([0u8; 48]);
        (outer, inner)
    }

    /// Checks the keys against a family header: `WrongKey` unless both open their check.
    pub(crate) fn verify_key_checks(&self, header: &FamilyHeader) -> Result<()> {
        let fields = FamilyHeader::fields(&header.uid, header.inner_layer);
        let open = |key: &LessSafeKey, check: &[u8; 48]| {
            let mut b = *check;
            matches!(
                key.open_in_place(nonce(0, 0), Aad::from(keycheck_aad(&fields)), &mut b),
                Ok(p) if p == KEY_CHECK
            )
        };
        let outer_ok = open(&self.outer, &header.outer_check);
        let inner_ok = match &self.inner {
            Some(k) => open(k, &header.inner_check),
            None => true,
        };
        if outer_ok && inner_ok {
            Ok(())
        } else {
            Err(DiskError::WrongKey)
        }
    }
}

fn keycheck_aad(fields: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(1 + fields.len());
    a.push(DOMAIN_KEYCHECK);
    a.extend_from_slice(fields);
    a
}

/// Ciphertext bytes of one block with or without the inner layer.
pub(crate) fn block_ct_len(inner_layer: bool) -> usize {
    BS + TAG_LEN + if inner_layer { TAG_LEN } else { 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cipher(k: u8, inner: Option<u8>, uid: u8) -> Cipher {
        let keys = FamilyKeys {
            data_key: Zeroizing::new([k; 32]),
            inner_key: inner.map(|i| Zeroizing::new([i; 32])),
        };
        Cipher::new(keys, [uid; 16], inner.is_some()).unwrap()
    }

    #[test]
    fn block_is_bound_to_position_address_key_and_family() {
        for inner in [None, Some(9)] {
            let c = cipher(1, inner, 1);
            let mut buf = vec![0u8; c.block_ct_len()];
            buf[..BS].fill(0x5a);
            c.seal_block(3, 100, 42, &mut buf);
            assert_ne!(&buf[..BS], &[0x5a; BS][..]);
            let sealed = buf.clone();
            c.open_block(3, 100, 42, &mut buf).unwrap();
            assert_eq!(&buf[..BS], &[0x5a; BS][..]);
            for (seg, off, blk) in [(3, 100, 43), (3, 101, 42), (4, 100, 42)] {
                let mut b = sealed.clone();
                assert!(c.open_block(seg, off, blk, &mut b).is_err());
            }
            let mut b = sealed.clone();
            assert!(cipher(2, inner, 1).open_block(3, 100, 42, &mut b).is_err());
            let mut b = sealed.clone();
            assert!(cipher(1, inner, 2).open_block(3, 100, 42, &mut b).is_err());
            if inner.is_some() {
                let mut b = sealed.clone();
                assert!(
                    cipher(1, Some(8), 1)
                        .open_block(3, 100, 42, &mut b)
                        .is_err()
                );
            }
        }
    }

    #[test]
    fn header_mac_and_key_checks() {
        let c = cipher(1, Some(2), 1);
        let tag = c.mac_header(5, 64, b"fields");
        assert!(c.verify_header(5, 64, b"fields", &tag));
        assert!(!c.verify_header(5, 65, b"fields", &tag));
        assert!(!c.verify_header(5, 64, b"fieldz", &tag));
        let fields = FamilyHeader::fields(&[1; 16], true);
        let (outer_check, inner_check) = c.key_checks(&fields);
        let h = FamilyHeader {
            uid: [1; 16],
            inner_layer: true,
            outer_check,
            inner_check,
        };
        c.verify_key_checks(&h).unwrap();
        assert!(matches!(
            cipher(3, Some(2), 1).verify_key_checks(&h),
            Err(DiskError::WrongKey)
        ));
        assert!(matches!(
            cipher(1, Some(3), 1).verify_key_checks(&h),
            Err(DiskError::WrongKey)
        ));
    }
}
