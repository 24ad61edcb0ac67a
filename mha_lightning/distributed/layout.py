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


@dataclass(frozen=True)
class ParallelConfig:
    """The ``parallel`` group: the sizes (dp x tp must equal devices x nodes) and the collective timeout."""

    tensor_parallel_size: int = 1
    data_parallel_size: int | str = "auto"  # "auto": devices x num_nodes / tensor_parallel_size
    timeout_minutes: float = 10.0  # a collective waiting longer (a hung rank) ends the job

    def __post_init__(self) -> None:
        minutes = self.timeout_minutes
        if not isinstance(minutes, (int, float)) or isinstance(minutes, bool) or minutes <= 0:
            raise ConfigError(f"parallel.timeout_minutes must be a positive number, got {minutes!r}")

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
        num_heads, ffn_dim = model.get("num_heads"), model.get("ffn_dim")
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
