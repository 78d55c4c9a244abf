//! `createOption: Import`: a new disk filled from a raw image the caller names by URL
//! (`creationData.sourceUri`, http or https; Azure names a blob of a storage account there).
//! The image is streamed into the disk's encrypted volume as it arrives: no plaintext copy of it
//! is kept anywhere, and a failed import leaves no disk behind.

use std::time::Duration;

use kagi_core::KvError;
use serde_json::Value;

use crate::keys::{blocking, internal};
use crate::{DiskService, bad};

/// How much of the image is gathered before one write into the volume.
const STEP: usize = 1 << 20;

/// A raw image to import.
#[derive(Clone, Debug)]
pub(crate) struct ImportSource {
    url: reqwest::Url,
}

impl ImportSource {
    /// The source named by `creation` when its `createOption` is `Import`.
    pub(crate) fn of(creation: &Value) -> Result<Option<Self>, KvError> {
        let import = creation["createOption"]
            .as_str()
            .is_some_and(|o| o.eq_ignore_ascii_case("Import"));
        if !import {
            return Ok(None);
        }
        let uri = creation["sourceUri"].as_str().ok_or_else(|| {
            bad(
                "InvalidParameter",
                "createOption 'Import' needs creationData.sourceUri (the http or https URL of a \
                 raw disk image).",
            )
        })?;
        let url = reqwest::Url::parse(uri)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| {
                bad(
                    "InvalidParameter",
                    format!("creationData.sourceUri '{uri}' is not an http or https URL."),
                )
            })?;
        Ok(Some(Self { url }))
    }

    /// The URL as stored in `creationData`.
    pub(crate) fn uri(&self) -> &str {
        self.url.as_str()
    }
}

fn unreadable(url: &reqwest::Url, why: impl std::fmt::Display) -> KvError {
    bad(
        "InvalidParameter",
        format!("The image at creationData.sourceUri '{url}' could not be read: {why}."),
    )
}

impl DiskService {
    /// A client for images: the usual roots and the platform's own CA.
    fn image_client(&self) -> Result<reqwest::Client, KvError> {
        let mut b = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60));
        let ca = self.host.config().data_dir.join("tls/ca.pem");
        if let Ok(pem) = std::fs::read(&ca)
            && let Ok(cert) = reqwest::Certificate::from_pem(&pem)
        {
            b = b.add_root_certificate(cert);
        }
        b.build().map_err(|e| internal("the image client", e))
    }

    /// The image's size in bytes (its `Content-Length`).
    pub(crate) async fn import_size(&self, src: &ImportSource) -> Result<u64, KvError> {
        let r = self
            .image_client()?
            .head(src.url.clone())
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| unreadable(&src.url, e))?;
        r.headers()
            .get(reqwest::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| {
                unreadable(
                    &src.url,
                    "the server gives no Content-Length; name properties.diskSizeGB",
                )
            })
    }

    /// Streams the image into `volume` (a new volume of `size` bytes, all holes), then
    /// flushes it. All-zero blocks stay holes.
    pub(crate) async fn import_into(
        &self,
        src: &ImportSource,
        volume: kagi_disk::Volume,
        size: u64,
    ) -> Result<u64, KvError> {
        let mut r = self
            .image_client()?
            .get(src.url.clone())
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| unreadable(&src.url, e))?;
        let mut at = 0u64;
        let mut buf: Vec<u8> = Vec::with_capacity(STEP);
        loop {
            let chunk = r.chunk().await.map_err(|e| unreadable(&src.url, e))?;
            let done = chunk.is_none();
            if let Some(c) = &chunk {
                buf.extend_from_slice(c);
            }
            if buf.len() >= STEP || (done && !buf.is_empty()) {
                // Whole blocks only (until the end), so that every write starts on a block
                // and its zero blocks are the disk's: they stay holes.
                let whole = if done {
                    buf.len()
                } else {
                    buf.len() - buf.len() % kagi_disk::BLOCK_SIZE as usize
                };
                let rest = buf.split_off(whole);
                let n = buf.len() as u64;
                if at + n > size {
                    return Err(bad(
                        "InvalidParameter",
                        format!(
                            "The image at '{}' is larger than the disk ({size} bytes): name a \
                             larger properties.diskSizeGB.",
                            src.url
                        ),
                    ));
                }
                let (v, data) = (volume.clone(), std::mem::replace(&mut buf, rest));
                buf.reserve(STEP);
                blocking("importing the image", move || v.write_over_holes(at, &data)).await?;
                at += n;
            }
            if done {
                break;
            }
        }
        blocking("importing the image", move || volume.flush()).await?;
        Ok(at)
    }
}
