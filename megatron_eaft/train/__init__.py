"""`megatron-eaft finetune`: the YAML schema (:mod:`.config`) and the Megatron-Core loop (:mod:`.trainer`).

Supporting modules: :mod:`.model` (model description -> GPTModel through the family presets),
:mod:`.batches` (layout-independent batch order, packed-row attention),
:mod:`.checkpointing` (atomic torch_dist checkpoints, exact resume).
"""
