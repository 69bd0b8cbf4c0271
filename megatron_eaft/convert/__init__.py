"""HF <-> Megatron-Core torch_dist checkpoint conversion.

* :mod:`.family` / :mod:`.families`: one declarative file per model family (config mapping +
  parameter table); ``family_for_hf_config`` picks one from an HF ``config.json``.
* :mod:`.engine`: streams tensors between sharded safetensors and a torch_dist checkpoint
  written from one process, one tensor group at a time.
* :mod:`.checkpoint`: the converted directory's layout and metadata (``read_model_metadata``).
* :mod:`.model`: ``build_gpt_model`` for a family at any TP/PP/EP.
* :mod:`.verify`: logits of transformers vs. the converted checkpoint.
"""
