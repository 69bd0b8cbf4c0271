"""HF <-> Megatron-Core torch_dist checkpoint conversion.

What a model is (families, metadata, building) lives in :mod:`megatron_eaft.models`; this
package moves tensors:

* :mod:`.engine`: streams tensors between sharded safetensors and a torch_dist checkpoint
  written from one process, one tensor group at a time, along a family's parameter table.
* :mod:`.hf_io` / :mod:`.torch_dist`: the two file formats, read and written directly.
* :mod:`.checkpoint`: the tokenizer / generation files carried beside a converted checkpoint.
* :mod:`.verify`: logits of transformers vs. the converted checkpoint.
"""
