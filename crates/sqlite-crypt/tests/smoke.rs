//! temp smoke
use kagi_sqlite_crypt::{DatabaseKey, open};

#[test]
fn smoke() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.db");
    let key = DatabaseKey::new([1; 32], [2; 16]);
    let conn = open(&path, &key).unwrap();
    conn.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES ('hello-plaintext');")
        .unwrap();
    let v: String = conn.query_row("SELECT x FROM t", [], |r| r.get(0)).unwrap();
    assert_eq!(v, "hello-plaintext");
    drop(conn);
    let conn = open(&path, &key).unwrap();
    let v: String = conn.query_row("SELECT x FROM t", [], |r| r.get(0)).unwrap();
    assert_eq!(v, "hello-plaintext");
    drop(conn);
    let bytes = std::fs::read(&path).unwrap();
    assert!(!bytes.windows(15).any(|w| w == b"hello-plaintext"));
    println!("{:?}", kagi_sqlite_crypt::inspect(&path));
    for e in std::fs::read_dir(dir.path()).unwrap() {
        println!("{:?}", e.unwrap().path());
    }
}
