//! Fuzzes the SQL lexer: statement splitting, classification and the rewrite for SQLite.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        kagi_pgsql::fuzzing::sql(s);
    }
});
