#!/usr/bin/env python3
"""Offline checks of the deployment files; run by deploy/validate-manifests.sh inside its venv.

  validate_manifests.py k8s-cross     Kubernetes manifests: cross-references and the settings
                                      switchyard relies on (kubernetes-validate does the schemas)
  validate_manifests.py keda          KEDA ScaledObject: structure (JSON schema) and its target
  validate_manifests.py compose       compose file: structural check (no Docker needed)
  validate_manifests.py dockerfile    Dockerfile and its .dockerignore: structure
  validate_manifests.py config-drift  the image's config equals deploy/switchyard.yaml but for the
                                      settings that differ on purpose
  validate_manifests.py partitions    replica counts (Deployment, KEDA min/max, PDB) against the
                                      partitions of each enabled stage's input topics

Paths are relative to the repository root (the working directory). Each subcommand prints one line
per check ("ok   ..." or "FAIL ...") and exits 1 if any check failed.
"""

from __future__ import annotations

import fnmatch
import os
import re
import sys
from pathlib import Path

import jsonschema
import yaml

ROOT = Path.cwd()
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"
IMAGE_CONFIG = DEPLOY / "docker" / "switchyard.yaml"

NAMESPACE = "switchyard"
HTTP_PORT = 9464


class Checks:
    def __init__(self, title: str):
        self.title = title
        self.failed = 0
        self.passed = 0

    def check(self, ok: bool, what: str, detail: str = "") -> bool:
        if ok:
            self.passed += 1
            print(f"  ok   {what}")
        else:
            self.failed += 1
            print(f"  FAIL {what}" + (f": {detail}" if detail else ""))
        return ok

    def done(self) -> int:
        print(f"  -- {self.title}: {self.passed} passed, {self.failed} failed")
        return 1 if self.failed else 0


def load_all(path: Path) -> list[dict]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def dig(obj, *keys, default=None):
    for k in keys:
        if isinstance(obj, dict) and k in obj:
            obj = obj[k]
        elif isinstance(obj, list) and isinstance(k, int) and -len(obj) <= k < len(obj):
            obj = obj[k]
        else:
            return default
    return obj


# ----------------------------------------------------------------------------------------------------
# Kubernetes cross-checks


def k8s_cross() -> int:
    c = Checks("Kubernetes cross-references")
    docs: dict[tuple[str, str], dict] = {}
    files: dict[tuple[str, str], str] = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for d in load_all(path):
            key = (d.get("kind"), dig(d, "metadata", "name"))
            docs[key] = d
            files[key] = path.name

    # kustomization lists exactly the manifests in the folder
    kust = load_all(K8S / "kustomization.yaml")[0]
    listed = set(kust.get("resources", []))
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    c.check(listed == present, "kustomization.yaml lists every manifest in deploy/k8s",
            f"listed only: {sorted(listed - present)}, missing: {sorted(present - listed)}")
    c.check(kust.get("namespace") == NAMESPACE, f"kustomization namespace is {NAMESPACE}")

    for (kind, name), d in sorted(docs.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))):
        if kind == "Namespace":
            c.check(name == NAMESPACE, f"Namespace is named {NAMESPACE}")
        else:
            c.check(dig(d, "metadata", "namespace") == NAMESPACE,
                    f"{kind}/{name} ({files[(kind, name)]}) is in namespace {NAMESPACE}")

    dep = docs.get(("Deployment", "switchyard"))
    if not c.check(dep is not None, "Deployment switchyard exists"):
        return c.done()
    pod = dig(dep, "spec", "template")
    pod_labels = dig(pod, "metadata", "labels", default={})
    spec = pod["spec"]
    ctr = spec["containers"][0]
    sel = dig(dep, "spec", "selector", "matchLabels", default={})
    c.check(sel and all(pod_labels.get(k) == v for k, v in sel.items()),
            "Deployment selector matches its pod labels")
    c.check(dig(dep, "spec", "replicas") == 3, "Deployment replicas: 3")
    c.check(ctr.get("args") == ["run"], 'container args ["run"]')
    c.check(spec.get("terminationGracePeriodSeconds") == 30, "terminationGracePeriodSeconds: 30")
    ann = dig(pod, "metadata", "annotations", default={})
    c.check(ann.get("prometheus.io/scrape") == "true" and ann.get("prometheus.io/port") == str(HTTP_PORT),
            "prometheus.io scrape/port annotations on the pod template")
    ports = {p.get("name"): p.get("containerPort") for p in ctr.get("ports", [])}
    c.check(ports.get("http") == HTTP_PORT, f"container port {HTTP_PORT} named http")
    c.check(dig(ctr, "livenessProbe", "httpGet", "path") == "/healthz"
            and dig(ctr, "livenessProbe", "httpGet", "port") in ("http", HTTP_PORT),
            "livenessProbe httpGet /healthz")
    c.check(dig(ctr, "readinessProbe", "httpGet", "path") == "/readyz"
            and dig(ctr, "readinessProbe", "httpGet", "port") in ("http", HTTP_PORT),
            "readinessProbe httpGet /readyz")
    res = ctr.get("resources", {})
    c.check(all(dig(res, a, b) for a in ("requests", "limits") for b in ("cpu", "memory")),
            "resources: cpu and memory requests and limits")

    def sc(key):
        v = dig(ctr, "securityContext", key)
        return dig(spec, "securityContext", key) if v is None else v

    c.check(sc("runAsNonRoot") is True and sc("runAsUser") == 10001,
            "runs as non-root uid 10001 (the image's user)")
    c.check(dig(ctr, "securityContext", "readOnlyRootFilesystem") is True,
            "readOnlyRootFilesystem: true")
    c.check(dig(ctr, "securityContext", "allowPrivilegeEscalation") is False,
            "allowPrivilegeEscalation: false")

    env = {e["name"]: e for e in ctr.get("env", [])}
    for name in ("SWITCHYARD_KAFKA_BROKERS", "SWITCHYARD_REDIS_URL"):
        c.check(bool(dig(env, name, "value")), f"env {name} has a value")
    ref = dig(env, "SWITCHYARD_APPROVAL_TOKEN", "valueFrom", "secretKeyRef", default={})
    secret = docs.get(("Secret", ref.get("name")))
    c.check(secret is not None and ref.get("key") in (secret.get("stringData") or {}) | (secret.get("data") or {}),
            "SWITCHYARD_APPROVAL_TOKEN comes from a key of secret.yaml",
            f"secretKeyRef {ref}")
    if secret is not None:
        c.check(secret.get("type") == "Opaque" and "stringData" in secret, "Secret is Opaque with stringData")

    # every configMap volume names a ConfigMap of ours, whose config equals the image's
    def check_config_volumes(owner: str, podspec: dict):
        for v in podspec.get("volumes", []):
            if "configMap" in v:
                cm = docs.get(("ConfigMap", v["configMap"]["name"]))
                c.check(cm is not None, f"{owner}: volume {v['name']} refers to an existing ConfigMap")
    check_config_volumes("Deployment", spec)
    cm = docs.get(("ConfigMap", "switchyard-config"))
    if c.check(cm is not None, "ConfigMap switchyard-config exists"):
        text = dig(cm, "data", "switchyard.yaml", default="")
        c.check(text == IMAGE_CONFIG.read_text(),
                "configmap.yaml's switchyard.yaml equals deploy/docker/switchyard.yaml")
        mounts = {m["mountPath"]: m for m in ctr.get("volumeMounts", [])}
        c.check("/etc/switchyard" in mounts, "config mounted at /etc/switchyard (SWITCHYARD_CONFIG's folder)")

    svc = docs.get(("Service", "switchyard"))
    if c.check(svc is not None, "Service switchyard exists"):
        ssel = dig(svc, "spec", "selector", default={})
        c.check(ssel and all(pod_labels.get(k) == v for k, v in ssel.items()),
                "Service selector matches the Deployment's pods")
        sp = dig(svc, "spec", "ports", 0, default={})
        c.check(dig(svc, "spec", "type", default="ClusterIP") == "ClusterIP" and sp.get("port") == HTTP_PORT
                and sp.get("targetPort") in ("http", HTTP_PORT), f"Service is ClusterIP on port {HTTP_PORT}")

    pdb = docs.get(("PodDisruptionBudget", "switchyard"))
    if c.check(pdb is not None, "PodDisruptionBudget switchyard exists"):
        psel = dig(pdb, "spec", "selector", "matchLabels", default={})
        c.check(psel and all(pod_labels.get(k) == v for k, v in psel.items()),
                "PodDisruptionBudget selector matches the Deployment's pods")
        c.check(dig(pdb, "spec", "maxUnavailable") == 1, "PodDisruptionBudget maxUnavailable: 1")

    job = docs.get(("Job", "switchyard-topics"))
    if c.check(job is not None, "Job switchyard-topics exists"):
        jspec = dig(job, "spec", "template", "spec")
        jc = jspec["containers"][0]
        c.check(jc.get("args") == ["topics", "apply"], 'Job runs `switchyard topics apply`')
        c.check(jc.get("image") == ctr.get("image"), "Job uses the Deployment's image")
        c.check(jspec.get("restartPolicy") in ("OnFailure", "Never"), "Job restartPolicy OnFailure/Never")
        check_config_volumes("Job", jspec)
    return c.done()


# ----------------------------------------------------------------------------------------------------
# KEDA ScaledObject

KEDA_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {
            "type": "object",
            "required": ["name", "namespace"],
            "properties": {"name": {"type": "string"}, "namespace": {"const": NAMESPACE}},
        },
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        "apiVersion": {"const": "apps/v1"},
                        "kind": {"const": "Deployment"},
                        "name": {"type": "string"},
                        "envSourceContainerName": {"type": "string"},
                    },
                },
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                "fallback": {"type": "object"},
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {"name": {"type": "string"}, "behavior": {"type": "object"}},
                        },
                        "scalingModifiers": {"type": "object"},
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "properties": {
                            "type": {"type": "string"},
                            "name": {"type": "string"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            "authenticationRef": {"type": "object", "required": ["name"]},
                            # KEDA trigger metadata is a map of strings
                            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                        },
                    },
                },
            },
        },
    },
}


def keda() -> int:
    c = Checks("KEDA ScaledObject")
    path = K8S / "keda-scaledobject.yaml"
    docs = load_all(path)
    if not c.check(len(docs) == 1, f"{path.relative_to(ROOT)} holds one document"):
        return c.done()
    so = docs[0]
    errors = sorted(jsonschema.Draft202012Validator(KEDA_SCHEMA).iter_errors(so), key=lambda e: list(e.path))
    c.check(not errors, "matches the ScaledObject structure (keda.sh/v1alpha1, string trigger metadata)",
            "; ".join(f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors))
    deps = [d for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"
            for d in load_all(p) if d.get("kind") == "Deployment"]
    names = {dig(d, "metadata", "name") for d in deps}
    c.check(dig(so, "spec", "scaleTargetRef", "name") in names,
            "spec.scaleTargetRef.name is the Deployment", f"{dig(so, 'spec', 'scaleTargetRef', 'name')} not in {names}")
    t = dig(so, "spec", "triggers", 0, default={})
    md = t.get("metadata", {})
    c.check(t.get("type") == "kafka", "triggers[0].type is kafka")
    for k in ("bootstrapServers", "consumerGroup", "topic", "lagThreshold"):
        c.check(bool(md.get(k)), f"triggers[0].metadata.{k} is set")
    c.check(md.get("consumerGroup") == "switchyard.agents", "consumerGroup is switchyard.agents (<group_prefix>.agents)")
    c.check(md.get("topic") == "switchyard.tasks", "topic is switchyard.tasks")
    c.check(str(md.get("lagThreshold")).isdigit() and int(md["lagThreshold"]) == 500, "lagThreshold 500")
    lo, hi = dig(so, "spec", "minReplicaCount"), dig(so, "spec", "maxReplicaCount")
    c.check((lo, hi) == (2, 12), "replicas 2..12", f"{lo}..{hi}")
    # the consumer group is the agents stage's, with the group prefix of the config
    cfg = yaml.safe_load(IMAGE_CONFIG.read_text())
    prefix = dig(cfg, "kafka", "group_prefix", default="switchyard")
    tasks = dig(cfg, "topics", "tasks", default="switchyard.tasks")
    c.check(md.get("consumerGroup") == f"{prefix}.agents" and md.get("topic") == tasks,
            "group and topic agree with the config (kafka.group_prefix, topics.tasks)")
    tdef = ROOT / "topics" / f"{tasks}.yaml"
    if tdef.exists():
        parts = yaml.safe_load(tdef.read_text()).get("partitions")
        c.check(isinstance(parts, int) and hi <= parts,
                f"maxReplicaCount {hi} <= partitions of {tasks} ({parts})")
    return c.done()


# ----------------------------------------------------------------------------------------------------
# compose

COMPOSE_TOP = {"name", "services", "networks", "volumes", "configs", "secrets", "include"}
SERVICE_KEYS = {
    "annotations", "attach", "blkio_config", "build", "cap_add", "cap_drop", "cgroup", "cgroup_parent",
    "command", "configs", "container_name", "cpu_count", "cpu_percent", "cpu_period", "cpu_quota",
    "cpu_rt_period", "cpu_rt_runtime", "cpu_shares", "cpus", "cpuset", "credential_spec", "depends_on",
    "deploy", "develop", "device_cgroup_rules", "devices", "dns", "dns_opt", "dns_search", "domainname",
    "entrypoint", "env_file", "environment", "expose", "extends", "external_links", "extra_hosts",
    "gpus", "group_add", "healthcheck", "hostname", "image", "init", "ipc", "isolation", "labels",
    "links", "logging", "mac_address", "mem_limit", "mem_reservation", "mem_swappiness",
    "memswap_limit", "network_mode", "networks", "oom_kill_disable", "oom_score_adj", "pid",
    "pids_limit", "platform", "ports", "post_start", "pre_stop", "privileged", "profiles",
    "pull_policy", "read_only", "restart", "runtime", "scale", "secrets", "security_opt", "shm_size",
    "stdin_open", "stop_grace_period", "stop_signal", "storage_opt", "sysctls", "tmpfs", "tty",
    "ulimits", "user", "userns_mode", "uts", "volumes", "volumes_from", "working_dir",
}
DURATION = re.compile(r"^(\d+(\.\d+)?(us|ms|s|m|h))+$")
PORT = re.compile(
    r"^((?P<ip>(\d{1,3}\.){3}\d{1,3}|\[[0-9a-fA-F:]+\]):)?"
    r"((?P<host>\d{1,5}(-\d{1,5})?):)?(?P<ctr>\d{1,5}(-\d{1,5})?)(/(tcp|udp|sctp))?$"
)
INTERP = re.compile(r"\$(\$|\{[A-Za-z_][A-Za-z0-9_]*((:?[-?+])[^}]*)?\}|[A-Za-z_][A-Za-z0-9_]*)")


def compose() -> int:
    c = Checks("compose (structural)")
    text = COMPOSE.read_text()
    base = COMPOSE.parent
    doc = yaml.safe_load(text)
    rel = COMPOSE.relative_to(ROOT)
    c.check(isinstance(doc, dict), f"{rel} is a YAML mapping")
    c.check("version" not in doc, "no top-level `version` key (Compose specification)")
    unknown = [k for k in doc if k not in COMPOSE_TOP and not k.startswith("x-")]
    c.check(not unknown, "top-level keys are Compose keys or x- extensions", f"unknown {unknown}")
    # every $ is an escape ($$) or a well-formed interpolation
    bad = [m for m in re.finditer(r"\$", text)
           if not INTERP.match(text, m.start()) and not (m.start() > 0 and text[m.start() - 1] == "$")]
    c.check(not bad, "variable interpolations are well formed",
            ", ".join(text[m.start():m.start() + 20] for m in bad))

    services: dict = doc.get("services") or {}
    c.check(bool(services), "services defined")
    volumes_top = doc.get("volumes") or {}
    networks_top = doc.get("networks") or {}
    built_images = {s.get("image") for s in services.values() if "build" in s and s.get("image")}

    for name, s in services.items():
        p = f"service {name}"
        unknown = [k for k in s if k not in SERVICE_KEYS and not k.startswith("x-")]
        c.check(not unknown, f"{p}: keys are Compose service keys", f"unknown {unknown}")
        c.check("image" in s or "build" in s, f"{p}: has image or build")
        if "build" in s:
            b = s["build"]
            ctx = base / (b if isinstance(b, str) else b.get("context", "."))
            dockerfile = ctx / ("Dockerfile" if isinstance(b, str) else b.get("dockerfile", "Dockerfile"))
            c.check(ctx.is_dir(), f"{p}: build context {ctx.resolve().relative_to(ROOT) if ctx.resolve().is_relative_to(ROOT) else ctx} exists")
            c.check(dockerfile.is_file(), f"{p}: dockerfile {dockerfile.resolve().relative_to(ROOT) if dockerfile.resolve().is_relative_to(ROOT) else dockerfile} exists")
        if s.get("pull_policy") == "never":
            c.check(s.get("image") in built_images, f"{p}: pull_policy never, image {s.get('image')} is built by a service")
        if "pull_policy" in s:
            c.check(s["pull_policy"] in ("always", "never", "missing", "if_not_present", "build", "daily", "weekly")
                    or str(s["pull_policy"]).startswith("every_"), f"{p}: pull_policy is valid")
        if "restart" in s:
            c.check(str(s["restart"]) in ("no", "always", "unless-stopped", "on-failure")
                    or str(s["restart"]).startswith("on-failure:"), f"{p}: restart policy is valid")
        # depends_on
        dep = s.get("depends_on") or {}
        targets = dep if isinstance(dep, list) else list(dep)
        for t in targets:
            c.check(t in services, f"{p}: depends_on {t} exists")
            if isinstance(dep, dict):
                cond = (dep[t] or {}).get("condition", "service_started")
                c.check(cond in ("service_started", "service_healthy", "service_completed_successfully"),
                        f"{p}: depends_on {t} condition {cond} is valid")
                if cond == "service_healthy" and t in services:
                    c.check(bool(dig(services[t], "healthcheck", "test")), f"{p}: {t} has a healthcheck (service_healthy)")
        # volumes
        for v in s.get("volumes") or []:
            if isinstance(v, dict):
                src, kind = v.get("source"), v.get("type", "volume")
            else:
                parts = str(v).split(":")
                src = parts[0] if len(parts) > 1 else None
                kind = "bind" if src and (src.startswith((".", "/", "~"))) else "volume"
                c.check(len(parts) in (1, 2, 3) and (len(parts) < 3 or set(parts[2].split(",")) <=
                        {"ro", "rw", "z", "Z", "cached", "delegated", "consistent", "nocopy"}),
                        f"{p}: volume {v} is well formed")
                if len(parts) > 1:
                    c.check(parts[1].startswith("/"), f"{p}: volume {v} target is absolute")
            if kind == "bind" and src:
                if src.startswith("/"):
                    continue  # a host path: not checked here
                path = (base / src).resolve()
                c.check(path.exists(), f"{p}: bind source {src} exists ({path.relative_to(ROOT) if path.is_relative_to(ROOT) else path})")
            elif src:
                c.check(src in volumes_top, f"{p}: named volume {src} is declared under volumes:")
        # ports / expose
        for port in s.get("ports") or []:
            if isinstance(port, dict):
                c.check("target" in port, f"{p}: port {port} has a target")
            else:
                c.check(bool(PORT.match(str(port))), f"{p}: port {port!r} is well formed")
        for e in s.get("expose") or []:
            c.check(bool(re.fullmatch(r"\d{1,5}(-\d{1,5})?(/(tcp|udp|sctp))?", str(e))), f"{p}: expose {e!r} is well formed")
        # environment
        env = s.get("environment")
        if isinstance(env, dict):
            c.check(all(isinstance(v, (str, int, float, bool)) or v is None for v in env.values()),
                    f"{p}: environment values are scalars")
        elif isinstance(env, list):
            c.check(all(isinstance(v, str) and re.match(r"^[^=]+(=.*)?$", v) for v in env), f"{p}: environment list is KEY=VALUE")
        # healthcheck
        hc = s.get("healthcheck")
        if hc:
            test = hc.get("test")
            c.check(isinstance(test, str) or (isinstance(test, list) and test and test[0] in ("CMD", "CMD-SHELL", "NONE")),
                    f"{p}: healthcheck test is a string or [CMD|CMD-SHELL|NONE, ...]")
            for k in ("interval", "timeout", "start_period", "start_interval"):
                if k in hc:
                    c.check(bool(DURATION.match(str(hc[k]))), f"{p}: healthcheck {k} {hc[k]} is a duration")
        if "stop_grace_period" in s:
            c.check(bool(DURATION.match(str(s["stop_grace_period"]))), f"{p}: stop_grace_period is a duration")
        for n in (s.get("networks") or []):
            c.check(n in networks_top or n == "default", f"{p}: network {n} is declared")

    # what this stack is meant to contain
    want = {"kafka", "redis", "topics", "switchyard-1", "switchyard-2", "prometheus", "grafana"}
    c.check(want <= set(services), f"services {sorted(want)} present", f"missing {sorted(want - set(services))}")
    host_ports = {name: [str(x) for x in (s.get("ports") or [])] for name, s in services.items()}
    c.check(any(p.endswith(":9464") for p in host_ports.get("switchyard-1", [])), "switchyard-1 publishes 9464")
    c.check(not host_ports.get("switchyard-2"), "switchyard-2 is not published on the host")
    # Prometheus' scrape targets are compose services (when the other helper's file is there)
    prom = DEPLOY / "prometheus" / "prometheus.yml"
    if prom.exists():
        pc = yaml.safe_load(prom.read_text()) or {}
        jobs = {j.get("job_name"): j for j in pc.get("scrape_configs") or []}
        targets = [t for sc in dig(jobs, "switchyard", "static_configs", default=[]) or [] for t in sc.get("targets", [])]
        c.check(bool(targets), "prometheus.yml has a `switchyard` job with static targets")
        for t in targets:
            host, _, port = t.partition(":")
            c.check(host in services and port == str(HTTP_PORT), f"prometheus target {t} is a compose service on {HTTP_PORT}")
        mounted = {str(v).split(":")[1] for v in dig(services, "prometheus", "volumes", default=[]) or []
                   if isinstance(v, str) and ":" in v}
        for rf in pc.get("rule_files") or []:
            # relative rule files are relative to the config file (/etc/prometheus/prometheus.yml)
            rf = rf if rf.startswith("/") else "/etc/prometheus/" + rf
            c.check(rf in mounted or any(fnmatch.fnmatch(m, rf) for m in mounted),
                    f"prometheus rule file {rf} is mounted into the container")
    # Grafana's provisioned data sources and dashboards point at what the compose file provides
    gmounts = {str(v).split(":")[1]: (base / str(v).split(":")[0]).resolve()
               for v in dig(services, "grafana", "volumes", default=[]) or [] if isinstance(v, str) and ":" in v}
    prov = gmounts.get("/etc/grafana/provisioning")
    if prov and prov.is_dir():
        for f in sorted((prov / "datasources").glob("*.y*ml")):
            for ds in (yaml.safe_load(f.read_text()) or {}).get("datasources") or []:
                url = str(ds.get("url", ""))
                m = re.match(r"^https?://([^:/]+)(:(\d+))?", url)
                c.check(bool(m) and m.group(1) in services,
                        f"grafana data source {ds.get('name')} ({url}) is a compose service")
        for f in sorted((prov / "dashboards").glob("*.y*ml")):
            for pr in (yaml.safe_load(f.read_text()) or {}).get("providers") or []:
                path = dig(pr, "options", "path", default="")
                c.check(any(path == m or path.startswith(m + "/") for m in gmounts),
                        f"grafana dashboard provider {pr.get('name')} path {path} is mounted")
    return c.done()


# ----------------------------------------------------------------------------------------------------
# Dockerfile


def dockerignore_included(patterns: list[tuple[bool, str]], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for negate, pat in patterns:
        rx = re.compile(
            "^" + "".join(
                ".*" if tok == "**" else "[^/]*" if tok == "*" else "[^/]" if tok == "?" else re.escape(tok)
                for tok in re.split(r"(\*\*|\*|\?)", pat)
            ) + "$"
        )
        if any(rx.match(cand) for cand in candidates):
            included = negate
    return included


def dockerfile() -> int:
    c = Checks("Dockerfile (structural)")
    raw = DOCKERFILE.read_text()
    # join continuation lines, drop comments and blank lines (the parser directive is a comment too)
    lines, cur = [], ""
    for line in raw.splitlines():
        s = line.strip()
        if not cur and (not s or s.startswith("#")):
            continue
        if s.startswith("#"):
            continue
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        lines.append((cur + s).strip())
        cur = ""
    instrs = [(l.split(None, 1)[0].upper(), (l.split(None, 1) + [""])[1]) for l in lines]
    froms = [(i, a) for i, (k, a) in enumerate(instrs) if k == "FROM"]
    c.check(len(froms) >= 2, "multi-stage (two or more FROM)")
    if not froms:
        return c.done()
    first = froms[0][1].split()
    c.check(len(first) == 3 and first[1].upper() == "AS" and first[2] == "builder"
            and first[0].startswith("rust:"), "first stage: FROM rust:… AS builder", " ".join(first))
    stages = {a.split()[2] for _, a in froms if len(a.split()) == 3 and a.split()[1].upper() == "AS"}
    last_i, last = froms[-1]
    c.check(last.split()[0] == "debian:bookworm-slim" and "builder" not in last,
            "final stage: FROM debian:bookworm-slim", last)
    final = instrs[last_i + 1:]
    users = [a for k, a in final if k == "USER"]
    c.check(bool(users) and users[-1].split(":")[0] not in ("0", "root"),
            "final stage: USER is not root", str(users))
    c.check(bool(users) and users[-1].split(":")[0].isdigit(),
            "final stage: USER is numeric (Kubernetes runAsNonRoot can check it)", str(users))
    ep = [a for k, a in final if k == "ENTRYPOINT"]
    c.check(ep and ep[-1].replace(" ", "") == '["switchyard"]', 'final stage: ENTRYPOINT ["switchyard"] (exec form)', str(ep))
    cmd = [a for k, a in final if k == "CMD"]
    c.check(cmd and cmd[-1].replace(" ", "") == '["run"]', 'final stage: CMD ["run"]', str(cmd))
    c.check(any(k == "EXPOSE" and "9464" in a.split() for k, a in final), "final stage: EXPOSE 9464")
    c.check(any(k == "ENV" and "SWITCHYARD_CONFIG=/etc/switchyard/switchyard.yaml" in a for k, a in final),
            "final stage: ENV SWITCHYARD_CONFIG=/etc/switchyard/switchyard.yaml")
    builds = [a for k, a in instrs[: last_i] if k == "RUN" and "cargo build" in a]
    c.check(bool(builds) and all("--release" in b and "--locked" in b and "--bin switchyard" in b for b in builds),
            "builder: cargo build --release --locked --bin switchyard")

    # COPY sources: stages exist; context files exist and pass the .dockerignore
    patterns = []
    if c.check(DOCKERIGNORE.exists(), f"{DOCKERIGNORE.relative_to(ROOT)} exists"):
        for line in DOCKERIGNORE.read_text().splitlines():
            s = line.strip()
            if s and not s.startswith("#"):
                neg = s.startswith("!")
                s = s[1:] if neg else s
                patterns.append((neg, os.path.normpath(s.strip("/"))))
    dests = {}
    for k, a in instrs:
        if k not in ("COPY", "ADD"):
            continue
        args = a.split()
        flags = [x for x in args if x.startswith("--")]
        paths = [x for x in args if not x.startswith("--")]
        srcs, dest = paths[:-1], paths[-1]
        frm = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
        for src in srcs:
            if frm:
                c.check(frm in stages, f"COPY --from={frm} names a stage")
                continue
            p = ROOT / src
            c.check(p.exists(), f"COPY source {src} exists in the context")
            c.check(dockerignore_included(patterns, src.rstrip("/")), f"COPY source {src} is not excluded by the .dockerignore")
            dests[src.rstrip("/")] = dest
    for src, dest in (("schemas", "/usr/share/switchyard/schemas"), ("topics", "/usr/share/switchyard/topics"),
                      ("deploy/docker/switchyard.yaml", "/etc/switchyard/switchyard.yaml")):
        c.check(dests.get(src, "").rstrip("/") == dest, f"{src} is copied to {dest}")
    for excluded in ("target", ".stack", ".git", "deploy/.validate-venv", "tests"):
        c.check(not dockerignore_included(patterns, excluded + "/x"), f".dockerignore keeps {excluded}/ out of the context")
    return c.done()


# ----------------------------------------------------------------------------------------------------
# the image's config against the documented example

# Settings deploy/docker/switchyard.yaml changes on purpose (see its header).
INTENDED_DIFFERENCES = [
    ("kafka", "brokers"), ("kafka", "consumer"), ("redis", "url"), ("http", "listen"), ("log", "format"),
    ("topics", "dir"), ("schemas_dir",), ("governance", "approvals", "token"),
]


def config_drift() -> int:
    c = Checks("image config vs deploy/switchyard.yaml")
    example = yaml.safe_load((DEPLOY / "switchyard.yaml").read_text())
    image = yaml.safe_load(IMAGE_CONFIG.read_text())
    for path in INTENDED_DIFFERENCES:
        for doc in (example, image):
            parent = dig(doc, *path[:-1]) if len(path) > 1 else doc
            if isinstance(parent, dict):
                parent.pop(path[-1], None)

    def diff(a, b, at=""):
        if isinstance(a, dict) and isinstance(b, dict):
            out = []
            for k in sorted(set(a) | set(b), key=str):
                out += diff(a.get(k, "<missing>"), b.get(k, "<missing>"), f"{at}.{k}" if at else str(k))
            return out
        return [] if a == b else [at]

    d = diff(example, image)
    c.check(not d, "deploy/docker/switchyard.yaml matches deploy/switchyard.yaml except "
            + ", ".join(".".join(p) for p in INTENDED_DIFFERENCES),
            "differs at " + ", ".join(d[:20]) + " (update deploy/docker/switchyard.yaml and deploy/k8s/configmap.yaml)")
    return c.done()


# ----------------------------------------------------------------------------------------------------
# replicas vs partitions

# What each stage consumes: a mirror of the `inputs` functions of src/stages/*.rs (the STAGES table).
STAGE_INPUTS = {
    "route": lambda t: list(t.get("inputs", [])),
    "agents": lambda t: [t.get("tasks", "switchyard.tasks")],
    "resolve": lambda t: [t.get("proposals", "switchyard.proposals")],
    "decisions": lambda t: [t.get("decisions", "switchyard.approval-decisions")],
    "tools": lambda t: [t.get("actions", "switchyard.actions")],
}
# The groups every replica must have work in: the agents stage, whose lag KEDA scales on, and
# resolve, which decides every proposal those agents make. A replica past their partition count
# would join both groups with nothing to do: scaling out that far buys nothing. The other groups
# (route over three inputs, decisions, tools) are light; a member beyond their partitions stands by
# (ready: /readyz counts a member joined without partitions as ready) and takes over on a rebalance.
MUST_HAVE_WORK = ("agents", "resolve")


def partitions() -> int:
    c = Checks("replicas vs partitions")
    cfg = yaml.safe_load(IMAGE_CONFIG.read_text())
    topics = dig(cfg, "topics", default={}) or {}
    stages = dig(cfg, "stages", default={}) or {}
    enabled = [n for n in STAGE_INPUTS if dig(stages, n, "enabled", default=True) is not False]
    parts: dict[str, int] = {}
    for n in enabled:
        for t in STAGE_INPUTS[n](topics):
            tdef = ROOT / "topics" / f"{t}.yaml"
            if c.check(tdef.exists(), f"{n} consumes {t}, defined in topics/{t}.yaml"):
                p = yaml.safe_load(tdef.read_text()).get("partitions")
                if c.check(isinstance(p, int) and p >= 1, f"topics/{t}.yaml: partitions is a positive integer"):
                    parts[t] = p

    def group_partitions(n: str) -> int:
        # roundrobin spreads a group's partitions of every topic over all members (configmap).
        return sum(parts.get(t, 0) for t in STAGE_INPUTS[n](topics))

    docs = {(d.get("kind"), dig(d, "metadata", "name")): d
            for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml" for d in load_all(p)}
    dep = docs.get(("Deployment", "switchyard"), {})
    so = docs.get(("ScaledObject", "switchyard"), {})
    pdb = docs.get(("PodDisruptionBudget", "switchyard"), {})
    replicas = dig(dep, "spec", "replicas")
    lo, hi = dig(so, "spec", "minReplicaCount"), dig(so, "spec", "maxReplicaCount")
    bounds = [("Deployment replicas", replicas), ("KEDA maxReplicaCount", hi)]
    for n in MUST_HAVE_WORK:
        if n not in enabled:
            continue
        have = group_partitions(n)
        for what, r in bounds:
            c.check(isinstance(r, int) and r <= have,
                    f"{what} ({r}) <= the {n} group's partitions ({have}): every replica has {n} work")
    c.check(isinstance(lo, int) and isinstance(replicas, int) and lo <= replicas <= (hi or 0),
            f"KEDA minReplicaCount ({lo}) <= Deployment replicas ({replicas}) <= maxReplicaCount ({hi})")
    mu = dig(pdb, "spec", "maxUnavailable")
    c.check(isinstance(mu, int) and isinstance(lo, int) and mu < lo,
            f"PDB maxUnavailable ({mu}) < KEDA minReplicaCount ({lo}): a drain never stops every consumer")
    strategy = str(dig(cfg, "kafka", "consumer", "partition.assignment.strategy", default="range,roundrobin"))
    c.check(strategy.split(",")[0].strip() in ("roundrobin", "cooperative-sticky"),
            "partition.assignment.strategy spreads every input topic of a group over all members",
            f"{strategy}: with range, each input topic's partitions go to its first members")
    for n in enabled:
        if n in MUST_HAVE_WORK:
            continue
        have = group_partitions(n)
        if isinstance(hi, int) and hi > have:
            print(f"  note {n}: {have} partitions; at {hi} replicas {hi - have} stand by (ready)")
    return c.done()


def main() -> int:
    cmds = {"k8s-cross": k8s_cross, "keda": keda, "compose": compose, "dockerfile": dockerfile,
            "config-drift": config_drift, "partitions": partitions}
    if len(sys.argv) != 2 or sys.argv[1] not in cmds:
        print(__doc__, file=sys.stderr)
        return 2
    return cmds[sys.argv[1]]()


if __name__ == "__main__":
    sys.exit(main())
