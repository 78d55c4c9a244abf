//! Directory trees as stored in a repository: one blob per directory listing its entries.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

/// What a tree entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
}

/// One entry of a directory. Names and link targets are bytes on Unix: UTF-8 ones are stored
/// as text, others base64-encoded, so any name round-trips exactly.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Name (UTF-8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Name bytes (base64) when not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_b64: Option<String>,
    /// Kind.
    pub kind: NodeKind,
    /// Permission bits (and setuid/setgid/sticky).
    pub mode: u32,
    /// Owner (user id), when recorded: a restore sets it only when asked to (as root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Group (group id), when recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// Size in bytes (files).
    #[serde(default)]
    pub size: u64,
    /// Content chunk ids, hex, in order (files).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub content: Vec<String>,
    /// Subtree id, hex (directories).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subtree: Option<String>,
    /// Link target (UTF-8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Link target bytes (base64) when not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_b64: Option<String>,
}

/// Encodes bytes as (text, base64) fields.
pub(crate) fn encode_bytes(b: &[u8]) -> (Option<String>, Option<String>) {
    match std::str::from_utf8(b) {
        Ok(s) => (Some(s.to_string()), None),
        Err(_) => (None, Some(STANDARD.encode(b))),
    }
}

fn decode_bytes(text: &Option<String>, b64: &Option<String>) -> Option<Vec<u8>> {
    match (text, b64) {
        (Some(t), _) => Some(t.as_bytes().to_vec()),
        (None, Some(b)) => STANDARD.decode(b).ok(),
        _ => None,
    }
}

impl Node {
    /// The entry's name as bytes.
    pub fn name_bytes(&self) -> Option<Vec<u8>> {
        decode_bytes(&self.name, &self.name_b64)
    }

    /// The link target as bytes.
    pub fn target_bytes(&self) -> Option<Vec<u8>> {
        decode_bytes(&self.target, &self.target_b64)
    }

    /// Sets the name from an OS string.
    pub fn set_name(&mut self, name: &OsStr) {
        let (t, b) = encode_bytes(name.as_bytes());
        self.name = t;
        self.name_b64 = b;
    }
}

/// Whether `name` can name a tree entry: one path component, never one that climbs or stays
/// (`.`, `..`), so that no entry of a tree, however crafted, resolves outside its directory.
pub(crate) fn valid_name(name: &[u8]) -> bool {
    !name.is_empty() && name != b"." && name != b".." && !name.contains(&b'/') && !name.contains(&0)
}

/// A directory listing, entries sorted by name bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tree {
    /// Entries.
    pub nodes: Vec<Node>,
}

impl Tree {
    /// Checks the entry rules: every name is valid ([`valid_name`]) and none repeats (a second
    /// entry of the same name would be created over the first, for instance a directory
    /// through a symbolic link). Returns what is wrong, for the caller's error.
    pub(crate) fn check_names(&self) -> Result<(), String> {
        let mut names = Vec::with_capacity(self.nodes.len());
        for n in &self.nodes {
            let name = n.name_bytes().ok_or("an entry has no name")?;
            if !valid_name(&name) {
                return Err(format!(
                    "entry name \"{}\" is not a single path component",
                    name.escape_ascii()
                ));
            }
            names.push(name);
        }
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(format!(
                "entry name \"{}\" appears more than once",
                w[0].escape_ascii()
            ));
        }
        Ok(())
    }

    /// The entry with this name.
    pub fn find(&self, name: &[u8]) -> Option<&Node> {
        self.nodes
            .iter()
            .find(|n| n.name_bytes().as_deref() == Some(name))
    }
}
