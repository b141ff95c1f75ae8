#!/usr/bin/env python3
"""Fails when the top-level modules of `src/` import each other in a cycle.

A module is a file `src/NAME.rs` or a directory `src/NAME/`; it depends on every other
top-level module its files name through `crate::OTHER` (in `use` lines or paths). Test
code is left out (tests may reach anywhere): a `#[cfg(test)] mod … { … }` body at the end
of a file, a `#[cfg(test)] mod …;` declaration, and files named `tests.rs`.

There is no allowed cycle: the modules form a DAG (see ARCHITECTURE.md).

Usage: python3 scripts/check_cycles.py [--graph]   (exit 1 and the cycles when there are any)
"""
import os
import re
import sys

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
ROOTS = {"lib", "main"}


def module_of(path):
    rel = os.path.relpath(path, SRC)
    top = rel.split(os.sep)[0]
    return top[:-3] if top.endswith(".rs") else top


def dependencies():
    graph = {}
    for dirpath, _, files in os.walk(SRC):
        for name in files:
            if not name.endswith(".rs") or name == "tests.rs":
                continue
            path = os.path.join(dirpath, name)
            module = module_of(path)
            if module in ROOTS:
                continue
            text = open(path, encoding="utf-8").read()
            text = re.sub(r"#\[cfg\(test\)\]\s*mod \w+;", "", text)
            text, _, tests = text.partition("#[cfg(test)]")
            closed = re.search(r"\n\}\n", tests)
            if closed and tests[closed.end():].strip():
                sys.exit(f"{path}: code after the test module; this check reads only what precedes #[cfg(test)]")
            text = re.sub(r"//[^\n]*", "", text)
            names = set(re.findall(r"\bcrate::(\w+)", text))
            # `use crate::{a, b::c}` groups
            for group in re.findall(r"\bcrate::\{([^}]*)\}", text):
                names |= set(re.findall(r"(?:^|,)\s*(\w+)", group))
            graph.setdefault(module, set()).update(n for n in names if n != module and n not in ROOTS)
    return graph


def cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main():
    graph = dependencies()
    found = cycles(graph)
    if "--graph" in sys.argv:
        for m in sorted(graph):
            print(f"{m} -> {', '.join(sorted(graph[m])) or '-'}")
    if not found:
        print(f"no import cycle between the {len(graph)} top-level modules")
        return 0
    for component in found:
        inside = {m: sorted(graph[m] & set(component)) for m in component}
        print("cycle among " + ", ".join(component) + ": " + "; ".join(f"{m} -> {', '.join(d)}" for m, d in inside.items()))
    return 1


if __name__ == "__main__":
    sys.exit(main())
