"""A local Redis Cluster of three masters, for switchyard's cluster tests: redis-server nodes on PORT
and two more free ports (`--cluster-enabled yes`, data under DIR), joined with
`redis-cli --cluster create`. The nodes die with this process (PR_SET_PDEATHSIG).

    python redis_cluster.py PORT DIR

Ready once `redis-cli -p PORT cluster info` says cluster_state:ok.
"""

import os
import subprocess
import sys
import time

from procs import answers, die_with_parent, free_port

port, data = int(sys.argv[1]), sys.argv[2]
os.makedirs(data, exist_ok=True)


def start(p):
    return subprocess.Popen(
        ["redis-server", "--port", str(p), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
         "--cluster-config-file", f"{data}/nodes-{p}.conf", "--cluster-node-timeout", "5000",
         "--save", "", "--appendonly", "no", "--dir", data, "--daemonize", "no"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        preexec_fn=die_with_parent,
    )


log = open(f"{data}/cluster.log", "a", encoding="utf-8")


def bring_up(seed):
    """Three nodes (the seed on `seed`) joined into a cluster, or None (all stopped again)."""
    nodes = {seed: start(seed)}
    while len(nodes) < 3:
        p = free_port()
        if p not in nodes:
            nodes[p] = start(p)
    for p, n in nodes.items():
        for _ in range(50):
            if n.poll() is not None or answers(p):
                break
            time.sleep(0.1)
    if all(n.poll() is None for n in nodes.values()):
        r = subprocess.run(
            ["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in nodes],
             "--cluster-replicas", "0", "--cluster-yes"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        )
        if r.returncode == 0:
            return nodes
    log.write(f"attempt failed; node exits: {[n.poll() for n in nodes.values()]}\n")
    log.flush()
    for n in nodes.values():
        n.terminate()
        n.wait()
    for p in nodes:
        try:
            os.remove(f"{data}/nodes-{p}.conf")
        except OSError:
            pass
    return None


nodes = {}
try:
    # A node that could not take its port (another process got it first) fails the attempt; the
    # next one draws new ports.
    for attempt in range(4):
        nodes = bring_up(port) or {}
        if nodes:
            break
        time.sleep(0.5)
    else:
        sys.exit("could not bring the cluster up (see cluster.log)")
    while all(n.poll() is None for n in nodes.values()):
        time.sleep(0.5)
finally:
    for n in nodes.values():
        n.terminate()
