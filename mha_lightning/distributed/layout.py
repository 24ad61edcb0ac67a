"""The device layout: the ``parallel`` config group, its checks, and the mesh's dimension names.

One object owns the parallel sizes and switches (:class:`ParallelConfig`, the YAML schema of
``conf/train.yaml``'s ``parallel`` node) and checks them against the model and the trainer in one
place (:meth:`ParallelConfig.validate`), in the launching process, before any worker starts. The
mesh is Lightning's ``ModelParallelStrategy`` mesh, whose dimensions are named :data:`DP` and
:data:`TP`; :func:`ranks_of` reads this process's coordinates off it (docs/design.md, "What
changes when tp=2").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from mha_lightning.errors import ConfigError
from mha_lightning.schema import from_mapping, positive_int

# Lightning's ModelParallelStrategy names the two dimensions of its 2-D mesh so.
DP = "data_parallel"
TP = "tensor_parallel"
MESH_DIM_NAMES = (DP, TP)
# Techniques switched by true, false or "auto" (on whenever tensor_parallel_size > 1).
SWITCHES = ("sequence_parallel", "vocab_parallel")
ACTIVATION_CHECKPOINTING = ("none", "full", "selective")


@dataclass(frozen=True)
class ParallelConfig:
    """The ``parallel`` group: the sizes (dp x tp must equal devices x nodes) and the collective timeout."""

    tensor_parallel_size: int = 1
    data_parallel_size: int | str = "auto"  # "auto": devices x num_nodes / tensor_parallel_size
    # Between the tensor-parallel regions, the residual stream, norms and dropout cut by position.
    sequence_parallel: bool | str = "auto"  # "auto": on whenever tensor_parallel_size > 1
    # Token embeddings, the output projection and its loss by vocabulary rows ("auto": whenever tp > 1).
    vocab_parallel: bool | str = "auto"
    # Per layer: "full" keeps its input only, "selective" its matrix products' outputs (the rest recomputed).
    activation_checkpointing: str = "none"
    timeout_minutes: float = 10.0  # a collective waiting longer (a hung rank) ends the job

    def __post_init__(self) -> None:
        minutes = self.timeout_minutes
        if not isinstance(minutes, (int, float)) or isinstance(minutes, bool) or minutes <= 0:
            raise ConfigError(f"parallel.timeout_minutes must be a positive number, got {minutes!r}")
        for key in SWITCHES:
            if getattr(self, key) not in ("auto", True, False):
                raise ConfigError(f"parallel.{key}={getattr(self, key)!r} must be auto, true or false")
        if self.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
            raise ConfigError(
                f"parallel.activation_checkpointing={self.activation_checkpointing!r} must be one of "
                f"{', '.join(ACTIVATION_CHECKPOINTING)}"
            )

    def on(self, key: str) -> bool:
        """Whether technique ``key`` (one of ``SWITCHES``) applies: "auto" means whenever tp > 1."""
        value = getattr(self, key)
        return self.tensor_parallel_size > 1 if value == "auto" else bool(value)

    @property
    def sequence_parallel_on(self) -> bool:
        """Whether sequence parallelism applies."""
        return self.on("sequence_parallel")

    @property
    def vocab_parallel_on(self) -> bool:
        """Whether vocabulary parallelism applies."""
        return self.on("vocab_parallel")

    @classmethod
    def from_dict(cls, values: ParallelConfig | Mapping[str, Any] | None) -> ParallelConfig:
        """From the ``parallel`` config node (missing keys take the defaults); an unknown key is one line."""
        if isinstance(values, cls):
            return values
        return from_mapping(cls, values, "parallel")

    def sizes(self, devices: Any, num_nodes: Any) -> tuple[int, int]:
        """(data_parallel_size, tensor_parallel_size) with "auto" resolved; not yet checked."""
        positive_int("trainer.devices", devices)
        positive_int("trainer.num_nodes", num_nodes)
        tp, dp = self.tensor_parallel_size, self.data_parallel_size
        if dp == "auto":
            dp = max(1, devices * num_nodes // tp) if isinstance(tp, int) and tp > 0 else 1
        return dp, tp

    def validate(self, model: Mapping[str, Any], devices: int, num_nodes: int) -> tuple[int, int]:
        """Check the layout against the model's shape and the trainer's processes -> (dp, tp).

        Runs in the launching process, before any worker exists; each problem is one line naming the values."""
        dp, tp = self.sizes(devices, num_nodes)
        num_heads, ffn_dim, vocab = model.get("num_heads"), model.get("ffn_dim"), model.get("vocab_size")
        checks = (
            ("model.num_heads", num_heads),
            ("model.ffn_dim", ffn_dim),
            ("parallel.tensor_parallel_size", tp),
            ("parallel.data_parallel_size", dp),
        )
        for key, value in checks:
            positive_int(key, value)
        if tp > num_heads:
            raise ConfigError(
                f"parallel.tensor_parallel_size ({tp}) is larger than model.num_heads ({num_heads}): "
                "every rank must hold at least one head; lower the tp size or add heads"
            )
        if num_heads % tp:
            raise ConfigError(
                f"model.num_heads ({num_heads}) must be divisible by parallel.tensor_parallel_size ({tp}): "
                "heads are the unit of sharding"
            )
        if ffn_dim % tp:
            raise ConfigError(f"model.ffn_dim ({ffn_dim}) must be divisible by parallel.tensor_parallel_size ({tp})")
        if dp * tp != devices * num_nodes:
            raise ConfigError(
                f"parallel.data_parallel_size ({dp}) x parallel.tensor_parallel_size ({tp}) = {dp * tp} must equal "
                f"trainer.devices ({devices}) x trainer.num_nodes ({num_nodes}) = {devices * num_nodes}"
            )
        for key in SWITCHES:
            if getattr(self, key) is True and tp == 1:
                raise ConfigError(
                    f"parallel.{key}=true needs parallel.tensor_parallel_size > 1 (it is 1): it shards across the "
                    f"tensor-parallel ranks; set parallel.{key}=auto (on whenever tp > 1) or raise the tp size"
                )
        per_rank = -(-vocab // tp) if isinstance(vocab, int) and vocab > 0 else None
        if self.vocab_parallel_on and per_rank is not None and per_rank * (tp - 1) >= vocab:
            raise ConfigError(
                f"model.vocab_size ({vocab}) split into {tp} parts of {per_rank} rows (torch.chunk's split) leaves the "
                f"last tensor-parallel rank none; set parallel.vocab_parallel=false or use a larger vocabulary"
            )
        return dp, tp


class Ranks(NamedTuple):
    """This process's coordinates on the (dp, tp) mesh."""

    dp_rank: int
    dp_size: int
    tp_rank: int
    tp_size: int


def ranks_of(mesh: Any | None) -> Ranks:
    """(dp_rank, dp_size, tp_rank, tp_size) on ``mesh``; (0, 1, 0, 1) without one (a single device)."""
    if mesh is None:
        return Ranks(0, 1, 0, 1)
    dp, tp = mesh[DP], mesh[TP]
    return Ranks(dp.get_local_rank(), dp.size(), tp.get_local_rank(), tp.size())


def head_layout(num_heads: int, tp_rank: int, tp_size: int) -> range:
    """Global indices of the heads that tensor-parallel rank ``tp_rank`` holds."""
    local = num_heads // tp_size
    return range(tp_rank * local, (tp_rank + 1) * local)
