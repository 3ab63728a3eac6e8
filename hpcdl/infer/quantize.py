"""`--quantize int8`: the scoring model's Linear and LSTM layers as dynamic int8 (weights int8, activations quantized
per batch on the fly; torch.ao.quantization.quantize_dynamic), the rest left in float32.

Scoring always runs the whole unsplit model on each rank (checkpoints hold it whatever the training layout), so
any run's checkpoint can be quantized; a model with no Linear or LSTM layer, or not in float32, is refused.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from hpcdl.errors import ConfigError
from hpcdl.infer.model import ScoringModel

QUANTIZE = ("none", "int8")  # what --quantize may say
LAYERS = (nn.Linear, nn.LSTM)  # what int8 quantizes


def int8(model: ScoringModel) -> ScoringModel:
    """`model` with its Linear and LSTM layers as dynamic int8; a ConfigError when nothing would be quantized."""
    if model.dtype != torch.float32:
        raise ConfigError(f"--quantize int8 takes a float32 model; {model.name} is {str(model.dtype)[6:]}")
    layers = sum(isinstance(module, LAYERS) for module in model.module.modules())
    if not layers:
        raise ConfigError(f"--quantize int8: {model.name} has no Linear or LSTM layer to quantize")
    with warnings.catch_warnings():  # torch.ao.quantization says it is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(model.module, set(LAYERS), dtype=torch.qint8)
    return ScoringModel(quantized.eval(), model.dtype, model.classes, f"{model.name} (int8, {layers} layers)",
                        model.source)  # fmt: skip
