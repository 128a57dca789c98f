"""Bit-budget search (``quant.bit_budget``): choose each linear's width among candidate
widths so that the model's measured output error is smallest at a target average number of
bits per weight.

* :mod:`llmcq.budget.solver`: the multiple-choice knapsack (pure Python);
* :mod:`llmcq.budget.sensitivity`: the per-(linear, width) KL measurement (torch);
* :mod:`llmcq.budget.plan`: the search inside a run (prices, feasibility, the layer plan,
  results.json's ``bit_budget``, the ``quant.mix_bits`` snippet).

Importing this package imports nothing heavy; the submodules are imported where used.
"""
