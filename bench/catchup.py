#!/usr/bin/env python3
"""Memory while catching up: the distributed shape under an open-loop load,
with some services frozen (SIGSTOP) for a while and then thawed, so that the
others pile up a backlog and then drain it. Samples every service process's
resident memory five times a second and prints each one's peak, its memory
once the run is over, and one service's timeline.

    bench/catchup.py [--binary B] [--rate 600] [--duration 40]
                     [--freeze mypage,delivery] [--from 5] [--to 20]
                     [--watch order]

Needs PostgreSQL and NATS (scripts/services.sh); uses a fresh database and
stream and drops them afterwards. Loopback only; bounded by --duration.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

PG = "postgres://postgres@127.0.0.1:5432"
NATS = "nats://127.0.0.1:4222"


def psql(sql):
    subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-qc", sql], check=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def wait_for(what, check, seconds=30):
    deadline = time.time() + seconds
    while time.time() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    sys.exit(f"catchup: {what} not within {seconds} s")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--binary", default="target/release/restaurant")
    p.add_argument("--rate", type=int, default=600)
    p.add_argument("--duration", type=int, default=40)
    p.add_argument("--freeze", default="mypage,delivery")
    p.add_argument("--from", dest="frozen_from", type=float, default=5)
    p.add_argument("--to", dest="frozen_to", type=float, default=20)
    p.add_argument("--watch", default="order")
    a = p.parse_args()
    frozen = a.freeze.split(",")

    name = f"rt_catchup_{os.getpid()}"
    psql(f"CREATE DATABASE {name}")
    data = tempfile.mkdtemp(prefix="restaurant-catchup-")
    port = free_port()
    up = subprocess.Popen(
        [a.binary, "up", "--processes", "--port", str(port), "--data-dir", data,
         "--database-url", f"{PG}/{name}", "--nats-url", NATS, "--stream", name,
         "--cook-time", "0", "--delivery-time", "0"],
        env=dict(os.environ, RUST_LOG="warn"),
        stdout=open(os.path.join(data, "up.log"), "w"), stderr=subprocess.STDOUT)
    try:
        def ready():
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1).status == 200
            except OSError:
                return False

        wait_for("ready", ready)

        def children():
            try:
                with open(os.path.join(data, "processes.json")) as f:
                    procs = json.load(f)["processes"]
            except (OSError, ValueError):
                return None
            if not procs or not all(p["pid"] for p in procs):
                return None
            return {p["name"]: p["pid"] for p in procs}

        procs = wait_for("processes.json", children)
        missing = [n for n in frozen + [a.watch] if n not in procs]
        if missing:
            sys.exit(f"catchup: no process named {missing}; there are {sorted(procs)}")
        report = os.path.join(data, "report.json")
        bench = subprocess.Popen(
            [a.binary, "bench", "--url", f"http://127.0.0.1:{port}", "--duration", f"{a.duration}s",
             "--concurrency", "64", "--rate", str(a.rate), "--json", report],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        peak = {n: 0.0 for n in procs}
        timeline = []
        start = time.time()
        state = "running"
        while bench.poll() is None:
            t = time.time() - start
            if state == "running" and t >= a.frozen_from:
                for n in frozen:
                    os.kill(procs[n], signal.SIGSTOP)
                state = "frozen"
            elif state == "frozen" and t >= a.frozen_to:
                for n in frozen:
                    os.kill(procs[n], signal.SIGCONT)
                state = "thawed"
            sample = {n: rss_mib(pid) for n, pid in procs.items()}
            for n, v in sample.items():
                peak[n] = max(peak[n], v)
            timeline.append((t, sample[a.watch]))
            time.sleep(0.2)
        if state == "frozen":
            for n in frozen:
                os.kill(procs[n], signal.SIGCONT)
        after = {n: rss_mib(pid) for n, pid in procs.items()}
        with open(report) as f:
            r = json.load(f)
        print(f"{a.rate}/s offered for {a.duration} s; {', '.join(frozen)} frozen "
              f"from {a.frozen_from:g} s to {a.frozen_to:g} s")
        print(f"orders placed {r['ordersPlaced']}, completed {r['ordersCompleted']}, "
              f"errors {r['errors'] or 0}; staleness p99 {r['mypageLagMs']['p99']} ms")
        print("peak RSS (MiB):", ", ".join(f"{n} {v:.1f}" for n, v in sorted(peak.items())))
        print("at the end (MiB):", ", ".join(f"{n} {v:.1f}" for n, v in sorted(after.items())))
        print(f"{a.watch} over time (s:MiB):",
              " ".join(f"{t:.0f}:{v:.0f}" for t, v in timeline[::10]))
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            up.kill()
        psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        subprocess.run([a.binary, "drop-stream", "--nats-url", NATS, "--stream", name],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
