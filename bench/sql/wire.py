"""Throughput over the wire (issue 13: "reported separately"): one workload through psycopg 3 over
TLS against a PostgreSQL-protocol server, with C client connections, each in a process of its own
(threads of one Python process would share its interpreter lock and measure the client).

  wire.py CONNINFO ROWS SECONDS CLIENTS MODE

MODE `read`: autocommit point reads (`SELECT v FROM t WHERE id = $1`, prepared). MODE `rw`:
transactions of 10 statements, 3 in 4 point reads and 1 in 4 updates of a row by id (prepared;
each sets a value no other update of the run sets, so every update changes its row),
retried from the start on a serialization failure (40001) or a lock not available (55P03), as
PostgreSQL applications do; the retries are counted. MODE `rwi`: the same transactions started
with a write that changes nothing (`UPDATE t SET v = v WHERE id = 0`), so that on kagi the
transaction waits for SQLite's write lock at its start (as `BEGIN IMMEDIATE` does) instead of
failing at its first real write; on PostgreSQL the statement is a no-op.
Ids are uniform over 1..ROWS from a fixed seed per client. Prints one JSON line: transactions and
statements per second over the whole run (every client's count, divided by the wall time), and
the count and the wall time themselves.
"""

import json
import random
import sys
import multiprocessing
import time

import psycopg


def worker(conninfo, rows, seconds, mode, clients, i, ready, go, out):
    rnd = random.Random(1000 + i)
    done = retries = 0
    try:
        with psycopg.connect(conninfo, autocommit=True) as c:
            cur = c.cursor()
            ready.release()
            go.wait()
            stop = time.monotonic() + seconds
            while time.monotonic() < stop:
                if mode == "read":
                    cur.execute("SELECT v FROM t WHERE id = %s", (rnd.randint(1, rows),), prepare=True)
                    cur.fetchone()
                else:
                    ids = [rnd.randint(1, rows) for _ in range(10)]
                    while True:
                        try:
                            with c.transaction():
                                if mode == "rwi":
                                    cur.execute("UPDATE t SET v = v WHERE id = 0")
                                for k, rid in enumerate(ids):
                                    if k % 4 == 3:
                                        # A value no earlier update wrote: SQLite writes no page
                                        # (and so commits no frame) for an identical row.
                                        v = f"{mode}/{clients} {i}.{done}"
                                        cur.execute("UPDATE t SET v = %s WHERE id = %s", (v, rid), prepare=True)
                                    else:
                                        cur.execute("SELECT v FROM t WHERE id = %s", (rid,), prepare=True)
                                        cur.fetchone()
                            break
                        except (psycopg.errors.SerializationFailure, psycopg.errors.LockNotAvailable):
                            retries += 1
                done += 1
        out.put((done, retries, None))
    except Exception as e:  # noqa: BLE001
        ready.release()
        out.put((0, 0, repr(e)))


def main():
    conninfo, rows, seconds, clients, mode = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    ready, go, out = multiprocessing.Semaphore(0), multiprocessing.Event(), multiprocessing.Queue()
    procs = [multiprocessing.Process(target=worker, args=(conninfo, rows, seconds, mode, clients, i, ready, go, out))
             for i in range(clients)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.acquire()
    t0 = time.monotonic()
    go.set()
    results = [out.get() for _ in procs]
    elapsed = time.monotonic() - t0
    for p in procs:
        p.join()
    errors = [e for _, _, e in results if e]
    if errors:
        print(json.dumps({"error": errors[0]}))
        sys.exit(1)
    tx = sum(d for d, _, _ in results)
    per_tx = 1 if mode == "read" else 10
    print(json.dumps({"clients": clients, "mode": mode, "tps": tx / elapsed, "statements_per_s": tx * per_tx / elapsed,
                      "retries": sum(r for _, r, _ in results), "transactions": tx, "seconds": elapsed}))


if __name__ == "__main__":
    main()
