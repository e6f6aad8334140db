#!/usr/bin/env python3
"""Checks that gateway's modules depend on each other one way only.

Reads every `gateway/src/**/*.rs`, collects the module paths each file names
(`crate::a::b`, `super::x`, `use` trees included) and builds two graphs:

- between the crate's top-level modules (`transport`, `session`, `hub`, `broker`, ...);
- between sibling modules inside each directory module (`broker/*`, `broker/redis/*`,
  `session/*`, `hub/*`), where a child naming its parent's own items does not count
  (the parent's `mod.rs` declares the children; that is not a dependency).

Fails if either graph has a cycle, or if a top-level edge goes against the declared
direction of data flow (LAYERS below: a module may only use modules of lower layers or
of its own layer's base). Prints the graphs with `-v`.
Usage: python3 scripts/check-layers.py [-v]
"""

import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "gateway" / "src"

# Data flows transport -> session -> hub <-> broker (the broker delivers into the hub;
# the hub never calls a broker). Higher layers may use lower ones, never the reverse.
LAYERS = [
    ["lib", "main"],
    ["shutdown", "transport"],
    ["api", "files", "web", "tls"],
    ["node"],
    ["session"],
    ["channels", "rpc"],
    ["error"],
    ["broker"],
    ["hub"],
    ["auth", "config", "metrics", "http", "backoff", "clock", "blobs"],
    ["channel", "peers", "ws"],
]
LAYER_OF = {m: i for i, layer in enumerate(LAYERS) for m in layer}


def module_of(path: Path) -> list[str]:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "mod":
        parts.pop()
    if parts == ["lib"] or parts == ["main"]:
        return parts
    return parts


def strip_comments(text: str) -> str:
    text = re.sub(r"//[^\n]*", "", text)
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


def expand_use(tree: str) -> list[str]:
    """Expands `a::{b, c::d}` into ['a::b', 'a::c::d'] (one level of nesting is enough
    for the paths we resolve; deeper groups recurse)."""
    tree = tree.strip()
    m = re.match(r"^(.*?)::\{(.*)\}$", tree, flags=re.S)
    if not m:
        return [tree]
    prefix, inner = m.group(1), m.group(2)
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
            out.append(prefix if e == "self" else f"{prefix}::{e}")
    return out


def paths_in(text: str) -> list[str]:
    text = strip_comments(text)
    found = []
    for m in re.finditer(r"\buse\s+([^;]+);", text):
        found += expand_use(m.group(1).replace("\n", " "))
    for m in re.finditer(r"\b((?:crate|super)(?:::[A-Za-z_][A-Za-z0-9_]*)+)", text):
        found.append(m.group(1))
    return found


def resolve(module: list[str], path: str) -> list[str] | None:
    """The absolute module path (as a list) a `crate::`/`super::` path points into."""
    segs = [s.strip() for s in path.split("::")]
    if segs[0] == "crate":
        return segs[1:]
    if segs[0] == "super":
        base = module[:]
        while segs and segs[0] == "super":
            if not base:
                return None
            base = base[:-1]
            segs = segs[1:]
        return base + segs
    return None


def main() -> int:
    verbose = "-v" in sys.argv
    modules = {tuple(module_of(p)): p for p in SRC.rglob("*.rs")}
    names = set(modules)
    top: dict[str, set[str]] = {}
    sib: dict[tuple[str, ...], dict[str, set[str]]] = {}
    for mod, path in modules.items():
        text = path.read_text()
        for p in paths_in(text):
            target = resolve(list(mod), p)
            if not target:
                continue
            # The longest prefix of `target` that is a real module.
            dest = None
            for n in range(len(target), 0, -1):
                if tuple(target[:n]) in names:
                    dest = tuple(target[:n])
                    break
            if dest is None or dest == mod:
                continue
            src_top, dst_top = mod[0], dest[0]
            if src_top != dst_top and src_top not in ("lib", "main"):
                top.setdefault(src_top, set()).add(dst_top)
            # Siblings: the first differing segment under a common parent.
            common = 0
            while common < min(len(mod), len(dest)) and mod[common] == dest[common]:
                common += 1
            if common < len(mod) and common < len(dest):
                parent = mod[:common]
                a, b = mod[common], dest[common]
                sib.setdefault(parent, {}).setdefault(a, set()).add(b)

    errors = []

    def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
        found, state, stack = [], {}, []

        def visit(n: str) -> None:
            state[n] = 1
            stack.append(n)
            for m in sorted(graph.get(n, ())):
                if state.get(m) == 1:
                    found.append(stack[stack.index(m):] + [m])
                elif not state.get(m):
                    visit(m)
            stack.pop()
            state[n] = 2

        for n in sorted(graph):
            if not state.get(n):
                visit(n)
        return found

    for c in cycles(top):
        errors.append("top-level cycle: " + " -> ".join(c))
    for a, deps in sorted(top.items()):
        for b in sorted(deps):
            la, lb = LAYER_OF.get(a), LAYER_OF.get(b)
            if la is None or lb is None:
                errors.append(f"module {a if la is None else b} is not in LAYERS")
            elif la > lb:
                errors.append(f"arrow back: {a} (layer {la}) uses {b} (layer {lb})")
    for parent, graph in sorted(sib.items()):
        for c in cycles(graph):
            where = "::".join(parent) or "crate"
            errors.append(f"cycle among the children of {where}: " + " -> ".join(c))

    if verbose:
        for a, deps in sorted(top.items()):
            print(f"{a} -> {', '.join(sorted(deps))}")
        for parent, graph in sorted(sib.items()):
            if not parent:
                continue
            for a, deps in sorted(graph.items()):
                print(f"  {'::'.join(parent)}::{a} -> {', '.join(sorted(deps))}")
    if errors:
        print("\n".join(errors), file=sys.stderr)
        return 1
    print(f"module layers ok: {len(modules)} files, no cycles, no arrows back")
    return 0


if __name__ == "__main__":
    sys.exit(main())
