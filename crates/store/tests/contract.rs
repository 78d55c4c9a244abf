//! The store contract ([`kagi_store::contract`]) on the embedded SQLite store: a fresh file in
//! a temporary directory per behaviour; then the same on PostgreSQL.

mod sqlite {
    kagi_store::store_contract!(|| async {
        let dir = tempfile::tempdir().expect("temporary directory");
        let store = kagi_store::SqlStore::open_sqlite(&dir.path().join("kagi.db"))
            .await
            .expect("open the store");
        kagi_store::contract::Backend::new(store, dir)
    });
}

/// The same behaviours on PostgreSQL: a scratch database per behaviour on the server
/// scripts/test.sh starts (see [`kagi_store::contract::postgres`]).
mod postgres {
    kagi_store::store_contract!(|| async {
        use kagi_store::contract::postgres;
        let Some(server) = postgres::server_url() else {
            // No server configured (and none required): run the behaviour on SQLite instead
            // of failing a developer's `cargo test` for want of PostgreSQL.
            let dir = tempfile::tempdir().expect("temporary directory");
            let store = kagi_store::SqlStore::open_sqlite(&dir.path().join("kagi.db"))
                .await
                .expect("open the store");
            return kagi_store::contract::Backend::new(store, dir);
        };
        let url = postgres::scratch_database(&server).await;
        let store = kagi_store::SqlStore::open_postgres(&url)
            .await
            .expect("open the PostgreSQL store");
        kagi_store::contract::Backend::new(store, ())
    });
}
