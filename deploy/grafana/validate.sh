#!/usr/bin/env bash
# Validates the Grafana dashboards in deploy/grafana/dashboards/.
#
#  1. Type check against Grafana's published schema types: installs (once, into deploy/grafana/.validate/,
#     git-ignored) @grafana/schema and typescript at pinned versions, turns every dashboard into
#         import type { Dashboard } from '@grafana/schema';
#         const d: Json<Dashboard> = <dashboard JSON>; export default d;
#         export const strict: StrictDashboard = <dashboard JSON>;
#     and runs `tsc --noEmit --strict --skipLibCheck false`. The JSON is an object literal, so unknown
#     properties (excess property checks), wrong types and invalid enum values fail. Json<T> and
#     StrictDashboard are in deploy/grafana/dashboard-types.ts (Json<T> only turns TypeScript string enums
#     into their JSON values; StrictDashboard also types panel options, field config and Prometheus targets).
#     Canaries (copies of a dashboard with one known mistake each) must fail, so a loosened type cannot make
#     the check pass silently.
#  2. Structural check (deploy/grafana/check_dashboards.py): descriptions, units, queries, variables, metric
#     and label names against src/telemetry.rs.
#  3. When promtool is installed: every PromQL expression parses (`promtool check rules`).
#
# Runs every check, then exits 1 if any failed. Needs node + npm (npm registry access on the first run)
# and python3.
set -euo pipefail

SCHEMA_VERSION=13.2.3
TYPESCRIPT_VERSION=5.9.3

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
WORK="$HERE/.validate"
DASHBOARDS=("$HERE"/dashboards/*.json)

fail() { echo "validate.sh: FAILED: $*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || fail "$1 is required ($2)"; }
need node "Debian: apt-get install -y nodejs npm"
need npm "Debian: apt-get install -y npm"
need python3 "Debian: apt-get install -y python3"
[[ -e "${DASHBOARDS[0]}" ]] || fail "no dashboards in $HERE/dashboards"

installed() { # prints the installed version of an npm package in $WORK, or nothing
  node -e 'try { console.log(require(process.argv[1]).version) } catch (e) {}' \
    "$WORK/node_modules/$1/package.json"
}

echo "== installing type checker (deploy/grafana/.validate)"
mkdir -p "$WORK"
if [[ "$(installed @grafana/schema)" == "$SCHEMA_VERSION" && "$(installed typescript)" == "$TYPESCRIPT_VERSION" ]]; then
  echo "  already installed: @grafana/schema@$SCHEMA_VERSION typescript@$TYPESCRIPT_VERSION"
else
  printf '{\n  "name": "switchyard-dashboard-validate",\n  "private": true\n}\n' >"$WORK/package.json"
  (cd "$WORK" && npm install --no-audit --no-fund --loglevel=error --save-exact \
    "@grafana/schema@$SCHEMA_VERSION" "typescript@$TYPESCRIPT_VERSION") ||
    fail "npm install of @grafana/schema@$SCHEMA_VERSION typescript@$TYPESCRIPT_VERSION"
  [[ "$(installed @grafana/schema)" == "$SCHEMA_VERSION" ]] || fail "@grafana/schema@$SCHEMA_VERSION did not install"
  [[ "$(installed typescript)" == "$TYPESCRIPT_VERSION" ]] || fail "typescript@$TYPESCRIPT_VERSION did not install"
  echo "  installed: @grafana/schema@$SCHEMA_VERSION typescript@$TYPESCRIPT_VERSION"
fi

rm -rf "$WORK/gen" "$WORK/canary"
mkdir -p "$WORK/gen" "$WORK/canary"
cp "$HERE/dashboard-types.ts" "$WORK/types.ts"
cat >"$WORK/tsconfig.json" <<'JSON'
{
  "compilerOptions": {
    "strict": true,
    "noEmit": true,
    "skipLibCheck": false,
    "exactOptionalPropertyTypes": true,
    "target": "es2022",
    "lib": ["es2022"],
    "module": "esnext",
    "moduleResolution": "bundler",
    "types": []
  },
  "include": ["types.ts", "gen/*.ts"]
}
JSON
printf '{ "extends": "./tsconfig.json", "include": ["types.ts", "canary/*.ts"] }\n' >"$WORK/tsconfig.canary.json"

# Writes the TypeScript wrapper of every dashboard (gen/) and the canaries (canary/). The dashboard text is
# embedded verbatim, its first line on line 1, so tsc's line numbers map back to the JSON (map.json).
python3 - "$WORK" "${DASHBOARDS[@]}" <<'PY'
import copy, json, sys
from pathlib import Path

work, files = Path(sys.argv[1]), [Path(f) for f in sys.argv[2:]]
HEAD = ("import type { Dashboard } from '@grafana/schema'; import type { Json, StrictDashboard } from '../types'; "
        "const d: Json<Dashboard> = ")

def wrapper(text):
    """The .ts text, and the line on which the second copy of the JSON starts."""
    first = HEAD + text.rstrip() + ";\nexport default d;\n"
    first += "// The stricter shape: typed panel options, field config and Prometheus targets.\n"
    second_line = first.count("\n") + 1
    return (first + "export const strict: StrictDashboard = " + text.rstrip() + ";\n"
            + "export const strictIsGrafana: Json<Dashboard> = strict;\n"), second_line

line_map = {}
for f in files:
    text = f.read_text()
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        sys.exit(f"validate.sh: FAILED: {f.name} is not valid JSON: {e}")
    ts, second = wrapper(text)
    (work / "gen" / f"{f.stem}.ts").write_text(ts)
    line_map[f"gen/{f.stem}.ts"] = {"json": str(f), "second": second}
(work / "map.json").write_text(json.dumps(line_map))

# Canaries: one known mistake each; every one must be reported by tsc.
base = json.loads(files[0].read_text())
def first(kind):
    return next(p for p in base["panels"] if p["type"] == kind)
def mutate(name, fn):
    d = copy.deepcopy(base)
    panels = {p["id"]: p for p in d["panels"]}
    fn(d, lambda kind: panels[first(kind)["id"]])
    (work / "canary" / f"{name}.ts").write_text(wrapper(json.dumps(d, indent=2))[0])
mutate("unknown_dashboard_property", lambda d, p: d.update(refreshInterval="5s"))
mutate("unknown_panel_property", lambda d, p: p("timeseries").update(descripton="typo"))
mutate("unknown_option_property", lambda d, p: p("timeseries")["options"]["legend"].update(show=True))
mutate("unknown_target_property", lambda d, p: p("stat")["targets"][0].update(query="up"))
mutate("invalid_enum_value", lambda d, p: p("timeseries")["fieldConfig"]["defaults"]["custom"].update(drawStyle="lines"))
mutate("wrong_type", lambda d, p: p("stat")["fieldConfig"]["defaults"].update(unit=1))
mutate("missing_description", lambda d, p: p("timeseries").pop("description"))
mutate("missing_unit", lambda d, p: p("timeseries")["fieldConfig"]["defaults"].pop("unit"))
mutate("no_targets", lambda d, p: p("stat").update(targets=[]))
mutate("unknown_variable_property", lambda d, p: d["templating"]["list"][1].update(definiton="x"))
print(f"  wrote {len(files)} wrappers and 10 canaries")
PY

FAILED=()
TSC=("$WORK/node_modules/.bin/tsc" --noEmit --strict --skipLibCheck false)
echo "== type check: tsc --strict against @grafana/schema@$SCHEMA_VERSION (Dashboard from '@grafana/schema')"
if out="$(cd "$WORK" && "${TSC[@]}" -p tsconfig.json 2>&1)"; then
  for f in "${DASHBOARDS[@]}"; do echo "  types: $(basename "$f"): OK"; done
else
  # Point each error at the dashboard file and line ([Dashboard]: Grafana's type; [StrictDashboard]: ours).
  printf '%s\n' "$out" | python3 -c '
import json, re, sys
line_map, repo = json.load(open(sys.argv[1])), sys.argv[2]
for line in sys.stdin.read().splitlines():
    m = re.match(r"(gen/[^(]+\.ts)\((\d+),(\d+)\): (.*)", line)
    if m and m.group(1) in line_map:
        info, n = line_map[m.group(1)], int(m.group(2))
        check, n = ("StrictDashboard", n - info["second"] + 1) if n >= info["second"] else ("Dashboard", n)
        path = info["json"].removeprefix(repo + "/")
        print(f"  {path}:{n}: [{check}] {m.group(4)}")
    else:
        print("  " + line)
' "$WORK/map.json" "$REPO" >&2
  FAILED+=("type check: the dashboards above do not match @grafana/schema@$SCHEMA_VERSION")
fi

echo "== canaries: each deliberately broken copy must be rejected"
if out="$(cd "$WORK" && "${TSC[@]}" -p tsconfig.canary.json 2>&1)"; then
  FAILED+=("canaries: tsc accepted every canary, the types are not strict")
else
  for c in "$WORK"/canary/*.ts; do
    name="$(basename "$c" .ts)"
    if grep -q "^canary/$name\.ts(" <<<"$out"; then
      echo "  canary $name: rejected (good)"
    else
      FAILED+=("canary $name was accepted: the type check no longer catches this mistake")
    fi
  done
fi

echo "== structure (deploy/grafana/check_dashboards.py)"
python3 "$HERE/check_dashboards.py" --promql-rules "$WORK/dashboard-expressions.rules.yml" "${DASHBOARDS[@]}" ||
  FAILED+=("structure: see the problems listed above")

echo "== PromQL syntax (promtool check rules)"
if ! command -v promtool >/dev/null 2>&1; then
  echo "  skipped: promtool is not installed (Debian: apt-get install -y prometheus)"
elif [[ ! -s "$WORK/dashboard-expressions.rules.yml" ]]; then
  FAILED+=("PromQL syntax: no expressions were extracted")
elif out="$(promtool check rules "$WORK/dashboard-expressions.rules.yml" 2>&1)"; then
  echo "  $(promtool --version 2>&1 | head -1): $(grep -o 'SUCCESS.*' <<<"$out")"
else
  printf '%s\n' "$out" | sed 's/^/  /' >&2
  FAILED+=("PromQL syntax: an expression does not parse (rules are named dashboard:<file>_<panel id>_<refId>)")
fi

if ((${#FAILED[@]})); then
  echo "validate.sh: FAILED:" >&2
  printf '  - %s\n' "${FAILED[@]}" >&2
  exit 1
fi
echo "validate.sh: OK: ${#DASHBOARDS[@]} dashboards passed the type check, the canaries, the structural check and PromQL parsing"
