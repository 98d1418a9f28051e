"""The rounds of scripts/bench-pgsync: benalsam against PGSync 7.3 on one PostgreSQL instance
and one search node. Run by that script (which starts PostgreSQL and Redis and sets BENCH_*),
with PGSync's venv python (it brings psycopg2).

Per system and round, on a database made anew (same table, same statements):
  warm-up  one row, waited for until searchable (both pipelines are live before timing)
  insert   BENCH_WRITERS (2) writers, INSERT ... SELECT of BENCH_BATCH (300) rows per statement,
           BENCH_INSERTS (52000) rows in all; done when the index counts them all
  update   the same writers, UPDATE of BENCH_BATCH rows per statement (rev = rev + 1, title,
           written_at), BENCH_UPDATES (20000); done when that many documents have rev = 1
  delete   the same writers, DELETE of BENCH_BATCH rows per statement, BENCH_DELETES (5000);
           done when the index counts the rows left
  paced    the same writers, single-row INSERT transactions at BENCH_PACED_RATE (200) rows/s in
           all for BENCH_PACED_SECONDS (60); each writer notes the time its COMMIT returned, a
           poller asks the index every BENCH_POLL_MS (50) ms for the documents of the run not yet
           seen (range on `seq`); a document's latency is the midpoint of the first search
           request that returned it, minus its commit time (both systems the same poller).
Every statement is its own transaction. Elapsed = first statement -> condition seen (the index
counted every BENCH_POLL_MS); writers = first statement -> last writer's last commit. CPU =
utime + stime (+ reaped children) from /proc of the system's own processes (benalsam: bridge +
consumer; PGSync: its daemon's process tree + redis-server), from the phase's first statement
to its condition plus BENCH_SETTLE_S (2) s, the same window for both. Rounds alternate the order
(A B, B A, ...). Prints markdown; the raw numbers go to BENCH_DIR/results-<time>.json.
"""

import base64
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import psycopg2

E = os.environ
ROUNDS = int(E.get("BENCH_ROUNDS", "2"))
WRITERS = int(E.get("BENCH_WRITERS", "2"))
BATCH = int(E.get("BENCH_BATCH", "300"))
INSERTS = int(E.get("BENCH_INSERTS", "52000"))
UPDATES = int(E.get("BENCH_UPDATES", "20000"))
DELETES = int(E.get("BENCH_DELETES", "5000"))
PACED_RATE = float(E.get("BENCH_PACED_RATE", "200"))
PACED_SECONDS = float(E.get("BENCH_PACED_SECONDS", "60"))
POLL = float(E.get("BENCH_POLL_MS", "50")) / 1000
SETTLE = float(E.get("BENCH_SETTLE_S", "2"))
DEADLINE = float(E.get("BENCH_DEADLINE_S", "600"))
SYSTEMS = E.get("BENCH_SYSTEMS", "benalsam pgsync").split()
DIR = E["BENCH_DIR"]
RUN = E["BENCH_RUN"]
PG_PORT = int(E["BENCH_PG_PORT"])
SEARCH = E["ELASTICSEARCH_URL"].rstrip("/")
HZ = os.sysconf("SC_CLK_TCK")
HEALTH = int(E.get("BENCH_HEALTH_PORT", "3401"))  # the bridge's; the consumer's is the next one
PACED_BASE = 10_000_000  # ids of the paced rows, above every bulk row

if UPDATES > INSERTS or DELETES > INSERTS - UPDATES:
    sys.exit("BENCH_UPDATES + BENCH_DELETES must not exceed BENCH_INSERTS (deletes take the last rows)")

TABLE = """
CREATE TABLE items (
    id bigint PRIMARY KEY,
    seq bigint NOT NULL,
    title text NOT NULL,
    description text NOT NULL,
    category text NOT NULL,
    status text NOT NULL,
    price numeric(12, 2) NOT NULL,
    rev integer NOT NULL DEFAULT 0,
    written_at timestamptz NOT NULL DEFAULT clock_timestamp()
)"""
# The document's fields and their types, given to both systems: the same mapping, so the search
# node does the same work for each (PGSync's default, a dynamic mapping, would add a keyword
# sub-field to every text column and a replica).
FIELDS = {"seq": "long", "title": "text", "description": "text", "category": "keyword", "status": "keyword",
          "price": "double", "rev": "long", "written_at": "date"}
COLUMNS = list(FIELDS)
INSERT = """INSERT INTO items (id, seq, title, description, category, status, price)
SELECT i, i, 'Satılık ikinci el bisiklet ' || i, repeat('Az kullanılmış, bakımlı, faturalı. ', 8),
       'cat' || (i %% 20), 'active', (i %% 1000) + 0.5
FROM generate_series(%s, %s) i"""
UPDATE = """UPDATE items SET rev = rev + 1, title = title || ' (yeni)', written_at = clock_timestamp()
WHERE id BETWEEN %s AND %s"""
DELETE = "DELETE FROM items WHERE id BETWEEN %s AND %s"


def say(*args):
    print("[bench-pgsync]", *args, file=sys.stderr, flush=True)


# --- HTTP -------------------------------------------------------------------------------------
def http(method, url, body=None, auth=None, ok=(200, 201, 204)):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            status, text = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read()
    except (urllib.error.URLError, ConnectionError) as err:
        # A server still starting refuses connections: an answer the waits can retry.
        if ok:
            raise RuntimeError(f"{method} {url}: {err}") from err
        return 0, None
    if ok and status not in ok:
        raise RuntimeError(f"{method} {url}: {status} {text[:300]!r}")
    return status, (json.loads(text) if text else None)


def count(index, query=None):
    body = {"query": query} if query else None
    status, answer = http("POST", f"{SEARCH}/{index}/_count", body or {}, ok=None)
    return answer.get("count", -1) if status == 200 else -1


def delete_index(pattern):
    status, answer = http("GET", f"{SEARCH}/_cat/indices/{pattern}?format=json", ok=None)
    for row in answer if status == 200 else []:
        http("DELETE", f"{SEARCH}/{row['index']}")


# --- PostgreSQL -------------------------------------------------------------------------------
def connect(db):
    conn = psycopg2.connect(host="127.0.0.1", port=PG_PORT, user="bench", dbname=db)
    conn.autocommit = True
    return conn


def fresh_database(db):
    admin = connect("postgres")
    with admin.cursor() as cur:
        cur.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = %s", (db,))
        cur.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        cur.execute(f"CREATE DATABASE {db}")
    admin.close()
    conn = connect(db)
    with conn.cursor() as cur:
        cur.execute(TABLE)
    conn.close()


# --- processes --------------------------------------------------------------------------------
def children():
    """Parent pid -> child pids, from /proc."""
    tree = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(name))
    return tree


def with_descendants(roots):
    tree, out, todo = children(), [], list(roots)
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(tree.get(pid, []))
    return out


def cpu_of(pid):
    """utime + stime + cutime + cstime in seconds (reaped children included), or 0."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return sum(int(v) for v in fields[11:15]) / HZ
    except (OSError, IndexError, ValueError):
        return 0.0


def rss_peak_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def stop(proc, name):
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        say(f"{name} did not stop within 30 s; killing it")
        proc.kill()
        proc.wait()


# --- the systems ------------------------------------------------------------------------------
class Benalsam:
    name = "benalsam"
    db = "bench_benalsam"
    index = "bench_pgsync_benalsam"

    def __init__(self):
        self.procs = {}
        url = urllib.parse.urlsplit(E["RABBITMQ_URL"])
        self.rabbit_auth = f"{urllib.parse.unquote(url.username or '')}:{urllib.parse.unquote(url.password or '')}"
        self.vhost = f"bench-pgsync-{os.getpid()}"
        self.amqp = urllib.parse.urlunsplit(url._replace(path="/" + self.vhost))
        self.config = os.path.join(RUN, "benalsam.toml")
        fields = "\n".join(f'{c} = {{ type = "{t}" }}' for c, t in FIELDS.items())
        with open(self.config, "w") as f:
            f.write(f'[[event_type]]\nname = "items"\ntable = "items"\nkey = "id"\n\n'
                    f'[event_type.index]\nalias = "{self.index}"\n\n'
                    f"[event_type.document.fields]\n{fields}\n")

    def env(self, port):
        env = dict(E)
        env.update(DATABASE_URL=f"postgres://bench@127.0.0.1:{PG_PORT}/{self.db}", RABBITMQ_URL=self.amqp,
                   BENALSAM_CONFIG=self.config, BENALSAM_HEALTH_ADDR=f"127.0.0.1:{port}", RUST_LOG="warn")
        for var in ("BENALSAM_SCHEMA", "BENALSAM_INDEX", "BENALSAM_MIGRATE"):
            env.pop(var, None)
        return env

    def start(self):
        fresh_database(self.db)
        delete_index(self.index + "*")
        mgmt, vhost = E["RABBITMQ_MANAGEMENT_URL"].rstrip("/"), urllib.parse.quote(self.vhost, safe="")
        http("DELETE", f"{mgmt}/api/vhosts/{vhost}", auth=self.rabbit_auth, ok=None)
        http("PUT", f"{mgmt}/api/vhosts/{vhost}", {}, auth=self.rabbit_auth)
        user = urllib.parse.quote(self.rabbit_auth.split(":")[0], safe="")
        http("PUT", f"{mgmt}/api/permissions/{vhost}/{user}", {"configure": ".*", "write": ".*", "read": ".*"},
             auth=self.rabbit_auth)
        subprocess.run([E["BENCH_BRIDGE"], "migrate"], env=self.env(HEALTH), check=True,
                       stdout=subprocess.DEVNULL)
        for name, binary, port in (("bridge", E["BENCH_BRIDGE"], HEALTH), ("consumer", E["BENCH_CONSUMER"], HEALTH + 1)):
            log = open(os.path.join(DIR, f"benalsam-{name}.log"), "ab")
            self.procs[name] = subprocess.Popen([binary, "run"], env=self.env(port), stdout=log, stderr=log)
        for name, port in (("bridge", HEALTH), ("consumer", HEALTH + 1)):
            wait_for(lambda p=port: http("GET", f"http://127.0.0.1:{p}/readyz", ok=None)[0] == 200,
                     f"benalsam {name} ready (see {DIR}/benalsam-{name}.log)", 120, self)

    def pids(self):
        return [p.pid for p in self.procs.values()]

    def alive(self):
        return all(p.poll() is None for p in self.procs.values())

    def stop(self):
        for name, proc in self.procs.items():
            stop(proc, name)
        self.procs = {}
        mgmt, vhost = E["RABBITMQ_MANAGEMENT_URL"].rstrip("/"), urllib.parse.quote(self.vhost, safe="")
        http("DELETE", f"{mgmt}/api/vhosts/{vhost}", auth=self.rabbit_auth, ok=None)
        delete_index(self.index + "*")


class PGSync:
    name = "PGSync"
    db = "bench_pgsync"
    index = "bench_pgsync_pgsync"

    def __init__(self):
        self.proc = None
        self.schema = os.path.join(RUN, "schema.json")
        with open(self.schema, "w") as f:
            json.dump([{"database": self.db, "index": self.index,
                        "setting": {"number_of_shards": 1, "number_of_replicas": 0, "refresh_interval": "1s"},
                        "mapping": {c: {"type": t} for c, t in FIELDS.items()},
                        "nodes": {"table": "items", "schema": "public", "columns": COLUMNS}}], f, indent=2)
        self.checkpoints = os.path.join(RUN, "pgsync-checkpoints")
        os.makedirs(self.checkpoints, exist_ok=True)

    def env(self):
        env = dict(E)
        # Its documented settings: where PostgreSQL, the search node and Redis are, and that
        # the node is OpenSearch. Everything else stays at its default.
        env.update(PG_HOST="127.0.0.1", PG_PORT=str(PG_PORT), PG_USER="bench", PG_PASSWORD="",
                   ELASTICSEARCH_URL=SEARCH, OPENSEARCH="true", ELASTICSEARCH="false",
                   REDIS_HOST="127.0.0.1", REDIS_PORT=E["BENCH_REDIS_PORT"],
                   CHECKPOINT_PATH=self.checkpoints + "/")
        return env

    def start(self):
        fresh_database(self.db)
        delete_index(self.index)
        subprocess.run(["redis-cli", "-p", E["BENCH_REDIS_PORT"], "FLUSHALL"], check=True, stdout=subprocess.DEVNULL)
        for name in os.listdir(self.checkpoints):
            os.remove(os.path.join(self.checkpoints, name))
        log = open(os.path.join(DIR, "pgsync.log"), "ab")
        subprocess.run([E["BENCH_PGSYNC_BOOTSTRAP"], "--config", self.schema], env=self.env(), check=True,
                       stdout=log, stderr=log, cwd=RUN)
        self.proc = subprocess.Popen([E["BENCH_PGSYNC"], "--config", self.schema, "--daemon"], env=self.env(),
                                     stdout=log, stderr=log, cwd=RUN)
        wait_for(lambda: count(self.index) >= 0, f"PGSync's index (see {DIR}/pgsync.log)", 120, self)

    def pids(self):
        return with_descendants([self.proc.pid]) + [int(E["BENCH_REDIS_PID"])]

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        if self.proc is None:
            return
        stop(self.proc, "pgsync")
        log = open(os.path.join(DIR, "pgsync.log"), "ab")
        subprocess.run([E["BENCH_PGSYNC_BOOTSTRAP"], "--config", self.schema, "--teardown"], env=self.env(),
                       stdout=log, stderr=log, cwd=RUN)
        delete_index(self.index)


def wait_for(check, what, deadline, system):
    end = time.monotonic() + deadline
    while not check():
        if not system.alive():
            raise RuntimeError(f"{system.name} exited while waiting for {what}")
        if time.monotonic() > end:
            raise RuntimeError(f"{what}: not within {deadline} s")
        time.sleep(POLL)
    return time.monotonic()


# --- workloads --------------------------------------------------------------------------------
def batches(first, last):
    return [(a, min(a + BATCH - 1, last)) for a in range(first, last + 1, BATCH)]


def run_writers(db, statement, ranges):
    """Runs the statements on WRITERS connections; returns (start, end) in monotonic time."""
    conns = [connect(db) for _ in range(WRITERS)]
    errors = []

    def writer(conn, mine):
        try:
            with conn.cursor() as cur:
                for a, b in mine:
                    cur.execute(statement, (a, b))
        except Exception as err:  # reported after the join, with the others
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(c, ranges[i::WRITERS])) for i, c in enumerate(conns)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    end = time.monotonic()
    for c in conns:
        c.close()
    if errors:
        raise errors[0]
    return start, end


class Cpu:
    """CPU seconds of a system's processes between two snapshots, and their peak RSS."""

    def __init__(self, system):
        self.system = system
        self.before = {pid: cpu_of(pid) for pid in system.pids()}

    def seconds(self):
        pids = self.system.pids()
        self.rss = sum(rss_peak_mib(p) for p in pids)
        return sum(max(0.0, cpu_of(p) - self.before.get(p, 0.0)) for p in pids)


def bulk(system, phase, statement, ranges, rows, done):
    cpu = Cpu(system)
    start, writers_end = run_writers(system.db, statement, ranges)
    seen = wait_for(done, f"{system.name} {phase}", DEADLINE, system)
    time.sleep(SETTLE)
    return {"rows": rows, "elapsed": seen - start, "writers": writers_end - start, "rows_s": rows / (seen - start),
            "cpu": cpu.seconds(), "rss": cpu.rss}


def paced(system):
    n_per = int(PACED_RATE * PACED_SECONDS / WRITERS)
    total = n_per * WRITERS
    commits, seen, errors = {}, {}, []
    conns = [connect(system.db) for _ in range(WRITERS)]
    cpu = Cpu(system)
    t0 = time.monotonic() + 0.2
    interval = WRITERS / PACED_RATE

    def writer(w, conn):
        try:
            with conn.cursor() as cur:
                for k in range(n_per):
                    due = t0 + (k + w / WRITERS) * interval
                    pause = due - time.monotonic()
                    if pause > 0:
                        time.sleep(pause)
                    i = PACED_BASE + k * WRITERS + w
                    cur.execute("INSERT INTO items (id, seq, title, description, category, status, price) "
                                "VALUES (%s, %s, %s, repeat('Az kullanılmış, bakımlı, faturalı. ', 8), 'paced', 'active', 1.5)",
                                (i, i, f"Satılık ikinci el bisiklet {i}"))
                    commits[i] = time.monotonic()
        except Exception as err:
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(w, c)) for w, c in enumerate(conns)]
    for t in threads:
        t.start()
    end = time.monotonic() + PACED_SECONDS + DEADLINE
    lowest = PACED_BASE
    while len(seen) < total and time.monotonic() < end and not errors:
        sent = time.monotonic()
        query = {"query": {"range": {"seq": {"gte": lowest}}}, "size": 10000, "_source": ["seq"]}
        status, answer = http("POST", f"{SEARCH}/{system.index}/_search", query, ok=None)
        back = time.monotonic()
        if status == 200:
            for hit in answer["hits"]["hits"]:
                seen.setdefault(int(hit["_source"]["seq"]), (sent + back) / 2)
            while lowest in seen:
                lowest += 1
        if not system.alive():
            errors.append(RuntimeError(f"{system.name} exited during the paced run"))
        time.sleep(max(0.0, POLL - (time.monotonic() - sent)))
    for t in threads:
        t.join()
    for c in conns:
        c.close()
    if errors:
        raise errors[0]
    if len(seen) < total:
        raise RuntimeError(f"{system.name} paced: {total - len(seen)} of {total} rows never searchable")
    time.sleep(SETTLE)
    lat = sorted((seen[i] - commits[i]) * 1000 for i in commits)
    q = statistics.quantiles(lat, n=100, method="inclusive")
    return {"rows": total, "cpu": cpu.seconds(), "rss": cpu.rss, "p50": q[49], "p99": q[98], "max": lat[-1],
            "elapsed": max(seen.values()) - t0}


def round_of(system):
    say(f"{system.name}: starting")
    try:
        system.start()
        conn = connect(system.db)
        with conn.cursor() as cur:
            cur.execute(INSERT, (0, 0))
        conn.close()
        wait_for(lambda: count(system.index) == 1, f"{system.name} warm-up row", 120, system)
        out = {}
        out["insert"] = bulk(system, "insert", INSERT, batches(1, INSERTS), INSERTS,
                             lambda: count(system.index) == 1 + INSERTS)
        say(f"{system.name}: insert {out['insert']['rows_s']:.0f} rows/s")
        out["update"] = bulk(system, "update", UPDATE, batches(1, UPDATES), UPDATES,
                             lambda: count(system.index, {"term": {"rev": 1}}) == UPDATES)
        say(f"{system.name}: update {out['update']['rows_s']:.0f} rows/s")
        out["delete"] = bulk(system, "delete", DELETE, batches(INSERTS - DELETES + 1, INSERTS), DELETES,
                             lambda: count(system.index) == 1 + INSERTS - DELETES)
        say(f"{system.name}: delete {out['delete']['rows_s']:.0f} rows/s")
        out["paced"] = paced(system)
        say(f"{system.name}: paced p50 {out['paced']['p50']:.0f} ms, p99 {out['paced']['p99']:.0f} ms")
        return out
    finally:
        system.stop()


# --- report -----------------------------------------------------------------------------------
def report(rounds):
    def pair(key, wl, fmt, r):
        a, b = r["benalsam"][wl][key], r["PGSync"][wl][key]
        return f"{fmt.format(a)} / {fmt.format(b)} | {a / b:.2f}"

    lines = ["| workload | round | rows/s benalsam / PGSync | ratio | writers s | ratio | CPU-s | ratio "
             "| elapsed s | peak RSS MiB | ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for wl, label in (("insert", f"{INSERTS:,} inserts"), ("update", f"{UPDATES:,} updates"),
                      ("delete", f"{DELETES:,} deletes")):
        for n, r in enumerate(rounds, 1):
            lines.append(f"| {label} | {n} | {pair('rows_s', wl, '{:,.0f}', r)} | {pair('writers', wl, '{:.2f}', r)} "
                         f"| {pair('cpu', wl, '{:.1f}', r)} | {pair('elapsed', wl, '{:.1f}', r).split(' |')[0]} "
                         f"| {pair('rss', wl, '{:.0f}', r)} |")
    lines += ["", f"| {PACED_RATE:.0f} rows/s for {PACED_SECONDS:.0f} s | round | CPU-s benalsam / PGSync | ratio "
              "| p50 ms | ratio | p99 ms | ratio | max ms |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n, r in enumerate(rounds, 1):
        lines.append(f"| paced inserts | {n} | {pair('cpu', 'paced', '{:.1f}', r)} | {pair('p50', 'paced', '{:,.0f}', r)} "
                     f"| {pair('p99', 'paced', '{:,.0f}', r)} | {pair('max', 'paced', '{:,.0f}', r).split(' |')[0]} |")
    return "\n".join(lines)


def main():
    # TERM (from scripts/bench-pgsync's trap) unwinds like an error: every started system stops.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    systems = {"benalsam": Benalsam(), "pgsync": PGSync()}
    order = [systems[s] for s in SYSTEMS]
    try:
        rounds = run_rounds(order)
    finally:
        # The bench's databases hold hundreds of MB of rows and jobs: not kept between runs.
        admin = connect("postgres")
        with admin.cursor() as cur:
            for system in order:
                cur.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = %s",
                            (system.db,))
                cur.execute(f"DROP DATABASE IF EXISTS {system.db} WITH (FORCE)")
            cur.execute("CHECKPOINT")
        admin.close()
    if len(SYSTEMS) == 2:
        print(report(rounds))


def run_rounds(order):
    rounds = []
    for n in range(ROUNDS):
        # A B, B A, A B ...: neither system always runs on the warmer machine.
        results = {}
        for system in (order if n % 2 == 0 else order[::-1]):
            results[system.name] = round_of(system)
        rounds.append(results)
        path = os.path.join(DIR, f"results-{time.strftime('%Y%m%dT%H%M%S')}.json")
        with open(path, "w") as f:
            json.dump({"settings": {k: v for k, v in E.items() if k.startswith("BENCH_")}, "rounds": rounds}, f, indent=1)
        say(f"round {n + 1} written to {path}")
    return rounds


if __name__ == "__main__":
    main()
