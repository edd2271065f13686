#!/usr/bin/env python3
"""Draws the import graph of src/ and measures it: files, floors, circles, imports that run back up.

    python3 deploy/tools/import_graph.py            # the numbers, the circles and the upward imports
    python3 deploy/tools/import_graph.py --dot      # Graphviz text of the graph
    python3 deploy/tools/import_graph.py --check    # exit 1 on any circle or more than --max-upward

A file imports another when it names a path into it (`use crate::a::b`, `crate::a::b::f()`,
`super::x`, or `switchyard::a` from the binary); `mod x;` declarations and `#[cfg(test)] mod tests`
blocks are not imports. Floors: a file that imports nothing is on floor 0, any other one floor above
the highest file it imports (files of one circle share a floor). Tiers follow DESIGN.md: entry points
(main, cmd/, app) use stages; stages use the domain; the domain uses the contract, the stores and
error. An import from a lower tier into a higher one runs back up.
"""
import argparse
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
SRC = os.path.normpath(os.path.join(ROOT, "src"))

# Tier of a module path (first segment after crate); unlisted modules are domain (1).
# `replay` drives the stages' processors in a sandbox, as `app` runs them: an entry point.
ENTRY = {"main", "cmd", "app", "cli", "status", "replay"}
STAGES = {"stages"}
FOUNDATION = {"error", "event", "codec", "schema", "records", "topics", "pattern", "route",
              "telemetry", "spans", "store", "secret", "kafka", "body"}


def module_of(path):
    rel = os.path.relpath(path, SRC)[:-3]
    parts = rel.split(os.sep)
    if parts[-1] == "mod":
        parts = parts[:-1]
    if parts in (["lib"],):
        return ()
    return tuple(parts)


def tier(mod):
    if not mod:
        return 0
    head = mod[0]
    if head in ENTRY:
        return 3
    if head in STAGES:
        return 2
    if head in FOUNDATION:
        return 0
    return 1


def strip_tests(text):
    m = re.search(r"#\[cfg\(test\)\]\s*(pub\s+)?mod\s+\w+\s*\{", text)
    return text[: m.start()] if m else text


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return "\n".join(re.sub(r"//.*$", "", line) for line in text.splitlines())


def expand_use(body):
    """`a::{b, c::{d, e}}` -> [a::b, a::c::d, a::c::e]."""
    body = body.strip()
    i = body.find("{")
    if i < 0:
        return [re.sub(r"\s+as\s+\w+$", "", body).strip()]
    prefix = body[:i]
    inner = body[i + 1: body.rfind("}")]
    parts, depth, cur = [], 0, ""
    for ch in inner:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    out = []
    for p in parts:
        p = p.strip()
        if not p:
            continue
        for e in expand_use(p):
            out.append(prefix + e if e != "self" else prefix.rstrip(":"))
    return out


def paths_in(text, mod, is_main, mods=frozenset()):
    """Absolute module paths (tuples) this file names."""
    selfmod = tuple(mod[:-1]) if mod and mod[-1] == "_" else tuple(mod)
    found = []
    for m in re.finditer(r"\buse\s+([^;]+);", text):
        for p in expand_use(m.group(1)):
            found.append(p)
    for m in re.finditer(r"\b((?:crate|super|switchyard)(?:::\w+)+)", text):
        found.append(m.group(1))
    for m in re.finditer(r"(?<![:\w])(\w+(?:::\w+)+)", text):
        # Inline paths into a child module (`child::Type`), as written inside a parent.
        if selfmod + (m.group(1).split("::")[0],) in mods:
            found.append(m.group(1))
    out = []
    for p in found:
        segs = [s for s in p.replace(" ", "").split("::") if s]
        if not segs:
            continue
        if segs[0] == "crate" or (segs[0] == "switchyard" and is_main):
            out.append(tuple(segs[1:]))
        elif segs[0] == "super":
            base = list(mod)
            # In a mod.rs, `super` is the parent of the folder; in a.rs it is the file's parent.
            base = base[:-1]
            while segs and segs[0] == "super":
                segs = segs[1:]
                if segs and segs[0] == "super":
                    base = base[:-1]
            out.append(tuple(base) + tuple(segs))
        elif segs[0] == "self":
            out.append(selfmod + tuple(segs[1:]))
        elif selfmod + (segs[0],) in mods:
            # `use child::Item` names a submodule relative to this one (2018 paths).
            out.append(selfmod + tuple(segs))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dot", action="store_true")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--max-upward", type=int, default=2)
    args = ap.parse_args()

    files = {}
    for dirpath, _, names in os.walk(SRC):
        for n in names:
            if n.endswith(".rs"):
                p = os.path.join(dirpath, n)
                files[module_of(p)] = p
    mods = set(files)
    main_mod = ("main",)
    edges = {m: set() for m in mods}
    for m, p in files.items():
        if m == ():
            continue  # lib.rs only declares modules
        text = strip_comments(strip_tests(open(p, encoding="utf-8").read()))
        is_mod_rs = os.path.basename(p) in ("mod.rs", "lib.rs")
        here = m + ("_",) if is_mod_rs else m
        # Inside an inline `mod x { ... }` (a contract suite), `super` is this file's module.
        inline = re.search(r"\bmod\s+\w+\s*\{", text)
        outer, inner = (text[: inline.start()], text[inline.start():]) if inline else (text, "")
        found = paths_in(outer, here, m == main_mod, frozenset(mods) if is_mod_rs else frozenset())
        found += paths_in(inner, m + ("_",), False, frozenset())
        for path in found:
            # Longest module prefix that is a file.
            for k in range(len(path), 0, -1):
                if path[:k] in mods:
                    target = path[:k]
                    if target != m and target != ():
                        edges[m].add(target)
                    break
    nodes = sorted(n for n in mods if n != ())
    # Tarjan's strongly connected components.
    index, low, on, stack, sccs = {}, {}, set(), [], []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                strong(w)
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
            sccs.append(comp)

    sys.setrecursionlimit(10000)
    for v in nodes:
        if v not in index:
            strong(v)
    comp_of = {v: i for i, c in enumerate(sccs) for v in c}
    floor = {}

    def floor_of(ci):
        if ci in floor:
            return floor[ci]
        floor[ci] = 0
        f = 0
        for v in sccs[ci]:
            for w in edges[v]:
                cw = comp_of[w]
                if cw != ci:
                    f = max(f, floor_of(cw) + 1)
        floor[ci] = f
        return f

    for ci in range(len(sccs)):
        floor_of(ci)
    circles = [sorted(c) for c in sccs if len(c) > 1]
    name = lambda m: "/".join(m) if m else "lib"
    upward = sorted((name(a), name(b)) for a in nodes for b in edges[a] if tier(b) > tier(a))
    floors = max(floor.values()) + 1 if floor else 0
    if args.dot:
        print("digraph src {")
        for a in nodes:
            for b in sorted(edges[a]):
                print(f'  "{name(a)}" -> "{name(b)}";')
        print("}")
        return 0
    print(f"files: {len(nodes)} (plus lib.rs)")
    print(f"imports: {sum(len(edges[a]) for a in nodes)}")
    print(f"floors: {floors}")
    print(f"circles: {len(circles)}" + "".join(
        f"\n  circle of {len(c)}: " + ", ".join(name(m) for m in c) for c in circles))
    print(f"imports that run back up: {len(upward)}" + "".join(f"\n  {a} -> {b}" for a, b in upward))
    by_floor = {}
    for v in nodes:
        by_floor.setdefault(floor[comp_of[v]], []).append(name(v))
    for f in sorted(by_floor):
        print(f"  floor {f}: " + ", ".join(sorted(by_floor[f])))
    if args.check and (circles or len(upward) > args.max_upward):
        print("import graph check failed: a circle, or too many imports running back up", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
