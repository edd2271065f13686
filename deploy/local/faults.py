"""The fault suite's driver (run by deploy/local/faults.sh; README, "Faults we test").

Starts its own world under WORK: a local S3 server (moto), a tansu broker storing in it (so a
killed broker restarts with its data), Redis with its append-only file fsynced on every write, and
three switchyard instances in one consumer group (deploy/local/faults.yaml). Then, per fault, a
phase of steady load over 1,000 resources of its own (`<phase>-svc-NNNN`: a completed deployment,
an SLA breach, a cost alert each, so rollbacks wait for approval, pages merge, scale-downs conflict
with rollbacks) with an approver deciding approvals as they come in (through the decisions topic),
and the fault injected a third of the way into the load. A phase ends when every one of its events
has a result and every approval it asked for is decided. The independent checker
(deploy/local/fault_check.py) then reads every topic and judges each phase.

    python faults.py --bin target/debug/switchyard --work .stack/faults [--short | --phases a,b]

Faults: instance (kill -9 of one of three instances, restarted 5 s later), redis-aof (kill -9 of
Redis, restarted from its AOF), broker-kill (kill -9 of the broker, restarted on its S3 storage),
broker-stop (SIGSTOP of the broker for 10 s), redis-wipe (Redis restarted without data: every
instance must notice, say so on /readyz and stop writing until `switchyard recover`).
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import zlib

from confluent_kafka import Consumer, Producer, TopicPartition

from fault_check import resolved_proposal
from procs import answers, die_with_parent, free_port

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
ALL_PHASES = ["instance", "redis-aof", "broker-kill", "broker-stop", "redis-wipe"]
SHORT_PHASES = ["instance", "broker-stop", "redis-wipe"]
# What the lost-state check watches for writes: every output of the stages.
WATCHED = ["switchyard.results", "switchyard.approvals", "switchyard.tasks", "switchyard.proposals",
           "switchyard.actions", "switchyard.audit"]
INPUTS = {"deployment": "events.deployments", "sla": "events.sla-breaches", "cost": "events.cost-thresholds"}


def log(msg):
    print(f"faults: [{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class World:
    """The processes under test and what they need, all on free loopback ports."""

    def __init__(self, args):
        self.args = args
        self.work = os.path.abspath(args.work)
        shutil.rmtree(self.work, ignore_errors=True)
        os.makedirs(self.work)
        self.venv_bin = os.path.dirname(sys.executable)
        self.tansu = args.tansu
        self.procs = {}
        self.s3_port, self.kafka_port, self.redis_port = free_port(), free_port(), free_port()
        self.brokers = f"127.0.0.1:{self.kafka_port}"
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/"
        self.http_ports = [free_port() for _ in range(3)]
        self.config = self.write_config()

    def write_config(self):
        """deploy/local/faults.yaml, with absolute paths and this run's consumer fetch wait (a broker
        on the S3 store answers every fetch from S3: a longer wait spares the S3 server)."""
        with open(os.path.join(HERE, "faults.yaml")) as f:
            text = f.read()
        text = text.replace("dir: ../../topics", f"dir: {ROOT}/topics")
        text = text.replace("schemas_dir: ../../schemas", f"schemas_dir: {ROOT}/schemas")
        text = text.replace('fetch.wait.max.ms: "20"', f'fetch.wait.max.ms: "{self.args.fetch_wait_ms}"')
        path = os.path.join(self.work, "switchyard.yaml")
        with open(path, "w") as f:
            f.write(text)
        return path

    # ------------------------------------------------------------ processes --
    def spawn(self, name, cmd, env=None):
        logf = open(os.path.join(self.work, f"{name}.log"), "ab")
        p = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                             preexec_fn=die_with_parent)
        self.procs[name] = p
        return p

    def wait_port(self, port, what, timeout=30):
        end = time.time() + timeout
        while time.time() < end:
            if answers(port):
                return
            time.sleep(0.1)
        raise SystemExit(f"faults: {what} did not accept connections on port {port} within {timeout}s")

    def start_s3(self):
        if self.args.storage != "s3":
            return
        self.spawn("moto", [os.path.join(self.venv_bin, "moto_server"), "-H", "127.0.0.1", "-p", str(self.s3_port)])
        self.wait_port(self.s3_port, "moto_server")
        import boto3  # installed with moto (stack.sh install-s3), only for this

        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{self.s3_port}", aws_access_key_id="faults",
                          aws_secret_access_key="faults", region_name="eu-west-2")
        s3.create_bucket(Bucket="tansu", CreateBucketConfiguration={"LocationConstraint": "eu-west-2"})

    def start_broker(self):
        env = {k: v for k, v in os.environ.items()
               if k not in ("RUST_LOG", "LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE", "CLUSTER_ID")}
        env.update(AWS_ENDPOINT=f"http://127.0.0.1:{self.s3_port}", AWS_ACCESS_KEY_ID="faults",
                   AWS_SECRET_ACCESS_KEY="faults", AWS_DEFAULT_REGION="eu-west-2", AWS_ALLOW_HTTP="true")
        addr = f"tcp://127.0.0.1:{self.kafka_port}"
        storage = "s3://tansu/" if self.args.storage == "s3" else "memory://tansu/"
        self.spawn("tansu", [self.tansu, "broker", "--listener-url", addr, "--advertised-listener-url", addr,
                             "--storage-engine", storage], env=env)
        self.wait_port(self.kafka_port, "tansu")

    def start_redis(self):
        d = os.path.join(self.work, "redis")
        os.makedirs(d, exist_ok=True)
        # Durable as switchyard requires (README, "Redis must be durable"): every write fsynced.
        self.spawn("redis", ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "yes", "--appendfsync", "always", "--dir", d])
        self.wait_port(self.redis_port, "redis-server")

    def sy_env(self, http_port=None):
        env = dict(os.environ, SWITCHYARD_KAFKA_BROKERS=self.brokers, SWITCHYARD_REDIS_URL=self.redis_url,
                   RUST_LOG=os.environ.get("SWITCHYARD_FAULTS_LOG", "info"))
        if http_port:
            env["SWITCHYARD_HTTP_LISTEN"] = f"127.0.0.1:{http_port}"
        return env

    def switchyard(self, *args, check=True, timeout=120):
        r = subprocess.run([self.args.bin, "--config", self.config, *args], env=self.sy_env(), capture_output=True,
                           text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise SystemExit(f"faults: switchyard {' '.join(args)} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
        return r

    def start_instance(self, i):
        self.spawn(f"switchyard-{i}", [self.args.bin, "--config", self.config, "run"], env=self.sy_env(self.http_ports[i]))

    def ready(self, i):
        """(ready, body) of instance i's /readyz."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_ports[i]}/readyz", timeout=2) as r:
                return r.status == 200, r.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return False, e.read().decode(errors="replace")
        except OSError as e:
            return False, str(e)

    def wait_ready(self, which=(0, 1, 2), timeout=90):
        end = time.time() + timeout
        while time.time() < end:
            if all(self.ready(i)[0] for i in which):
                return
            time.sleep(0.5)
        raise SystemExit("faults: instances not ready: " + "; ".join(f"{i}: {self.ready(i)[1][:200]}" for i in which))

    def kill(self, name, sig=signal.SIGKILL):
        p = self.procs[name]
        p.send_signal(sig)
        if sig == signal.SIGKILL:
            p.wait()

    def stop_instances(self):
        """Gracefully (SIGTERM: drain and commit); returns each one's exit code."""
        codes = {}
        for name, p in list(self.procs.items()):
            if name.startswith("switchyard-") and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for name, p in list(self.procs.items()):
            if name.startswith("switchyard-"):
                try:
                    codes[name] = p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    codes[name] = "killed after 30 s"
        return codes

    def stop_services(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


def events_of(phase, resources):
    """The phase's input events, in the order produced: deployments, then breaches, then costs."""
    out = []
    for kind in ("deployment", "sla", "cost"):
        for i in range(resources):
            svc = f"{phase}-svc-{i:04d}"
            eid = f"{phase}-{kind}-{i:04d}"
            if kind == "deployment":
                ev = {"type": "deployment.completed", "source": "faults/ci",
                      "data": {"service": svc, "version": "v2", "previous_version": "v1",
                               "environment": "production", "actor": "faults", "owner": "team-faults"}}
            elif kind == "sla":
                ev = {"type": "sla.breached", "source": "faults/monitoring",
                      "data": {"service": svc, "slo": "availability", "objective": 99.9, "observed": 97.0,
                               "window": "5m", "owner": "team-faults"}}
            else:
                ev = {"type": "cost.threshold_exceeded", "source": "faults/finops",
                      "data": {"service": svc, "budget": 100.0, "spend": 150.0, "currency": "USD",
                               "period": "2026-11", "threshold_pct": 150.0}}
            ev.update(specversion="1.0", id=eid, subject=svc)
            out.append((INPUTS[kind], svc, ev))
    return out


class Watcher(threading.Thread):
    """Follows results, proposals and approvals from the start: which events have results, which
    proposals conflict resolution decided (its audit record names the proposal), which approvals
    were asked for and decided; decides approvals (approve two in three, reject the third) a moment
    after they are asked for, through the decisions topic, as a person or another system would."""

    def __init__(self, brokers, decide_after=1.0):
        super().__init__(daemon=True)
        self.brokers = brokers
        self.decide_after = decide_after
        self.lock = threading.Lock()
        self.results = set()  # event ids with a result
        self.requested = {}  # approval id -> (resource, seen at)
        self.decided = set()
        self.sent = set()
        self.proposals = {}  # proposal id -> resource
        self.resolved = set()  # proposal ids with a decision of the resolve stage
        self.stamps = []  # broker timestamps of every record seen
        self.stop = False

    def run(self):
        c = Consumer({"bootstrap.servers": self.brokers, "group.id": f"faults-watcher-{time.time()}",
                      "enable.auto.commit": False, "fetch.wait.max.ms": 20, "session.timeout.ms": 6000})
        parts = []
        for t in WATCHED:
            md = c.list_topics(t, timeout=10).topics[t]
            parts += [TopicPartition(t, p, -2) for p in md.partitions]  # -2: the beginning
        c.assign(parts)
        p = Producer({"bootstrap.servers": self.brokers, "linger.ms": 5})
        last_due = 0.0
        while not self.stop:
            msgs = c.consume(500, 0.2)
            now = time.time()
            with self.lock:
                for m in msgs:
                    if m.error():
                        continue
                    # When the broker got it (the producer's time): what the lost-state check counts.
                    self.stamps.append(m.timestamp()[1] / 1000.0)
                    if m.topic() not in ("switchyard.results", "switchyard.approvals", "switchyard.proposals",
                                         "switchyard.audit"):
                        continue
                    try:
                        d = json.loads(m.value()).get("data") or {}
                    except (TypeError, ValueError, AttributeError):
                        continue
                    if not isinstance(d, dict):
                        continue
                    if m.topic() == "switchyard.proposals":
                        if d.get("proposal_id"):
                            self.proposals.setdefault(d["proposal_id"], d.get("resource", ""))
                    elif m.topic() == "switchyard.audit":
                        pid = resolved_proposal(d)
                        if pid:
                            self.resolved.add(pid)
                    elif m.topic() == "switchyard.results":
                        if d.get("event_id"):
                            self.results.add(d["event_id"])
                    elif d.get("status") in ("pending", "escalated"):
                        self.requested.setdefault(d["approval_id"], (d.get("resource", ""), now))
                    elif d.get("approval_id"):
                        self.decided.add(d["approval_id"])
                if now - last_due < 0.2:
                    continue
                last_due = now
                due = [a for a, (_, seen) in self.requested.items()
                       if a not in self.sent and a not in self.decided and now - seen >= self.decide_after]
            for a in due:
                decision = "reject" if zlib.crc32(a.encode()) % 3 == 0 else "approve"
                body = {"approval_id": a, "decision": decision, "by": "fault-approver", "why": "fault suite"}
                p.produce("switchyard.approval-decisions", key=a, value=json.dumps(body))
                self.sent.add(a)
            p.poll(0)
        p.flush(10)
        c.close()

    def written_between(self, start, end):
        """Records the broker got between `start` and `end` (seconds since the epoch)."""
        with self.lock:
            return sum(1 for t in self.stamps if start <= t < end)

    def progress(self, phase, event_ids):
        """Events with results, approvals asked for, approvals open, proposals not yet decided."""
        with self.lock:
            have = sum(1 for e in event_ids if e in self.results)
            asked = [a for a, (res, _) in self.requested.items() if res.startswith(phase + "-")]
            open_ = sum(1 for a in asked if a not in self.decided)
            undecided = sum(1 for p, res in self.proposals.items()
                            if res.startswith(phase + "-") and p not in self.resolved)
            return have, len(asked), open_, undecided


def produce(brokers, events, rate, started, failed):
    """Produces the events at `rate` per second; says when a third is out; appends to `failed` what
    went wrong."""
    p = Producer({"bootstrap.servers": brokers, "linger.ms": 5, "enable.idempotence": True,
                  "message.timeout.ms": 300000})
    t0 = time.time()
    for n, (topic, key, ev) in enumerate(events):
        p.produce(topic, key=key, value=json.dumps(ev))
        p.poll(0)
        ahead = t0 + (n + 1) / rate - time.time()
        if ahead > 0:
            time.sleep(ahead)
        if n + 1 == len(events) // 3:
            started.set()
    left = p.flush(300)
    if left:
        failed.append(f"{left} events not acknowledged by the broker")
    started.set()


def inject(world, phase, notes):
    """The fault of `phase`; returns when the system has been given back what it needs."""
    if phase == "instance":
        world.kill("switchyard-1")
        notes.append("instance 1 killed (SIGKILL)")
        time.sleep(5)
        world.start_instance(1)
        notes.append("instance 1 restarted after 5 s")
    elif phase == "redis-aof":
        world.kill("redis")
        notes.append("Redis killed (SIGKILL)")
        time.sleep(2)
        world.start_redis()
        notes.append("Redis restarted from its AOF after 2 s")
    elif phase == "broker-kill":
        world.kill("tansu")
        notes.append("broker killed (SIGKILL)")
        time.sleep(2)
        world.start_broker()
        notes.append("broker restarted on its S3 storage after 2 s")
    elif phase == "broker-stop":
        world.kill("tansu", signal.SIGSTOP)
        notes.append("broker stopped (SIGSTOP) for 10 s")
        time.sleep(10)
        world.kill("tansu", signal.SIGCONT)
    elif phase == "redis-wipe":
        world.kill("redis")
        shutil.rmtree(os.path.join(world.work, "redis"))
        world.start_redis()
        notes.append("Redis killed and restarted without its data")
        # Every instance must notice within seconds and say so on /readyz.
        end = time.time() + 15
        seen = set()
        while time.time() < end and len(seen) < 3:
            for i in range(3):
                ok, body = world.ready(i)
                if not ok and "redis lost its state" in body:
                    seen.add(i)
            time.sleep(0.2)
        notes.append(f"instances reporting 'redis lost its state' on /readyz: {len(seen)} of 3")
        if len(seen) < 3:
            raise SystemExit(f"faults: redis-wipe: only instances {sorted(seen)} noticed the lost state")
        # ... and write nothing while it lasts: no output record stamped by the broker in the 5 s
        # after the second that lets writes in flight land (the watcher's reading may lag; the
        # broker's timestamps do not).
        noticed = time.time()
        time.sleep(8)
        written = world.watcher.written_between(noticed + 1, noticed + 6)
        notes.append(f"output records written in the 5 s after noticing: {written}")
        if written:
            raise SystemExit(f"faults: redis-wipe: {written} records written while Redis had lost its state")
        t = time.time()
        r = world.switchyard("recover", "--idle-timeout-ms", "1000")
        notes.append(f"`switchyard recover` took {time.time() - t:.1f} s")
        for line in (r.stdout + r.stderr).strip().splitlines()[-8:]:
            notes.append(f"recover: {line.strip()}")
        world.wait_ready(timeout=30)
        notes.append("every instance ready again")
    else:
        raise SystemExit(f"faults: unknown fault {phase}")


def run_phase(world, phase, resources, rate, timeout):
    events = events_of(phase, resources)
    ids = [ev["id"] for _, _, ev in events]
    log(f"phase {phase}: {len(events)} events over {resources} resources at {rate}/s")
    started = threading.Event()
    failed = []
    t0 = time.time()
    producer = threading.Thread(target=produce, args=(world.brokers, events, rate, started, failed), daemon=True)
    producer.start()
    started.wait()
    notes = []
    log(f"phase {phase}: injecting the fault")
    inject(world, phase, notes)
    for n in notes:
        log(f"  {n}")
    producer.join()
    if failed:
        raise SystemExit(f"faults: phase {phase}: {'; '.join(failed)}")
    # Done when every event has its result, every proposal its conflict-resolution decision and
    # every approval asked for its decision (results alone can be ahead of resolve by a rebalance).
    end = time.time() + timeout
    while True:
        have, asked, open_, undecided = world.watcher.progress(phase, ids)
        if have == len(ids) and open_ == 0 and undecided == 0:
            break
        if time.time() > end:
            notes.append(f"NOT DONE after {timeout}s: {have}/{len(ids)} events with results, "
                         f"{undecided} proposals undecided, {open_} approvals open")
            log(f"phase {phase}: {notes[-1]}")
            break
        time.sleep(1)
    took = time.time() - t0
    log(f"phase {phase}: done in {took:.0f} s ({have}/{len(ids)} events with results, {asked} approvals)")
    return {"phase": phase, "events": len(ids), "seconds": round(took, 1), "notes": notes}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--tansu", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--short", action="store_true", help=f"only {', '.join(SHORT_PHASES)}")
    ap.add_argument("--phases", help="comma-separated, of: " + ", ".join(ALL_PHASES))
    ap.add_argument("--storage", choices=["memory", "s3"], default="memory",
                    help="the broker's storage: s3 (a local moto server) survives a broker kill, memory does not")
    ap.add_argument("--resources", type=int, default=1000)
    ap.add_argument("--fetch-wait-ms", type=int, default=20, help="the instances' fetch.wait.max.ms")
    ap.add_argument("--rate", type=float, default=150.0, help="input events per second")
    ap.add_argument("--keep", action="store_true", help="on failure, keep the services up (until stopped)")
    ap.add_argument("--phase-timeout", type=float, default=240.0)
    args = ap.parse_args()
    phases = args.phases.split(",") if args.phases else SHORT_PHASES if args.short else ALL_PHASES
    if "broker-kill" in phases and args.storage != "s3":
        raise SystemExit("faults: broker-kill needs --storage s3 (the memory store loses everything)")
    world = World(args)
    report = {"phases": [], "resources": args.resources, "rate": args.rate}
    status = 1
    try:
        world.start_s3()
        world.start_broker()
        world.start_redis()
        log(f"broker {world.brokers} ({args.storage} storage), Redis {world.redis_url} (AOF, fsync always)")
        out = world.switchyard("topics", "apply")
        log(f"topics applied ({len(out.stdout.splitlines())} lines)")
        for i in range(3):
            world.start_instance(i)
        world.wait_ready()
        log("three instances ready")
        world.watcher = Watcher(world.brokers)
        world.watcher.start()
        for phase in phases:
            report["phases"].append(run_phase(world, phase, args.resources, args.rate, args.phase_timeout))
        world.watcher.stop = True
        world.watcher.join(timeout=15)
        report["exit_codes"] = world.stop_instances()
        log(f"instances stopped: {report['exit_codes']}")
        with open(os.path.join(world.work, "driver.json"), "w") as f:
            json.dump(report, f, indent=2)
        # The independent checker reads every topic of the broker that is still up.
        status = subprocess.run([sys.executable, os.path.join(HERE, "fault_check.py"), "--brokers", world.brokers,
                                 "--bin", args.bin, "--config", world.config, "--driver", os.path.join(world.work, "driver.json"),
                                 "--out", os.path.join(world.work, "check.json"),
                                 # A broker on S3 (moto) answers fetches slowly: wait longer.
                                 "--idle", "30" if args.storage == "s3" else "5"], env=world.sy_env()).returncode
        if status != 0 and args.keep:
            log(f"--keep: broker {world.brokers}, Redis {world.redis_url}, config {world.config}; "
                "the services stay up until this process is stopped")
            while True:
                time.sleep(3600)
    finally:
        world.stop_instances()
        world.stop_services()
    sys.exit(status)

if __name__ == "__main__":
    main()
