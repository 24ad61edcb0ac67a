"""Encoder-decoder transformer (Vaswani et al. 2017) with pre-LN or post-LN blocks.

Single-device code: nothing here knows about distribution. ``mha_lightning.distributed``
shards its modules in place (heads, FFN units, embeddings, the output projection).

Decoding runs incrementally by default: a :class:`DecoderCache` keeps every decoder
attention's keys and values, so each step feeds only the newest token through the decoder
(docs/design.md, "Decoding with a KV cache").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from mha_lightning.errors import ConfigError
from mha_lightning.kinds import Head, layers_of_kind
from mha_lightning.model.attention import AttentionMask, KVCache, MultiHeadAttention, SDPACore
from mha_lightning.model.dropout import Dropout
from mha_lightning.model.vocabulary import VocabularyHead

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}

# Given "this rank's batch is finished", return whether every rank that must step in lockstep is.
DoneSync = Callable[[bool], bool]
# Given (attention kind, layer index), return the core module that attention should use.
CoreFactory = Callable[[str, int], nn.Module]


@dataclass
class TransformerConfig:
    """Model shape and options. Defaults are the ``tiny`` preset (conf/model/tiny.yaml); ``small``
    and ``base`` are named presets in conf/model/."""

    vocab_size: int
    d_model: int = 64
    num_heads: int = 4
    head_dim: int | None = None  # default d_model // num_heads; independent on purpose
    num_encoder_layers: int = 2
    num_decoder_layers: int = 2
    ffn_dim: int = 128
    activation: str = "relu"
    dropout: float = 0.0
    attention_dropout: float = 0.0
    norm_first: bool = True  # pre-LN
    positional: str = "sinusoidal"  # or "learned"
    max_len: int = 128
    share_embeddings: bool = True  # one matrix for source, target and output projection
    # Heads removed from the model (their outputs gated to 0), e.g. ["cross/L1/H3", "enc_self/L0/H0"].
    head_mask: list[str] = field(default_factory=list)
    pad_id: int = 0

    def __post_init__(self) -> None:
        positive = (
            "vocab_size",
            "d_model",
            "num_heads",
            "num_encoder_layers",
            "num_decoder_layers",
            "ffn_dim",
            "max_len",
        )
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model.{key} must be a positive integer, got {value!r}")
        if self.head_dim is None:
            if self.d_model % self.num_heads:
                raise ConfigError(
                    f"model.d_model ({self.d_model}) is not divisible by model.num_heads ({self.num_heads}); "
                    "set model.head_dim explicitly or change one of them"
                )
            self.head_dim = self.d_model // self.num_heads
        elif not isinstance(self.head_dim, int) or self.head_dim <= 0:
            raise ConfigError(f"model.head_dim must be a positive integer or null, got {self.head_dim!r}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"model.activation={self.activation!r} is not one of {sorted(ACTIVATIONS)}")
        if self.positional not in ("sinusoidal", "learned"):
            raise ConfigError(f"model.positional={self.positional!r} must be 'sinusoidal' or 'learned'")
        for key in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"model.{key} must be in [0, 1), got {getattr(self, key)!r}")
        self.head_mask = [str(h) for h in self.masked_heads()]  # canonical names; a ListConfig becomes a list

    def layers_of(self, kind: str) -> int:
        """How many attention modules of ``kind`` the model has."""
        return layers_of_kind(kind, self.num_encoder_layers, self.num_decoder_layers)

    def masked_heads(self) -> list[Head]:
        """``head_mask`` as :class:`Head` values, checked against the model's shape (one-line ConfigError)."""
        if isinstance(self.head_mask, str):
            raise ConfigError(f"model.head_mask must be a list of head names, got {self.head_mask!r}")
        heads = []
        for name in self.head_mask:
            try:
                head = Head.parse(name)
            except ValueError as e:
                raise ConfigError(f"model.head_mask: {e}") from None
            if head.layer >= self.layers_of(head.kind) or head.head >= self.num_heads:
                raise ConfigError(
                    f"model.head_mask: {name} does not exist; {head.kind} has layers 0-{self.layers_of(head.kind) - 1}"
                    f" and heads 0-{self.num_heads - 1}"
                )
            heads.append(head)
        return heads


class FeedForward(nn.Module):
    """Position-wise fc2(dropout(act(fc1(x)))); fc1 and fc2 are what tensor parallelism shards."""

    def __init__(self, d_model: int, ffn_dim: int, activation: str, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.act = ACTIVATIONS[activation]
        self.dropout = Dropout(dropout)

    @override
    def forward(self, x: Tensor) -> Tensor:
        """(..., D) -> (..., D)."""
        return self.fc2(self.dropout(self.act(self.fc1(x))))


class Residual(nn.Module):
    """x + dropout(f(norm(x))) for pre-LN, norm(x + dropout(f(x))) for post-LN."""

    def __init__(self, d_model: int, dropout: float, norm_first: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)
        self.norm_first = norm_first

    @override
    def forward(self, x: Tensor, sublayer: Callable[[Tensor], Tensor]) -> Tensor:
        """``sublayer`` wrapped in the norm, dropout and residual; x and the result (B, T, D)."""
        if self.norm_first:
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))


class EncoderLayer(nn.Module):
    """Self-attention then feed-forward, each in a :class:`Residual`."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.attention_dropout)
        self.ffn = FeedForward(cfg.d_model, cfg.ffn_dim, cfg.activation, cfg.dropout)
        self.attn_block = Residual(cfg.d_model, cfg.dropout, cfg.norm_first)
        self.ffn_block = Residual(cfg.d_model, cfg.dropout, cfg.norm_first)

    @override
    def forward(self, x: Tensor, mask: AttentionMask) -> Tensor:
        """x: (B, S, D) -> (B, S, D)."""
        x = self.attn_block(x, lambda h: self.self_attn(h, mask=mask))
        return self.ffn_block(x, self.ffn)


@dataclass
class LayerCache:
    """The two attention caches of one decoder layer."""

    self_attn: KVCache = field(default_factory=KVCache)
    cross_attn: KVCache = field(default_factory=KVCache)


@dataclass
class DecoderCache:
    """Everything incremental decoding keeps between steps: one :class:`LayerCache` per decoder layer.

    The decoding loop creates it, passes it to :meth:`Seq2SeqTransformer.decode` every step and
    drops it at the end; the modules never hold it."""

    layers: list[LayerCache]

    @classmethod
    def empty(cls, num_layers: int) -> DecoderCache:
        """A cache for a new batch of sentences."""
        return cls([LayerCache() for _ in range(num_layers)])

    @property
    def length(self) -> int:
        """Target positions already decoded (the position of the next token fed in)."""
        return self.layers[0].self_attn.length

    def reorder(self, rows: Tensor) -> None:
        """Keep batch rows ``rows`` of the self-attention caches (beam search's surviving beams).

        The cross-attention caches stay: beams only move within their sentence, whose rows all
        hold the same memory, and the uncached path, too, pairs row i with memory row i."""
        for layer in self.layers:
            layer.self_attn.reorder(rows)


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention over the encoder memory, then feed-forward."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.attention_dropout)
        self.cross_attn = MultiHeadAttention(cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.attention_dropout)
        self.ffn = FeedForward(cfg.d_model, cfg.ffn_dim, cfg.activation, cfg.dropout)
        self.self_block = Residual(cfg.d_model, cfg.dropout, cfg.norm_first)
        self.cross_block = Residual(cfg.d_model, cfg.dropout, cfg.norm_first)
        self.ffn_block = Residual(cfg.d_model, cfg.dropout, cfg.norm_first)

    @override
    def forward(
        self,
        y: Tensor,
        memory: Tensor,
        self_mask: AttentionMask,
        cross_mask: AttentionMask,
        cache: LayerCache | None = None,
    ) -> Tensor:
        """y: (B, T, D), memory: (B, S, D) -> (B, T, D); with ``cache``, y holds only the new positions."""
        self_cache, cross_cache = (None, None) if cache is None else (cache.self_attn, cache.cross_attn)
        y = self.self_block(y, lambda h: self.self_attn(h, mask=self_mask, cache=self_cache))
        y = self.cross_block(y, lambda h: self.cross_attn(h, mask=cross_mask, memory=memory, cache=cross_cache))
        return self.ffn_block(y, self.ffn)


def sinusoidal_positions(max_len: int, d_model: int) -> Tensor:
    """(max_len, d_model) fixed encodings of Vaswani et al.: sin on even, cos on odd dimensions."""
    position = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(max_len, d_model)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq)[:, : d_model // 2]
    return table


class Embedder(nn.Module):
    """Token embedding scaled by sqrt(d_model), plus positions."""

    def __init__(self, cfg: TransformerConfig, tokens: nn.Embedding) -> None:
        super().__init__()
        self.tokens = tokens
        self.scale = math.sqrt(cfg.d_model)
        self.max_len = cfg.max_len
        self.d_model = cfg.d_model
        if cfg.positional == "learned":
            self.learned_positions = nn.Embedding(cfg.max_len, cfg.d_model)
        else:
            self.register_buffer("sinusoid", torch.empty(cfg.max_len, cfg.d_model), persistent=False)
        self.dropout = Dropout(cfg.dropout)

    def reset_buffers(self) -> None:
        """Fill the fixed sinusoidal table (not saved in checkpoints: it is computed, on its device)."""
        if hasattr(self, "sinusoid"):
            self.sinusoid = sinusoidal_positions(self.max_len, self.d_model).to(self.sinusoid.device)

    @override
    def forward(self, ids: Tensor, start: int = 0) -> Tensor:
        """ids: (B, T) at positions start .. start + T - 1 -> (B, T, D); ValueError past ``max_len``."""
        end = start + ids.shape[1]
        if end > self.max_len:
            raise ValueError(f"sequence length {end} exceeds model.max_len ({self.max_len})")
        table = self.learned_positions.weight if hasattr(self, "learned_positions") else self.sinusoid
        pos = table[start:end]
        return self.dropout(self.tokens(ids) * self.scale + pos)


def _token_embedding(cfg: TransformerConfig) -> nn.Embedding:
    return nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_id)


# Writes a parameter's initial value: the whole tensor, drawn on CPU, into the parameter (or, on a
# sharded model, the part of it this rank holds; docs/design.md, "Initialisation").
InitWriter = Callable[[nn.Parameter, Tensor], None]


def _copy_into(param: nn.Parameter, value: Tensor) -> None:
    param.copy_(value)


def initial_value(module: nn.Module, name: str, shape: torch.Size, d_model: int) -> Tensor:
    """The initial value of ``module``'s parameter ``name``, drawn on CPU from torch's generator.

    PyTorch's own defaults for Linear (U(+-1/sqrt(fan_in)), weight and bias) and LayerNorm (1, 0);
    embeddings N(0, 1/d_model) before the sqrt(d_model) scale, the padding row 0: with N(0, 1) the
    scaled embeddings drown the cross-attention signal in the decoder's residual stream
    (docs/design.md, "The model and the attention core")."""
    if isinstance(module, nn.Linear):
        bound = module.in_features**-0.5
        return torch.empty(shape).uniform_(-bound, bound)
    if isinstance(module, nn.LayerNorm):
        return torch.ones(shape) if name == "weight" else torch.zeros(shape)
    if isinstance(module, nn.Embedding):
        value = torch.empty(shape).normal_(std=d_model**-0.5)
        if module.padding_idx is not None:
            value[module.padding_idx] = 0.0
        return value
    raise TypeError(f"no initialisation for {type(module).__name__}.{name}")


class Seq2SeqTransformer(nn.Module):
    """Encoder-decoder transformer; ``config`` are the :class:`TransformerConfig` fields."""

    def __init__(self, **config) -> None:
        super().__init__()
        cfg = self.config = TransformerConfig(**config)
        device = torch.get_default_device()
        # Built on the meta device (no memory, no random numbers), then initialised one parameter at
        # a time in a fixed order (reset_parameters): a sharded build with the same seed, which stays
        # on the meta device until each rank initialises its own shards, gets the same weights
        # (docs/design.md, "Initialisation"). Built under `with torch.device("meta")` it stays there.
        with torch.device("meta"):
            src_tokens = _token_embedding(cfg)
            tgt_tokens = src_tokens if cfg.share_embeddings else _token_embedding(cfg)
            self.src_embed = Embedder(cfg, src_tokens)
            self.tgt_embed = Embedder(cfg, tgt_tokens)
            self.encoder_layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_encoder_layers))
            self.decoder_layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_decoder_layers))
            # Pre-LN stacks need a final norm; post-LN outputs are already normalised.
            self.encoder_norm = nn.LayerNorm(cfg.d_model) if cfg.norm_first else nn.Identity()
            self.decoder_norm = nn.LayerNorm(cfg.d_model) if cfg.norm_first else nn.Identity()
            self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # Logits, loss and next-token choices from output.weight: vocabulary parallelism swaps it.
        self.vocabulary = VocabularyHead()
        self.tie_weights()
        if device.type != "meta":
            self.materialize(device)

    def tie_weights(self) -> None:
        """With ``share_embeddings`` the output projection is the target embedding matrix (itself the
        source's): tie them again after anything that replaced the parameter (``to_empty``, sharding)."""
        if self.config.share_embeddings:
            self.output.weight = self.tgt_embed.tokens.weight

    def materialize(self, device: torch.device | str, write: InitWriter | None = None) -> None:
        """Give a meta-device model real memory on ``device`` and initialise it (``reset_parameters``)."""
        self.to_empty(device=device)  # new parameter objects: ties are cut
        self.tie_weights()
        self.reset_parameters(write)

    @torch.no_grad()
    def reset_parameters(self, write: InitWriter | None = None) -> None:
        """Initialise every parameter, one at a time in a fixed order (the modules' order, a tied weight
        once), from torch's CPU generator, then the buffers (positions, head gates).

        ``write(param, value)`` puts each whole initial value in place (default: copy it in); a
        sharded model passes one that keeps the rank's own part, so it equals an unsharded model
        initialised from the same seed while no rank holds more than one whole parameter."""
        write = write or _copy_into
        seen: set[int] = set()
        for module in self.modules():
            for name, param in module.named_parameters(recurse=False):
                if id(param) not in seen:
                    seen.add(id(param))
                    write(param, initial_value(module, name, param.shape, self.config.d_model))
        for embed in (self.src_embed, self.tgt_embed):
            embed.reset_buffers()
        self.set_head_mask(self.config.masked_heads())

    def hparams(self) -> dict:
        """The resolved config as a plain dict (saved in checkpoints to rebuild the model)."""
        return asdict(self.config)

    def attention_layers(self) -> dict[str, list[MultiHeadAttention]]:
        """Every attention module, by kind (``ATTENTION_KINDS``), in layer order."""
        return {
            "enc_self": [layer.self_attn for layer in self.encoder_layers],
            "dec_self": [layer.self_attn for layer in self.decoder_layers],
            "cross": [layer.cross_attn for layer in self.decoder_layers],
        }

    def set_attention_core(self, make: CoreFactory | None) -> None:
        """Give every attention module the core ``make(kind, layer)`` returns; None restores SDPA.

        The one swap point for probing (entropy) and gating (head masks) cores (KV caching is an
        explicit :class:`DecoderCache` instead, docs/design.md, "Decoding with a KV cache"): cores
        hold no parameters, so the sharding plan and checkpoints are the same whichever is in."""
        for kind, mods in self.attention_layers().items():
            for layer, attn in enumerate(mods):
                attn.core = SDPACore() if make is None else make(kind, layer)

    def set_head_mask(self, heads: Sequence[Head]) -> None:
        """Remove ``heads`` (gate 0) and restore every other head (single-device; the config's
        ``head_mask`` is applied when the model is built, before any sharding)."""
        gates = self.head_gates([heads])
        for kind, mods in self.attention_layers().items():
            for layer, attn in enumerate(mods):
                gate = gates[kind, layer]
                attn.set_head_gate(None if gate is None else gate[0])

    def head_gates(self, masks: Sequence[Sequence[Head]]) -> dict[tuple[str, int], Tensor | None]:
        """Every attention module's gates for ``masks``: (len(masks), num_heads), row i 0 on the heads
        mask i removes and 1 elsewhere; None for a module no mask touches."""
        gates: dict[tuple[str, int], Tensor | None] = {}
        for kind, mods in self.attention_layers().items():
            for layer, attn in enumerate(mods):
                gate = None
                for row, mask in enumerate(masks):
                    off = [h.head for h in mask if (h.kind, h.layer) == (kind, layer)]
                    if off:
                        if gate is None:
                            gate = torch.ones(len(masks), self.config.num_heads, device=attn.o.weight.device)
                        gate[row, off] = 0.0
                gates[kind, layer] = gate
        return gates

    @contextmanager
    def attention_core(self, make: CoreFactory) -> Iterator[None]:
        """``set_attention_core(make)`` for the duration of a block, then the previous cores again."""
        previous = [attn.core for mods in self.attention_layers().values() for attn in mods]
        self.set_attention_core(make)
        try:
            yield
        finally:
            for attn, core in zip(
                (a for mods in self.attention_layers().values() for a in mods), previous, strict=True
            ):
                attn.core = core

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """src: (B, S) token ids -> memory (B, S, D), src_valid (B, S)."""
        src_valid = src != self.config.pad_id
        mask = AttentionMask(keys=src_valid.unsqueeze(1), queries=src_valid)  # (B, 1, S): all valid keys
        x = self.src_embed(src)
        for layer in self.encoder_layers:
            x = layer(x, mask)
        return self.encoder_norm(x), src_valid

    def decode(self, tgt_in: Tensor, memory: Tensor, src_valid: Tensor, cache: DecoderCache | None = None) -> Tensor:
        """tgt_in: (B, T) ids starting with BOS -> logits (B, T - start, V) of positions start .. T - 1.

        Without ``cache`` start is 0 (every position). With one, start is ``cache.length``: only
        the positions not yet cached run through the decoder (their keys and values are added
        to the cache) and attend to the cached ones."""
        return self.vocabulary.logits(self._decoder_states(tgt_in, memory, src_valid, cache), self.output.weight)

    def _decoder_states(
        self, tgt_in: Tensor, memory: Tensor, src_valid: Tensor, cache: DecoderCache | None = None
    ) -> Tensor:
        """``decode`` before the output projection: (B, T - start, D)."""
        T = tgt_in.shape[1]
        start = 0 if cache is None else cache.length
        tgt_valid = tgt_in != self.config.pad_id  # (B, T)
        new_valid = tgt_valid[:, start:]  # (B, T - start): the queries
        causal = torch.ones(T, T, dtype=torch.bool, device=tgt_in.device).tril()[start:]  # (T - start, T)
        self_mask = AttentionMask(keys=causal.unsqueeze(0) & tgt_valid.unsqueeze(1), queries=new_valid)
        cross_mask = AttentionMask(keys=src_valid.unsqueeze(1), queries=new_valid)  # (B, 1, S)
        y = self.tgt_embed(tgt_in[:, start:], start=start)
        layer_caches = [None] * len(self.decoder_layers) if cache is None else cache.layers
        for layer, layer_cache in zip(self.decoder_layers, layer_caches, strict=True):
            y = layer(y, memory, self_mask, cross_mask, layer_cache)
        return self.decoder_norm(y)

    @override
    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher forcing: src (B, S), tgt_in (B, T) ids -> logits (B, T, V)."""
        return self.vocabulary.logits(self.decoder_states(src, tgt_in), self.output.weight)

    def decoder_states(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher forcing up to the output projection: src (B, S), tgt_in (B, T) -> (B, T, D)."""
        memory, src_valid = self.encode(src)
        return self._decoder_states(tgt_in, memory, src_valid)

    def teacher_forced_loss(
        self, src: Tensor, tgt_in: Tensor, tgt_out: Tensor, label_smoothing: float = 0.0
    ) -> tuple[Tensor, Tensor]:
        """-> (the label-smoothed cross-entropy summed over tgt_out's non-PAD tokens, the argmax
        predictions (B, T)). With gradients on, the (B, T, V) logits are never materialised: the
        output projection and the loss run together, a block of tokens at a time
        (``losses.linear_cross_entropy_sum``); the value and gradients are ``forward``'s."""
        states = self.decoder_states(src, tgt_in)
        loss_sum, predictions = self.vocabulary.loss(
            states.flatten(0, 1), self.output.weight, tgt_out.flatten(), self.config.pad_id, label_smoothing
        )
        return loss_sum, predictions.view_as(tgt_out)

    @torch.no_grad()
    def teacher_forced_scores(
        self, src: Tensor, tgt_in: Tensor, tgt_out: Tensor, label_smoothing: float = 0.0
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Evaluation's teacher-forced numbers -> (label-smoothed cross-entropy summed over tgt_out's
        non-PAD tokens, their negative log-likelihood summed (no smoothing: perplexity's), argmax (B, T))."""
        states = self.decoder_states(src, tgt_in)
        loss_sum, nll_sum, predictions = self.vocabulary.scores(
            states.flatten(0, 1), self.output.weight, tgt_out.flatten(), self.config.pad_id, label_smoothing
        )
        return loss_sum, nll_sum, predictions.view_as(tgt_out)

    def generate(
        self,
        src: Tensor,
        max_len: int,
        bos_id: int,
        eos_id: int,
        beam_size: int = 1,
        length_penalty: float = 0.6,
        sync_done: DoneSync | None = None,
        *,
        use_cache: bool = True,
    ) -> Tensor:
        """Greedy (beam_size 1) or beam search -> (B, L) ids without BOS, PAD after EOS."""
        if beam_size > 1:
            return self.beam_decode(
                src, max_len, bos_id, eos_id, beam_size, length_penalty, sync_done, use_cache=use_cache
            )
        return self.greedy_decode(src, max_len, bos_id, eos_id, sync_done, use_cache=use_cache)

    def never_emit(self, logits: Tensor, bos_id: int) -> Tensor:
        """``logits`` (..., V) with PAD and BOS at -inf: never real output tokens (PAD only follows
        EOS, added by the decoding loop). A copy; the input is left as it is."""
        logits = logits.clone()
        logits[..., [self.config.pad_id, bos_id]] = float("-inf")
        return logits

    def _decoding_cache(self, use_cache: bool) -> DecoderCache | None:
        return DecoderCache.empty(len(self.decoder_layers)) if use_cache else None

    @torch.no_grad()
    def greedy_decode(
        self,
        src: Tensor,
        max_len: int,
        bos_id: int,
        eos_id: int,
        sync_done: DoneSync | None = None,
        *,
        use_cache: bool = True,
    ) -> Tensor:
        """Batched greedy decoding -> (B, L) ids without BOS, PAD after EOS.

        ``use_cache=False`` runs the whole prefix through the decoder at every step instead of
        only the newest token: the reference the cached path must equal, token for token."""
        memory, src_valid = self.encode(src)
        cache = self._decoding_cache(use_cache)
        B = src.shape[0]
        ys = torch.full((B, 1), bos_id, dtype=torch.long, device=src.device)
        finished = torch.zeros(B, dtype=torch.bool, device=src.device)
        for _ in range(min(max_len, self.config.max_len - 1)):
            newest = self._decoder_states(ys, memory, src_valid, cache)[:, -1]  # (B, D)
            next_token = self.vocabulary.best_tokens(newest, self.output.weight, (self.config.pad_id, bos_id))
            next_token = next_token.masked_fill(finished, self.config.pad_id)
            ys = torch.cat([ys, next_token.unsqueeze(1)], dim=1)
            finished |= next_token == eos_id
            if _all_done(bool(finished.all()), sync_done):
                break
        return ys[:, 1:]

    @torch.no_grad()
    def beam_decode(
        self,
        src: Tensor,
        max_len: int,
        bos_id: int,
        eos_id: int,
        beam_size: int = 4,
        length_penalty: float = 0.6,
        sync_done: DoneSync | None = None,
        *,
        use_cache: bool = True,
    ) -> Tensor:
        """Batched beam search with GNMT length penalty ((5 + len) / 6) ** alpha.

        A beam that emitted EOS is frozen: it only extends with PAD at no cost, so it keeps
        its slot and score until the final, length-normalised choice. All sentences' beams run
        as one batch of B * K rows; ``use_cache`` as in :meth:`greedy_decode`."""
        pad = self.config.pad_id
        memory, src_valid = self.encode(src)
        B, K = src.shape[0], beam_size
        memory = memory.repeat_interleave(K, dim=0)  # (B*K, S, D)
        src_valid = src_valid.repeat_interleave(K, dim=0)
        ys = torch.full((B * K, 1), bos_id, dtype=torch.long, device=src.device)
        scores = torch.full((B, K), float("-inf"), device=src.device)
        scores[:, 0] = 0.0  # all beams start identical: keep one alive
        finished = torch.zeros(B * K, dtype=torch.bool, device=src.device)
        lengths = torch.zeros(B * K, device=src.device)
        cache = self._decoding_cache(use_cache)
        for _ in range(min(max_len, self.config.max_len - 1)):
            newest = self._decoder_states(ys, memory, src_valid, cache)[:, -1]  # (B*K, D)
            scores, flat = self.vocabulary.top_candidates(  # (B, K) each; flat indexes K * V candidates
                newest, self.output.weight, scores, finished, pad, (pad, bos_id)
            )
            V = self.config.vocab_size
            beam = flat // V + torch.arange(B, device=src.device).unsqueeze(1) * K  # (B, K) rows of ys
            token = (flat % V).view(-1)
            beam = beam.view(-1)
            ys = torch.cat([ys[beam], token.unsqueeze(1)], dim=1)
            if cache is not None:
                cache.reorder(beam)  # each surviving beam continues from its parent's keys and values
            was_finished = finished[beam]
            lengths = lengths[beam] + (~was_finished).float()
            finished = was_finished | (token == eos_id)
            if _all_done(bool(finished.all()), sync_done):
                break
        penalty = ((5.0 + lengths) / 6.0) ** length_penalty
        normalised = (scores.view(-1) / penalty).view(B, K)
        best = normalised.argmax(-1) + torch.arange(B, device=src.device) * K
        return ys[best, 1:]


def _all_done(local_done: bool, sync_done: DoneSync | None) -> bool:
    return sync_done(local_done) if sync_done is not None else local_done
