"""A small BERT-shaped ``nn.TransformerEncoder`` classifier over float token features.

Input (batch, seq, d_model) float32, so shapes (and attention MACs) follow ``--input-shape``.
"""
from __future__ import annotations

import torch
from torch import nn

D_MODEL = 64
HEADS = 4
FF = 128
LAYERS = 2
NUM_CLASSES = 5


class TinyTransformer(nn.Module):
    def __init__(self, d_model: int = D_MODEL, heads: int = HEADS, ff: int = FF, layers: int = LAYERS,
                 num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model, heads, ff, dropout=0.0, batch_first=True)
        # enable_nested_tensor=False: the fast path changes the exported graph with padding masks.
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(dim=1))


def untrained() -> TinyTransformer:
    torch.manual_seed(0)
    return TinyTransformer().eval()
