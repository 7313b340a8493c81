"""Streaming access to a safetensors checkpoint: one decoder layer at a time, never the whole model.

Tensors are read with `safetensors.safe_open` from the file that holds them (sharded checkpoints via
`model.safetensors.index.json`); each read opens and closes its file so that no mapping of the whole
checkpoint stays resident. Decoder layers are built from the config with the architecture's own
transformers class (on the meta device, then the weights are assigned), so the profiler runs exactly
the layer that the full model would run.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from tasks.errors import PipelineError
from tasks.experts import unstack_experts, unstack_state
from tasks.families import SUPPORTED_MODEL_TYPES as STREAMABLE
from tasks.families import layout_for

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
EMBED_SUFFIX = "embed_tokens.weight"


class Checkpoint:
    """Tensor names -> files of a checkpoint directory, and reads of a few tensors at a time."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise PipelineError(f"{self.path} is not a checkpoint directory (no config.json)")
        index = self.path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise PipelineError(f"{index} is malformed: {exc!r}") from None
            self._files = {name: self.path / file for name, file in weight_map.items()}
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise PipelineError(f"{self.path} has no *.safetensors weights")
            self._files = {}
            for file in files:
                with safe_open(str(file), framework="pt") as handle:
                    self._files.update({name: file for name in handle.keys()})
        embeds = [n for n in self._files if n.endswith(EMBED_SUFFIX)]
        if len(embeds) != 1:
            raise PipelineError(f"{self.path}: expected one '*{EMBED_SUFFIX}' tensor, found {len(embeds)}")
        self.embed_name = embeds[0]
        self.prefix = self.embed_name[: -len(EMBED_SUFFIX)]  # e.g. "model."

    def read(self, names: list[str], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        missing = [n for n in names if n not in self._files]
        if missing:
            raise PipelineError(f"checkpoint {self.path} lacks tensor(s) {', '.join(missing[:3])}")
        by_file: dict[Path, list[str]] = defaultdict(list)
        for name in names:
            by_file[self._files[name]].append(name)
        out = {}
        for file, group in by_file.items():
            with safe_open(str(file), framework="pt") as handle:
                for name in group:
                    out[name] = handle.get_tensor(name).to(dtype)
        return out

    def has(self, name: str) -> bool:
        return name in self._files

    def rows(self, name: str) -> int:
        """The first dimension of a tensor, read from the file header."""
        from safetensors import safe_open

        with safe_open(str(self._files[name]), framework="pt") as handle:
            return handle.get_slice(name).get_shape()[0]

    def read_rows(self, name: str, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows [start, stop) of a tensor, without reading the rest (e.g. a chunk of the vocabulary)."""
        from safetensors import safe_open

        with safe_open(str(self._files[name]), framework="pt") as handle:
            return handle.get_slice(name)[start:stop].to(dtype)

    def layer_state(self, index: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The state dict of decoder layer `index`, keys relative to the layer (e.g. 'mlp.up_proj.weight');
        stacked expert tensors come back per expert (tasks.experts)."""
        start = f"{self.prefix}layers.{index}."
        names = [n for n in self._files if n.startswith(start)]
        if not names:
            raise PipelineError(f"checkpoint {self.path} has no tensors for decoder layer {index}")
        return unstack_state({name[len(start) :]: t for name, t in self.read(names, dtype).items()})

    def embed(self, input_ids: torch.Tensor, dtype: torch.dtype = torch.float32, rows: int = 8192) -> torch.Tensor:
        """Embeddings of `input_ids`, reading the table in row chunks (only the embedding is touched)."""
        from safetensors import safe_open

        with safe_open(str(self._files[self.embed_name]), framework="pt") as handle:
            table = handle.get_slice(self.embed_name)
            vocab, dim = table.get_shape()
            if int(input_ids.max()) >= vocab:
                raise PipelineError(f"calibration token id {int(input_ids.max())} is outside the vocabulary ({vocab})")
            flat = input_ids.reshape(-1)
            out = torch.empty(flat.numel(), dim, dtype=dtype)
            for start in range(0, vocab, rows):
                hit = ((flat >= start) & (flat < start + rows)).nonzero(as_tuple=True)[0]
                if hit.numel():
                    chunk = table[start : start + rows].to(dtype)
                    out[hit] = chunk[flat[hit] - start]
        return out.reshape(*input_ids.shape, dim)


def load_config(path: str | Path, attn_implementation: str = "sdpa"):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise PipelineError(f"cannot read the model config in {path}: {str(exc).splitlines()[0]}") from None
    if config.model_type not in STREAMABLE:
        raise PipelineError(
            f"the streaming profiler supports model types {', '.join(STREAMABLE)}; {path} is {config.model_type!r}"
        )
    if getattr(config, "attn_logit_softcapping", None):  # Gemma 2: SDPA cannot soft-cap attention scores
        attn_implementation = "eager"
    config._attn_implementation = attn_implementation
    return config


class LayerFactory:
    """Builds decoder layer i of the config's architecture, plus the pieces shared by all layers
    (rotary embedding, causal masks) that the full model would compute once per forward."""

    def __init__(self, config):
        from transformers import AutoModel

        self.config = config
        self.layout = layout_for(config)  # where each logical linear is stored (Phi-3: stacked rows)
        with torch.device("meta"):
            skeleton = AutoModel.from_config(config)
        self.layer_class = type(skeleton.layers[0])
        self._norm = skeleton.norm  # the final norm, on the meta device
        self.rotary = type(skeleton.rotary_emb)(config=config)
        # Gemma scales the embeddings by sqrt(hidden) (its embedding class holds the factor) and soft-caps
        # the final logits; other families do neither.
        self.embed_scale = float(getattr(skeleton.embed_tokens, "scalar_embed_scale", 1.0))
        self.logit_softcap = getattr(config, "final_logit_softcapping", None)
        # Gemma 3 keeps one rotary table per layer kind (local and global bases).
        self._rotary_by_kind = "layer_type" in inspect.signature(self.rotary.forward).parameters
        self._masks: dict[tuple, object] = {}
        self._rope: dict[tuple, object] = {}

    def build(self, index: int, state: dict[str, torch.Tensor]) -> nn.Module:
        with torch.device("meta"):
            layer = self.layer_class(self.config, index)
        if self.layout.experts:  # one nn.Linear per expert, named as the checkpoint and the bit map name them
            unstack_experts(layer)
        try:
            layer.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:
            raise PipelineError(f"decoder layer {index} does not match its config: {str(exc).splitlines()[0]}") from None
        return layer.eval()

    def build_norm(self, weight: torch.Tensor) -> nn.Module:
        """The model's final norm with `weight` (its class and epsilon come from the config)."""
        norm = copy.deepcopy(self._norm)
        norm.load_state_dict({"weight": weight}, strict=True, assign=True)
        return norm.eval()

    def scale_embeddings(self, hidden: torch.Tensor) -> torch.Tensor:
        """The embedding scale of the family, applied as its embedding module does (a float32 product)."""
        return hidden if self.embed_scale == 1.0 else hidden * torch.tensor(self.embed_scale, dtype=hidden.dtype)

    def position_embeddings(self, index: int, hidden: torch.Tensor, position_ids: torch.Tensor):
        """The rotary (cos, sin) that the full model passes to layer `index`."""
        kind = self.mask_kind(index) if self._rotary_by_kind else ""
        key = (kind, tuple(position_ids.shape), hidden.device, hidden.dtype)
        if key not in self._rope:
            self._rope[key] = self.rotary(hidden, position_ids, kind) if kind else self.rotary(hidden, position_ids)
        return self._rope[key]

    def mask_kind(self, index: int) -> str:
        types = getattr(self.config, "layer_types", None)
        if types:
            return types[index]
        return "sliding_attention" if getattr(self.config, "sliding_window", None) else "full_attention"

    def mask(self, index: int, hidden: torch.Tensor, position_ids: torch.Tensor):
        """The attention mask the full model passes to layer `index` (None when SDPA's is_causal does it)."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        kind = self.mask_kind(index)
        key = (kind, tuple(hidden.shape[:2]))
        if key not in self._masks:
            make = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
            self._masks[key] = make(
                config=self.config, inputs_embeds=hidden, attention_mask=None, past_key_values=None, position_ids=position_ids
            )
        return self._masks[key]
