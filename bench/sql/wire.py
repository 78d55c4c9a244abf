"""Throughput over the wire (issue 13: "reported separately"): one workload through psycopg 3 over
TLS against a PostgreSQL-protocol server, with C client connections, each in its own thread.

  wire.py CONNINFO ROWS SECONDS CLIENTS MODE

MODE `read`: autocommit point reads (`SELECT v FROM t WHERE id = $1`, prepared). MODE `rw`:
transactions of 10 statements, 3 in 4 point reads and 1 in 4 updates of a row by id (prepared),
retried from the start on a serialization failure (40001) or a lock not available (55P03), as
PostgreSQL applications do; the retries are counted. MODE `rwi`: the same transactions started
with a write that changes nothing (`UPDATE t SET v = v WHERE id = 0`), so that on kagi the
transaction waits for SQLite's write lock at its start (as `BEGIN IMMEDIATE` does) instead of
failing at its first real write; on PostgreSQL the statement is a no-op.
Ids are uniform over 1..ROWS from a fixed seed per client. Prints one JSON line: transactions and
statements per second over the whole run (every client's count, divided by the wall time).
"""

import json
import random
import sys
import threading
import time

import psycopg


def main():
    conninfo, rows, seconds, clients, mode = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    counts = [0] * clients
    retries = [0] * clients
    errors = []
    start = threading.Barrier(clients + 1)

    def worker(i):
        rnd = random.Random(1000 + i)
        try:
            with psycopg.connect(conninfo, autocommit=True) as c:
                cur = c.cursor()
                start.wait()
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
                                            cur.execute("UPDATE t SET v = %s WHERE id = %s", (f"updated {rid}", rid), prepare=True)
                                        else:
                                            cur.execute("SELECT v FROM t WHERE id = %s", (rid,), prepare=True)
                                            cur.fetchone()
                                break
                            except (psycopg.errors.SerializationFailure, psycopg.errors.LockNotAvailable):
                                retries[i] += 1
                    counts[i] += 1
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))
            try:
                start.abort()
            except threading.BrokenBarrierError:
                pass

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.monotonic()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    if errors:
        print(json.dumps({"error": errors[0]}))
        sys.exit(1)
    tx = sum(counts)
    per_tx = 1 if mode == "read" else 10
    print(json.dumps({"clients": clients, "mode": mode, "tps": tx / elapsed, "statements_per_s": tx * per_tx / elapsed,
                      "retries": sum(retries)}))


if __name__ == "__main__":
    main()
