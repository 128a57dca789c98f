"""Dataset specs (entry-point group ``llmcq.datasets``): how a named corpus is read, joined
for perplexity, and sampled for calibration.

The evaluation text follows the GPTQ protocol: wikitext2 is ``"\\n\\n".join(rows)`` (the
``test.txt`` under ``../shared/data`` already is that string); PTB is
``" ".join(sentences)``; C4 is ``" ".join(first 1100 validation documents)`` cut to
256 windows. A third-party dataset is a :class:`DatasetSpec` instance (or subclass overriding
:meth:`DatasetSpec.calibration_ids` / :meth:`DatasetSpec.evaluation_ids` for synthetic data).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from llmcq.api import PluginSpec
from llmcq.data.preproc import preprocess
from llmcq.data.readers import Corpus, read_corpus
from llmcq.errors import ConfigError

if TYPE_CHECKING:
    from llmcq.config.schema import CalibSection

__all__ = ["DatasetSpec", "RandomTokens", "WIKITEXT2", "C4", "PTB", "PILEVAL", "CUSTOM_TXT",
           "RANDOM"]


@dataclass(frozen=True, kw_only=True)
class DatasetSpec(PluginSpec):
    """A named text corpus read from a local path."""

    group: ClassVar[str] = "llmcq.datasets"
    #: field holding the text in JSON/Parquet/Arrow rows
    text_field: str = "text"
    #: how records join into one evaluation text
    separator: str = "\n\n"
    #: a plain text file holds one record per line (else it is the joined text already)
    txt_lines: bool = False
    #: evaluation uses only the first N records (C4: 1100)
    eval_records: int | None = None
    #: evaluation keeps at most N windows (C4: 256)
    eval_windows: int | None = None
    #: whether a path is required (False for synthetic data)
    needs_path: bool = True
    #: whether the text is tokenized (False for synthetic token ids, which then receive the
    #: vocabulary size, an ``int``, in place of a tokenizer)
    needs_tokenizer: bool = True

    def corpus(self, path: str, *, purpose: str) -> Corpus:
        return read_corpus(path, field=self.text_field, separator=self.separator,
                           txt_lines=self.txt_lines, purpose=purpose)

    def calibration_ids(self, tokenizer: Any, calib: CalibSection) -> list[list[int]]:
        """Token-id samples for calibration (``calib.preproc`` applied to the corpus)."""
        if calib.path is None:
            raise ConfigError("calib.path", None, reason=f"dataset {self.name} reads a local "
                              "file or folder", show_value=False)
        corpus = self.corpus(calib.path, purpose="calib")
        return preprocess(calib.preproc, corpus, tokenizer, calib.n_samples, calib.seq_len,
                          calib.seed)

    def evaluation_ids(self, tokenizer: Any, path: str | None, seq_len: int) -> list[int]:
        """The evaluation text tokenized once (GPTQ protocol)."""
        if path is None:
            raise ConfigError("eval.path", None, reason=f"dataset {self.name} reads a local "
                              "file or folder", show_value=False)
        corpus = self.corpus(path, purpose="eval")
        text = corpus.text
        if self.eval_records is not None:
            text = self.separator.join(corpus.records[: self.eval_records])
        ids = list(tokenizer(text, return_attention_mask=False)["input_ids"])
        if self.eval_windows is not None:
            ids = ids[: self.eval_windows * seq_len]
        return ids


WIKITEXT2 = DatasetSpec(name="wikitext2", summary="WikiText-2 (raw); text joined by blank lines",
                        separator="\n\n")
PTB = DatasetSpec(name="ptb", summary="Penn Treebank; one sentence per line, joined by spaces",
                  aliases=("penn_treebank",), separator=" ", txt_lines=True,
                  text_field="sentence")
C4 = DatasetSpec(name="c4", summary="C4 (en); documents joined by spaces, first 1100 for eval",
                 separator=" ", eval_records=1100, eval_windows=256)
PILEVAL = DatasetSpec(name="pileval", summary="Pile validation documents (AWQ/SmoothQuant "
                      "calibration); any jsonl of {'text': ...} works", separator="\n\n")
CUSTOM_TXT = DatasetSpec(name="custom_txt", summary="your own text: .txt, .jsonl, .json, "
                         ".parquet or a save_to_disk folder", aliases=("custom", "text"),
                         separator="\n\n")


@dataclass(frozen=True, kw_only=True)
class RandomTokens(DatasetSpec):
    """Uniformly random token ids, seeded: for plumbing tests and speed benchmarks where the
    text does not matter, and for checkpoints shipped without tokenizer files.

    Keys (``calib:``): ``name: random``, ``n_samples`` samples of ``seq_len`` tokens drawn
    from ``seed``; ``path`` and ``preproc`` are not used. As an ``eval`` dataset:
    ``eval_windows`` (32) windows of ``eval.seq_len`` tokens from seed 0. Ids are drawn from
    ``[0, vocab)`` where ``vocab`` is the smaller of the tokenizer's vocabulary and the model's
    input-embedding rows (core passes that bound as an ``int``), so no id can index past the
    embedding; no tokenizer is needed."""

    needs_path: bool = False
    needs_tokenizer: bool = False
    eval_windows: int | None = 32

    @staticmethod
    def _ids(vocab: Any, n: int, seed: int) -> list[int]:
        import torch

        size = vocab if isinstance(vocab, int) else len(vocab)
        gen = torch.Generator().manual_seed(int(seed))
        return torch.randint(0, size, (n,), generator=gen).tolist()

    def calibration_ids(self, tokenizer: Any, calib: CalibSection) -> list[list[int]]:
        flat = self._ids(tokenizer, calib.n_samples * calib.seq_len, calib.seed)
        return [flat[i * calib.seq_len:(i + 1) * calib.seq_len] for i in range(calib.n_samples)]

    def evaluation_ids(self, tokenizer: Any, path: str | None, seq_len: int) -> list[int]:
        return self._ids(tokenizer, (self.eval_windows or 32) * seq_len, 0)


RANDOM = RandomTokens(name="random", summary="random token ids from the tokenizer's vocabulary "
                      "(seeded by calib.seed); for plumbing tests and speed benchmarks",
                      aliases=("random_tokens",))
