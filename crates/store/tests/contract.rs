//! The store contract ([`kagi_store::contract`]) on the embedded SQLite store: a fresh file in
//! a temporary directory per behaviour.

mod sqlite {
    kagi_store::store_contract!(|| async {
        let dir = tempfile::tempdir().expect("temporary directory");
        let store = kagi_store::SqliteStore::open(&dir.path().join("kagi.db"))
            .await
            .expect("open the store");
        kagi_store::contract::Backend::new(store, dir)
    });
}
