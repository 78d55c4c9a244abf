//! The workload of the embedded SQL benchmark (issue 13, "Performance"), shared by both
//! binaries (`kagi-bench-sql`: plain SQLite and kagi; `kagi-bench-sqlcipher`: SQLCipher 4) and
//! written out as an SQL script for the `sqlcipher` shell, so that every engine runs the same
//! statements in the same order on the same data.
//!
//! Data: one table `orders` of `rows` rows (about 230 bytes each on disk with the index; 1.5
//! million rows make a file of about 350 MB, far beyond SQLite's default page cache of 2 MB),
//! generated in SQL so that the shell seeds exactly the same rows, and an index on
//! `(customer, created)`.
//!
//! A transaction is `BEGIN`, 100 statements and `COMMIT`. With a read ratio of R%, R of the 100
//! statements are reads, spread evenly (Bresenham), the others writes. A read is a point lookup
//! of a whole row by id (3 in 4) or a customer's latest 5 orders through the index (1 in 4). A
//! write updates two columns of a row by id (3 in 4) or inserts a new order (1 in 4; the table
//! grows). Ids and values come from SplitMix64 with a fixed seed, uniform over all rows.

use std::error::Error;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use rusqlite::Connection;

/// Errors of the benchmark programs: printed, then the program exits with 1.
pub type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// Statements per transaction.
pub const STATEMENTS: usize = 100;
/// Distinct customers (about 15 orders each at 1.5 million rows).
const CUSTOMERS: i64 = 100_000;
/// The SplitMix64 seed (the number).
const SEED: u64 = 13;
/// Text the notes are cut from (ASCII, no quotes: it goes into SQL literals as it is).
const LOREM: &str = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod \
tempor incididunt ut labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud \
exercitation ullamco laboris nisi ut aliquip ex ea commodo consequat. Duis aute irure dolor in \
reprehenderit in voluptate velit esse cillum dolore eu fugiat nulla pariatur. Excepteur sint \
occaecat cupidatat non proident, sunt in culpa qui officia deserunt mollit anim id est laborum.";
/// Length of the part of [`LOREM`] in a note.
const NOTE_CUT: usize = 140;

const SCHEMA: &str = "CREATE TABLE orders(id INTEGER PRIMARY KEY, customer INTEGER NOT NULL, \
created INTEGER NOT NULL, status INTEGER NOT NULL, amount INTEGER NOT NULL, note TEXT NOT NULL);";
const INDEX: &str = "CREATE INDEX orders_by_customer ON orders(customer, created);";
const GET: &str = "SELECT customer, created, status, amount, note FROM orders WHERE id = ?1";
const LATEST: &str =
    "SELECT id, created, amount FROM orders WHERE customer = ?1 ORDER BY created DESC LIMIT 5";
const UPDATE: &str = "UPDATE orders SET status = ?2, amount = ?3 WHERE id = ?1";
const INSERT: &str = "INSERT INTO orders(id, customer, created, status, amount, note) \
VALUES (?1, ?2, ?3, ?4, ?5, ?6)";
/// What every engine must agree on after a run (same rows, same writes).
const CHECK: &str = "SELECT count(*), sum(amount), sum(status) FROM orders";

/// Where in [`LOREM`] the note of order `id` starts (as `substr(…, 1 + k, …)` in the seed).
fn note_start(id: i64) -> usize {
    usize::try_from(id.wrapping_mul(31).rem_euclid(200)).unwrap_or(0)
}

/// The note of an order, as the seed's SQL writes it.
fn note(id: i64, customer: i64) -> String {
    let k = note_start(id);
    format!(
        "order {id} of customer {customer}: {}",
        &LOREM[k..k + NOTE_CUT]
    )
}

/// The SQL that creates and fills the database: schema, `rows` rows, then the index.
pub fn seed_script(rows: i64) -> String {
    format!(
        "BEGIN;\n{SCHEMA}\nWITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {rows})\n\
         INSERT INTO orders(id, customer, created, status, amount, note)\n\
         SELECT i, (i * 7919) % {CUSTOMERS}, 1700000000 + i * 13, i % 5, (i * 104729) % 100000,\n\
         printf('order %d of customer %d: %s', i, (i * 7919) % {CUSTOMERS}, substr('{LOREM}', 1 + (i * 31) % 200, {NOTE_CUT}))\n\
         FROM n;\n{INDEX}\nCOMMIT;\n"
    )
}

/// One statement of the workload.
enum Op {
    Get(i64),
    Latest(i64),
    Update {
        id: i64,
        status: i64,
        amount: i64,
    },
    Insert {
        id: i64,
        customer: i64,
        status: i64,
        amount: i64,
    },
}

/// Creation time of an inserted order (after every seeded one).
fn created(id: i64) -> i64 {
    1_800_000_000 + id
}

impl Op {
    /// The statement as SQL text, for the shell.
    fn sql(&self) -> String {
        match *self {
            Op::Get(id) => GET.replace("?1", &id.to_string()),
            Op::Latest(c) => LATEST.replace("?1", &c.to_string()),
            Op::Update { id, status, amount } => {
                format!("UPDATE orders SET status = {status}, amount = {amount} WHERE id = {id}")
            }
            Op::Insert {
                id,
                customer,
                status,
                amount,
            } => format!(
                "INSERT INTO orders(id, customer, created, status, amount, note) \
                 VALUES ({id}, {customer}, {}, {status}, {amount}, '{}')",
                created(id),
                note(id, customer)
            ),
        }
    }
}

/// The deterministic stream of statements for one read ratio.
struct Workload {
    state: u64,
    next_id: i64,
    read_pct: usize,
}

impl Workload {
    fn new(rows: i64, read_pct: usize) -> Self {
        Self {
            state: SEED,
            next_id: rows + 1,
            read_pct,
        }
    }

    /// SplitMix64.
    fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (n > 0).
    fn below(&mut self, n: i64) -> i64 {
        let n = u64::try_from(n).unwrap_or(1).max(1);
        i64::try_from(self.next() % n).unwrap_or(0)
    }

    /// An existing row's id.
    fn any_id(&mut self) -> i64 {
        1 + self.below(self.next_id - 1)
    }

    /// Statement `k` (0..100) of a transaction.
    fn op(&mut self, k: usize) -> Op {
        let read = (k + 1) * self.read_pct / STATEMENTS > k * self.read_pct / STATEMENTS;
        let quarter = self.next().is_multiple_of(4);
        match (read, quarter) {
            (true, true) => Op::Latest(self.below(CUSTOMERS)),
            (true, false) => Op::Get(self.any_id()),
            (false, true) => {
                let id = self.next_id;
                self.next_id += 1;
                Op::Insert {
                    id,
                    customer: self.below(CUSTOMERS),
                    status: self.below(5),
                    amount: self.below(100_000),
                }
            }
            (false, false) => Op::Update {
                id: self.any_id(),
                status: self.below(5),
                amount: self.below(100_000),
            },
        }
    }
}

/// Writes the workload as an SQL script (for the shell).
fn write_script(out: &mut impl Write, rows: i64, read_pct: usize, txs: usize) -> Result<()> {
    let mut w = Workload::new(rows, read_pct);
    for _ in 0..txs {
        writeln!(out, "BEGIN;")?;
        for k in 0..STATEMENTS {
            writeln!(out, "{};", w.op(k).sql())?;
        }
        writeln!(out, "COMMIT;")?;
    }
    Ok(out.flush()?)
}

/// Runs the workload on `conn`; returns the seconds of the transactions alone.
fn run(conn: &Connection, rows: i64, read_pct: usize, txs: usize) -> Result<f64> {
    let mut w = Workload::new(rows, read_pct);
    let mut get = conn.prepare(GET)?;
    let mut latest = conn.prepare(LATEST)?;
    let mut update = conn.prepare(UPDATE)?;
    let mut insert = conn.prepare(INSERT)?;
    let mut begin = conn.prepare("BEGIN")?;
    let mut commit = conn.prepare("COMMIT")?;
    // Read what the statements return, so that no engine can skip work.
    let mut seen = 0usize;
    let t0 = Instant::now();
    for _ in 0..txs {
        begin.execute([])?;
        for k in 0..STATEMENTS {
            match w.op(k) {
                Op::Get(id) => {
                    let mut rows = get.query([id])?;
                    while let Some(row) = rows.next()? {
                        seen += row.get_ref(4)?.as_str()?.len();
                    }
                }
                Op::Latest(c) => {
                    let mut rows = latest.query([c])?;
                    while let Some(row) = rows.next()? {
                        seen += usize::from(row.get::<_, i64>(2)? > 0);
                    }
                }
                Op::Update { id, status, amount } => {
                    if update.execute([id, status, amount])? != 1 {
                        return Err(format!("update of order {id} changed no row").into());
                    }
                }
                Op::Insert {
                    id,
                    customer,
                    status,
                    amount,
                } => {
                    insert.execute(rusqlite::params![
                        id,
                        customer,
                        created(id),
                        status,
                        amount,
                        note(id, customer)
                    ])?;
                }
            }
        }
        commit.execute([])?;
    }
    let seconds = t0.elapsed().as_secs_f64();
    if seen == 0 && read_pct > 0 {
        return Err("the reads returned nothing".into());
    }
    Ok(seconds)
}

/// The settings a run actually had, as SQLite reports them.
fn settings(conn: &Connection) -> Result<String> {
    let text = |pragma: &str| -> Result<String> {
        Ok(conn.query_row(&format!("PRAGMA {pragma}"), [], |r| {
            r.get_ref(0).map(|v| match v {
                rusqlite::types::ValueRef::Integer(i) => i.to_string(),
                rusqlite::types::ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
                _ => String::from("?"),
            })
        })?)
    };
    let version: String = conn.query_row("SELECT sqlite_version()", [], |r| r.get(0))?;
    // Only SQLCipher knows this pragma; elsewhere it returns no row.
    let cipher = conn
        .query_row("PRAGMA cipher_version", [], |r| r.get::<_, String>(0))
        .map(|v| format!(" sqlcipher={v}"))
        .unwrap_or_default();
    Ok(format!(
        "sqlite={version}{cipher} page_size={} cache_size={} journal_mode={} synchronous={} mmap_size={}",
        text("page_size")?,
        text("cache_size")?,
        text("journal_mode")?,
        text("synchronous")?,
        text("mmap_size")?
    ))
}

/// The check line every engine must agree on after the same run.
fn check(conn: &Connection) -> Result<String> {
    Ok(conn.query_row(CHECK, [], |r| {
        Ok(format!(
            "{}/{}/{}",
            r.get::<_, i64>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)?
        ))
    })?)
}

/// Opens (or creates) a database for an engine, in WAL mode with `synchronous` as given.
pub type Opener = fn(engine: &str, path: &Path, synchronous: &str) -> Result<Connection>;

const USAGE: &str = "usage:
  seed ENGINE DB ROWS                      create and fill DB (it must not exist)
  run ENGINE DB ROWS READ_PCT TXS SYNC     run TXS transactions on a seeded DB (SYNC: FULL|NORMAL)
  script ROWS READ_PCT TXS                 the same workload as SQL, on standard output
  seed-script ROWS                         the seed as SQL, on standard output
  check ENGINE DB                          count(*)/sum(amount)/sum(status) of the table";

fn arg<T: std::str::FromStr>(args: &[String], i: usize) -> Result<T> {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| format!("bad or missing argument {i}\n{USAGE}").into())
}

fn command(engines: &[&str], open: Opener) -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let engine = |i: usize| -> Result<String> {
        let e: String = arg(&args, i)?;
        if engines.contains(&e.as_str()) {
            Ok(e)
        } else {
            Err(format!("unknown engine {e}: this binary has {engines:?}").into())
        }
    };
    match args.first().map(String::as_str) {
        Some("seed") => {
            let (e, db, rows): (String, String, i64) = (engine(1)?, arg(&args, 2)?, arg(&args, 3)?);
            if Path::new(&db).exists() {
                return Err(format!("{db} exists").into());
            }
            let conn = open(&e, Path::new(&db), "FULL")?;
            let t0 = Instant::now();
            conn.execute_batch(&seed_script(rows))?;
            let seconds = t0.elapsed().as_secs_f64();
            println!("engine={e} seed_seconds={seconds:.3} {}", settings(&conn)?);
            conn.close().map_err(|(_, err)| err)?;
        }
        Some("run") => {
            let e = engine(1)?;
            let db: String = arg(&args, 2)?;
            let (rows, read_pct, txs): (i64, usize, usize) =
                (arg(&args, 3)?, arg(&args, 4)?, arg(&args, 5)?);
            let sync: String = arg(&args, 6)?;
            if read_pct > 100 || !Path::new(&db).exists() {
                return Err(format!("read ratio over 100, or no database {db}\n{USAGE}").into());
            }
            let conn = open(&e, Path::new(&db), &sync)?;
            let seconds = run(&conn, rows, read_pct, txs)?;
            let said = settings(&conn)?;
            conn.close().map_err(|(_, err)| err)?;
            let tps = usize_f64(txs) / seconds;
            println!(
                "engine={e} read={read_pct} txs={txs} seconds={seconds:.3} tps={tps:.1} {said}"
            );
        }
        Some("check") => {
            let conn = open(&engine(1)?, Path::new(&arg::<String>(&args, 2)?), "FULL")?;
            println!("{}", check(&conn)?);
        }
        Some("script") => {
            let (rows, read_pct, txs): (i64, usize, usize) =
                (arg(&args, 1)?, arg(&args, 2)?, arg(&args, 3)?);
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            write_script(&mut out, rows, read_pct, txs)?;
        }
        Some("seed-script") => print!("{}", seed_script(arg(&args, 1)?)),
        _ => return Err(USAGE.into()),
    }
    Ok(())
}

fn usize_f64(n: usize) -> f64 {
    u32::try_from(n).map(f64::from).unwrap_or(f64::MAX)
}

/// The program: runs the command line with the engines this binary links.
pub fn main_with(engines: &[&str], open: Opener) -> std::process::ExitCode {
    match command(engines, open) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-sql: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Sets WAL mode and the run's settings on a plain or SQLCipher connection (kagi's `open` sets
/// WAL itself).
pub fn wal_and_settings(conn: &Connection, synchronous: &str) -> Result<()> {
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(format!("journal mode stays {mode}").into());
    }
    settings_of_run(conn, synchronous)
}

/// Sets `synchronous` (FULL or NORMAL), and `cache_size` when BENCH_SQL_CACHE_SIZE is set (an
/// experiment: the benchmark itself leaves SQLite's default).
pub fn settings_of_run(conn: &Connection, synchronous: &str) -> Result<()> {
    if !["FULL", "NORMAL"].contains(&synchronous) {
        return Err(format!("synchronous must be FULL or NORMAL, not {synchronous}").into());
    }
    conn.execute_batch(&format!("PRAGMA synchronous = {synchronous}"))?;
    if let Ok(size) = std::env::var("BENCH_SQL_CACHE_SIZE") {
        let size: i64 = size
            .parse()
            .map_err(|_| "BENCH_SQL_CACHE_SIZE: not a number")?;
        conn.execute_batch(&format!("PRAGMA cache_size = {size}"))?;
    }
    Ok(())
}

/// The benchmark's raw 256-bit key (kagi's DEK, SQLCipher's raw key): fixed, it protects
/// nothing.
pub const KEY: [u8; 32] = *b"kagi bench sql key, not a secret";
