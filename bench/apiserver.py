#!/usr/bin/env python3
"""Benchmarks Flotilla's Kubernetes API server with `flotilla bench-api`.

Starts `flotilla up` (one-member store + apiserver) in a temporary directory, creates pods
until 10,000 and then 100,000 are stored, and at each size measures create, get, list of one
namespace and list of the whole cluster (pages of 500, as kubectl and informers read), and
watch delivery. Prints a Markdown table and writes it into BENCHMARKS.md between the
`<!-- apiserver -->` markers. Kubernetes' SLOs are the floor: mutating calls p99 <= 1 s,
list of one namespace p99 <= 5 s, cluster-wide list p99 <= 30 s.

    python3 bench/apiserver.py [--flotilla target/release/flotilla] [--sizes 10000,100000]
"""

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

NAMESPACES = 100


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench(flotilla, kubeconfig, op, **kw):
    args = [flotilla, "bench-api", "--op", op, "--kubeconfig", kubeconfig, "--json",
            "--namespaces", str(NAMESPACES)]
    for k, v in kw.items():
        args += ["--" + k.replace("_", "-"), str(v)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=3600)
    line = next((l for l in out.stdout.splitlines() if l.startswith("{")), None)
    if out.returncode != 0 or line is None:
        sys.exit(f"{' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
    return json.loads(line)


def rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--flotilla", default=os.path.join(
        os.environ.get("CARGO_TARGET_DIR", "target"), "release", "flotilla"))
    p.add_argument("--sizes", default="10000,100000")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--output", default="BENCHMARKS.md")
    a = p.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    work = tempfile.mkdtemp(prefix="flotilla-api-bench-")
    api, store, peer = free_port(), free_port(), free_port()
    log = open(os.path.join(work, "up.log"), "w")
    up = subprocess.Popen([a.flotilla, "up", "--data-dir", os.path.join(work, "cluster"),
                           "--secure-port", str(api), "--store-port", str(store),
                           "--store-peer-port", str(peer)], stdout=log, stderr=log)
    kubeconfig = os.path.join(work, "cluster", "admin.kubeconfig")
    rows = []
    try:
        deadline = time.time() + 60
        while not os.path.exists(kubeconfig) and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(1)
        stored = 0
        for size in sizes:
            created = bench(a.flotilla, kubeconfig, "create", total=size - stored,
                            first=stored, clients=a.clients, conns=4)
            # Names continue where the last size stopped.
            stored = size
            per_ns = size // NAMESPACES
            got = bench(a.flotilla, kubeconfig, "get", total=20000, clients=a.clients,
                        conns=4, pods_per_namespace=min(per_ns, 100))
            listed = bench(a.flotilla, kubeconfig, "list", total=max(20, 2000000 // size),
                           clients=4, conns=2)
            listed_all = bench(a.flotilla, kubeconfig, "list-all",
                               total=max(3, 300000 // size), clients=1, conns=1)
            watched = bench(a.flotilla, kubeconfig, "watch", total=5000, clients=8, conns=4,
                            watchers=1000, pods_per_namespace=min(per_ns, 100))
            rss = rss_mib(up.pid)
            rows.append((size, created, got, listed, listed_all, watched, rss))
            print(f"{size} pods: done", file=sys.stderr)
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            up.kill()
        shutil.rmtree(work, ignore_errors=True)

    def cell(r, key):
        v = r[key] if key == "requests_per_second" else r["latency_ms"][key]
        return f"{v:,.1f}" if v is not None else "-"

    lines = [
        "## The Kubernetes API: `flotilla up` (one-member store + apiserver)",
        "",
        f"Written by `bench/apiserver.py`; pods spread over {NAMESPACES} namespaces; "
        f"{a.clients} clients for create and get over 4 HTTP/2 connections; lists read pages "
        "of 500 (the latency is the whole list); watch: 1,000 watchers, 8 writers patching "
        "pods, latency from the patch's send to a watcher's receipt. Kubernetes' SLOs: "
        "mutating p99 <= 1 s, namespace list p99 <= 5 s, cluster list p99 <= 30 s.",
        "",
        f"- machine: {os.cpu_count()} cores, {platform.platform()}",
        f"- command: `python3 bench/apiserver.py --sizes {a.sizes} --clients {a.clients}`",
        "",
        "| pods stored | load | req/s | p50 ms | p99 ms | max ms |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for size, created, got, listed, listed_all, watched, rss in rows:
        per_ns = size // NAMESPACES
        for name, r in [("create pod", created), ("get pod", got),
                        (f"list one namespace ({per_ns:,} pods)", listed),
                        (f"list all pods ({size:,})", listed_all),
                        ("watch delivery (events/s)", watched)]:
            lines.append(f"| {size:,} | {name} | {cell(r, 'requests_per_second')} | "
                         f"{cell(r, 'p50')} | {cell(r, 'p99')} | {cell(r, 'max')} |")
        lines.append(f"| {size:,} | RSS of `flotilla up` | {rss:,.0f} MiB | | | |")
    table = "\n".join(lines) + "\n"
    print(table)
    start, end = "<!-- apiserver -->", "<!-- /apiserver -->"
    text = open(a.output).read() if os.path.exists(a.output) else ""
    block = f"{start}\n{table}{end}"
    if start in text and end in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text,
                      flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(a.output, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
