"""The three kinds of attention in an encoder-decoder, named once for the model, the monitor and
the entropy record; the one way to name a single head; and the keys the monitor logs, which the
W&B dashboard reads (a module of its own so that reading a record does not import torch)."""

from __future__ import annotations

import re
from typing import NamedTuple

ATTENTION_KINDS = ("enc_self", "dec_self", "cross")
# How figures, reports and the W&B workspace name each kind.
KIND_LABELS = {"enc_self": "encoder self-attention", "dec_self": "decoder self-attention", "cross": "cross-attention"}

_HEAD_NAME = re.compile(r"^(?P<kind>\w+?)/L(?P<layer>\d+)/H(?P<head>\d+)$")


def layers_of_kind(kind: str, encoder_layers: int, decoder_layers: int) -> int:
    """How many attention modules of ``kind`` a model of that depth has: the encoder's for ``enc_self``, the
    decoder's for its self- and cross-attention."""
    return encoder_layers if kind == "enc_self" else decoder_layers


class Head(NamedTuple):
    """One attention head: its kind, layer and global head index (0-based), named ``kind/L<layer>/H<head>``
    as in the logged keys (``attn_entropy/cross/L1/H3``)."""

    kind: str
    layer: int
    head: int

    def __str__(self) -> str:
        return f"{self.kind}/L{self.layer}/H{self.head}"

    @classmethod
    def parse(cls, name: str) -> Head:
        """``"cross/L1/H3"`` -> Head("cross", 1, 3); ValueError naming the expected form otherwise."""
        match = _HEAD_NAME.match(str(name).strip())
        if match is None or match["kind"] not in ATTENTION_KINDS:
            raise ValueError(
                f"{name!r} is not a head name; write <kind>/L<layer>/H<head> with kind one of {ATTENTION_KINDS}"
            )
        return cls(match["kind"], int(match["layer"]), int(match["head"]))


def entropy_key(kind: str, layer: int, head: int, split: str = "train", normalised: bool = False) -> str:
    """The logged key of one head's entropy: ``attn_entropy/cross/L1/H3`` (nats), ``attn_entropy_norm/...``
    (normalised), prefixed ``val_`` for the validation probe set."""
    prefix = "" if split == "train" else f"{split}_"
    return f"{prefix}{'attn_entropy_norm' if normalised else 'attn_entropy'}/{Head(kind, layer, head)}"


def importance_key(kind: str, layer: int, head: int, split: str = "val") -> str:
    """The logged key of one head's importance on the probe set: ``val_head_importance/cross/L1/H3``."""
    return f"{split}_head_importance/{Head(kind, layer, head)}"


def collapse_key(split: str, kind: str) -> str:
    """The logged count of ``kind``'s heads under the collapse threshold."""
    return f"attn_collapse/{split}/{kind}"


def heatmap_key(split: str) -> str:
    """The logged layer x head heatmap images."""
    return f"attn_heatmap/{split}"
