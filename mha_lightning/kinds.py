"""The three kinds of attention in an encoder-decoder, named once for the model, the monitor and
the entropy record (a module of its own so that reading a record does not import torch)."""

ATTENTION_KINDS = ("enc_self", "dec_self", "cross")
