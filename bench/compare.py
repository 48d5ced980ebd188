#!/usr/bin/env python3
"""Side-by-side benchmark of Flotilla's store and etcd on this machine.

Starts a 3-member etcd (Debian's etcd-server) and a 3-member `flotilla store` on loopback,
with the same Raft timing, data directories on the same filesystem, and both fsyncing their
logs. Runs the same loads with `flotilla bench` against each in alternation (each load on
one and then the other, the order flipping every round), takes medians, and writes
BENCHMARKS.md: the table, the machine, the versions and the command that reproduces it.

    python3 bench/compare.py                 # the full run (1M keys; about half an hour)
    python3 bench/compare.py --quick         # smaller loads, for trying the script

Needs: target/release/flotilla (cargo build --release), etcd and etcdctl on PATH.
"""

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLOTILLA = str(Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release" / "flotilla")


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def free_base_port(seed):
    return 20000 + (seed % 50) * 100


class Cluster:
    """Three members of one system on loopback ports base+{1,2,3}{0,1}."""

    def __init__(self, system, binary, workdir, base):
        self.system = system
        self.binary = binary
        self.workdir = Path(workdir)
        self.base = base
        self.procs = {}

    def client_port(self, i):
        return self.base + 10 * i

    def peer_port(self, i):
        return self.base + 10 * i + 1

    def endpoints(self):
        return ",".join(f"127.0.0.1:{self.client_port(i)}" for i in (1, 2, 3))

    def endpoint(self, i):
        return f"127.0.0.1:{self.client_port(i)}"

    def args(self, i, members=(1, 2, 3), state="new"):
        name = f"m{i}"
        cluster = ",".join(f"m{j}=http://127.0.0.1:{self.peer_port(j)}" for j in members)
        common = [
            "--name", name,
            "--data-dir", str(self.workdir / name),
            "--listen-client-urls", f"http://127.0.0.1:{self.client_port(i)}",
            "--advertise-client-urls", f"http://127.0.0.1:{self.client_port(i)}",
            "--listen-peer-urls", f"http://127.0.0.1:{self.peer_port(i)}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_port(i)}",
            "--initial-cluster", cluster,
            "--initial-cluster-token", f"bench-{self.system}",
            "--initial-cluster-state", state,
            "--heartbeat-interval", "100",
            "--election-timeout", "1000",
            "--snapshot-count", "100000",
        ]
        if self.system == "flotilla":
            return [self.binary, "store"] + common
        return [self.binary] + common + ["--quota-backend-bytes", str(8 << 30), "--log-level", "error"]

    def start_member(self, i, members=(1, 2, 3), state="new"):
        logf = open(self.workdir / f"m{i}.log", "ab")
        self.procs[i] = subprocess.Popen(self.args(i, members, state), stdout=logf, stderr=logf,
                                         env=dict(os.environ, NO_COLOR="1"))

    def start(self):
        self.workdir.mkdir(parents=True, exist_ok=True)
        for i in (1, 2, 3):
            self.start_member(i)
        self.wait_ready()

    def etcdctl(self, *args, endpoints=None, check=True, timeout=120):
        cmd = ["etcdctl", "--endpoints", endpoints or self.endpoints()] + list(args)
        r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, ETCDCTL_API="3"), timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
        return r

    def wait_ready(self, timeout=60, members=(1, 2, 3)):
        deadline = time.time() + timeout
        while time.time() < deadline:
            ok = all(
                self.etcdctl("get", "ready-probe", endpoints=self.endpoint(i), check=False).returncode == 0
                for i in members
            )
            if ok:
                return
            time.sleep(0.2)
        raise RuntimeError(f"{self.system} did not become ready")

    def leader(self):
        r = self.etcdctl("endpoint", "status", "-w", "json")
        for i, st in enumerate(json.loads(r.stdout), start=1):
            s = st["Status"]
            if s["leader"] == s["header"]["member_id"]:
                return i
        raise RuntimeError("no leader")

    def rss_kib(self, i):
        with open(f"/proc/{self.procs[i].pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def kill(self, i):
        p = self.procs.pop(i)
        p.send_signal(signal.SIGKILL)
        p.wait()

    def stop(self):
        for i in list(self.procs):
            self.kill(i)


def bench(cluster, *args, endpoints=None):
    """Runs `flotilla bench ... --json` against `endpoints` (default: every member) and returns
    the parsed result (None on failure)."""
    cmd = [FLOTILLA, "bench"] + list(args) + ["--endpoints", endpoints or cluster.endpoints(), "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if not lines:
        log(f"  bench failed: {' '.join(args)}: {r.stderr.strip()[-300:]}")
        return None
    out = json.loads(lines[-1])
    if r.returncode != 0:
        log(f"  bench reported errors: {out.get('errors')}")
        return None
    return out


def measure_fsync_rate(directory):
    """fsyncs per second of a 4 KiB write on the benchmark filesystem."""
    path = Path(directory) / "fsync-probe"
    n, start = 0, time.time()
    with open(path, "wb") as f:
        while time.time() - start < 2.0:
            f.write(b"x" * 4096)
            f.flush()
            os.fsync(f.fileno())
            n += 1
    path.unlink()
    return n / (time.time() - start)


def load_keys(cluster, keys, val_size):
    return bench(cluster, "put", "--clients", "256", "--conns", "16", "--total", str(keys),
                 "--key-space-size", str(keys), "--sequential-keys", "--key-size", "16",
                 "--val-size", str(val_size))


def startup_seconds(cluster):
    """Kills a follower holding the data and times its restart until it serves a read."""
    leader = cluster.leader()
    i = next(j for j in (1, 2, 3) if j != leader)
    cluster.kill(i)
    t0 = time.time()
    cluster.start_member(i)
    # etcdctl's first connect, refused because the process has not bound its port yet, costs
    # gRPC's 1 s reconnect back-off: wait for the port first, so that is not what is timed.
    while time.time() - t0 < 600:
        try:
            socket.create_connection(("127.0.0.1", cluster.client_port(i)), timeout=1).close()
            break
        except OSError:
            time.sleep(0.005)
    while True:
        r = cluster.etcdctl("get", "probe", "--consistency=s", endpoints=cluster.endpoint(i), check=False)
        if r.returncode == 0:
            return time.time() - t0
        if time.time() - t0 > 600:
            return None
        time.sleep(0.05)


def revision(cluster, endpoints=None, serializable=False):
    args = ["get", "revision-probe", "-w", "json"] + (["--consistency=s"] if serializable else [])
    r = cluster.etcdctl(*args, endpoints=endpoints, check=False)
    if r.returncode != 0:
        return None
    return json.loads(r.stdout)["header"]["revision"]


def catch_up_seconds(cluster):
    """Adds a fourth member (a learner) to the loaded cluster and times it from its start until
    it serves a serializable read at the revision the cluster had when it was added."""
    peer = f"http://127.0.0.1:{cluster.peer_port(4)}"
    target = revision(cluster)
    # etcd refuses a member change until every member has been connected for 5 s.
    deadline = time.time() + 60
    while True:
        r = cluster.etcdctl("member", "add", "m4", "--learner", f"--peer-urls={peer}", check=False)
        if r.returncode == 0:
            break
        if time.time() > deadline:
            raise RuntimeError(f"member add: {r.stderr.strip()[-300:]}")
        time.sleep(1)
    t0 = time.time()
    cluster.start_member(4, members=(1, 2, 3, 4), state="existing")
    while time.time() - t0 < 900:
        got = revision(cluster, endpoints=cluster.endpoint(4), serializable=True)
        if got is not None and got >= target:
            return time.time() - t0
        time.sleep(0.1)
    return None


def compaction_p99(cluster, revisions):
    """Write p99 of an open-loop put load, quiet and while compacting `revisions` revisions."""
    bench(cluster, "put", "--clients", "64", "--conns", "8", "--total", str(revisions),
          "--key-space-size", "1000", "--key-size", "16")
    quiet = bench(cluster, "put", "--clients", "64", "--conns", "8", "--rate", "1000", "--duration", "10s",
                  "--key-space-size", "1000", "--key-size", "16")
    rev = json.loads(cluster.etcdctl("get", "x", "-w", "json").stdout)["header"]["revision"]
    proc = subprocess.Popen(
        [FLOTILLA, "bench", "put", "--clients", "64", "--conns", "8", "--rate", "1000",
         "--duration", "10s", "--key-space-size", "1000", "--key-size", "16", "--endpoints", cluster.endpoints(),
         "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1)
    # A physical compaction of a million revisions takes etcd longer than etcdctl's 5 s default.
    cluster.etcdctl("--command-timeout=600s", "compaction", str(rev - 1), "--physical", timeout=900)
    out, _ = proc.communicate(timeout=600)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    during = json.loads(lines[-1]) if lines else None
    return (quiet or {}).get("latency_ms", {}).get("p99"), (during or {}).get("latency_ms", {}).get("p99")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per load (median reported)")
    ap.add_argument("--keys", type=int, default=1_000_000, help="keys for the RSS and start-up rows")
    ap.add_argument("--quick", action="store_true", help="small loads to try the script")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    ap.add_argument("--workdir", default=None, help="where data directories go (default: a temp dir)")
    ap.add_argument("--flotilla", default=FLOTILLA, help="the flotilla binary (default: $CARGO_TARGET_DIR or target/, release)")
    args = ap.parse_args()
    scale = 0.1 if args.quick else 1.0
    if args.quick:
        args.keys = min(args.keys, 50_000)
        args.rounds = min(args.rounds, 2)

    flotilla = args.flotilla
    # The load generator is the same binary.
    globals()["FLOTILLA"] = flotilla
    etcd = shutil.which("etcd")
    if not Path(flotilla).exists() or not etcd or not shutil.which("etcdctl"):
        sys.exit("needs target/release/flotilla (cargo build --release), etcd and etcdctl on PATH")

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="flotilla-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    systems = {"etcd": etcd, "flotilla": flotilla}
    n = lambda x: str(max(1, int(x * scale)))  # noqa: E731

    loads = [
        # One client talks to one member, so the member matters: the leader (etcd's own
        # benchmark method for this row), then a follower, which hands each write to the leader
        # and asks it for the read index of each linearizable read. A serializable read is
        # answered by the member itself: a follower, the member that is not also busy leading.
        ("put, 1 client, leader", ["put", "--clients", "1", "--total", n(3000), "--key-space-size", "100000", "@leader"]),
        ("put, 1 client, follower", ["put", "--clients", "1", "--total", n(3000), "--key-space-size", "100000", "@follower"]),
        ("put, 16 clients", ["put", "--clients", "16", "--conns", "4", "--total", n(30000), "--key-space-size", "100000"]),
        ("put, 256 clients", ["put", "--clients", "256", "--conns", "16", "--total", n(100000), "--key-space-size", "100000"]),
        ("range l, 1 client, leader", ["range", "--consistency", "l", "--clients", "1", "--total", n(3000), "--key-space-size", "1000", "@leader"]),
        ("range l, 1 client, follower", ["range", "--consistency", "l", "--clients", "1", "--total", n(3000), "--key-space-size", "1000", "@follower"]),
        ("range l, 256 clients", ["range", "--consistency", "l", "--clients", "256", "--conns", "16", "--total", n(100000), "--key-space-size", "1000"]),
        ("range s, 1 client, follower", ["range", "--consistency", "s", "--clients", "1", "--total", n(3000), "--key-space-size", "1000", "@follower"]),
        ("range s, 256 clients", ["range", "--consistency", "s", "--clients", "256", "--conns", "16", "--total", n(100000), "--key-space-size", "1000"]),
        ("txn-mixed 1:1, 64 clients", ["txn-mixed", "--clients", "64", "--conns", "8", "--total", n(30000), "--key-space-size", "1000"]),
        ("watch 10k watchers, 1k puts/s", ["watch", "--watchers", n(10000), "--streams", "100", "--clients", "16", "--put-rate", "1000", "--duration", "10s", "--key-size", "16"]),
        ("lease keep-alive, 16 clients", ["lease-keepalive", "--clients", "16", "--total", n(30000)]),
    ]

    results = {name: {s: [] for s in systems} for name, _ in loads}
    extra = {s: {} for s in systems}
    fsync_rate = measure_fsync_rate(workdir)
    log(f"fsync rate of {workdir}: {fsync_rate:.0f}/s")

    # Each round starts a fresh cluster of each system, both at once, and runs every load on
    # one and then at once on the other (the order flips each round): the two runs of a load
    # are seconds apart, so a change in the machine's speed over the run (this machine's
    # varies by a third over minutes) falls on both.
    for rnd in range(args.rounds):
        order = list(systems) if rnd % 2 == 0 else list(reversed(list(systems)))
        clusters = {}
        log(f"round {rnd + 1}: {' then '.join(order)}")
        try:
            for s in order:
                c = Cluster(s, systems[s], workdir / f"{s}-{rnd}", free_base_port(rnd * 2 + (s == "flotilla")))
                clusters[s] = c
                c.start()
            targets = {}
            for s, c in clusters.items():
                # Keys for the range loads.
                bench(c, "put", "--clients", "16", "--total", "1000", "--key-space-size", "1000", "--sequential-keys")
                leader = c.leader()
                follower = next(i for i in (1, 2, 3) if i != leader)
                targets[s] = {"@leader": c.endpoint(leader), "@follower": c.endpoint(follower)}
            for name, cmd in loads:
                for s in order:
                    c = clusters[s]
                    endpoints = next((targets[s][a] for a in cmd if a in targets[s]), None)
                    r = bench(c, *[a for a in cmd if a not in targets[s]], endpoints=endpoints)
                    results[name][s].append(r)
                    if r:
                        log(f"  {name}, {s}: {r['requests_per_second']:.0f}/s p99 {r['latency_ms']['p99']:.2f} ms")
        finally:
            for c in clusters.values():
                c.stop()
        for c in clusters.values():
            shutil.rmtree(c.workdir, ignore_errors=True)

    # One run each of the large-state measurements.
    for s in systems:
        c = Cluster(s, systems[s], workdir / f"{s}-state", free_base_port(90 + (s == "flotilla")))
        log(f"state measurements: {s}")
        c.start()
        try:
            t0 = time.time()
            load_keys(c, args.keys, 256)
            extra[s]["load_seconds"] = time.time() - t0
            time.sleep(2)
            extra[s]["rss_mib"] = max(c.rss_kib(i) for i in (1, 2, 3)) / 1024
            extra[s]["startup_seconds"] = startup_seconds(c)
            c.wait_ready()
            quiet, during = compaction_p99(c, args.keys)
            extra[s]["p99_quiet_ms"], extra[s]["p99_compacting_ms"] = quiet, during
            extra[s]["catch_up_seconds"] = catch_up_seconds(c)
        finally:
            c.stop()
        shutil.rmtree(c.workdir, ignore_errors=True)

    write_report(args, systems, loads, results, extra, fsync_rate)
    log(f"wrote {args.out}")


def med(runs, path):
    vals = []
    for r in runs:
        if not r:
            continue
        v = r
        for p in path:
            v = v.get(p) if isinstance(v, dict) else None
        if v is not None:
            vals.append(v)
    return statistics.median(vals) if vals else None


def round_ratios(etcd_runs, flotilla_runs):
    """Each round's flotilla/etcd req/s. A round's two runs are seconds apart, so each ratio
    holds however the machine's speed moved between rounds, which the ratio of the two
    medians does not."""
    out = []
    for e, f in zip(etcd_runs, flotilla_runs):
        if e and f and e.get("requests_per_second"):
            out.append(f["requests_per_second"] / e["requests_per_second"])
    return out


def fmt(v, digits=1):
    return "—" if v is None else f"{v:,.{digits}f}"


def ratio(a, b):
    return "—" if a is None or b in (None, 0) else f"{a / b:.2f}"


def version(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.splitlines()[0].strip()
    except Exception:  # noqa: BLE001 - a version string is informational
        return "unknown"


def write_report(args, systems, loads, results, extra, fsync_rate):
    mem_kib = int(open("/proc/meminfo").read().split()[1])
    lines = [
        "# Benchmarks: Flotilla's store against etcd",
        "",
        "Written by `bench/compare.py`; numbers are medians over rounds on one machine, both as",
        "3-member clusters on loopback, same filesystem, both fsyncing. Each round starts both",
        "clusters and runs every load on one and then on the other (etcd first in odd rounds,",
        "flotilla first in even ones). Ratio > 1 favours Flotilla for throughput; < 1 for latency.",
        "`ratio` divides the two medians; `by round` gives each round's ratio of req/s (the two",
        "runs of a round are seconds apart) and, in brackets, their median.",
        "",
        "## Machine",
        "",
        f"- {os.cpu_count()} cores ({platform.processor() or platform.machine()}), {mem_kib // 1024} MiB memory, {platform.platform()}",
        f"- fsync rate of the data filesystem (4 KiB write + fsync, one thread): {fsync_rate:,.0f}/s",
        f"- etcd: {version([systems['etcd'], '--version'])}; flotilla: {version([systems['flotilla'], '--version'])}",
        f"- rounds: {args.rounds}; command: `python3 bench/compare.py{' --quick' if args.quick else ''} --rounds {args.rounds} --keys {args.keys}`",
        "",
        "## Loads",
        "",
        "| load | etcd req/s | flotilla req/s | ratio | by round | etcd p50 ms | flotilla p50 ms | etcd p99 ms | flotilla p99 ms | p99 ratio |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for name, _ in loads:
        e, f = results[name]["etcd"], results[name]["flotilla"]
        er, fr = med(e, ["requests_per_second"]), med(f, ["requests_per_second"])
        e50, f50 = med(e, ["latency_ms", "p50"]), med(f, ["latency_ms", "p50"])
        e99, f99 = med(e, ["latency_ms", "p99"]), med(f, ["latency_ms", "p99"])
        rounds = round_ratios(e, f)
        by_round = (" / ".join(f"{r:.2f}" for r in rounds) + f" ({statistics.median(rounds):.2f})") if rounds else "—"
        lines.append(
            f"| {name} | {fmt(er)} | {fmt(fr)} | {ratio(fr, er)} | {by_round} | {fmt(e50, 2)} | {fmt(f50, 2)} | {fmt(e99, 2)} | {fmt(f99, 2)} | {ratio(f99, e99)} |"
        )
    lines += [
        "",
        "For the watch load, req/s counts delivered events and the latency is from put to receipt.",
        "",
        f"## State: {args.keys:,} keys of 256 B",
        "",
        "| measure | etcd | flotilla | ratio |",
        "|---|---:|---:|---:|",
    ]
    for key, label, digits in [
        ("load_seconds", "time to load the keys (256 clients), s", 1),
        ("rss_mib", "largest member RSS after loading, MiB", 1),
        ("startup_seconds", "restart of a member until it serves a read, s", 2),
        ("catch_up_seconds", "new member (learner) from start until it serves the cluster's revision, s", 2),
        ("p99_quiet_ms", "put p99 at 1k/s, quiet, ms", 2),
        ("p99_compacting_ms", f"put p99 at 1k/s while compacting {args.keys:,} revisions, ms", 2),
    ]:
        e, f = extra["etcd"].get(key), extra["flotilla"].get(key)
        lines.append(f"| {label} | {fmt(e, digits)} | {fmt(f, digits)} | {ratio(f, e)} |")
    lines += [
        "",
    ]
    # The file's other sections (the apiserver's, from bench/apiserver.py) stay.
    out = Path(args.out)
    old = out.read_text() if out.exists() else ""
    keep = old[old.index("<!-- apiserver -->"):] if "<!-- apiserver -->" in old else ""
    out.write_text("\n".join(lines) + ("\n" + keep if keep else ""))


if __name__ == "__main__":
    main()
