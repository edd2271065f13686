#!/usr/bin/env python3
"""Structural checks of the switchyard Grafana dashboards (run by deploy/grafana/validate.sh).

Checks every deploy/grafana/dashboards/*.json:
  - dashboard: uid, title, schemaVersion >= 39, editable, time range, refresh;
  - template variables: `datasource` (type datasource, query prometheus), `instance`
    (label_values(switchyard_records_consumed_total, instance), multi, includeAll) and, on dashboards whose
    queries touch agent metrics, `agent` (label_values(switchyard_agent_tasks_total, agent), multi, includeAll);
  - every panel: a known type (timeseries, stat, table), a description, a unit in fieldConfig.defaults.unit
    (not "none"), the ${datasource} datasource, at least one target, each with an expr and a unique refId;
  - panel ids unique and gridPos rectangles not overlapping;
  - every PromQL selector of a switchyard_/process_/up metric filters on instance=~"$instance" (and on
    agent=~"$agent" for metrics with an agent label when the dashboard has the variable); metric names and
    label names exist in src/telemetry.rs; range windows are [$__rate_interval] or [$__range].

With --promql-rules FILE it also writes every expression (Grafana variables replaced by constants) as a
Prometheus rules file, so `promtool check rules FILE` can parse them.
Exits 1 with one line per problem.
"""
import argparse
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PANEL_TYPES = {"timeseries", "stat", "table"}
INSTANCE_QUERY = "label_values(switchyard_records_consumed_total, instance)"
AGENT_QUERY = "label_values(switchyard_agent_tasks_total, agent)"
WINDOWS = {"$__rate_interval", "$__range"}
PROCESS_METRICS = {
    "process_cpu_seconds_total", "process_resident_memory_bytes", "process_virtual_memory_bytes",
    "process_open_fds", "process_max_fds", "process_start_time_seconds", "process_threads",
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# PromQL words that may precede "(" or stand alone and are not metric names.
PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "by", "without", "on", "ignoring", "group_left", "group_right",
    "rate", "irate", "increase", "deriv", "delta", "histogram_quantile", "vector", "or", "and", "unless",
    "offset", "bool", "topk", "bottomk", "quantile", "stddev", "stdvar", "abs", "clamp_min", "clamp_max",
    "label_replace", "time", "scalar", "absent", "min_over_time", "max_over_time", "avg_over_time",
    "sum_over_time", "count_over_time", "last_over_time", "le", "e", "inf", "nan",
}


def telemetry_metrics():
    """{metric name: set of labels} from src/telemetry.rs."""
    src = (REPO / "src" / "telemetry.rs").read_text()
    found = {}
    for m in re.finditer(r'"(switchyard_[a-z0-9_]+)",\s*"[^"]*",\s*&\[([^\]]*)\]', src):
        found[m.group(1)] = set(re.findall(r'"([a-z_]+)"', m.group(2)))
    if not found:
        sys.exit("check_dashboards: no metric definitions found in src/telemetry.rs")
    return found


def base_metric(name, known):
    if name in known:
        return name
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in known:
            return name[: -len(suffix)]
    return None


def check_expr(where, expr, known, has_agent_var, problems):
    """Checks one PromQL expression; returns the metrics it uses."""
    used = set()
    if not expr.strip():
        problems.append(f"{where}: empty expr")
        return used
    for window in re.findall(r"\[([^\]]*)\]", expr):
        if window not in WINDOWS:
            problems.append(f"{where}: range window [{window}] is neither [$__rate_interval] nor [$__range]")
    for m in re.finditer(r"\b(switchyard_[a-z0-9_]+|process_[a-z0-9_]+|up)\b(\{([^}]*)\})?", expr):
        name, selector = m.group(1), m.group(3)
        if name == "up" and m.group(2) is None:
            continue  # the word "up" outside a selector
        labels = set(re.findall(r"([a-z_]+)\s*(?:=~|!~|!=|=)", selector or ""))
        if name.startswith("switchyard_"):
            metric = base_metric(name, known)
            if metric is None:
                problems.append(f"{where}: metric {name} is not defined in src/telemetry.rs")
                continue
            allowed = known[metric] | {"instance", "job"} | ({"le"} if name.endswith("_bucket") else set())
            used.add(metric)
        else:
            if name != "up" and name not in PROCESS_METRICS:
                problems.append(f"{where}: unknown process metric {name}")
            allowed = {"instance", "job"}
            if 'job="switchyard"' not in (selector or ""):
                problems.append(f'{where}: {name} must be filtered on job="switchyard"')
        if 'instance=~"$instance"' not in (selector or ""):
            problems.append(f'{where}: selector of {name} does not filter on instance=~"$instance"')
        for label in labels - allowed:
            problems.append(f"{where}: {name} has no label {label!r} (labels: {sorted(allowed)})")
        metric = base_metric(name, known)
        if has_agent_var and metric and "agent" in known[metric] and 'agent=~"$agent"' not in (selector or ""):
            problems.append(f'{where}: selector of {name} does not filter on agent=~"$agent"')
    # Grouping labels must be labels of some metric the expression uses.
    label_pool = {"instance", "job", "le"}.union(*(known[m] for m in used)) if used else {"instance", "job", "le"}
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        for label in filter(None, (x.strip() for x in group.split(","))):
            if label not in label_pool:
                problems.append(f"{where}: grouping label {label!r} is not a label of {sorted(used)}")
    leftover = set(re.findall(r"\$[A-Za-z_]+", expr)) - WINDOWS - {"$instance", "$agent"}
    if leftover:
        problems.append(f"{where}: unknown Grafana variables {sorted(leftover)}")
    if "$agent" in expr and not has_agent_var:
        problems.append(f"{where}: uses $agent but the dashboard has no agent variable")
    return used


def check_variable(where, variables, name, query, problems):
    var = variables.get(name)
    if var is None:
        problems.append(f"{where}: template variable {name!r} is missing")
        return
    if var.get("type") != "query":
        problems.append(f"{where}: variable {name!r} must be of type query")
    q = var.get("query")
    q = q.get("query") if isinstance(q, dict) else q
    if q != query:
        problems.append(f"{where}: variable {name!r} must query {query!r} (has {q!r})")
    if var.get("multi") is not True or var.get("includeAll") is not True:
        problems.append(f"{where}: variable {name!r} must be multi and includeAll")
    if (var.get("datasource") or {}).get("uid") != "${datasource}":
        problems.append(f"{where}: variable {name!r} must use the ${{datasource}} datasource")


def check_dashboard(path, known, problems, exprs):
    where = path.name
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        problems.append(f"{where}: invalid JSON: {e}")
        return 0
    for key in ("uid", "title", "refresh"):
        if not isinstance(d.get(key), str) or not d[key]:
            problems.append(f"{where}: {key} must be a non-empty string")
    if not isinstance(d.get("schemaVersion"), int) or d["schemaVersion"] < 39:
        problems.append(f"{where}: schemaVersion must be >= 39")
    if d.get("editable") is not True:
        problems.append(f"{where}: editable must be true")
    if not (d.get("time") or {}).get("from") or not (d.get("time") or {}).get("to"):
        problems.append(f"{where}: time range (time.from, time.to) is missing")

    variables = {v.get("name"): v for v in (d.get("templating") or {}).get("list") or []}
    ds = variables.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        problems.append(f"{where}: template variable 'datasource' (type datasource, query prometheus) is missing")
    check_variable(where, variables, "instance", INSTANCE_QUERY, problems)
    has_agent_var = "agent" in variables
    if has_agent_var:
        check_variable(where, variables, "agent", AGENT_QUERY, problems)

    panels = d.get("panels") or []
    if not panels:
        problems.append(f"{where}: no panels")
    ids, cells, used = set(), {}, set()
    for i, p in enumerate(panels):
        pw = f"{where}: panel {p.get('id', i)} {p.get('title', '(no title)')!r}"
        if p.get("type") not in PANEL_TYPES:
            problems.append(f"{pw}: type {p.get('type')!r} is not one of {sorted(PANEL_TYPES)}")
        if p.get("id") in ids:
            problems.append(f"{pw}: duplicate panel id")
        ids.add(p.get("id"))
        if not str(p.get("title") or "").strip():
            problems.append(f"{pw}: no title")
        if not str(p.get("description") or "").strip():
            problems.append(f"{pw}: no description")
        unit = ((p.get("fieldConfig") or {}).get("defaults") or {}).get("unit")
        if not isinstance(unit, str) or not unit.strip() or unit == "none":
            problems.append(f"{pw}: fieldConfig.defaults.unit must be a real unit (has {unit!r})")
        if (p.get("datasource") or {}).get("uid") != "${datasource}":
            problems.append(f"{pw}: datasource must be {{'type': 'prometheus', 'uid': '${{datasource}}'}}")
        g = p.get("gridPos") or {}
        if not all(isinstance(g.get(k), int) for k in ("x", "y", "w", "h")) or g.get("x", 0) + g.get("w", 0) > 24:
            problems.append(f"{pw}: gridPos is missing or wider than 24 columns")
        else:
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    if (x, y) in cells:
                        problems.append(f"{pw}: overlaps panel {cells[(x, y)]}")
                        break
                    cells[(x, y)] = p.get("id")
                else:
                    continue
                break
        targets = p.get("targets") or []
        if not targets:
            problems.append(f"{pw}: no targets")
        refs = set()
        for t in targets:
            tw = f"{pw} target {t.get('refId')}"
            if not t.get("refId") or t.get("refId") in refs:
                problems.append(f"{tw}: missing or duplicate refId")
            refs.add(t.get("refId"))
            if (t.get("datasource") or {}).get("uid") != "${datasource}":
                problems.append(f"{tw}: datasource must be ${{datasource}}")
            expr = t.get("expr")
            if not isinstance(expr, str):
                problems.append(f"{tw}: no expr")
                continue
            used |= check_expr(tw, expr, known, has_agent_var, problems)
            exprs.append((f"{path.stem}_{p.get('id')}_{t.get('refId')}", expr))
    agent_metrics = {m for m in used if "agent" in known[m]}
    if agent_metrics and not has_agent_var:
        problems.append(f"{where}: queries agent metrics {sorted(agent_metrics)} but has no 'agent' variable")
    return len(panels)


def promql_rules(exprs):
    """A rules file with one recording rule per expression, Grafana variables replaced."""
    lines = ["groups:", "  - name: dashboard-expressions", "    rules:"]
    for name, expr in exprs:
        e = (expr.replace("$__rate_interval", "1m").replace("$__range", "1h")
             .replace("$instance", ".*").replace("$agent", ".*"))
        lines.append(f"      - record: dashboard:{re.sub(r'[^a-zA-Z0-9_]', '_', name)}")
        lines.append(f"        expr: {json.dumps(e)}")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dashboards", nargs="*", type=Path,
                    help="dashboard files (default: deploy/grafana/dashboards/*.json)")
    ap.add_argument("--promql-rules", type=Path, help="write every expression as a rules file for promtool")
    args = ap.parse_args()
    files = args.dashboards or sorted((HERE / "dashboards").glob("*.json"))
    if not files:
        sys.exit("check_dashboards: no dashboards found")
    known = telemetry_metrics()
    problems, exprs = [], []
    for f in files:
        n = check_dashboard(f, known, problems, exprs)
        print(f"  structure: {f.name}: {n} panels")
    if args.promql_rules:
        args.promql_rules.write_text(promql_rules(exprs))
    if problems:
        print(f"structural check FAILED ({len(problems)} problems):", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        sys.exit(1)
    print(f"  structure: OK: {len(files)} dashboards, {len(exprs)} PromQL expressions, "
          f"every panel has a description, a unit and a query; variables present")


if __name__ == "__main__":
    main()
