#!/usr/bin/env python3
"""Fails when source files of a crate import each other in a loop.

Builds, per crate, the graph of `crate::module` and `super::` references between its files
(comments and `#[cfg(test)]` sections left out) and lists its strongly connected components of
more than one file. Exit status 1 when there is any.
    scripts/import-loops.py [REPO]
"""
import os, re, sys
root = sys.argv[1] if len(sys.argv) > 1 else '.'
def modules(src):
    mods = {}
    for dp, _, fs in os.walk(src):
        for f in fs:
            if f.endswith('.rs'):
                p = os.path.join(dp, f)
                rel = os.path.relpath(p, src)[:-3]
                parts = rel.split(os.sep)
                if parts[-1] in ('lib', 'main', 'mod'):
                    parts = parts[:-1]
                mods['::'.join(parts)] = p
    return mods
def refs(text, mods, me):
    out = set()
    # crate::a::b paths, and `use crate::{a, b::c}` groups
    for m in re.finditer(r'crate::([A-Za-z_][A-Za-z0-9_:]*)', text):
        path = m.group(1).split('::')
        for i in range(len(path), 0, -1):
            k = '::'.join(path[:i])
            if k in mods: out.add(k); break
    for m in re.finditer(r'use crate::\{([^;]*)\};', text, re.S):
        for item in re.split(r'[,\s]+', m.group(1)):
            path = item.strip('{} ').split('::')
            for i in range(len(path), 0, -1):
                k = '::'.join(path[:i])
                if k in mods: out.add(k); break
    if me:
        parent = me.rsplit('::', 1)[0] if '::' in me else ''
        for m in re.finditer(r'super::([A-Za-z_][A-Za-z0-9_]*)', text):
            k = (parent + '::' if parent else '') + m.group(1)
            if k in mods: out.add(k)
            elif parent in mods: out.add(parent)
    out.discard(me)
    return out
def sccs(g):
    idx, low, st, on, res, c = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10000)
    def s(v):
        idx[v] = low[v] = c[0]; c[0] += 1; st.append(v); on.add(v)
        for w in g.get(v, ()):
            if w not in idx: s(w); low[v] = min(low[v], low[w])
            elif w in on: low[v] = min(low[v], idx[w])
        if low[v] == idx[v]:
            comp = []
            while True:
                w = st.pop(); on.discard(w); comp.append(w)
                if w == v: break
            if len(comp) > 1: res.append(comp)
    for v in g:
        if v not in idx: s(v)
    return res
total = 0
for crate in sorted(os.listdir(os.path.join(root, 'crates'))):
    src = os.path.join(root, 'crates', crate, 'src')
    if not os.path.isdir(src): continue
    mods = modules(src)
    g = {}
    for k, p in mods.items():
        text = open(p).read()
        # ignore test modules inside files
        text = text.split('#[cfg(test)]')[0]
        text = '\n'.join(l for l in text.splitlines() if not l.strip().startswith('//'))
        g[k] = refs(text, mods, k) - ({''} if k else set())
        if k == '': g[k] = set()  # lib.rs re-exports do not count
    for comp in sccs(g):
        total += 1
        print(f"{crate}: {sorted(mods[m].split('/src/')[1] for m in comp)}")
print(f"{total} import loops")
sys.exit(1 if total else 0)
