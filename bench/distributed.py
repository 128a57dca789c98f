"""Data-parallel calibration, measured: 2 gloo ranks (torchrun, the real CLI) against one
process, per algorithm, with the comparison tests/test_distributed.py asserts on (largest
differences of the exported transformed and fake-quant tensors, codes unchanged, grid steps).

    .venv/bin/python bench/distributed.py      # ~2 min on 2 CPU cores

Same tiny Llama, data and settings as the test (its helpers are imported from the test
file). Prints a table and writes bench/results/distributed_issue13.json.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

from _common import REPO, markdown_table, write_json

OUT = REPO / "bench" / "results" / "distributed_issue13.json"


def _test_module():
    spec = importlib.util.spec_from_file_location("dp_test", REPO / "tests" / "test_distributed.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    from llmcq.testing.tiny_models import save_tiny_model, tiny_llama_config, train_tokenizer

    t = _test_module()
    data = REPO.parent / "shared" / "data"
    rows, table = {}, []
    with tempfile.TemporaryDirectory(prefix="llmcq-dp-") as tmp_s:
        tmp = Path(tmp_s)
        tok = train_tokenizer([(data / "wikitext2" / "valid.txt").read_text()[:200_000]], 512)
        model = save_tiny_model(tmp / "tiny", tiny_llama_config(vocab_size=len(tok)), tok)
        texts = tmp / "texts" / "wikitext2"
        texts.mkdir(parents=True)
        for name in ("valid.txt", "test.txt"):
            (texts / name).write_text((data / "wikitext2" / name).read_text()[:64_000])
        for algo in ("smoothquant", "osplus", "gptq", "awq", "omniquant"):
            bs_one = 4 if algo == "omniquant" else 2  # the harness's equivalent schedule
            one, two, _ = t._run_pair(tmp, algo, model, texts.parent, bs_one=bs_one)
            r = t._compare(one, two)
            r["one_process_bs"] = bs_one
            rows[algo] = r
            table.append([algo, f"{r['trans_abs']:.3g}", f"{r['fake_abs']:.3g}",
                          f"{r['codes_unchanged']:.6f}", f"{r['max_steps_unflipped']:.3g}",
                          r["quant_meta_equal"]])
    print(markdown_table(["algorithm", "trans max |diff|", "fake max |diff|",
                          "codes unchanged", "max steps (unflipped)", "meta equal"], table))
    write_json(OUT, {"what": "2 gloo ranks (torchrun --standalone --nproc-per-node 2 "
                             "--no-python llmcq run) vs one process; tiny 2-block Llama, "
                             "8 x 32 calibration tokens in 4 batches",
                     "tolerances": {"trans_rtol": t.TRANS_RTOL, "float_steps": t.FLOAT_STEPS,
                                    "code_agree": t.CODE_AGREE},
                     "rows": rows})


if __name__ == "__main__":
    main()
