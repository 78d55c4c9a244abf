//! Rows the front end computes itself (SHOW, catalog queries, cursors) rather than SQLite.

use rusqlite::types::Value;

/// A result column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Col {
    pub name: String,
    pub oid: u32,
}

impl Col {
    pub(crate) fn new(name: &str, oid: u32) -> Self {
        Self {
            name: name.to_owned(),
            oid,
        }
    }
}

/// Rows computed by the front end (SHOW, catalog queries, cursors).
#[derive(Debug, Clone, Default)]
pub(crate) struct ResultSet {
    pub cols: Vec<Col>,
    pub rows: Vec<Vec<Value>>,
}
