"""Test helpers for llmcq and its plugins (loaded by pytest through the ``pytest11`` entry
point; nothing here imports torch at module level).

Fixtures: ``shared_data`` (the offline texts), ``tiny_llama_dir`` (a 2-block Llama with random
weights and a small real tokenizer, saved as a HF folder), ``smollm2_path`` (the bundled GGUF),
``smollm2_copy`` (a fresh copy of the bundled model, loaded once per session),
``smollm2_ppl`` (float and round-to-nearest wikitext2 perplexities of it, once per test run
per setting, shared by the pytest-xdist workers through a file per setting), ``llmcq_cli``
(run the CLI in a subprocess). See :mod:`llmcq.testing.tiny_models`.
"""
