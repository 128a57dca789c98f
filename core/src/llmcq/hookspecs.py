"""The five stage hooks (pluggy project ``llmcq``). ``docs/hooks.md`` is generated from this
module (:func:`markdown`; ``python scripts/gen_hook_docs.py``), and
``tests/test_hook_docs.py`` checks both that the page is current and that a real run calls the
hooks as documented here (order, arguments, ``firstresult``, merged results).

How a run calls them
--------------------
Core registers one built-in plugin (``llmcq.pipeline.builtin``) whose implementations do the
work the config asks for: they call the algorithm drivers chosen by ``quant.method`` and
``sparse.method`` in recipe order (sparse steps first), the evaluators chosen by ``eval``,
the exporters chosen by ``save``. Its implementations are ``trylast``, so plugins installed
through the ``llmcq.hooks`` entry-point group run before them (pluggy calls later-registered
plugins first among equals) and ``wrapper=True`` implementations wrap them.

Rules for third-party implementations:

* calibrate/transform/quantize implementations must not change weights unless they are the
  driver the config chose; observe, or wrap (``@llmcq.hookimpl(wrapper=True)``).
* Do not give implementation arguments default values: pluggy never passes them.
* Take only the arguments you need: pluggy passes arguments by name.
* Exceptions are re-raised as ``PluginError`` naming the stage, the block and the plugin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from pathlib import Path

    from llmcq.pipeline.context import Block, BlockInputs, RunContext, Step
    from llmcq.quant.record import QuantizedLinear

__all__ = ["hookspec", "hookimpl", "PROJECT", "HOOK_NAMES", "CALL_ORDER", "markdown"]

PROJECT = "llmcq"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

HOOK_NAMES = ("llmcq_calibrate", "llmcq_transform", "llmcq_quantize", "llmcq_evaluate",
              "llmcq_export")

#: the order of calls in one ``llmcq run`` (``tests/test_hook_docs.py`` records a real run's
#: calls and checks them against this)
CALL_ORDER = """\
llmcq_evaluate(position="pretrain")
for each recipe step:  llmcq_transform(block=None)              # model-wide, before the loop
for each block:
    for each recipe step in order (sparse steps first):
        llmcq_calibrate, llmcq_transform                        # then core prunes (sparse steps)
    llmcq_quantize(step=<the quantizing step>)                  # firstresult; not if no quant
llmcq_evaluate(position="transformed")
llmcq_export(backend="trans")                                   # transformed float model
(fake-quantized linears are swapped in)
llmcq_evaluate(position="fake_quant")
llmcq_export(backend=...)                                       # every other backend
"""


@hookspec
def llmcq_calibrate(run: RunContext, step: Step, block: Block, inputs: BlockInputs) -> None:
    """Observe one block on calibration inputs, before ``step`` transforms it.

    Receives: the run, the recipe step (``step.algorithm`` is the driver), the block (on the
    compute device, weights as left by earlier steps) and its calibration inputs (``None``
    for data-free runs). Store statistics on the driver or in ``run.scratch(block.index)``;
    accumulate them (running sums), never keep every activation.
    Returns: nothing. All implementations run. Must not modify weights.
    When: per block, per recipe step, just before that step's ``llmcq_transform``.
    """


@hookspec
def llmcq_transform(run: RunContext, step: Step, block: Block | None,
                    inputs: BlockInputs | None) -> None:
    """Apply ``step``'s function-preserving transforms in place (scaling, smoothing, clipping).

    Receives: as ``llmcq_calibrate``. ``block is None`` is the single model-wide pass before
    the block loop (rotations, norm fusion), with ``inputs`` ``None``.
    Returns: nothing. All implementations run; core's applies the driver's ``transform``.
    For a sparse step, core then calls the driver's ``prune`` and zeroes the pruned weights
    (``block.masks`` holds the masks for later steps).
    When: per block, per recipe step, after that step's ``llmcq_calibrate``; and once per step
    with ``block=None`` before the block loop.
    """


@hookspec(firstresult=True)
def llmcq_quantize(run: RunContext, step: Step, block: Block,
                   inputs: BlockInputs | None) -> dict[str, QuantizedLinear] | None:
    """Quantize (or prune) the block's linears and return one record per linear.

    Receives: the step that quantizes (the last step in the recipe whose driver quantizes;
    RTN when none does, e.g. SmoothQuant alone), the block after every step's transforms,
    its inputs. Returns: ``{relative linear name: QuantizedLinear}``; the float weights stay
    as they are (core builds the fake-quantized model from the records). First non-``None``
    result wins; core's implementation is ``trylast``, so a plugin may take over a block (a
    mixed-precision allocator, say). Core checks the records for NaN/Inf afterwards.
    When: per block, once, after every step's calibrate/transform.
    """


@hookspec
def llmcq_evaluate(run: RunContext, model: Any, position: str) -> list[dict[str, Any]]:
    """Evaluate the model at ``position`` (pretrain, transformed, fake_quant).

    Returns: a list of metric dicts ``{"dataset": str, "metric": str, "value": float, ...}``;
    core concatenates the lists of all implementations into ``results.json["eval"]``.
    When: at each position listed in ``eval.eval_pos``; core's implementation runs the
    evaluators named by each ``eval`` block.
    """


@hookspec
def llmcq_export(run: RunContext, backend: str, model: Any,
                 records: dict[str, QuantizedLinear], out_dir: Path) -> list[Path]:
    """Write the files of one export into ``out_dir``.

    ``out_dir`` is a fresh temporary folder; core renames it into place only after every
    implementation returned, and deletes it on any error, so no half-written model is left.
    Returns: the paths written. All implementations run (core's calls the backend's exporter;
    others may add files such as a model card). ``records`` maps full linear names to their
    quantized records (empty for the ``trans`` backend).
    When: once per selected backend; ``trans`` before fake quantization, others after.
    """


def markdown() -> str:
    """``docs/hooks.md``: the module's rules, :data:`CALL_ORDER` and every hook's docstring."""
    import inspect
    import sys

    module = sys.modules[__name__]
    doc = inspect.getdoc(module) or ""
    intro = doc.split("How a run calls them", 1)[1].split("\n", 2)[2].strip()
    parts = ["# Stage hooks", "",
             "<!-- generated by scripts/gen_hook_docs.py from core/src/llmcq/hookspecs.py; "
             "do not edit -->", "",
             "llmcq's five stages are [pluggy](https://pluggy.readthedocs.io) hooks of the "
             "project `llmcq`, specified in `core/src/llmcq/hookspecs.py`, from which this "
             "page is generated.", "", _rst_to_md(intro), "", "Call order in a run:", "",
             "```", CALL_ORDER.rstrip(), "```"]
    for name in HOOK_NAMES:
        fn = getattr(module, name)
        args = ", ".join(inspect.signature(fn).parameters)
        first = " (`firstresult`: the first non-None result wins)" if getattr(
            fn, "llmcq_spec", {}).get("firstresult") else ""
        body = inspect.cleandoc(fn.__doc__ or "")
        parts += ["", f"## {name}({args}){first}", "", _rst_to_md(body)]
    return "\n".join(parts) + "\n"


def _rst_to_md(text: str) -> str:
    """The docstrings' ``literal`` spans and ``*`` bullets, as Markdown."""
    import re

    text = re.sub(r"``([^`]+)``", r"`\1`", text)
    text = re.sub(r"(?<=[^\n])\n(Receives|Returns|When):", r"\n\n\1:", text)
    return re.sub(r"^\* ", "- ", text, flags=re.M)
