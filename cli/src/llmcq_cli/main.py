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
    if not progress:
        _quiet_library_bars()

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
    if "bit_budget" in results:
        _echo_budget(results["bit_budget"])
    for position, table in results["eval"].items():
        for dataset, entry in table.items():
            if "ppl" in entry:
                click.echo(f"{position:12s} {dataset:12s} ppl {entry['ppl']:.4f} "
                           f"({entry.get('windows')} x {entry.get('seq_len')} tokens)")
    click.echo(f"results: {resolved.save_dir / RESULTS_FILE}")


def _echo_budget(bb: dict[str, Any]) -> None:
    """The chosen widths per block and the averages against the target."""
    click.echo(f"bit budget ({bb['samples']} samples, {bb['tokens']} tokens, predicted KL "
               f"{bb['predicted_kl']:.4g}):")
    for line in bb["table"]:
        click.echo(f"  {line}")
    if "achieved" in bb:
        a = bb["achieved"]
        click.echo(f"  achieved weight_bits_mean {a['weight_bits_mean']}, bits_per_param "
                   f"{a['bits_per_param']} (target {bb['target']} {bb['measure']})")
    if bb.get("save_path"):
        click.echo(f"  allocation written to {bb['save_path']} (quant.mix_bits)")


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@_set_option
@click.option("--overwrite", is_flag=True, help="Replace an existing quant.bit_budget.save_path.")
@click.option("--json", "as_json", is_flag=True,
              help="Print results.json's bit_budget block (allocation, errors, means).")
@click.option("--progress/--no-progress", default=None,
              help="Progress bars (default: when stderr is a terminal).")
@_debug_option
def budget(config: str, overrides: tuple[str, ...], overwrite: bool, as_json: bool,
           progress: bool | None, debug: bool) -> None:
    """Run only CONFIG's quant.bit_budget search: measure each linear's sensitivity, choose
    the widths, print them and write quant.bit_budget.save_path (a quant.mix_bits
    snippet). Nothing is quantized, evaluated or exported."""
    from llmcq.config.loader import load_config

    debug = _debug(debug)
    resolved = _guard(lambda: load_config(config, overrides, overwrite=True), debug)
    resolved.overwrite = overwrite or resolved.config.save.overwrite
    logging.basicConfig(level=logging.INFO, format="llmcq: %(message)s", stream=sys.stderr)
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        _quiet_library_bars()

    def go() -> dict[str, Any]:
        from llmcq.pipeline.runner import search_budget

        return search_budget(resolved, progress=progress)

    bb = _guard(go, debug)
    if as_json:
        click.echo(json.dumps(bb, indent=2))
    else:
        _echo_budget(bb)


def _quiet_library_bars() -> None:
    """``--no-progress`` also silences the bars transformers, huggingface_hub and datasets
    draw themselves (loading and writing checkpoints)."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TQDM_DISABLE"] = "1"
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a core dependency
        pass


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
    if cfg.quant is not None or cfg.sparse is not None:
        click.echo(f"grid:    {resolved.specs.describe()}")
    layers = resolved.specs.layers
    for s in layers.settings if layers is not None else ():
        names = ", ".join(map(str, s.entries))
        click.echo(f"  {s.path}: {s.spec.describe()} ({names})")
    if layers is not None and layers.ignored is not None:
        ign = layers.ignored
        click.echo(f"  ignored_layers: float ({len(ign.layer_names)} name(s) in "
                   f"{len(ign.blocks)} block(s), {len(ign.full_names)} full name(s))")
    bb = cfg.quant.bit_budget if cfg.quant is not None else None
    if bb is not None:
        measure = "bits_per_param" if bb.count_overhead else "weight_bits_mean"
        click.echo(f"  quant.bit_budget: target {bb.target} {measure}, widths "
                   f"{list(bb.widths)} (quant.weight at each), {bb.n_samples} calibration "
                   "sample(s)" + (f" of {bb.seq_len} tokens" if bb.seq_len else "")
                   + (f", saved to {bb.save_path}" if bb.save_path else ""))
    if resolved.features:
        names = ", ".join(sorted({f.name for f in resolved.features}))
        click.echo(f"records: {names}")
    if resolved.calib is not None and cfg.calib is not None:
        dspec, c = resolved.calib[0], cfg.calib
        where = f" {c.path}" if c.path else ""
        how = f", {c.preproc}" if dspec.needs_tokenizer else ", token ids"
        click.echo(f"calib:   {dspec.name}{where} ({c.n_samples} x {c.seq_len}{how}, "
                   f"seed {c.seed})")
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
@click.argument("run_dirs", nargs=-1, required=True,
                type=click.Path(exists=True, file_okay=False))
@click.option("--out", default=None, type=click.Path(),
              help="Where to write the page: a .html file or a folder (default: "
                   "report.html in the first RUN_DIR).")
@click.option("--format", "fmt", default="html", show_default=True,
              help="Report plugin (entry point group llmcq.reports).")
@_debug_option
def report(run_dirs: tuple[str, ...], out: str | None, fmt: str, debug: bool) -> None:
    """Write a quality report of one or more runs (folders holding results.json): a page
    with plots, found through the ``llmcq.reports`` entry points (pip install llmcq-report)."""
    from importlib import metadata as md

    from llmcq.errors import DataError
    from llmcq.plugins import registry

    info = _guard(lambda: registry.resolve("llmcq.reports", fmt, field="--format"),
                  _debug(debug))
    write = md.EntryPoint(name=info.name, value=info.value, group=info.group).load()

    def go() -> Any:
        try:
            return write(list(run_dirs), out)
        except (FileNotFoundError, ValueError) as exc:
            raise DataError(str(exc)) from exc

    path = _guard(go, _debug(debug))
    click.echo(f"report: {path}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--check", is_flag=True,
              help="Also import each plugin's implementation (imports torch).")
@click.option("--describe", "describe", metavar="NAME", default=None,
              help="Show one plugin's keys (type, default, doc) and what it declares.")
def plugins(as_json: bool, check: bool, describe: str | None) -> None:
    """List discovered plugins: group, name, distribution, version, whether they load, and
    a one-line summary each. A plugin that fails to import is listed with its error; the
    command still succeeds.
    """
    if describe is not None:
        _describe(describe, as_json)
        return
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
        if r.get("summary"):
            click.echo(f"{'':9s} {'':{width}s}  {r['summary']}")


def _describe(name: str, as_json: bool) -> None:
    """Find ``name`` in every plugin group and print what it declares."""
    from llmcq.config.describe import describe_spec
    from llmcq.errors import ConfigError, LlmcqError
    from llmcq.plugins import registry

    found = []
    for group, kind in GROUP_LABELS.items():
        if group == "llmcq.hooks":
            continue
        try:
            spec, info = registry.load_spec(group, name, field="--describe")
        except ConfigError:
            continue
        except LlmcqError as exc:
            _fail(exc, False)
        found.append({"kind": kind, "distribution": info.distribution,
                      "version": info.version, **describe_spec(spec)})
    if not found:
        names = sorted({i.name for g in GROUP_LABELS if g != "llmcq.hooks"
                        for i in registry.discover(g)})
        from llmcq.errors import closest

        _fail(ConfigError("--describe", name, reason="no plugin of that name",
                          allowed=names, suggestion=closest(name, names)), False)
    if as_json:
        click.echo(json.dumps(found, indent=2, default=str))
        return
    for d in found:
        click.echo(f"{d['kind']} {d['name']} ({d['distribution']} {d['version']}): "
                   f"{d['summary']}")
        if d.get("aliases"):
            click.echo(f"  aliases: {', '.join(d['aliases'])}")
        if d.get("paper"):
            click.echo(f"  paper: {d['paper']}")
        keys = d.get("keys")
        if keys is not None:
            section = "sparse" if d["declares"].get("kind") == "sparse" else "quant"
            click.echo(f"  {section}.special keys:" if keys else f"  {section}.special: no keys")
            for k in keys:
                click.echo(f"    {k['key']}: {k['type']} = {k['default']!r}")
                if k["doc"]:
                    click.echo(f"        {k['doc']}")
        click.echo("  declares:")
        for key, value in d["declares"].items():
            click.echo(f"    {key}: {value}")
        if d.get("with_defaults"):
            click.echo(f"  with its defaults: {d['with_defaults']}")


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
