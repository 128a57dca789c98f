"""``llmcq report RUN_DIR [RUN_DIR ...]``: a self-contained HTML quality page from runs'
results.json (entry point group ``llmcq.reports``, name ``html``).

:mod:`llmcq_report.data` reads results.json into plain tables (no plotting);
:mod:`llmcq_report.plots` draws them with matplotlib (Agg); :mod:`llmcq_report.html`
writes the page.
"""

__all__: list[str] = []
