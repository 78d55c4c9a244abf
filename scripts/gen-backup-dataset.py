#!/usr/bin/env python3
"""Generates the backup benchmark data set (about 1 GB), reproducibly from a seed:
random binaries of 1-7 MiB, about a thousand small files, and compressible logs.
With --mutate, changes about 1% of the bytes, scattered, in place (for the incremental run).

  scripts/gen-backup-dataset.py DIR [--size-mb 1024] [--seed 1] [--mutate]
"""
import argparse
import os
import random


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--mutate", action="store_true")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    if a.mutate:
        return mutate(a.dir, rng)
    total = a.size_mb * 1024 * 1024
    os.makedirs(a.dir, exist_ok=True)
    binaries = int(total * 0.75)
    i = 0
    while binaries > 0:
        n = min(binaries, rng.randint(1, 7) * 1024 * 1024 + rng.randint(0, 4095))
        d = os.path.join(a.dir, "bin", f"d{i % 20:02d}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"blob{i:04d}.bin"), "wb") as f:
            f.write(rng.randbytes(n))
        binaries -= n
        i += 1
    for j in range(1000):
        d = os.path.join(a.dir, "small", f"s{j % 50:02d}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{j:04d}.txt"), "wb") as f:
            f.write(rng.randbytes(rng.randint(100, 16 * 1024)))
    logs = total - int(total * 0.75) - 1000 * 8 * 1024
    words = ["GET", "POST", "/api/v1/items", "/login", "200", "404", "500", "user", "ok", "timeout", "cache", "hit", "miss"]
    k = 0
    os.makedirs(os.path.join(a.dir, "logs"), exist_ok=True)
    while logs > 0:
        lines = []
        size = 0
        while size < min(logs, 20 * 1024 * 1024):
            line = f"2026-11-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:00Z req={rng.randint(0, 10**9)} " + " ".join(rng.choice(words) for _ in range(8)) + "\n"
            lines.append(line)
            size += len(line)
        with open(os.path.join(a.dir, "logs", f"app{k:03d}.log"), "w") as f:
            f.write("".join(lines))
        logs -= size
        k += 1


def mutate(root, rng):
    """Overwrites ~1% of all bytes in 4 KiB pieces at random places of random files."""
    files = []
    for dp, _, fns in os.walk(root):
        for fn in fns:
            p = os.path.join(dp, fn)
            files.append((p, os.path.getsize(p)))
    files.sort()
    total = sum(s for _, s in files)
    budget = total // 100
    while budget > 0:
        p, s = rng.choice(files)
        if s <= 4096:
            continue
        off = rng.randrange(0, s - 4096)
        with open(p, "r+b") as f:
            f.seek(off)
            f.write(rng.randbytes(4096))
        budget -= 4096


if __name__ == "__main__":
    main()
