"""Round-to-nearest: weights quantized directly by the format, activations quantized at run time."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from wanexp.formats import get_format
from wanexp.quant.linear import QuantLinear


@dataclass
class RTNConfig:
    """W: ``weight_format`` (packed); A: ``act_format`` or None for weight-only (W4A16)."""

    weight_format: dict
    act_format: dict | None
    clip_tables: dict[str, torch.Tensor] = field(default_factory=dict)  # layer name → ratios per bin
    compute_dtype: torch.dtype = torch.bfloat16

    def build(self, name: str, linear: nn.Linear) -> QuantLinear:
        fmt = get_format(self.weight_format["name"], **self.weight_format.get("opts", {}))
        packed = fmt.encode(linear.weight.detach().float(), name=f"{name}.weight")
        return QuantLinear(linear.in_features, linear.out_features, weight=packed, bias=linear.bias,
                           act_format=self.act_format, clip_table=self.clip_tables.get(name),
                           compute_dtype=self.compute_dtype)
