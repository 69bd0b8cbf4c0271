"""Benchmark evaluation of base and fine-tuned models: the paper's forgetting table.

`megatron-eaft evaluate` scores HF model directories, and megatron-eaft checkpoints exported
to a temporary HF directory, on lm-evaluation-harness tasks (:mod:`.harness`), then compares
every model with the base model: per-task scores, the target-domain and general averages and
their change (:mod:`.table`). lm-evaluation-harness is the ``eval`` extra; nothing here
imports it before it is needed.
"""
