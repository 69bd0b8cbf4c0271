"""A reference multi-token-prediction (MTP) forward built from transformers' own classes.

transformers does not implement MTP, so the reference follows the published inference code
(vLLM's ``qwen3_5_mtp.py``, ``glm4_moe_lite_mtp.py``, ``deepseek_mtp.py``) with transformers'
modules: at position i the MTP layer takes the main model's last hidden state h_i (after the
final norm) and the embedding of token i+1, normalises each (``enorm`` / ``hnorm``), projects
their concatenation [embedding; hidden] (``eh_proj``, Qwen3.5's ``mtp.fc``), runs one decoder
layer over the sequence, normalises (Qwen3.5's ``mtp.norm``, GLM's ``shared_head.norm``) and
applies the main output layer: logits for token i+2.

The decoder layer, its norm and the output layer are a one-layer transformers model of the
same family, fed the projection through ``inputs_embeds``: transformers builds the layer's
attention mask, rotary embedding (positions 0..s-1, as Megatron's MTP layers use) and MoE.
The last position's "next token" is id 0 (Megatron's roll fills with zeros); it has no label.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (norm weights around 1), every expert bias random."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.2 * noise if "norm" in name else 0.1 * noise)
        for name, buffer in module.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.3 * torch.randn(buffer.shape, generator=generator))


@dataclass
class MTPHead:
    """One MTP layer as transformers' modules: the norms and projection before the layer, and
    a one-layer model of the family (the MTP decoder layer, its final norm, an output layer)."""

    enorm: torch.nn.Module
    hnorm: torch.nn.Module
    eh_proj: torch.nn.Linear
    layer_model: Any  # a transformers *ForCausalLM with one decoder layer

    def logits(self, main_model: Any, input_ids: torch.Tensor) -> torch.Tensor:
        """[batch, seq, vocab] fp32 logits of this MTP head (position i predicts token i+2)."""
        with torch.no_grad():
            hidden = main_model.model(input_ids=input_ids).last_hidden_state
            next_ids = torch.roll(input_ids, -1, dims=-1)
            next_ids[:, -1] = 0
            embedded = main_model.get_input_embeddings()(next_ids)
            projected = self.eh_proj(torch.cat((self.enorm(embedded), self.hnorm(hidden)), -1))
            self.layer_model.lm_head.weight.copy_(main_model.lm_head.weight)
            return self.layer_model(inputs_embeds=projected, use_cache=False).logits.float()


def build_head(
    model_class: Any, layer_config: Any, norm_class: Any, hidden: int, eps: float, seed: int
) -> MTPHead:
    torch.manual_seed(seed)
    head = MTPHead(
        enorm=norm_class(hidden, eps=eps),
        hnorm=norm_class(hidden, eps=eps),
        eh_proj=torch.nn.Linear(2 * hidden, hidden, bias=False),
        layer_model=model_class(layer_config).float().eval(),
    )
    for index, module in enumerate((head.enorm, head.hnorm, head.eh_proj, head.layer_model)):
        randomise(module, seed * 10 + index)
    return head


def layer_tensors(head: MTPHead, directory: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The MTP decoder layer's tensors as transformers saves a decoder layer (its on-disk
    expert layout included), renamed from ``model.layers.0.`` to ``prefix``."""
    from safetensors.torch import load_file

    head.layer_model.save_pretrained(directory)
    tensors = {}
    for shard in sorted(directory.glob("*.safetensors")):
        for name, tensor in load_file(shard).items():
            if name.startswith("model.layers.0."):
                tensors[prefix + name[len("model.layers.0.") :]] = tensor
    return tensors


def add_tensors(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Add ``tensors`` to the single safetensors file of a tiny checkpoint."""
    from safetensors.torch import load_file, save_file

    (single,) = directory.glob("*.safetensors")
    save_file({**load_file(single), **tensors}, single, metadata={"format": "pt"})


def head_from_checkpoint(
    directory: Path,
    layer_config: Any,
    norm_class: Any,
    prefix: str,
    names: dict[str, str],
    exclude: tuple[str, ...] = (),
) -> tuple[Any, MTPHead]:
    """A checkpoint's main model (transformers) and its MTP layer as an :class:`MTPHead`.

    ``prefix`` starts the MTP decoder layer's tensors, ``names`` gives the tensors of
    ``eh_proj``, ``enorm``, ``hnorm`` and the layer's final ``norm``, ``exclude`` the other
    tensors under ``prefix`` (DeepSeek-style copies of the embedding and output layer). The
    decoder layer loads through ``from_pretrained`` of a one-layer model (``layer_config``), so
    transformers reads any on-disk expert layout it reads for the main model.
    """
    import transformers
    from safetensors.torch import load_file, save_file

    main_model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32
    ).eval()
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(shard))
    skipped = {*names.values(), *exclude}
    layer = {
        "model.layers.0." + name[len(prefix) :]: tensor
        for name, tensor in tensors.items()
        if name.startswith(prefix) and name not in skipped
    }
    layer["model.norm.weight"] = tensors[names["norm"]]
    layer_dir = Path(directory).parent / f"{Path(directory).name}-mtp-reference"
    layer_config.save_pretrained(layer_dir)
    save_file(layer, layer_dir / "model.safetensors", metadata={"format": "pt"})
    model_class = getattr(transformers, layer_config.architectures[0])
    # Its embedding and output layer are left random: MTPHead.logits uses the main model's.
    layer_model = model_class.from_pretrained(layer_dir, dtype=torch.float32).eval()
    hidden, eps = layer_config.hidden_size, layer_config.rms_norm_eps
    head = MTPHead(
        enorm=norm_class(hidden, eps=eps),
        hnorm=norm_class(hidden, eps=eps),
        eh_proj=torch.nn.Linear(2 * hidden, hidden, bias=False),
        layer_model=layer_model,
    )
    with torch.no_grad():
        for module in ("eh_proj", "enorm", "hnorm"):
            getattr(head, module).weight.copy_(tensors[names[module]])
    return main_model, head
