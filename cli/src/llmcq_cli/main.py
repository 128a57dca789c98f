"""The ``llmcq`` command.

``--help``, ``plugins`` and ``validate`` never import torch; ``run`` imports it when it
starts. User errors (bad config, missing files, outputs in the way) print one message and
exit with code 2 (1 for bad data or a failing plugin); never a traceback, unless ``--debug``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import click

from llmcq import __version__

__all__ = ["cli"]

GROUP_LABELS = {
    "llmcq.algorithms": "algorithm",
    "llmcq.models": "model",
    "llmcq.backends": "backend",
    "llmcq.datasets": "dataset",
    "llmcq.evaluators": "evaluator",
    "llmcq.hooks": "hooks",
}


def _fail(exc: BaseException, debug: bool) -> None:
    from llmcq.errors import LlmcqError, PluginError

    if debug:
        traceback.print_exception(exc)
    msg = f"error: {exc}"
    if isinstance(exc, PluginError) and not debug:
        msg += "\n(run with --debug or LLMCQ_DEBUG=1 for the traceback)"
    click.echo(msg, err=True)
    sys.exit(exc.exit_code if isinstance(exc, LlmcqError) else 1)


def _guard(fn: Callable[[], Any], debug: bool) -> Any:
    from llmcq.errors import LlmcqError

    try:
        return fn()
    except LlmcqError as exc:
        _fail(exc, debug)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="llmcq")
def cli() -> None:
    """llmcq: compress large language models after training (quantize, prune, evaluate,
    export), with algorithms, model families and backends as plugins."""


_set_option = click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
                           help="Override a config value (YAML-parsed), e.g. "
                                "--set quant.weight.bit=3. Repeatable.")
_debug_option = click.option("--debug", is_flag=True, default=False,
                             help="Show tracebacks for errors.")


def _debug(flag: bool) -> bool:
    return flag or os.environ.get("LLMCQ_DEBUG", "") not in ("", "0")


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@_set_option
@click.option("--overwrite", is_flag=True, help="Replace existing outputs under save_path.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bars (default: when stderr is a terminal).")
@_debug_option
def run(config: str, overrides: tuple[str, ...], overwrite: bool, progress: bool | None,
        debug: bool) -> None:
    """Run CONFIG (llmc-style YAML): evaluate, calibrate, quantize, export.

    Writes <save.save_path>/results.json with perplexities, stage timings, peak memory,
    the resolved config and package versions.
    """
    from llmcq.config.loader import RESULTS_FILE, load_config

    debug = _debug(debug)
    resolved = _guard(lambda: load_config(config, overrides, overwrite=overwrite), debug)
    logging.basicConfig(level=logging.INFO, format="llmcq: %(message)s", stream=sys.stderr)
    for note in resolved.notes:
        click.echo(f"note: {note}", err=True)
    if progress is None:
        progress = sys.stderr.isatty()

    main_rank = True

    def go() -> dict[str, Any]:
        nonlocal main_rank
        from llmcq import dist
        from llmcq.pipeline.runner import run as run_pipeline

        # under torchrun: data-parallel calibration, one rank per GPU (llmcq.dist)
        if dist.init_from_env() and not dist.is_main():
            main_rank = False
            logging.getLogger("llmcq").setLevel(logging.WARNING)
        try:
            return run_pipeline(resolved, progress=progress and main_rank)
        finally:
            dist.shutdown()

    try:
        results = _guard(go, debug)
    except KeyboardInterrupt:
        click.echo("interrupted; no partial outputs were left in place", err=True)
        sys.exit(130)
    if not main_rank:
        return  # rank 0 evaluates, exports and reports
    for position, table in results["eval"].items():
        for dataset, entry in table.items():
            if "ppl" in entry:
                click.echo(f"{position:12s} {dataset:12s} ppl {entry['ppl']:.4f} "
                           f"({entry.get('windows')} x {entry.get('seq_len')} tokens)")
    click.echo(f"results: {resolved.save_dir / RESULTS_FILE}")


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@_set_option
@click.option("--overwrite", is_flag=True, help="Do not complain about existing outputs.")
@_debug_option
def validate(config: str, overrides: tuple[str, ...], overwrite: bool, debug: bool) -> None:
    """Validate CONFIG without loading a model: keys, values, plugins, files, outputs."""
    from llmcq.config.loader import load_config

    resolved = _guard(lambda: load_config(config, overrides, overwrite=overwrite),
                      _debug(debug))
    cfg = resolved.config
    click.echo(f"model:   {resolved.source.display} (adapter {resolved.model[0].name})")
    for step in resolved.steps:
        click.echo(f"{step.section}:   {step.spec.name} ({step.info.label})")
    if cfg.quant is not None and cfg.quant.weight is not None:
        from llmcq.quant.spec import ActQuantSpec, WeightQuantSpec

        text = WeightQuantSpec.from_section(cfg.quant.weight).describe()
        if cfg.quant.act is not None:
            text += ", " + ActQuantSpec.from_section(cfg.quant.act).describe()
        click.echo(f"grid:    {text}")
    if resolved.calib is not None and cfg.calib is not None:
        click.echo(f"calib:   {resolved.calib[0].name} {cfg.calib.path} ({cfg.calib.n_samples} x "
                   f"{cfg.calib.seq_len}, {cfg.calib.preproc}, seed {cfg.calib.seed})")
    for ev in resolved.evals:
        e = cfg.eval[ev.index]
        names = ", ".join(d[0].name for d in ev.datasets)
        click.echo(f"eval:    {ev.evaluator.name} on {names} at {', '.join(e.eval_pos)} "
                   f"(seq_len {e.seq_len})")
    for b in resolved.backends:
        click.echo(f"export:  {b.name} -> {resolved.save_dir / b.folder}")
    for note in resolved.notes:
        click.echo(f"note:    {note}")
    click.echo("config OK")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--check", is_flag=True,
              help="Also import each plugin's implementation (imports torch).")
def plugins(as_json: bool, check: bool) -> None:
    """List discovered plugins: group, name, distribution, version, and whether they load.

    A plugin that fails to import is listed with its error; the command still succeeds.
    """
    rows = _plugin_rows(check)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no plugins found")
        return
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        status = "ok" if r["loaded"] else f"FAILED: {r['error']}"
        dist = f"{r['distribution']} {r['version']}" if r["distribution"] else "in-process"
        alias = f" (aliases: {', '.join(r['aliases'])})" if r.get("aliases") else ""
        click.echo(f"{r['kind']:9s} {r['name']:{width}s}  {dist:24s} {status}{alias}")


def _plugin_rows(check: bool) -> list[dict[str, Any]]:
    import importlib.metadata as md

    from llmcq.plugins import registry

    rows: list[dict[str, Any]] = []
    for group, kind in GROUP_LABELS.items():
        if group == "llmcq.hooks":
            infos = [registry.EntryPointInfo(group, ep.name, ep.value, d.metadata["Name"],
                                             d.version)
                     for d in md.distributions() for ep in d.entry_points if ep.group == group]
        else:
            infos = registry.discover(group)
        for info in infos:
            row: dict[str, Any] = {"kind": kind, "group": group, "name": info.name,
                                   "distribution": info.distribution, "version": info.version,
                                   "target": info.value, "loaded": True, "error": None}
            try:
                ep = md.EntryPoint(name=info.name, value=info.value, group=group)
                obj = ep.load()
                row["aliases"] = list(getattr(obj, "aliases", ()) or ())
                row["summary"] = getattr(obj, "summary", "") or ""
                if check and hasattr(obj, "impl") and getattr(obj, "impl"):
                    obj.load_impl()
            except BaseException as exc:  # a broken plugin must not break the listing
                if isinstance(exc, KeyboardInterrupt):
                    raise
                row["loaded"] = False
                row["error"] = f"{type(exc).__name__}: {exc}"
            rows.append(row)
    return rows


if __name__ == "__main__":  # pragma: no cover
    cli()
