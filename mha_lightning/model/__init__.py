"""Single-device model code: attention (with its swappable core) and the seq2seq transformer."""

from mha_lightning.kinds import ATTENTION_KINDS
from mha_lightning.model.attention import AttentionMask, KVCache, MultiHeadAttention, ProbingCore, SDPACore
from mha_lightning.model.transformer import DecoderCache, LayerCache, Seq2SeqTransformer, TransformerConfig

__all__ = [
    "ATTENTION_KINDS",
    "AttentionMask",
    "DecoderCache",
    "KVCache",
    "LayerCache",
    "MultiHeadAttention",
    "ProbingCore",
    "SDPACore",
    "Seq2SeqTransformer",
    "TransformerConfig",
]
