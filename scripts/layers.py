#!/usr/bin/env python3
"""Checks the layering inside the trusted crates: which files import which.

For each crate named (default: arch and platform), reads every `crate::...` and
`super::...` path in its source files (comments and `mod` lines left out; grouped
imports such as `use crate::{a, b::c}` expanded), resolves each to the file that defines
that module, and builds the graph "file A names something of file B". It then prints

- each cycle of imports (a strongly connected set of files) with the names that tie it,
- how many imports run against the layering: imports between files of one cycle,
  counted as the fewest edges whose removal would leave that cycle without a loop
  (computed by brute force for small cycles, otherwise an upper bound),

and exits 1 if a crate has a cycle of more than --max-cycle files (default 3) or
--max-back or more imports against the layering (default 5). docs/ARCHITECTURE.md gives
the layers these checks keep. scripts/test.sh runs it as `layers`.

usage: scripts/layers.py [--root DIR] [--max-cycle N] [--max-back N] [CRATE_DIR ...]
(test files, `ktests.rs` and `tests.rs`, are left out)
"""
import argparse
import itertools
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def module_files(src):
    """Map from module path (tuple) to file path, for every .rs file under src."""
    mods = {}
    for dirpath, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), src)
            parts = rel[:-3].split(os.sep)
            if parts[-1] in ("lib", "main", "mod"):
                parts = parts[:-1]
            mods[tuple(parts)] = os.path.join(dirpath, f)
    return mods


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    out = []
    for line in text.splitlines():
        line = re.sub(r"//.*", "", line)
        if re.match(r"\s*(pub(\([^)]*\))?\s+)?mod\s+\w+\s*;", line):
            continue
        out.append(line)
    return "\n".join(out)


def expand_group(s, i):
    """Parses a `{...}` group starting at s[i] == '{'; returns (paths, end index)."""
    assert s[i] == "{"
    depth, j = 0, i
    while j < len(s):
        if s[j] == "{":
            depth += 1
        elif s[j] == "}":
            depth -= 1
            if depth == 0:
                break
        j += 1
    body = s[i + 1:j]
    items, depth, cur = [], 0, ""
    for ch in body:
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        cur += ch
    items.append(cur)
    paths = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        m = re.match(r"([A-Za-z_][A-Za-z0-9_]*(?:::[A-Za-z_][A-Za-z0-9_]*)*)(::)?(\{)?", item)
        if not m:
            continue
        head = m.group(1).split("::")
        if m.group(3):
            sub, _ = expand_group(item, item.index("{"))
            paths.extend(head + p for p in sub)
        else:
            paths.append(head)
    return paths, j


def paths_in(text):
    """Every path that starts with crate:: or super:: (as lists of segments)."""
    found = []
    for m in re.finditer(r"\b(crate|super)((?:::super)*)::", text):
        start = m.group(1)
        supers = m.group(2).count("super")
        rest = text[m.end():]
        if rest.startswith("{"):
            group, _ = expand_group(rest, 0)
            tails = group
        else:
            mm = re.match(r"[A-Za-z_][A-Za-z0-9_]*(?:::[A-Za-z_][A-Za-z0-9_]*)*", rest)
            tails = [mm.group(0).split("::")] if mm else []
        for t in tails:
            found.append((start, supers, t))
    return found


def resolve(mods, here, start, supers, tail):
    """The module file a path names (its longest module prefix), and the item name."""
    if start == "crate":
        base = ()
    else:
        base = here[: len(here) - 1 - supers] if len(here) > supers else ()
    full = tuple(base) + tuple(tail)
    for n in range(len(full), -1, -1):
        if full[:n] in mods:
            item = full[n] if n < len(full) else full[-1] if full else ""
            return full[:n], item
    return (), ""


def sccs(nodes, edges):
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(comp)

    sys.setrecursionlimit(10000)
    for v in nodes:
        if v not in index:
            visit(v)
    return out


def acyclic(nodes, edges):
    indeg = {n: 0 for n in nodes}
    for a, b in edges:
        indeg[b] += 1
    ready = [n for n in nodes if indeg[n] == 0]
    seen = 0
    adj = {}
    for a, b in edges:
        adj.setdefault(a, []).append(b)
    while ready:
        n = ready.pop()
        seen += 1
        for b in adj.get(n, ()):
            indeg[b] -= 1
            if indeg[b] == 0:
                ready.append(b)
    return seen == len(nodes)


def feedback_edges(comp, edges):
    """Fewest edges to remove to make the component acyclic (exact when small)."""
    inner = sorted((a, b) for a in comp for b in edges.get(a, ()) if b in comp)
    for k in range(0, min(len(inner), 6) + 1):
        for cut in itertools.combinations(inner, k):
            rest = [e for e in inner if e not in cut]
            if acyclic(comp, rest):
                return k
    # Upper bound: order files by how many in-cycle files they import, count backward edges.
    order = sorted(comp, key=lambda n: sum(1 for b in edges.get(n, ()) if b in comp))
    pos = {n: i for i, n in enumerate(order)}
    return sum(1 for a, b in inner if pos[a] <= pos[b])


def check(crate_dir, max_cycle, max_back):
    src = os.path.join(ROOT, crate_dir, "src")
    mods = module_files(src)
    edges, names = {}, {}
    for mod, path in mods.items():
        if os.path.basename(path) in ("ktests.rs", "tests.rs") or mod[-1:] == ("tests",):
            continue
        text = strip_comments(open(path, encoding="utf-8").read())
        for start, supers, tail in paths_in(text):
            target, item = resolve(mods, mod, start, supers, tail)
            if target == mod or target == ():
                continue
            edges.setdefault(mod, set()).add(target)
            names.setdefault((mod, target), set()).add(item)
    nodes = list(mods)
    comps = [c for c in sccs(nodes, edges) if len(c) > 1]
    fname = lambda m: os.path.relpath(mods[m], ROOT)
    arrows = sum(len(v) for v in edges.values())
    back = 0
    ok = True
    for comp in comps:
        k = feedback_edges(comp, edges)
        back += k
        print(f"  cycle of {len(comp)} files ({k} imports against the layering):")
        for a in sorted(comp):
            for b in sorted(edges.get(a, ())):
                if b in comp:
                    print(f"    {fname(a)} -> {fname(b)}: {', '.join(sorted(names[(a, b)]))}")
        if len(comp) > max_cycle:
            ok = False
    if back >= max_back:
        ok = False
    biggest = max((len(c) for c in comps), default=0)
    verdict = "ok" if ok else "FAIL"
    print(f"{verdict} {crate_dir}: {len(mods)} files, {arrows} imports between them, "
          f"{len(comps)} cycles (largest {biggest} files), {back} imports against the layering "
          f"(limits: cycles of at most {max_cycle} files, fewer than {max_back} against)")
    return ok


def main():
    global ROOT
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-cycle", type=int, default=3)
    p.add_argument("--max-back", type=int, default=5)
    p.add_argument("--root", default=ROOT, help="the checkout to read (default: this one)")
    p.add_argument("crates", nargs="*", default=["arch", "platform"])
    a = p.parse_args()
    ROOT = os.path.abspath(a.root)
    ok = all([check(c, a.max_cycle, a.max_back) for c in a.crates])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
