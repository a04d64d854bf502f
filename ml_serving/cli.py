"""`ml-serving`: plan a stack offline, pin its versions, serve a model locally, roll a challenger out.

Every failure a user can cause ends in one clear message and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from ml_serving import labels
from ml_serving.cliutil import UsageError, console, errors, find_project_dir
from ml_serving.clustercli import cmd_cluster
from ml_serving.localcluster import CRD_DIR
from ml_serving.runtimes import Runtime
from ml_serving.settings import ConfigError


def cmd_plan(args: argparse.Namespace) -> int:
    from ml_serving.plan import run_program, write_rendered
    from ml_serving.stackfile import load_settings

    project_dir = args.project_dir or find_project_dir()
    settings = load_settings(project_dir, args.stack)  # a bad stack file fails here, with its own message
    if args.diff:
        from ml_serving.diff import DiffError, check_ref

        try:
            check_ref(project_dir, args.diff)
        except DiffError as exc:
            raise UsageError(str(exc)) from None
    plan = _run(lambda: run_program(project_dir, args.stack, cwd=args.cwd))
    out_dir = args.out or project_dir / "rendered" / args.stack
    written = write_rendered(plan, out_dir)
    if args.quiet:
        return 0
    _print_summary(plan, out_dir, len(written))
    if settings.node_pools:
        _print_pools(settings)
    if args.diff:
        _print_diff(project_dir, args.stack, args.diff, out_dir)
    if args.preview:
        _pulumi_preview(project_dir, args.stack)
    return 0


def _run(make_plan):  # type: ignore[no-untyped-def]
    """Turn the program's own clean errors (config, registry) into a usage error."""
    import pulumi

    try:
        return make_plan()
    except pulumi.RunError as exc:
        raise UsageError(str(exc)) from None


def _print_summary(plan, out_dir: Path, files: int) -> None:  # type: ignore[no-untyped-def]
    objects = Table(title=f"stack {plan.stack}: {len(plan.objects)} Kubernetes objects", title_justify="left")
    for column in ("kind", "namespace", "name"):
        objects.add_column(column)
    for obj in plan.objects:
        meta = obj["metadata"]
        objects.add_row(obj["kind"], meta.get("namespace", ""), meta["name"])
    for image in plan.images:
        pushed = "pushed" if not image.get("skipPush") else "local"
        objects.add_row("Docker image", pushed, image["imageName"])
    for image in plan.local_images:
        objects.add_row("Docker image", "pushed" if image.get("push") else "local", image["name"])
    for release in plan.releases:
        objects.add_row(
            "Helm release", release.get("namespace", ""), f"{release['name']} ({release['chart']} {release['version']})"
        )
    console.print(objects)
    models = Table(title="models", title_justify="left")
    for column in ("model", "variant", "version", "from", "traffic", "image tag"):
        models.add_column(column)
    models.add_column("model URI", overflow="fold")
    for sdep in plan.find("SeldonDeployment"):
        for predictor in sdep["spec"]["predictors"]:
            traffic = "shadow" if predictor.get("shadow") else f"{predictor.get('traffic', 0)}%"
            uri = predictor["annotations"][labels.MODEL_URI]
            image = predictor["componentSpecs"][0]["spec"]["containers"][0]["image"]
            models.add_row(
                sdep["metadata"]["name"],
                predictor["name"],
                predictor["labels"][labels.MODEL_VERSION],
                predictor["annotations"][labels.RESOLVED_FROM],
                traffic,
                image.rsplit(":", 1)[-1],
                uri if "modelUri" in predictor["graph"] else f"{uri} (baked into the image)",
            )
    _kserve_rows(plan, models)
    console.print(models)
    console.print(f"wrote {files} files to {out_dir}")


def _kserve_rows(plan, models: Table) -> None:  # type: ignore[no-untyped-def]
    """The models table's rows under the kserve backend: a variant per InferenceService, its share from the
    model's VirtualService (a variant it only mirrors to is a shadow)."""
    from ml_serving.specs import kserve

    for isvc in plan.find("InferenceService"):
        meta = isvc["metadata"]
        model, variant = meta["labels"][labels.MODEL], meta["labels"][labels.VARIANT]
        split = {name: w for vs in plan.find("VirtualService", model) for name, w in kserve.traffic(vs).items()}
        (container,) = isvc["spec"]["predictor"]["containers"]
        baked = not any(e["name"] == kserve.STORAGE_URI_ENV for e in container["env"])
        uri = meta["annotations"][labels.MODEL_URI]
        models.add_row(
            model,
            variant,
            meta["labels"][labels.MODEL_VERSION],
            meta["annotations"][labels.RESOLVED_FROM],
            f"{split[variant]}%" if variant in split else "shadow",
            container["image"].rsplit(":", 1)[-1],
            f"{uri} (baked into the image)" if baked else uri,
        )


def _print_pools(settings) -> None:  # type: ignore[no-untyped-def]
    from ml_serving.specs.gpu import placements

    pools = Table(title="node pools", title_justify="left")
    for column in ("pool", "GPU types", "GPU limit", "time-slicing", "capacity", "instance families"):
        pools.add_column(column)
    for name, pool in settings.node_pools.items():
        gpu = pool.gpu
        pools.add_row(
            name,
            ", ".join(gpu.types) if gpu else "-",
            str(gpu.limit) if gpu else "-",
            f"{gpu.time_slicing.replicas} per GPU" if gpu and gpu.time_slicing else "-",
            ", ".join(pool.capacity_types),
            ", ".join(pool.instance_families or pool.instance_categories) or "any",
        )
    console.print(pools)
    placed = Table(title="placement", title_justify="left")
    for column in ("model", "variant", "pool", "GPUs", "GPU type"):
        placed.add_column(column)
    for place in placements(settings):
        placed.add_row(
            place.model, place.variant, place.pool or "general nodes", str(place.gpus or "-"), place.gpu_type or "-"
        )
    console.print(placed)


def _print_diff(project_dir: Path, stack: str, ref: str, out_dir: Path) -> None:
    from ml_serving.diff import DiffError, diff_rendered, plan_at_ref

    with tempfile.TemporaryDirectory(prefix="ml-serving-plan-") as tmp:
        before = Path(tmp) / "before"
        try:
            plan_at_ref(project_dir, ref, stack, before)
        except DiffError as exc:
            raise UsageError(str(exc)) from None
        changes = diff_rendered(before, out_dir)
    if not changes:
        console.print(f"no object changes against {ref}")
        return
    marks = {"added": "[green]+[/]", "removed": "[red]-[/]", "changed": "[yellow]~[/]"}
    console.print(f"{len(changes)} object(s) differ from the plan at {ref}:")
    for change in changes:
        console.print(f"{marks[change.action]} {change.key} ({change.action})")
    for change in changes:
        for line in change.lines:
            style = "green" if line.startswith("+") else "red" if line.startswith("-") else None
            console.print(line, style=style, markup=False)


def _pulumi_preview(project_dir: Path, stack: str) -> None:
    """`plan --preview`: the real engine's preview after the mock plan, when a Pulumi CLI is there."""
    from ml_serving.engine import EngineError

    try:
        _engine(project_dir, stack, "preview", as_json=False)
    except EngineError as exc:
        console.print(f"skipped `pulumi preview`: {exc} (the plan above ran the same program)")


def _engine(project_dir: Path, stack: str, action: str, as_json: bool) -> list[dict[str, str]]:
    """Run `action` with the real engine; each resource's step (op, type, name) is collected and returned."""
    from ml_serving.engine import run

    steps: list[dict[str, str]] = []

    def on_event(event) -> None:  # type: ignore[no-untyped-def]
        pre = getattr(event, "resource_pre_event", None)
        if pre is not None and pre.metadata is not None:
            meta = pre.metadata
            steps.append({"op": str(getattr(meta.op, "value", meta.op)), "type": meta.type, "urn": meta.urn})

    output = None if as_json else (lambda line: console.print(line.rstrip("\n"), markup=False, highlight=False))
    extra = {"diff": True} if action in ("preview", "up") else {}
    run(project_dir, stack, action, on_output=output, on_event=on_event, **extra)
    return steps


def cmd_engine(args: argparse.Namespace) -> int:
    """`preview`, `up`, `destroy`: the real Pulumi engine on this stack (see `./run tools`)."""
    from ml_serving.engine import EngineError

    project_dir = args.project_dir or find_project_dir()
    try:
        steps = _engine(project_dir, args.stack, args.command, as_json=args.json)
    except EngineError as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        print(json.dumps(steps))
        return 0
    changed = [s for s in steps if s["op"] not in ("same", "read")]
    summary = Table(title=f"{args.command} {args.stack}: {len(changed)} change(s)", title_justify="left")
    for column in ("op", "type", "name"):
        summary.add_column(column)
    for step in changed:
        summary.add_row(step["op"], step["type"], step["urn"].rsplit("::", 1)[-1])
    console.print(summary)
    return 0


def cmd_pin(args: argparse.Namespace) -> int:
    from ml_serving.pin import pin_stack

    project_dir = args.project_dir or find_project_dir()
    pins, _ = pin_stack(
        project_dir, args.stack, args.tracking_uri, warn=lambda message: console.print(f"[yellow]warning:[/] {message}")
    )
    if not pins:
        console.print(f"Pulumi.{args.stack}.yaml names no aliases: nothing to pin")
        return 0
    table = Table(title=f"Pulumi.{args.stack}.yaml pinned", title_justify="left")
    for column in ("model", "variant", "alias", "version"):
        table.add_column(column)
    table.add_column("model URI", overflow="fold")
    for pin in pins:
        version = f"{pin.before} → {pin.after.version}" if pin.changed and pin.before else pin.after.version
        table.add_row(pin.model, pin.variant, f"@{pin.alias}", version, pin.after.model_uri)
    console.print(table)
    console.print("review it with `git diff`, and the object changes with `ml-serving plan STACK --diff HEAD`")
    return 0


def cmd_seed(args: argparse.Namespace) -> int:
    from ml_serving.seed import seed

    project_dir = args.project_dir or find_project_dir()
    uri = args.tracking_uri or _stack_tracking_uri(project_dir, args.stack)
    with contextlib.chdir(project_dir):
        seeded = seed(uri)
    state = "registered" if seeded.created else "already there"
    console.print(f"{seeded.model} v{seeded.version} @{', @'.join(seeded.aliases)} in {uri}: {state}")
    return 0


def _stack_tracking_uri(project_dir: Path, stack: str) -> str:
    """The stack's MLflow registry; a relative one (sqlite:///.mlflow/…) is relative to the project folder."""
    from ml_serving.stackfile import load_settings

    settings = load_settings(project_dir, stack)
    if settings.registry is None:
        raise UsageError(f"Pulumi.{stack}.yaml has no ml-serving:registry: pass --tracking-uri")
    return settings.registry.tracking_uri


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the serving image's own entrypoint here, without Docker: same settings files, same validation.

    It replaces this process (exec), so the PID printed is the server's: SIGTERM to it stops the server and its
    workers. Ports are checked first: one in use is a one-line error before any model is fetched.
    """
    from ml_serving.server.__main__ import server_settings, settings_dir

    env = dict(os.environ)
    uri, cwd = args.tracking_uri, None
    if uri is None and not Path(args.model).is_dir():
        cwd = args.project_dir or find_project_dir()
        uri = _stack_tracking_uri(cwd, args.stack)
    if uri:
        env["MLFLOW_TRACKING_URI"] = env["MLFLOW_REGISTRY_URI"] = uri
    if args.runtime == Runtime.BENTOML:
        return _serve_bentoml(args, env, cwd)
    defaults = server_settings(settings_dir())
    env["MLSERVER_HOST"] = args.host
    ports = {}
    for name, value in (
        ("HTTP_PORT", args.http_port),
        ("GRPC_PORT", args.grpc_port),
        ("METRICS_PORT", args.metrics_port),
    ):
        if value is not None:
            env[f"MLSERVER_{name}"] = str(value)
        ports[name] = int(env.get(f"MLSERVER_{name}") or getattr(defaults, name.lower()))
    for name, port in ports.items():
        _check_port_free(args.host, port, f"--{name.lower().replace('_', '-')}")
    command = [sys.executable, "-m", "ml_serving.server", args.model, "--name", args.name or _model_name(args.model)]
    console.print(f"serving {args.model} as '{command[5]}' on {args.host} (PID {os.getpid()}): {' '.join(command)}")
    sys.stdout.flush()
    if cwd is not None:
        os.chdir(cwd)
    os.execve(sys.executable, command, env)
    return 0  # not reached


BENTOML_PYTHON_ENV = "ML_SERVING_BENTOML_PYTHON"
BENTOML_VENV = Path.home() / ".cache" / "ml-serving" / "bentoml"


def bentoml_python() -> str:
    """The Python with BentoML: BentoML's pins clash with MLServer's, so it lives in a virtualenv of its own."""
    configured = os.environ.get(BENTOML_PYTHON_ENV)
    candidates = [Path(configured)] if configured else [BENTOML_VENV / "bin" / "python"]
    for candidate in candidates:
        if candidate.exists():
            return str(candidate)
    raise UsageError(
        f"the BentoML runtime needs BentoML, kept apart from MLServer: create {BENTOML_VENV} (`.ci/run` does: "
        f"python3 -m venv {BENTOML_VENV} && {BENTOML_VENV}/bin/pip install -r serving_image/bentoml/requirements.txt "
        f"plus the model's requirements) or set {BENTOML_PYTHON_ENV}"
    )


def _serve_bentoml(args: argparse.Namespace, env: dict[str, str], cwd: Path | None) -> int:
    """The BentoML image's entrypoint here: the model fetched once (like the MLServer path), then `bentoml serve`."""
    from ml_serving.image import BENTOML_PORT, PROJECT_DIR
    from ml_serving.server import VERSION_ENV
    from ml_serving.server.__main__ import ModelNotFound, local_model

    python = bentoml_python()
    port = args.http_port or BENTOML_PORT
    _check_port_free(args.host, port, "--http-port")
    if cwd is not None:
        os.chdir(cwd)
    os.environ.update({k: env[k] for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI") if k in env})
    try:
        served = local_model(args.model)
    except ModelNotFound as error:
        raise UsageError(str(error)) from None
    name = args.name or _model_name(args.model)
    env.update({"MLSERVER_MODEL_URI": str(served.path), "MLSERVER_MODEL_NAME": name})
    if served.version:
        env[VERSION_ENV] = served.version
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_DIR), env.get("PYTHONPATH")]))
    env.setdefault("BENTOML_HOME", str(Path(served.path).parent / "bentoml"))
    command = [python, "-m", "bentoml", "serve", "ml_serving.server.bento:ModelService", "--host", args.host,
               "--port", str(port), "--working-dir", str(PROJECT_DIR)]  # fmt: skip
    console.print(f"serving {args.model} as '{name}' with BentoML on {args.host}:{port} (PID {os.getpid()})")
    sys.stdout.flush()
    os.execve(python, command, env)
    return 0  # not reached


def _check_port_free(host: str, port: int, flag: str) -> None:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            raise UsageError(f"port {port} on {host} is in use (another server?): stop it, or pass {flag}") from None


def _model_name(model: str) -> str:
    """The V2 model name: the registered model's name, or 'model' for a folder."""
    if model.startswith("models:/"):
        return labels.label_value(model.removeprefix("models:/").split("@")[0].split("/")[0]).lower()
    return "model"


def cmd_rollout(args: argparse.Namespace) -> int:
    from ml_serving import rollout
    from ml_serving.stackfile import load_settings

    project_dir = args.project_dir or find_project_dir()
    settings = load_settings(project_dir, args.stack)
    url = args.prometheus or (settings.monitoring.prometheus_url if settings.monitoring else None)
    if url is None and not args.abort:
        raise UsageError("no Prometheus to judge with: pass --prometheus URL or set ml-serving:monitoring")
    log_path = args.log or project_dir / "rollouts" / f"{args.stack}-{args.model}.jsonl"
    mode = next((m for m in rollout.Mode if getattr(args, m.value.replace("-", "_"), False)), rollout.Mode.RUN)
    started = time.time()
    try:
        if mode == rollout.Mode.ABORT and (pid := rollout.stop_running(project_dir, args.stack)) is not None:
            console.print(f"asked the running rollout (PID {pid}) to stop: it rolled back (see {log_path})")
            return 0
        with rollout.locked(project_dir, args.stack), rollout.interruptible():
            runner = rollout.rollout_run(
                project_dir, args.stack, args.model, rollout.Prometheus(url or "http://unused"),
                rollout.PulumiStack(project_dir, args.stack, on_output=None), log_path,
                mode=mode, report=console.print, sleep=rollout.countdown(console),
            )  # fmt: skip
            outcome = runner.run()
    except rollout.RolloutError as exc:
        raise UsageError(str(exc)) from None
    rollout.print_ending(console, outcome, log_path, started, dry_run=mode == rollout.Mode.DRY_RUN)
    return outcome.exit_code


def build_parser() -> argparse.ArgumentParser:
    from ml_serving import image
    from ml_serving.rollout import EXIT_MEANINGS

    parser = argparse.ArgumentParser(prog="ml-serving", description=__doc__.splitlines()[0])
    project = argparse.ArgumentParser(add_help=False)
    project.add_argument(
        "--project-dir",
        type=Path,
        default=argparse.SUPPRESS,
        help="folder with Pulumi.yaml (default: found from the cwd)",
    )
    parser.add_argument("--project-dir", type=Path, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)

    plan = commands.add_parser(
        "plan", parents=[project], help="run the program under Pulumi's mock engine and show what it declares"
    )
    plan.add_argument("stack", help="stack name: Pulumi.<stack>.yaml")
    plan.add_argument("--diff", metavar="REF", help="also show the object diff against the plan at git REF")
    plan.add_argument("--out", type=Path, help="where to write the YAML (default: rendered/<stack>/)")
    plan.add_argument("--preview", action="store_true", help="also run `pulumi preview` if the CLI is installed")
    plan.add_argument("--quiet", action="store_true", help="write the files, print nothing")
    plan.add_argument("--cwd", type=Path, help=argparse.SUPPRESS)
    plan.set_defaults(func=cmd_plan)

    for action, description in (
        ("preview", "the real `pulumi preview --diff` of a stack (the engine from `./run tools`)"),
        ("up", "the real `pulumi up` of a stack: create or update its objects in the cluster"),
        ("destroy", "the real `pulumi destroy` of a stack: delete everything it created"),
    ):
        engine = commands.add_parser(action, parents=[project], help=description)
        engine.add_argument("stack", help="stack name: Pulumi.<stack>.yaml")
        engine.add_argument("--json", action="store_true", help="print each resource's step as JSON instead")
        engine.set_defaults(func=cmd_engine)

    cluster = commands.add_parser(
        "cluster", parents=[project], help="run the one-machine cluster (API server, Seldon operator; --node for pods)"
    )
    cluster.add_argument("--crds", type=Path, default=CRD_DIR, help="apply these CRDs (default: %(default)s)")
    cluster.add_argument(
        "--namespace",
        action="append",
        default=["istio-system", "monitoring"],
        help="namespaces its installs would have made (default: istio-system, monitoring)",
    )
    cluster.add_argument(
        "--no-operator", dest="operator", action="store_false", help="do not run the Seldon operator beside it"
    )
    cluster.add_argument("--stack", default="dev", help="whose Seldon chart values set up the operator (default: dev)")
    cluster.add_argument(
        "--node", action="store_true", help="add a node that runs pods (containerd, kubelet, scheduler; needs root)"
    )
    cluster.add_argument(
        "--monitoring",
        action="store_true",
        help="with --node: prometheus-operator and the Prometheus it generates, as a pod (selects --stack's monitors)",
    )
    cluster.add_argument(
        "--up",
        action="store_true",
        help="with --node: serve --stack's models from pods: its registry over S3, its images pushed, then `up` of "
        "a copy pinned to them (your stack file is not edited)",
    )
    cluster.add_argument(
        "--images",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also a Docker engine (unless one runs) and a local OCI registry, which a --node pulls images from "
        "(default: on)",
    )
    cluster.add_argument("--registry-port", type=int, default=5001, help="the OCI registry's port (default 5001)")
    cluster.set_defaults(func=cmd_cluster)

    pin = commands.add_parser(
        "pin", parents=[project], help="resolve aliases in the registry and pin versions in the stack file"
    )
    pin.add_argument("stack", help="stack name: Pulumi.<stack>.yaml (its aliases are resolved and pinned)")
    pin.add_argument("--tracking-uri", help="registry to ask (default: the stack's registry.trackingUri)")
    pin.set_defaults(func=cmd_pin)

    serve = commands.add_parser(
        "serve", parents=[project], help="serve a model locally with the serving image's entrypoint (no Docker)"
    )
    serve.add_argument("model", help="models:/NAME@ALIAS, models:/NAME/VERSION, or a local MLflow model folder")
    serve.add_argument("--stack", default="dev", help="whose registry.trackingUri to use (default: dev)")
    serve.add_argument("--tracking-uri", help="the MLflow registry to download from")
    serve.add_argument("--name", help="model name in V2 paths (default: the registered model's name)")
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; the image listens on 0.0.0.0)"
    )
    serve.add_argument("--http-port", type=int, help=f"REST port (default {image.HTTP_PORT})")
    serve.add_argument("--grpc-port", type=int, help=f"gRPC port (default {image.GRPC_PORT})")
    serve.add_argument("--metrics-port", type=int, help=f"Prometheus metrics port (default {image.METRICS_PORT})")
    serve.add_argument(
        "--runtime",
        choices=[str(runtime) for runtime in Runtime],
        default=str(Runtime.MLSERVER),
        help="the server: MLServer (default) or BentoML (the BentoML image's entrypoint, REST and metrics on one "
        f"port, default {image.BENTOML_PORT}; BentoML from ML_SERVING_BENTOML_PYTHON or ~/.cache/ml-serving/bentoml)",
    )
    serve.set_defaults(func=cmd_serve)

    rollout = commands.add_parser(
        "rollout",
        parents=[project],
        help="move traffic to the challenger stage by stage, judged on Prometheus",
        epilog="exit codes: " + "; ".join(f"{int(code)} {meaning}" for code, meaning in EXIT_MEANINGS.items()),
    )
    rollout.add_argument("model", help="the model key in the stack file")
    rollout.add_argument("--stack", required=True, help="stack name: Pulumi.<stack>.yaml")
    rollout.add_argument("--prometheus", help="Prometheus URL (default: monitoring.prometheusUrl)")
    rollout.add_argument("--log", type=Path, help="JSON-lines log (default: rollouts/<stack>-<model>.jsonl)")
    mode = rollout.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="judge the current stage and print; write nothing")
    mode.add_argument("--step", action="store_true", help="apply one stage's edit and stop (for a pull request)")
    mode.add_argument("--resume", action="store_true", help="continue an interrupted rollout from the stack file")
    mode.add_argument(
        "--abort", action="store_true", help="roll back now (a running rollout is asked to stop and roll back)"
    )
    rollout.set_defaults(func=cmd_rollout)

    seed = commands.add_parser(
        "seed", parents=[project], help="register a small real model in the dev stack's local registry"
    )
    seed.add_argument("--stack", default="dev", help="whose registry.trackingUri to seed (default: dev)")
    seed.add_argument("--tracking-uri", help="seed this registry instead")
    seed.set_defaults(func=cmd_seed)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ml_serving.registry import RegistryError

    args = build_parser().parse_args(argv)
    if args.project_dir is not None:
        args.project_dir = args.project_dir.resolve()
    try:
        code = args.func(args)
    except (ConfigError, UsageError, RegistryError) as exc:
        errors.print("[bold red]error:[/]", escape(str(exc)))
        code = 2
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
