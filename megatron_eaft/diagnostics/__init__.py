"""EAFT diagnostics: what the loss sees in a dataset, and how a training run went.

* :mod:`.statistics`: torch-only accumulators (the (entropy, target probability) histogram,
  scalar sums, top-K vs exact entropy agreement) that merge by addition and all-reduce over
  data parallel with one call.
* :mod:`.model_pass`: a forward-only pass of a Megatron checkpoint over a prepared SFT
  dataset at any TP/PP/DP, filling those accumulators on the last pipeline stage.
* :mod:`.run_logs`: scalar series from a run's TensorBoard directory or JSONL metrics file.
* :mod:`.plots` / :mod:`.report`: PNG figures (matplotlib, Agg), JSON and console summaries.

The CLI is ``megatron-eaft diagnose model|run``. Modules are imported on use so that the CLI's
``--help`` does not pay for torch, Megatron-Core or matplotlib.
"""
