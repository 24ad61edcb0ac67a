from mha_lightning.model.attention import MultiHeadAttention
from mha_lightning.model.transformer import Seq2SeqTransformer, TransformerConfig

__all__ = ["MultiHeadAttention", "Seq2SeqTransformer", "TransformerConfig"]
