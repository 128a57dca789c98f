"""Per-linear quantization settings: llmc's ``quant.mix_bits`` and ``ignored_layers``
(torch-free).

:class:`LayerRules` holds what the config says (read at config time); once the model is
loaded, :meth:`LayerRules.bind` matches it against every quantizable linear of every block
and returns a :class:`LayerPlan`: the :class:`LayerSpec` (weight grid, activation
quantization, or "keep in float") of each linear by full name. The plan is built and checked
before any block runs, so a name that matches nothing fails before any calibration.

llmc's rules, which these follow:

* ``ignored_layers`` keeps a linear in float when its block is in ``block_ids`` (indices and
  inclusive ranges ``15-23``) and its name within the block is in ``layer_names`` (exact),
  or when its full name is in ``speical_names`` / ``special_names``. It wins over
  ``mix_bits``.
* ``mix_bits`` entries are texts contained in a linear's name within its block
  (``down_proj`` matches ``mlp.down_proj``, and every expert's ``down_proj``), optionally
  ``#`` with block indices joined by ``-`` (``down_proj#0-1-31``: blocks 0, 1 and 31, a list
  as llmc reads it). Per block, the entries that apply form an ordered table: an entry
  text takes its place at its first mention (in setting order) and the setting of its last
  mention; a linear takes the setting of the first entry in that order whose text its name
  contains. A setting's ``weight``/``act`` replace the global ones (no merge); without
  ``act`` the linear's inputs stay in float; ``do_quant: False`` keeps it in float.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmcq.config.schema import LAYER_ENTRY
from llmcq.errors import ConfigError, ConfigErrors, closest
from llmcq.quant.spec import ActQuantSpec, WeightQuantSpec

if TYPE_CHECKING:
    from llmcq.config.schema import RunConfig

__all__ = ["LayerSpec", "NameEntry", "MixSetting", "IgnoreRule", "LayerRules", "LayerPlan",
           "BlockLinears", "GLOBAL", "IGNORED"]

#: the origin of a linear on the global grids
GLOBAL = "quant.weight"
#: the origin of a linear kept in float by ``ignored_layers``
IGNORED = "ignored_layers"


@dataclass(frozen=True)
class LayerSpec:
    """What one linear is quantized to. ``weight`` None: kept in float (no record).

    ``origin``: the config key that decided it (``quant.weight``,
    ``quant.mix_bits.setting_1``, ``ignored_layers``), for messages and results.json."""

    weight: WeightQuantSpec | None
    act: ActQuantSpec | None
    origin: str = GLOBAL

    @property
    def keeps_float(self) -> bool:
        return self.weight is None

    def grids(self) -> tuple[WeightQuantSpec | None, ActQuantSpec | None]:
        """What must agree for two linears to share one kernel scheme."""
        return self.weight, self.act

    def describe(self) -> str:
        if self.weight is None:
            return "float"
        return self.weight.describe() + ("" if self.act is None else f", {self.act.describe()}")


@dataclass(frozen=True)
class NameEntry:
    """One ``layer_name`` entry: a text and the blocks it applies to (None: every block)."""

    text: str
    blocks: tuple[int, ...] | None
    path: str

    @classmethod
    def parse(cls, entry: str, path: str) -> NameEntry:
        m = LAYER_ENTRY.match(entry.strip())
        if m is None:  # the schema checked every entry already
            raise ConfigError(path, entry, allowed="NAME or NAME#i-j-k")
        ids = m.group("blocks")
        return cls(m.group("text").strip(),
                   None if ids is None else tuple(int(i) for i in ids.split("-")), path)

    def applies(self, block: int) -> bool:
        return self.blocks is None or block in self.blocks

    def __str__(self) -> str:
        """As written in the config (``down_proj#0-1``)."""
        return self.text if self.blocks is None else \
            f"{self.text}#{'-'.join(map(str, self.blocks))}"


@dataclass(frozen=True)
class MixSetting:
    """One ``quant.mix_bits.setting_<i>``: its entries and the spec they give."""

    path: str
    entries: tuple[NameEntry, ...]
    spec: LayerSpec


@dataclass(frozen=True)
class IgnoreRule:
    """``ignored_layers``: (block, name within the block) pairs and full names."""

    blocks: tuple[int, ...] = ()
    layer_names: tuple[str, ...] = ()
    full_names: tuple[str, ...] = ()
    #: the config key of each full name (``speical_names[0]``, ``special_names[1]``)
    full_name_paths: tuple[str, ...] = ()

    def keeps(self, block: int, relative: str, full: str) -> bool:
        return (block in self.blocks and relative in self.layer_names) or full in self.full_names


#: per block, the names (relative to the block) of its quantizable linears
BlockLinears = Sequence[Sequence[str]]


@dataclass(frozen=True)
class LayerPlan:
    """Every quantizable linear's :class:`LayerSpec` by full name, for one loaded model."""

    layers: Mapping[str, LayerSpec]

    def spec(self, full_name: str) -> LayerSpec:
        try:
            return self.layers[full_name]
        except KeyError:
            raise KeyError(f"{full_name} is not a quantizable linear of the model's blocks "
                           "(the layer plan covers every linear the adapter's groups list)"
                           ) from None

    def summary(self) -> dict[str, Any]:
        """How many linears each origin decided, with its grid (results.json ``layers``)."""
        out: dict[str, dict[str, Any]] = {}
        for spec in self.layers.values():
            entry = out.setdefault(spec.origin, {"linears": 0, "grid": spec.describe()})
            entry["linears"] += 1
        return dict(sorted(out.items()))


@dataclass(frozen=True)
class LayerRules:
    """The config's per-linear settings (see the module docstring)."""

    default: LayerSpec
    settings: tuple[MixSetting, ...] = ()
    ignored: IgnoreRule | None = None

    @classmethod
    def from_config(cls, cfg: RunConfig, weight: WeightQuantSpec | None,
                    act: ActQuantSpec | None) -> LayerRules | None:
        """The rules of ``cfg``, None when it has neither ``quant.mix_bits`` nor
        ``ignored_layers`` (every linear then takes the global grids)."""
        q, ign = cfg.quant, cfg.ignored_layers
        mix = q.mix_bits if q is not None else None
        if not mix and ign is None:
            return None
        settings = []
        for key, s in (mix or {}).items():
            path = f"quant.mix_bits.{key}"
            entries = tuple(NameEntry.parse(e, f"{path}.layer_name[{i}]")
                            for i, e in enumerate(s.layer_name))
            if s.do_quant:
                assert s.weight is not None  # the schema requires it
                spec = LayerSpec(WeightQuantSpec.from_section(s.weight),
                                 None if s.act is None else ActQuantSpec.from_section(s.act),
                                 path)
            else:
                spec = LayerSpec(None, None, path)
            settings.append(MixSetting(path, entries, spec))
        ignored = None
        if ign is not None:
            named = [(n, f"ignored_layers.{key}[{i}]") for key in ("speical_names",
                                                                   "special_names")
                     for i, n in enumerate(getattr(ign, key))]
            ignored = IgnoreRule(tuple(ign.blocks()), tuple(ign.layer_names),
                                 tuple(n for n, _ in named), tuple(p for _, p in named))
        return cls(LayerSpec(weight, act, GLOBAL), tuple(settings), ignored)

    @property
    def quantizing_settings(self) -> list[MixSetting]:
        """Settings that give their linears grids (``do_quant: True``)."""
        return [s for s in self.settings if not s.spec.keeps_float]

    @property
    def mixes_grids(self) -> bool:
        """Whether some linears get other grids than the global ones."""
        return any(s.spec.grids() != self.default.grids() for s in self.quantizing_settings)

    @property
    def keeps_some_float(self) -> bool:
        return self.ignored is not None or any(s.spec.keeps_float for s in self.settings)

    def spec_for(self, block: int, relative: str, full: str) -> LayerSpec:
        """The spec of the linear ``relative`` (name within block ``block``; ``full``: its
        full name)."""
        if self.ignored is not None and self.ignored.keeps(block, relative, full):
            return LayerSpec(None, None, IGNORED)
        for text, index in self._table(block).items():
            if text in relative:
                return self.settings[index].spec
        return self.default

    def _table(self, block: int) -> dict[str, int]:
        """llmc's per-block table: entry text -> setting index (first mention orders it,
        the last mention's setting holds)."""
        table: dict[str, int] = {}
        for index, s in enumerate(self.settings):
            for e in s.entries:
                if e.applies(block):
                    table[e.text] = index
        return table

    def bind(self, prefix: str, blocks: BlockLinears) -> LayerPlan:
        """The plan for a model whose blocks ``{prefix}.{i}`` hold the linears ``blocks[i]``;
        every entry that names no linear (or no block) of the model is a
        :class:`ConfigError` naming its key, all of them reported together."""
        errors = self._check_names(prefix, blocks)
        if errors:
            raise ConfigErrors(errors)
        layers = {}
        for i, names in enumerate(blocks):
            for rel in names:
                full = f"{prefix}.{i}.{rel}"
                layers[full] = self.spec_for(i, rel, full)
        return LayerPlan(layers)

    def _check_names(self, prefix: str, blocks: BlockLinears) -> list[ConfigError]:
        n = len(blocks)
        span = f"the model has {n} blocks (0-{n - 1})" if n else "the model has no blocks"
        everywhere = sorted({rel for names in blocks for rel in names})
        errors: list[ConfigError] = []
        for s in self.settings:
            for e in s.entries:
                ids = range(n) if e.blocks is None else e.blocks
                bad = [i for i in ids if i >= n]
                if bad:
                    errors.append(ConfigError(e.path, str(e), reason=f"block "
                                              f"{', '.join(map(str, bad))}: {span}"))
                    continue
                names = sorted({rel for i in ids for rel in blocks[i]})
                if not any(e.text in rel for rel in names):
                    where = "any block" if e.blocks is None else \
                        f"block {', '.join(map(str, e.blocks))}"
                    errors.append(ConfigError(
                        e.path, str(e), allowed=names or everywhere,
                        reason=f"{e.text!r} is not part of the name of any linear of {where}",
                        suggestion=closest(e.text, names or everywhere)))
        if self.ignored is not None:
            errors += self._check_ignored(prefix, blocks, span, everywhere)
        return errors

    def _check_ignored(self, prefix: str, blocks: BlockLinears, span: str,
                       everywhere: list[str]) -> list[ConfigError]:
        ign = self.ignored
        assert ign is not None
        n = len(blocks)
        errors: list[ConfigError] = []
        bad = [i for i in ign.blocks if i >= n]
        if bad:
            errors.append(ConfigError("ignored_layers.block_ids", list(bad),
                                      reason=f"block {', '.join(map(str, bad))}: {span}"))
        chosen = sorted({rel for i in ign.blocks if i < n for rel in blocks[i]})
        for j, name in enumerate(ign.layer_names):
            if name not in chosen:
                errors.append(ConfigError(
                    f"ignored_layers.layer_names[{j}]", name, allowed=chosen or everywhere,
                    reason="not the name of a linear (within its block, matched exactly) in "
                    "the blocks of block_ids", suggestion=closest(name, chosen or everywhere)))
        full = [f"{prefix}.{i}.{rel}" for i, names in enumerate(blocks) for rel in names]
        known = set(full)
        for name, path in zip(ign.full_names, ign.full_name_paths, strict=True):
            if name not in known:
                errors.append(ConfigError(
                    path, name,
                    reason="not the full name of a quantizable linear of the model "
                    f"({prefix}.<block>.<linear>, e.g. {full[0] if full else prefix + '.0'})",
                    suggestion=closest(name, full)))
        return errors
