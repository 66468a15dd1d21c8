"""The `modelfleet` command. Tables for people, --json for scripts; every flag has a MODELFLEET_* variable."""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from modelfleet.client import ClusterError, ControllerClient
from modelfleet.config import (
    DEFAULT_CONTROLLER_PORT,
    DEFAULT_GATEWAY_PORT,
    DEFAULT_RUNNER_PORT_START,
    DEFAULT_WORKER_PORT,
    SecretFileError,
    default_store_url,
    resolve_token,
    split_controllers,
)

app = typer.Typer(help="modelfleet: one OpenAI-compatible endpoint in front of many machines.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys for inference (the store keeps only their hash).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
models_app = typer.Typer(help="Models the cluster serves (no subcommand); `models pull` downloads one ahead of time.")
app.add_typer(models_app, name="models")
cache_app = typer.Typer(help="The workers' model caches: list (no subcommand) and prune.")
app.add_typer(cache_app, name="cache")
store_app = typer.Typer(help="The cluster's store: accept it after it lost its state.", no_args_is_help=True)
app.add_typer(store_app, name="store")
# Piped output keeps whole rows (rich would wrap at 80 columns when not on a terminal).
console = Console() if sys.stdout.isatty() else Console(width=240)
err_console = Console(stderr=True)

ControllerOpt = Annotated[
    str, typer.Option("--controller", "-c", envvar="MODELFLEET_CONTROLLER", help="Controller URL(s), comma-separated.")
]
AdminTokenOpt = Annotated[
    str | None, typer.Option("--admin-token", envvar="MODELFLEET_ADMIN_TOKEN", help="Admin token of the cluster.")
]
# Files are the recommended way to give a token: a flag's value is readable by every user of
# the machine in /proc/PID/cmdline. Surrounding whitespace is stripped.
AdminTokenFileOpt = Annotated[
    str | None,
    typer.Option("--admin-token-file", envvar="MODELFLEET_ADMIN_TOKEN_FILE",
                 help="File holding the admin token (recommended over --admin-token)."),
]
JoinTokenOpt = Annotated[
    str | None, typer.Option("--join-token", envvar="MODELFLEET_JOIN_TOKEN", help="Join token of the cluster.")
]
JoinTokenFileOpt = Annotated[
    str | None,
    typer.Option("--join-token-file", envvar="MODELFLEET_JOIN_TOKEN_FILE",
                 help="File holding the join token (recommended over --join-token)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
DEFAULT_CONTROLLER = f"http://127.0.0.1:{DEFAULT_CONTROLLER_PORT}"


LogLevelOpt = Annotated[
    str, typer.Option("--log-level", envvar="MODELFLEET_LOG_LEVEL", help="debug, info, warning or error.")
]
LogFormatOpt = Annotated[
    str | None,
    typer.Option("--log-format", envvar="MODELFLEET_LOG_FORMAT",
                 help="text (one line per event) or json (one JSON object per line)."),
]


def setup_logging(role: str, level: str = "INFO", fmt: str | None = None) -> None:
    """One line per state change at INFO; third-party libraries only from WARNING (logs.py)."""
    from modelfleet.logs import setup_logging as setup

    try:
        setup(role, level, fmt)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def parse_kv(items: list[str] | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise typer.BadParameter(f"{what} must be key=value, got {item!r}")
        out[k] = v
    return out


def parse_param_value(v: str) -> Any:
    """--param n_ctx=2048 -> 2048; true/false -> bool; anything else stays a string."""
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def fail(msg: str) -> None:
    err_console.print(f"[red]error:[/red] {msg}")
    raise typer.Exit(1)


def token(value: str | None, path: str | None, what: str) -> str | None:
    """--X-token or --X-token-file (one of them); a bad file ends the command with one line."""
    try:
        return resolve_token(value, path, what)
    except SecretFileError as exc:
        fail(str(exc))
        raise  # unreachable: fail() exits


def client(controller: str, admin_token: str | None, admin_token_file: str | None = None) -> ControllerClient:
    return ControllerClient(split_controllers(controller), token(admin_token, admin_token_file, "admin"))


def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except ClusterError as exc:
        fail(str(exc))


def human_bytes(n: int | float | None) -> str:
    if not n:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*[("-" if v is None else str(v)) for v in r])
    console.print(table)


# --------------------------------------------------------------------------- roles
@app.command()
def controller(
    store: Annotated[str, typer.Option(envvar="MODELFLEET_STORE", help="Store URL.")] = "",
    host: Annotated[str, typer.Option(envvar="MODELFLEET_HOST")] = "0.0.0.0",
    port: Annotated[int, typer.Option(envvar="MODELFLEET_PORT")] = DEFAULT_CONTROLLER_PORT,
    admin_token: AdminTokenOpt = None,
    admin_token_file: AdminTokenFileOpt = None,
    join_token: JoinTokenOpt = None,
    join_token_file: JoinTokenFileOpt = None,
    heartbeat_interval: Annotated[float, typer.Option(envvar="MODELFLEET_HEARTBEAT_INTERVAL")] = 2.0,
    missed_heartbeats: Annotated[
        int, typer.Option(envvar="MODELFLEET_MISSED_HEARTBEATS", help="Dead after this many missed intervals.")
    ] = 3,
    lease_ttl: Annotated[float, typer.Option(envvar="MODELFLEET_LEASE_TTL")] = 10.0,
    grace: Annotated[
        float, typer.Option(envvar="MODELFLEET_RESCHEDULE_GRACE", help="Move replicas of a worker dead this long.")
    ] = 30.0,
    moves_per_minute: Annotated[int, typer.Option(envvar="MODELFLEET_MOVES_PER_MINUTE")] = 10,
    drain_timeout: Annotated[float, typer.Option(
        envvar="MODELFLEET_DRAIN_TIMEOUT", help="Stop a draining replica after this long even if not idle.")] = 30.0,
    load_report_ttl: Annotated[float, typer.Option(
        envvar="MODELFLEET_LOAD_REPORT_TTL", help="Seconds a gateway's load report counts.")] = 5.0,
    controller_id: Annotated[str, typer.Option(envvar="MODELFLEET_CONTROLLER_ID")] = "",
    catalog: Annotated[
        str | None, typer.Option(envvar="MODELFLEET_CATALOG", help="A catalog YAML file added to the built-in one.")
    ] = None,
    source_lookup_timeout: Annotated[
        float, typer.Option(envvar="MODELFLEET_SOURCE_LOOKUP_TIMEOUT", help="Seconds to ask a hub for a model's size.")
    ] = 5.0,
    allow_volatile_store: Annotated[
        bool, typer.Option("--allow-volatile-store", envvar="MODELFLEET_ALLOW_VOLATILE_STORE",
                           help="Run on a Redis with neither RDB snapshots nor AOF (a restart of it loses "
                                "every deployment and key).")
    ] = False,
    log_level: LogLevelOpt = "INFO",
    log_format: LogFormatOpt = None,
) -> None:
    """Run a controller: cluster state in a store, answers workers and gateways."""
    from modelfleet.catalog import CatalogError, load_catalog
    from modelfleet.controller.api import ControllerSettings, run_controller

    setup_logging("controller", log_level, log_format)
    try:
        load_catalog(catalog)
    except CatalogError as exc:
        raise SystemExit(f"modelfleet controller: {exc}") from None
    run_controller(
        ControllerSettings(
            store_url=store or default_store_url(), host=host, port=port,
            admin_token=token(admin_token, admin_token_file, "admin"),
            join_token=token(join_token, join_token_file, "join"), heartbeat_interval=heartbeat_interval,
            missed_heartbeats=missed_heartbeats,
            lease_ttl=lease_ttl, controller_id=controller_id, reschedule_grace=grace,
            moves_per_minute=moves_per_minute, catalog=catalog, source_lookup_timeout=source_lookup_timeout,
            allow_volatile_store=allow_volatile_store, drain_timeout=drain_timeout, load_report_ttl=load_report_ttl,
        )
    )


@app.command()
def worker(
    controller: ControllerOpt = DEFAULT_CONTROLLER,
    join_token: JoinTokenOpt = None,
    join_token_file: JoinTokenFileOpt = None,
    admin_token: AdminTokenOpt = None,
    admin_token_file: AdminTokenFileOpt = None,
    name: Annotated[str, typer.Option(envvar="MODELFLEET_WORKER_NAME", help="Unique worker name.")] = "",
    address: Annotated[
        str, typer.Option(envvar="MODELFLEET_ADDRESS", help="Address others use to reach this machine.")
    ] = "127.0.0.1",
    host: Annotated[str, typer.Option(envvar="MODELFLEET_HOST", help="Bind address.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(envvar="MODELFLEET_PORT")] = DEFAULT_WORKER_PORT,
    heartbeat_interval: Annotated[float, typer.Option(envvar="MODELFLEET_HEARTBEAT_INTERVAL")] = 2.0,
    model: Annotated[
        list[str] | None,
        typer.Option("--model", "-m", envvar="MODELFLEET_MODELS", help="NAME[=BACKEND:SOURCE], repeatable."),
    ] = None,
    label: Annotated[list[str] | None, typer.Option("--label", help="k=v, repeatable.")] = None,
    runner_port_start: Annotated[int, typer.Option(envvar="MODELFLEET_RUNNER_PORT_START")] = DEFAULT_RUNNER_PORT_START,
    startup_timeout: Annotated[float, typer.Option(envvar="MODELFLEET_STARTUP_TIMEOUT")] = 600.0,
    models_dir: Annotated[
        str | None,
        typer.Option(envvar="MODELFLEET_MODELS_DIR", help="Model cache for remote sources ($MODELFLEET_HOME/models)."),
    ] = None,
    log_level: LogLevelOpt = "INFO",
    log_format: LogFormatOpt = None,
    drain_timeout: Annotated[float, typer.Option(
        envvar="MODELFLEET_DRAIN_TIMEOUT",
        help="On SIGTERM: wait at most this long for gateways to finish with this worker's instances.")] = 30.0,
) -> None:
    """Run a worker agent: registers with a controller, runs model instances on this machine."""
    from pathlib import Path

    from modelfleet.worker.agent import WorkerSettings, run_worker

    setup_logging("worker", log_level, log_format)
    from modelfleet.worker.modelspec import parse_model_flag

    settings = WorkerSettings(
        controllers=split_controllers(controller), join_token=token(join_token, join_token_file, "join"),
        admin_token=token(admin_token, admin_token_file, "admin"), name=name,
        address=address, host=host, port=port, heartbeat_interval=heartbeat_interval, models=model or [],
        labels=parse_kv(label, "--label"), runner_port_start=runner_port_start, startup_timeout=startup_timeout,
        models_dir=Path(models_dir).expanduser().absolute() if models_dir else None,
        drain_timeout=drain_timeout,
    )
    try:
        for m in settings.models:
            parse_model_flag(m, settings.name)
    except ValueError as exc:
        raise SystemExit(f"modelfleet worker: {exc}") from None
    run_worker(settings)


@app.command()
def gateway(
    controller: ControllerOpt = DEFAULT_CONTROLLER,
    admin_token: AdminTokenOpt = None,
    admin_token_file: AdminTokenFileOpt = None,
    host: Annotated[str, typer.Option(envvar="MODELFLEET_HOST")] = "0.0.0.0",
    port: Annotated[int, typer.Option(envvar="MODELFLEET_PORT")] = DEFAULT_GATEWAY_PORT,
    snapshot_path: Annotated[
        str | None, typer.Option(envvar="MODELFLEET_SNAPSHOT_PATH", help="Route table snapshot file.")
    ] = None,
    max_body_bytes: Annotated[int, typer.Option(envvar="MODELFLEET_MAX_BODY_BYTES")] = 10 << 20,
    max_attempts: Annotated[int, typer.Option(envvar="MODELFLEET_MAX_ATTEMPTS")] = 3,
    retry_budget: Annotated[float, typer.Option(envvar="MODELFLEET_RETRY_BUDGET_S")] = 30.0,
    eject_after: Annotated[int, typer.Option(envvar="MODELFLEET_EJECT_AFTER")] = 3,
    eject_cooldown: Annotated[float, typer.Option(envvar="MODELFLEET_EJECT_COOLDOWN_S")] = 10.0,
    queue_len: Annotated[int, typer.Option(envvar="MODELFLEET_QUEUE_LEN")] = 100,
    queue_wait: Annotated[float, typer.Option(envvar="MODELFLEET_QUEUE_WAIT_S")] = 60.0,
    cold_start_wait: Annotated[float, typer.Option(
        envvar="MODELFLEET_COLD_START_WAIT_S",
        help="Hold a request for a model with no ready instance (starting, scaled to zero) this long.")] = 120.0,
    processes: Annotated[int, typer.Option(envvar="MODELFLEET_PROCESSES", help="Processes sharing the port.")] = 1,
    connect_timeout: Annotated[float, typer.Option(envvar="MODELFLEET_CONNECT_TIMEOUT_S")] = 2.0,
    header_timeout: Annotated[
        float, typer.Option(envvar="MODELFLEET_HEADER_TIMEOUT_S", help="Longest wait for an answer to start.")
    ] = 300.0,
    read_timeout: Annotated[float, typer.Option(envvar="MODELFLEET_READ_TIMEOUT_S")] = 300.0,
    send_timeout: Annotated[
        float, typer.Option(envvar="MODELFLEET_SEND_TIMEOUT_S", help="End a request whose client reads nothing.")
    ] = 30.0,
    client_header_timeout: Annotated[
        float, typer.Option(envvar="MODELFLEET_CLIENT_HEADER_TIMEOUT_S", help="Longest time to get request headers.")
    ] = 30.0,
    client_body_timeout: Annotated[
        float, typer.Option(envvar="MODELFLEET_CLIENT_BODY_TIMEOUT_S", help="Longest pause in a request body.")
    ] = 30.0,
    eject_cooldown_max: Annotated[float, typer.Option(envvar="MODELFLEET_EJECT_COOLDOWN_MAX_S")] = 300.0,
    affinity_slack: Annotated[int, typer.Option(envvar="MODELFLEET_AFFINITY_SLACK")] = 4,
    affinity_ratio: Annotated[float, typer.Option(envvar="MODELFLEET_AFFINITY_RATIO")] = 2.0,
    prefix_load_bound: Annotated[float, typer.Option(envvar="MODELFLEET_PREFIX_LOAD_BOUND")] = 1.25,
    prefix_load_slack: Annotated[int, typer.Option(envvar="MODELFLEET_PREFIX_LOAD_SLACK")] = 0,
    prefix_index_blocks: Annotated[int, typer.Option(envvar="MODELFLEET_PREFIX_INDEX_BLOCKS")] = 32768,
    prefix_ttl: Annotated[float, typer.Option(envvar="MODELFLEET_PREFIX_TTL_S")] = 600.0,
    poll_wait: Annotated[float, typer.Option(envvar="MODELFLEET_POLL_WAIT_S")] = 10.0,
    gateway_id: Annotated[str, typer.Option(envvar="MODELFLEET_GATEWAY_ID")] = "",
    shutdown_delay: Annotated[
        float, typer.Option(envvar="MODELFLEET_SHUTDOWN_DELAY_S", help="On SIGTERM: not ready, serving this long.")
    ] = 0.0,
    access_log: Annotated[
        bool, typer.Option("--access-log/--no-access-log", envvar="MODELFLEET_ACCESS_LOG",
                           help="One line per inference request (docs/operations.md).")
    ] = False,
    log_level: LogLevelOpt = "INFO",
    log_format: LogFormatOpt = None,
) -> None:
    """Run a gateway: the OpenAI-compatible front door, routing from its cached route table."""
    from modelfleet.gateway.app import run_gateway
    from modelfleet.gateway.settings import GatewaySettings

    setup_logging("gateway", log_level, log_format)
    run_gateway(
        GatewaySettings(
            controllers=split_controllers(controller), admin_token=token(admin_token, admin_token_file, "admin"),
            host=host, port=port,
            snapshot_path=snapshot_path, max_body_bytes=max_body_bytes, max_attempts=max_attempts,
            retry_budget_s=retry_budget, eject_after=eject_after, eject_cooldown_s=eject_cooldown,
            queue_len=queue_len, queue_wait_s=queue_wait, cold_start_wait_s=cold_start_wait, processes=processes,
            log_level=log_level.lower(),
            connect_timeout_s=connect_timeout, header_timeout_s=header_timeout, read_timeout_s=read_timeout,
            send_timeout_s=send_timeout, client_header_timeout_s=client_header_timeout,
            client_body_timeout_s=client_body_timeout,
            eject_cooldown_max_s=eject_cooldown_max, affinity_slack=affinity_slack, affinity_ratio=affinity_ratio,
            prefix_load_bound=prefix_load_bound, prefix_load_slack=prefix_load_slack,
            prefix_index_blocks=prefix_index_blocks, prefix_ttl_s=prefix_ttl,
            poll_wait_s=poll_wait, gateway_id=gateway_id, shutdown_delay_s=shutdown_delay,
            access_log=access_log, log_format=log_format or "",
        )
    )


@app.command()
def up(
    home: Annotated[str | None, typer.Option(envvar="MODELFLEET_HOME", help="State, logs, snapshot.")] = None,
    gateway_port: Annotated[int, typer.Option(envvar="MODELFLEET_GATEWAY_PORT")] = DEFAULT_GATEWAY_PORT,
    controller_port: Annotated[int, typer.Option(envvar="MODELFLEET_CONTROLLER_PORT")] = DEFAULT_CONTROLLER_PORT,
    worker_port: Annotated[int, typer.Option(envvar="MODELFLEET_WORKER_PORT")] = DEFAULT_WORKER_PORT,
    runner_port_start: Annotated[int, typer.Option(envvar="MODELFLEET_RUNNER_PORT_START")] = DEFAULT_RUNNER_PORT_START,
    no_models: Annotated[bool, typer.Option("--no-models", help="Do not deploy the bundled models.")] = False,
    access_log: Annotated[
        bool, typer.Option("--access-log/--no-access-log", envvar="MODELFLEET_ACCESS_LOG",
                           help="The gateway logs one line per request (in logs/gateway.log).")
    ] = False,
    log_level: LogLevelOpt = "INFO",
    log_format: LogFormatOpt = None,
) -> None:
    """A whole cluster on this machine: controller (SQLite), worker, gateway, the bundled models."""
    from modelfleet.up import UpSettings, run_up

    # Its roles inherit level and format through the environment (logs.setup_logging exports them).
    setup_logging("up", log_level, log_format)
    raise typer.Exit(run_up(UpSettings(
        home=home, gateway_port=gateway_port, controller_port=controller_port, worker_port=worker_port,
        runner_port_start=runner_port_start, deploy_bundled=not no_models, access_log=access_log,
    )))


# --------------------------------------------------------------------------- deployments
def infer_backend(source: str) -> str | None:
    """The backend a source obviously means: a bundled model's own, llama.cpp for a GGUF file or
    quantization; None when only the user can say."""
    from modelfleet.bundled import BUNDLED
    from modelfleet.sources import SourceError, parse_source

    if source in BUNDLED:
        return BUNDLED[source].backend
    try:
        src = parse_source(source)
    except SourceError:
        return None
    path = (src.file or src.url) if src is not None else source
    if (src is not None and src.quant) or (path or "").lower().endswith(".gguf"):
        return "llama.cpp"
    return None


@app.command()
def deploy(
    name: Annotated[str, typer.Argument(help="The model name clients send (or a catalog entry name).")],
    model: Annotated[
        str | None,
        typer.Option("--model", help="Source: a path, a bundled name, hf://ORG/REPO:QUANT, hf://ORG/REPO/FILE@REV, "
                                     "modelscope://… (the same), https://…#sha256=…, or a URL (openai). "
                                     "Default: the catalog entry NAME."),
    ] = None,
    backend: Annotated[
        str | None,
        typer.Option(help="llama.cpp, sentence-transformers, transformers, vllm, openai (default: from the catalog "
                          "or the source)"),
    ] = None,
    quant: Annotated[str | None, typer.Option(help="GGUF quantization to pick in a repository, e.g. Q4_K_M.")] = None,
    catalog: Annotated[str | None, typer.Option(help="Deploy this catalog entry under NAME.")] = None,
    replicas: int = 1,
    max_concurrency: Annotated[int, typer.Option(help="Requests one instance serves at once.")] = 4,
    gpus: Annotated[int, typer.Option(help="GPUs per replica.")] = 0,
    gpu_memory: Annotated[float, typer.Option(help="GiB of GPU memory per replica (0 = estimate).")] = 0,
    memory: Annotated[float, typer.Option(help="GiB of RAM per replica (0 = estimate).")] = 0,
    label: Annotated[list[str] | None, typer.Option("--label", help="Only on workers with k=v.")] = None,
    param: Annotated[list[str] | None, typer.Option("--param", help="Backend parameter k=v.")] = None,
    policy: Annotated[str, typer.Option(help="spread or binpack")] = "spread",
    weight: int = 100,
    routing: Annotated[str, typer.Option(help="How gateways pick a replica: prefix (where the prompt's prefix is "
                                              "cached, within a load bound), p2c (least busy of two), auto "
                                              "(p2c for now: docs/gateway.md).")] = "auto",
    min_replicas: Annotated[int | None, typer.Option(help="Autoscale: fewest replicas (0: scale to zero).")] = None,
    max_replicas: Annotated[int | None, typer.Option(help="Autoscale: most replicas.")] = None,
    target_ongoing: Annotated[
        float | None, typer.Option(help="Autoscale: requests in flight + queued per replica to aim for.")] = None,
    idle_after: Annotated[
        float | None, typer.Option(help="Autoscale with --min-replicas 0: stop after this many idle seconds.")] = None,
    up_delay: Annotated[float | None, typer.Option(help="Autoscale: seconds of steady advice before adding.")] = None,
    down_delay: Annotated[
        float | None, typer.Option(help="Autoscale: seconds of steady advice before removing.")] = None,
    controller: ControllerOpt = DEFAULT_CONTROLLER, admin_token: AdminTokenOpt = None,
    admin_token_file: AdminTokenFileOpt = None, as_json: JsonOpt = False,
) -> None:
    """Deploy a model: N replicas placed on workers that fit, kept running by the reconciler. A remote
    source is downloaded once per worker into its model cache (`modelfleet instances` shows the progress).
    Any of --min-replicas, --max-replicas, --target-ongoing, --idle-after turns autoscaling on."""
    from modelfleet.sources import SourceError, with_quant

    body: dict[str, Any] = {
        "name": name, "replicas": replicas, "max_concurrency": max_concurrency, "weight": weight,
        "routing": routing,
        "params": {k: parse_param_value(v) for k, v in parse_kv(param, "--param").items()},
        "placement": {"labels": parse_kv(label, "--label"), "gpus": gpus, "gpu_memory": int(gpu_memory * (1 << 30)),
                      "memory": int(memory * (1 << 30)), "policy": policy},
    }
    policy_body = autoscale_body(min_replicas, max_replicas, target_ongoing, idle_after, up_delay, down_delay)
    if policy_body is not None:
        body["autoscale"] = policy_body
    if catalog:
        body["catalog"] = catalog
    if model:
        try:
            body["source"] = with_quant(model, quant) if quant else model
        except SourceError as exc:
            fail(str(exc))
        backend = backend or infer_backend(model)
        if backend is None and not catalog and not model.startswith(("hf://", "modelscope://")):
            # A hub repository's files tell the controller which backend it needs; a path does not.
            fail(f"which backend runs {model}? give --backend (llama.cpp, sentence-transformers, transformers, vllm, "
                 "openai)")
    elif quant:
        fail("--quant needs --model (a hf:// or modelscope:// repository)")
    if backend:
        body["backend"] = backend  # left out: the catalog entry's backend
    data = call(client(controller, admin_token, admin_token_file).request, "POST", "/v1/cluster/deployments", json=body)
    if as_json:
        print(json.dumps(data, indent=2))
        return
    size = f"; size {human_bytes(data['model_bytes'])} ({data['model_bytes_from']})" if data.get("model_bytes") else (
        f"; size {data['model_bytes_from']}" if data.get("model_bytes_from") else "")
    console.print(f"deployed [bold]{name}[/bold]: {data['backend']} {data['source']}, {data['replicas']} "
                  f"replica(s){size}")


@app.command()
def attach(
    name: str,
    url: Annotated[str, typer.Option(help="Base URL of an OpenAI-compatible server (…/v1 or without).")],
    max_concurrency: int = 8,
    controller: ControllerOpt = DEFAULT_CONTROLLER, admin_token: AdminTokenOpt = None,
    admin_token_file: AdminTokenFileOpt = None,
) -> None:
    """Serve an external OpenAI-compatible server (vLLM, Ollama, llama.cpp, TGI) as model NAME."""
    body = {"name": name, "backend": "openai", "source": url, "replicas": 1, "max_concurrency": max_concurrency}
    call(client(controller, admin_token, admin_token_file).request, "POST", "/v1/cluster/deployments", json=body)
    console.print(f"attached [bold]{name}[/bold] -> {url}")


def autoscale_body(min_replicas: int | None, max_replicas: int | None, target_ongoing: float | None,
                   idle_after: float | None, up_delay: float | None, down_delay: float | None) -> dict[str, Any] | None:
    """The autoscale policy from CLI flags (None: none given); the controller validates it."""
    given = {"min_replicas": min_replicas, "max_replicas": max_replicas, "target_ongoing": target_ongoing,
             "idle_after_s": idle_after, "up_delay_s": up_delay, "down_delay_s": down_delay}
    body = {k: v for k, v in given.items() if v is not None}
    return body or None


@app.command()
def scale(
    name: str,
    replicas: Annotated[int | None, typer.Argument(help="A fixed count (turns autoscaling off).")] = None,
    auto: Annotated[bool, typer.Option("--auto", help="Autoscale, with the policy flags below.")] = False,
    min_replicas: Annotated[int | None, typer.Option(help="Autoscale: fewest replicas (0: scale to zero).")] = None,
    max_replicas: Annotated[int | None, typer.Option(help="Autoscale: most replicas.")] = None,
    target_ongoing: Annotated[float | None, typer.Option(help="Autoscale: requests per replica to aim for.")] = None,
    idle_after: Annotated[float | None, typer.Option(help="Autoscale: stop after this many idle seconds.")] = None,
    up_delay: Annotated[float | None, typer.Option(help="Autoscale: seconds before adding.")] = None,
    down_delay: Annotated[float | None, typer.Option(help="Autoscale: seconds before removing.")] = None,
    controller: ControllerOpt = DEFAULT_CONTROLLER,
    admin_token: AdminTokenOpt = None, admin_token_file: AdminTokenFileOpt = None,
) -> None:
    """Change the number of replicas of a deployment (N), or let them follow the load (--auto)."""
    policy_body = autoscale_body(min_replicas, max_replicas, target_ongoing, idle_after, up_delay, down_delay)
    if auto == (replicas is not None):
        fail("give either a replica count or --auto")
    if not auto and policy_body is not None:
        fail("the policy flags go with --auto")
    body: dict[str, Any] = {"autoscale": policy_body or {}} if auto else {"replicas": replicas, "autoscale": None}
    data = call(client(controller, admin_token, admin_token_file).request, "PATCH",
                f"/v1/cluster/deployments/{name}", json=body)
    if auto:
        p = data.get("autoscale") or {}
        console.print(f"[bold]{name}[/bold] autoscaled: {p.get('min_replicas')}..{p.get('max_replicas')} replicas, "
                      f"target {p.get('target_ongoing')} requests each; now {data.get('replicas')}")
    else:
        console.print(f"scaled [bold]{name}[/bold] to {replicas} replica(s)")


@app.command()
def undeploy(name: str, controller: ControllerOpt = DEFAULT_CONTROLLER, admin_token: AdminTokenOpt = None,
             admin_token_file: AdminTokenFileOpt = None) -> None:
    """Delete a deployment; its replicas are stopped."""
    call(client(controller, admin_token, admin_token_file).request, "DELETE", f"/v1/cluster/deployments/{name}")
    console.print(f"undeployed [bold]{name}[/bold]")


@app.command()
def drain(instance: str, controller: ControllerOpt = DEFAULT_CONTROLLER, admin_token: AdminTokenOpt = None,
          admin_token_file: AdminTokenFileOpt = None) -> None:
    """Stop sending new requests to an instance; it is stopped once its in-flight requests had time to finish."""
    c = client(controller, admin_token, admin_token_file)
    call(c.request, "POST", f"/v1/cluster/instances/{instance}/drain")
    console.print(f"draining [bold]{instance}[/bold]")


@app.command()
def chat(
    model: str,
    gateway: Annotated[str, typer.Option(envvar="MODELFLEET_GATEWAY")] = f"http://127.0.0.1:{DEFAULT_GATEWAY_PORT}",
    api_key: Annotated[str | None, typer.Option(envvar="MODELFLEET_API_KEY")] = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    max_tokens: int = 256,
) -> None:
    """Talk to MODEL through the gateway; replies stream as they are generated. Ctrl-D ends."""
    from modelfleet.chat import run_chat

    raise typer.Exit(run_chat(gateway, model, api_key=api_key, system=system, max_tokens=max_tokens))


# --------------------------------------------------------------------------- reads
@app.command()
def workers(controller: ControllerOpt = DEFAULT_CONTROLLER, admin_token: AdminTokenOpt = None,
            admin_token_file: AdminTokenFileOpt = None, as_json: JsonOpt = False) -> None:
    """Workers with their resources, heartbeat age and health."""
    data = call(client(controller, admin_token, admin_token_file).get, "/v1/cluster/workers")["data"]
    if as_json:
        print(json.dumps(data, indent=2))
        return
    rows = []
    for w in data:
        r = w["resources"]
        gpus = ", ".join(f"{g['index']}:{g['name']} {human_bytes(g['memory_free'])}/{human_bytes(g['memory_total'])}"
                         for g in r.get("gpus", [])) or "-"
        cache = f"{len(r.get('cached_models') or [])} models, {human_bytes(r.get('disk_free'))} free"
        rows.append([w["name"], f"{w['address']}:{w['port']}", "alive" if w["alive"] else "DEAD",
                     f"{w['heartbeat_age']:.1f}s", r["cpu_cores"],
                     f"{human_bytes(r['memory_free'])}/{human_bytes(r['memory_total'])}", gpus, w["instances"],
                     cache, ",".join(f"{k}={v}" for k, v in w.get("labels", {}).items()) or "-"])
    print_table("workers", ["name", "address", "health", "heartbeat", "cpus", "memory free/total", "gpus",
                            "instances", "model cache", "labels"], rows)


@app.command()
def instances(
    controller: ControllerOpt = DEFAULT_CONTROLLER, admin_token: AdminTokenOpt = None,
    admin_token_file: AdminTokenFileOpt = None, as_json: JsonOpt = False,
    model: Annotated[str | None, typer.Option(help="Only this model.")] = None,
    worker: Annotated[str | None, typer.Option(help="Only this worker.")] = None,
    logs: Annotated[str | None, typer.Option("--logs", help="Print the last log lines of this instance.")] = None,
    lines: Annotated[int, typer.Option(help="How many log lines.")] = 50,
    request: Annotated[
        str | None, typer.Option("--request", help="With --logs: only the lines of this request id (X-Request-ID).")
    ] = None,
) -> None:
    """Model instances: state, worker, endpoint, restarts, last error (or --logs ID)."""
    c = client(controller, admin_token, admin_token_file)
    if request and not logs:
        fail("--request needs --logs INSTANCE")
    if logs:
        params: dict[str, Any] = {"lines": lines}
        if request:
            params["request"] = request
        data = call(c.get, f"/v1/cluster/instances/{logs}/logs", **params)
        if as_json:
            print(json.dumps(data, indent=2))
        else:
            for line in data["lines"]:
                print(line)
        return
    data = call(c.get, "/v1/cluster/instances", model=model, worker=worker)["data"]
    if as_json:
        print(json.dumps(data, indent=2))
        return
    rows = []
    for i in data:
        state = i["state"] if i["enabled"] or i["state"] != "ready" else "ready (disabled)"
        if i.get("download") and i["state"] == "downloading":
            state = f"downloading {download_text(i['download'])}"
        why = i.get("last_error") or i.get("pending_reason") or ""
        rows.append([i["id"], i["model"], i["backend"], state, i["worker_id"], i["endpoint"], i["restarts"],
                     why.splitlines()[0][:80] if why else None])
    print_table("instances", ["id", "model", "backend", "state", "worker", "endpoint", "restarts", "last error"], rows)


@models_app.callback(invoke_without_command=True)
def models(ctx: typer.Context, controller: ControllerOpt = DEFAULT_CONTROLLER, admin_token: AdminTokenOpt = None,
           admin_token_file: AdminTokenFileOpt = None, as_json: JsonOpt = False) -> None:
    """Models the cluster serves, with ready replicas."""
    if ctx.invoked_subcommand is not None:
        return
    data = call(client(controller, admin_token, admin_token_file).get, "/v1/cluster/models")["data"]
    if as_json:
        print(json.dumps(data, indent=2))
        return
    print_table("models", ["model", "backend", "ready", "instances", "replicas wanted", "autoscale",
                           "last decision", "deployed", "error"],
                [[m["name"], m["backend"], m["ready"], m["instances"], m["replicas"],
                  autoscale_text(m.get("autoscale")), decision_text(m.get("last_decision")), m["deployed"],
                  (m.get("error") or "")[:120] or None] for m in data])


def autoscale_text(p: dict[str, Any] | None) -> str | None:
    if not p:
        return None
    zero = f", idle {p['idle_after_s']:g} s" if p.get("min_replicas") == 0 else ""
    return f"{p['min_replicas']}..{p['max_replicas']} @ {p['target_ongoing']:g}{zero}"


def decision_text(d: dict[str, Any] | None) -> str | None:
    if not d:
        return None
    ago = max(0.0, time.time() - float(d.get("at") or 0))
    return f"{d['desired']} ({ago:.0f} s ago): {d.get('reason', '')}"[:160]


def download_text(d: dict[str, Any]) -> str:
    """'45% of 94.0 MiB, 7.5 MiB/s, 7 s left' from a download's progress."""
    done, total = d.get("done") or 0, d.get("total")
    if d.get("state") == "resolving":
        return "(asking the hub)"
    parts = [f"{100 * done / total:.0f}% of {human_bytes(total)}" if total else human_bytes(done)]
    if d.get("rate"):
        parts.append(f"{human_bytes(d['rate'])}/s")
    if d.get("eta_s") is not None:
        parts.append(f"{d['eta_s']:.0f} s left")
    return "(" + ", ".join(parts) + ")"


def target_workers(c: ControllerClient, names: list[str] | None, all_workers: bool) -> list[str]:
    if names:
        return names
    if not all_workers:
        fail("name the worker(s) with --worker W (repeatable), or use --all-workers")
    alive = [w["id"] for w in call(c.get, "/v1/cluster/workers")["data"] if w.get("alive")]
    if not alive:
        fail("no worker is alive")
    return alive


WorkerOpt = Annotated[list[str] | None, typer.Option("--worker", "-w", help="Worker id, repeatable.")]
AllWorkersOpt = Annotated[bool, typer.Option("--all-workers", help="Every alive worker.")]


@models_app.command("pull")
def models_pull(
    source: Annotated[str, typer.Argument(help="hf://…, modelscope://… or https://… (or a catalog entry name).")],
    worker: WorkerOpt = None, all_workers: AllWorkersOpt = False,
    backend: Annotated[str | None, typer.Option(help="Decides which files a repository means (llama.cpp: one GGUF).")
                       ] = None,
    quant: Annotated[str | None, typer.Option(help="GGUF quantization to pick, e.g. Q4_K_M.")] = None,
    wait: Annotated[bool, typer.Option(help="Show progress until done (--no-wait: start and return).")] = True,
    controller: ControllerOpt = DEFAULT_CONTROLLER, admin_token: AdminTokenOpt = None,
    admin_token_file: AdminTokenFileOpt = None, as_json: JsonOpt = False,
) -> None:
    """Download a model into workers' caches ahead of time (placement then prefers them)."""
    import time

    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    from modelfleet.sources import SourceError, is_remote, with_quant

    c = client(controller, admin_token, admin_token_file)
    if not is_remote(source):
        entry = next((e for e in call(c.get, "/v1/cluster/catalog")["data"] if e["name"] == source), None)
        if entry is None or not is_remote(entry["source"]):
            fail(f"{source!r} is neither a remote source nor a catalog entry with one")
        source, backend = entry["source"], backend or entry["backend"]
    try:
        source = with_quant(source, quant) if quant else source
    except SourceError as exc:
        fail(str(exc))
    started: dict[str, dict[str, Any]] = {}
    for w in target_workers(c, worker, all_workers):
        started[w] = call(c.request, "POST", f"/v1/cluster/workers/{w}/models/pull",
                          json={"source": source, "backend": backend})["download"]
    if not wait:
        if as_json:
            print(json.dumps(started, indent=2))
        else:
            for w, d in started.items():
                console.print(f"{w}: pulling {d['source']}")
        return
    final: dict[str, dict[str, Any]] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=err_console, disable=as_json, transient=False) as bar:
        tasks = {w: bar.add_task(f"{w}: {d['source']}", total=None) for w, d in started.items()}
        while len(final) < len(started):
            for w, d0 in started.items():
                if w in final:
                    continue
                rows = call(c.get, f"/v1/cluster/workers/{w}/models/downloads")["data"]
                d = next((r for r in rows if r["source"] == d0["source"] and r.get("backend") == d0.get("backend")),
                         None)
                if d is None:
                    continue
                bar.update(tasks[w], completed=d["done"], total=d["total"])
                if d["state"] in ("done", "failed"):
                    final[w] = d
            time.sleep(0.5)
    if as_json:
        print(json.dumps(final, indent=2))
    failed = {w: d for w, d in final.items() if d["state"] == "failed"}
    if not as_json:
        for w, d in final.items():
            if d["state"] == "done":
                size = human_bytes(d["total"] or d["done"])
                console.print(f"{w}: {d['source']} is in the cache ({size}) at {d['path']}")
            else:
                err_console.print(f"[red]{w}: {d['error']}[/red]")
    if failed:
        raise typer.Exit(1)


@cache_app.callback(invoke_without_command=True)
def cache(
    ctx: typer.Context, worker: WorkerOpt = None,
    controller: ControllerOpt = DEFAULT_CONTROLLER, admin_token: AdminTokenOpt = None,
    admin_token_file: AdminTokenFileOpt = None, as_json: JsonOpt = False,
) -> None:
    """Models in the workers' caches (every alive worker unless --worker), with size and use."""
    if ctx.invoked_subcommand is not None:
        return
    c = client(controller, admin_token, admin_token_file)
    out = {w: call(c.get, f"/v1/cluster/workers/{w}/models/cache") for w in target_workers(c, worker, True)}
    if as_json:
        print(json.dumps(out, indent=2))
        return
    rows = []
    for w, data in out.items():
        for e in data["data"]:
            rows.append([w, e["source"], human_bytes(e["bytes"]), e["files"],
                         "in use" if e["in_use"] else ("complete" if e["complete"] else "INCOMPLETE"),
                         time_ago(e["last_used"]), e["path"]])
        for d in data.get("downloads", []):
            rows.append([w, d["source"], human_bytes(d["done"]), d["files"], f"downloading {download_text(d)}", "-",
                         "-"])
    print_table("model cache", ["worker", "source", "size", "files", "state", "last used", "path"], rows)
    for w, data in out.items():
        console.print(f"{w}: {data['dir']}, {human_bytes(data['disk_free'])} free")


@cache_app.command("prune")
def cache_prune(
    worker: WorkerOpt = None, all_workers: AllWorkersOpt = False,
    source: Annotated[str | None, typer.Option(help="Only this source (default: every one no instance uses).")] = None,
    controller: ControllerOpt = DEFAULT_CONTROLLER, admin_token: AdminTokenOpt = None,
    admin_token_file: AdminTokenFileOpt = None, as_json: JsonOpt = False,
) -> None:
    """Delete cached models no instance on that worker uses (and unfinished downloads)."""
    c = client(controller, admin_token, admin_token_file)
    out = {w: call(c.request, "POST", f"/v1/cluster/workers/{w}/models/cache/prune", json={"source": source})
           for w in target_workers(c, worker, all_workers)}
    if as_json:
        print(json.dumps(out, indent=2))
        return
    for w, r in out.items():
        freed = human_bytes(r["freed"]) if r["freed"] else "0 B"
        console.print(f"{w}: removed {len(r['removed'])} item(s), freed {freed}")
        for item in r["removed"]:
            console.print(f"  {item}")


@app.command("catalog")
def catalog_list(controller: ControllerOpt = DEFAULT_CONTROLLER, admin_token: AdminTokenOpt = None,
                 admin_token_file: AdminTokenFileOpt = None, as_json: JsonOpt = False) -> None:
    """Models known to work with each backend: `modelfleet deploy NAME` deploys one."""
    data = call(client(controller, admin_token, admin_token_file).get, "/v1/cluster/catalog")["data"]
    if as_json:
        print(json.dumps(data, indent=2))
        return
    print_table("catalog", ["name", "kind", "backend", "source", "size", "memory", "gpu memory", "from"],
                [[e["name"], e["kind"], e["backend"], e["source"], human_bytes(e["size"]), human_bytes(e["memory"]),
                  human_bytes(e["gpu_memory"]), e["origin"]] for e in data])


def time_ago(epoch: float | None) -> str:
    import time

    if not epoch:
        return "-"
    s = max(0.0, time.time() - epoch)
    return f"{s:.0f} s ago" if s < 120 else f"{s / 60:.0f} min ago" if s < 7200 else f"{s / 3600:.0f} h ago"


# --------------------------------------------------------------------------- keys
@keys_app.command("create")
def keys_create(name: str, controller: ControllerOpt = DEFAULT_CONTROLLER, admin_token: AdminTokenOpt = None,
                admin_token_file: AdminTokenFileOpt = None, as_json: JsonOpt = False) -> None:
    """Create an API key. The key is printed once; the store keeps only its hash."""
    c = client(controller, admin_token, admin_token_file)
    data = call(c.request, "POST", "/v1/cluster/keys", json={"name": name})
    if as_json:
        print(json.dumps(data, indent=2))
        return
    console.print(f"created key [bold]{data['id']}[/bold] ({data['name']}). Save it now; it is not shown again:")
    print(data["key"])


@keys_app.command("list")
def keys_list(controller: ControllerOpt = DEFAULT_CONTROLLER, admin_token: AdminTokenOpt = None,
              admin_token_file: AdminTokenFileOpt = None, as_json: JsonOpt = False) -> None:
    """List API keys (ids and names, never secrets)."""
    data = call(client(controller, admin_token, admin_token_file).get, "/v1/cluster/keys")["data"]
    if as_json:
        print(json.dumps(data, indent=2))
        return
    print_table("api keys", ["id", "name", "revoked"], [[k["id"], k["name"], k["revoked"]] for k in data])


@keys_app.command("revoke")
def keys_revoke(key_id: str, controller: ControllerOpt = DEFAULT_CONTROLLER,
                admin_token: AdminTokenOpt = None, admin_token_file: AdminTokenFileOpt = None) -> None:
    """Revoke an API key: every gateway refuses it after its next route refresh."""
    call(client(controller, admin_token, admin_token_file).request, "DELETE", f"/v1/cluster/keys/{key_id}")
    console.print(f"revoked {key_id}")


@keys_app.command("open")
def keys_open(controller: ControllerOpt = DEFAULT_CONTROLLER, admin_token: AdminTokenOpt = None,
              admin_token_file: AdminTokenFileOpt = None) -> None:
    """Let inference run WITHOUT an API key again (refused while a key is not revoked).

    Once a key was created, inference needs one even when every key is revoked or the key
    table is lost: opening it is this explicit act, logged by the controller."""
    call(client(controller, admin_token, admin_token_file).request, "POST", "/v1/cluster/keys/open")
    console.print("inference is OPEN: gateways serve requests without an API key after their next refresh")


@store_app.command("accept")
def store_accept(
    controller: ControllerOpt = DEFAULT_CONTROLLER, admin_token: AdminTokenOpt = None,
    admin_token_file: AdminTokenFileOpt = None, as_json: JsonOpt = False,
    replaces: Annotated[str | None, typer.Option(
        help="Cluster id the gateways still serve (their log names it), when no running controller knows it.")
    ] = None,
) -> None:
    """Serve the store as it is now, after it lost its state (controllers refuse it until then).

    Deployments and keys it lost are gone: deploy again. Gateways take the new store's tables;
    API keys stay required if they were."""
    params = {"replaces": replaces} if replaces else None
    data = call(client(controller, admin_token, admin_token_file).request, "POST", "/v1/cluster/store/accept",
                params=params)
    if as_json:
        print(json.dumps(data, indent=2))
    elif data["accepted"]:
        console.print(f"accepted: cluster {data['cluster_id']} replaces {', '.join(data['replaces'])} "
                      f"(auth {data['auth']})")
    else:
        console.print(f"nothing to accept: the store shows cluster {data['cluster_id']}")


def main() -> None:
    # No HF_HUB_OFFLINE default here: runners are always offline (runners/base.offline_env), and
    # an hf:// source is fetched by the worker because a deployment asked for it. An operator's
    # own HF_HUB_OFFLINE=1 is honoured: such a worker fetches nothing from the Hub.
    app()


if __name__ == "__main__":
    main()
