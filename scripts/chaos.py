#!/usr/bin/env python3
"""Chaos run: load the system while killing and freezing its processes.

Starts `restaurant up --processes` (every service and the gateway as its own
supervised process) on a fresh data directory, places orders (and cancels
some) from several clients for a bounded time on loopback, and meanwhile
repeatedly picks a random process and either kills it (SIGKILL; the
supervisor restarts it) or freezes it (SIGSTOP, then SIGCONT after a
moment). Then it waits for quiescence and checks the promises:

- every acknowledged order (201) exists and reached a final state;
- nothing was doubled: at most one cook ticket and one delivery per order,
  and a delivered order has exactly one of each;
- stock balances: what is left is the initial stock minus what delivered
  orders took (cancelled orders gave theirs back, rejected ones took none).

The last line is
  orders: N acknowledged, N final, 0 lost, 0 doubled, stock balanced: yes
and the exit status is non-zero if any check fails.

Only the standard library; targets 127.0.0.1 only; bounded in time.
"""

import argparse
import atexit
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

FINAL = {"DELIVERED", "REJECTED", "CANCELLED"}
MENU = {"plenty": 1_000_000, "scarce": 40}


def request(method, url, body=None, timeout=5.0):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as res:
            return res.status, json.loads(res.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, None
    except (urllib.error.URLError, OSError, ValueError):
        return None, None


def read_list(url, patience=30.0):
    """A listing the checks rely on. A failed read is not an empty list: it
    is retried (a process may still be restarting), and reported."""
    deadline = time.time() + patience
    while True:
        status, body = request("GET", url, timeout=10)
        if status == 200 and isinstance(body, list):
            return body
        if time.time() > deadline:
            raise SystemExit(f"chaos: cannot read {url} (last status {status})")
        print(f"chaos: read {url} answered {status}; retrying", flush=True)
        time.sleep(0.5)


def find_binary(explicit):
    if explicit:
        return explicit
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for profile in ("release", "debug"):
        path = os.path.join(root, "target", profile, "restaurant")
        if os.path.exists(path):
            return path
    subprocess.run(["cargo", "build", "--release"], cwd=root, check=True)
    return os.path.join(root, "target", "release", "restaurant")


def start_system(binary, data_dir, shared=()):
    proc = subprocess.Popen(
        [binary, "up", "--processes", "--port", "0", "--data-dir", data_dir,
         "--cook-time", "50ms", "--delivery-time", "50ms", "--cancel-timeout", "300ms",
         "--no-fsync", *shared],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "RUST_LOG": "error"},
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit("chaos: restaurant exited before it was up")
        if line.startswith("restaurant is up at "):
            url = line.split("restaurant is up at ", 1)[1].strip()
            threading.Thread(target=lambda: proc.stdout.read(), daemon=True).start()
            return proc, url
    raise SystemExit("chaos: restaurant was not up within 60 s")


def processes(data_dir):
    try:
        with open(os.path.join(data_dir, "processes.json")) as f:
            return [p for p in json.load(f)["processes"] if p.get("pid")]
    except (OSError, ValueError, KeyError):
        return []


class Load:
    def __init__(self, url, restaurant, workers, deadline):
        self.url, self.restaurant, self.deadline = url, restaurant, deadline
        self.lock = threading.Lock()
        self.acked = {}  # order id -> customer
        self.customers = set()
        self.placements = 0
        self.cancels = 0
        self.threads = [threading.Thread(target=self.worker, args=(w,)) for w in range(workers)]

    def worker(self, w):
        rng = random.Random(w)
        mine = []
        for i in range(100_000):
            if time.time() >= self.deadline:
                return
            # A new customer every 500 attempts keeps each listing short.
            customer = f"chaos-{self.restaurant}-{w}-{i // 500}"
            with self.lock:
                self.customers.add(customer)
            if mine and rng.random() < 0.1:
                self.cancels += 1
                request("POST", f"{self.url}/orders/{rng.choice(mine)}/cancel")
                continue
            items = ([{"menuId": "plenty", "qty": 1}, {"menuId": "scarce", "qty": 1}]
                     if i % 3 == 0 else [{"menuId": "plenty", "qty": 2}])
            status, body = request("POST", f"{self.url}/orders", {
                "customerId": customer, "restaurantId": self.restaurant,
                "items": items, "address": "1 Jongno, Seoul"})
            self.placements += 1
            if status == 201 and body:
                mine.append(body["id"])
                with self.lock:
                    self.acked[body["id"]] = customer
            else:
                time.sleep(0.05)  # part of the system is down: back off a little

    def run(self):
        for t in self.threads:
            t.start()

    def join(self):
        for t in self.threads:
            t.join()


def chaos(data_dir, deadline, rng, log):
    frozen = []
    while time.time() < deadline:
        time.sleep(rng.uniform(0.4, 1.2))
        procs = processes(data_dir)
        if not procs:
            continue
        p = rng.choice(procs)
        try:
            if rng.random() < 0.5:
                os.kill(p["pid"], signal.SIGKILL)
                log.append(f"kill -9 {p['name']} ({p['pid']})")
            else:
                os.kill(p["pid"], signal.SIGSTOP)
                frozen.append(p["pid"])
                pause = rng.uniform(0.3, 1.5)
                log.append(f"freeze {p['name']} ({p['pid']}) for {pause:.1f}s")
                time.sleep(pause)
                os.kill(p["pid"], signal.SIGCONT)
                frozen.remove(p["pid"])
        except ProcessLookupError:
            pass
    for pid in frozen:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def all_orders(url, customers):
    orders = {}
    for c in customers:
        status, body = request("GET", f"{url}/orders?customerId={c}&limit=1000", timeout=10)
        if status != 200:
            return None
        if len(body) >= 1000:
            raise SystemExit(f"chaos: customer {c} has too many orders to list")
        for o in body:
            orders[o["id"]] = o
    return orders


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of load and chaos")
    ap.add_argument("--workers", type=int, default=6)
    ap.add_argument("--binary", help="the restaurant binary (default: target/*/restaurant)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--settle", type=float, default=120.0, help="seconds to wait for quiescence")
    ap.add_argument("--distributed", action="store_true",
                    help="PostgreSQL + NATS JetStream (a fresh database and stream, "
                         "dropped afterwards; DATABASE_URL's server, NATS_URL)")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    binary = find_binary(args.binary)
    data_dir = tempfile.mkdtemp(prefix="restaurant-chaos-")
    shared = ()
    if args.distributed:
        name = f"rt_chaos_{seed}"
        server = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
        subprocess.run(["psql", server, "-qc", f"CREATE DATABASE {name}"], check=True)
        atexit.register(subprocess.run, ["psql", server, "-qc",
                                         f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"])
        nats = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
        atexit.register(subprocess.run, [binary, "drop-stream", "--nats-url", nats,
                                         "--stream", name],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shared = ("--database-url", server.rsplit("/", 1)[0] + "/" + name,
                  "--nats-url", nats, "--stream", name)
    proc, url = start_system(binary, data_dir, shared)
    ok = False
    try:
        restaurant = f"chaos{seed}"
        for menu, stock in MENU.items():
            status, _ = request("PUT", f"{url}/menus/{restaurant}/{menu}",
                                {"name": menu, "price": 1000, "stock": stock})
            assert status in (200, 201), f"menu setup failed: {status}"
        print(f"chaos: seed {seed}, {args.duration:.0f}s of load on {url}, data in {data_dir}",
              flush=True)
        deadline = time.time() + args.duration
        load = Load(url, restaurant, args.workers, deadline)
        load.run()
        log = []
        chaos(data_dir, deadline, rng, log)
        load.join()
        print(f"chaos: {len(log)} faults: {'; '.join(log[:12])}{' …' if len(log) > 12 else ''}",
              flush=True)

        customers = sorted(load.customers)
        settle_by = time.time() + args.settle
        orders = None
        while time.time() < settle_by:
            orders = all_orders(url, customers)
            if orders is not None and all(o["status"] in FINAL for o in orders.values()):
                break
            time.sleep(0.5)
        if orders is None:
            raise SystemExit("chaos: could not list orders after the run")

        acked = load.acked
        lost = [i for i in acked if i not in orders]
        final = [i for i in acked if i in orders and orders[i]["status"] in FINAL]
        unfinished = [o["id"] for o in orders.values() if o["status"] not in FINAL]
        doubled = []
        taken = {m: 0 for m in MENU}
        for oid, o in orders.items():
            cooks = read_list(f"{url}/cooks?orderId={oid}")
            deliveries = read_list(f"{url}/deliveries?orderId={oid}")
            if len(cooks) > 1 or len(deliveries) > 1 or (
                    o["status"] == "DELIVERED" and (len(cooks), len(deliveries)) != (1, 1)):
                doubled.append(oid)
                if len(doubled) <= 5:
                    print(f"chaos: doubled? order {oid} {o['status']}: "
                          f"{len(cooks)} cook tickets, {len(deliveries)} deliveries", flush=True)
            if o["status"] == "DELIVERED":
                for line in o["items"]:
                    taken[line["menuId"]] += line["qty"]
        _, menus = request("GET", f"{url}/menus?restaurantId={restaurant}", timeout=10)
        left = {m["menuId"]: m["stock"] for m in (menus or [])}
        balanced = all(left.get(m) == MENU[m] - taken[m] for m in MENU)
        statuses = {}
        for o in orders.values():
            statuses[o["status"]] = statuses.get(o["status"], 0) + 1
        print(f"chaos: {len(orders)} orders in the system ({load.placements} placement attempts, "
              f"{load.cancels} cancel attempts): {statuses}; unfinished: {len(unfinished)}",
              flush=True)
        if not balanced:
            print(f"chaos: stock left {left}, expected "
                  f"{ {m: MENU[m] - taken[m] for m in MENU} }", flush=True)
        ok = not lost and not doubled and not unfinished and balanced and len(acked) > 0
        print(f"orders: {len(acked)} acknowledged, {len(final)} final, {len(lost)} lost, "
              f"{len(doubled)} doubled, stock balanced: {'yes' if balanced else 'no'}", flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
