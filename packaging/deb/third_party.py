#!/usr/bin/env python3
"""Lists the Rust crates compiled into the agent, with version and licence, from `cargo metadata`
on stdin: every crate the `idaics` package reaches through normal (run-time) dependencies, so
build tools and test-only crates are left out."""
import json
import sys

meta = json.load(sys.stdin)
packages = {p["id"]: p for p in meta["packages"]}
nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
root = next(p["id"] for p in meta["packages"] if p["name"] == "idaics")
reached, todo = set(), [root]
while todo:
    for dep in nodes[todo.pop()]["deps"]:
        runtime = any(kind["kind"] is None for kind in dep["dep_kinds"])
        if runtime and dep["pkg"] not in reached:
            reached.add(dep["pkg"])
            todo.append(dep["pkg"])

print("Rust crates compiled into /usr/bin/idaics, each under its own licence (SPDX expression).")
print("Each crate's licence text is in its source, published on crates.io.")
print()
for p in sorted((packages[i] for i in reached), key=lambda p: (p["name"], p["version"])):
    licence = p["license"] or (f"in its file {p['license_file']}" if p.get("license_file") else "not declared")
    print(f"{p['name']} {p['version']}: {licence}")
