"""`mha-dashboard`: a ready W&B workspace for a run or a sweep (docs/design.md, "Sweep reports and the W&B
dashboard").

W&B's automatic workspace gives every logged key a panel of its own, so a ``base`` run's 288 per-head
entropy keys land as 288 one-line panels in one section. This module builds the workspace instead, with
``wandb-workspaces`` (the optional extra ``mha-lightning[dashboard]``), from the run's config (the model's
layers and heads per attention kind, the monitor's settings):

- per attention kind, one line plot per layer with every head as a line, raw entropy (nats) and normalised
  (and the validation probe's, when the monitor measures it);
- the layer x head heatmaps, the collapse counts, every head's importance on the probe set (a line per head,
  a plot per layer), and the training curves;
- for a sweep, a parallel-coordinates panel of the swept values against the objective, and the swept values'
  importance for it.

The specification is built offline (``--dry-run`` writes it as JSON); ``mha-dashboard DIR`` saves it to W&B.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mha_lightning.errors import ConfigError, DataError, UserError, exit_on_user_error, first_line
from mha_lightning.kinds import (
    ATTENTION_KINDS,
    KIND_LABELS,
    collapse_key,
    entropy_key,
    heatmap_key,
    importance_key,
    layers_of_kind,
)
from mha_lightning.sweep_report import MULTIRUN_FILE, Sweep, read_sweep

SPEC_FILE = "wandb_workspace.json"
STEP_KEY = "trainer/global_step"  # Lightning's WandbLogger logs it with every row
_RUN_CONFIG_PREFIX = "run_config."  # train() logs the resolved config as W&B config under run_config


# --------------------------------------------------------------------------- the keys the monitor logs
def entropy_keys(kind: str, layer: int, num_heads: int, split: str = "train", normalised: bool = False) -> list[str]:
    """Every head's entropy key of one attention kind and layer (``val`` split: the probe set)."""
    return [entropy_key(kind, layer, head, split, normalised) for head in range(num_heads)]


# --------------------------------------------------------------------------- what the workspace is built from
@dataclass(frozen=True)
class ModelShape:
    """Layers per attention kind and heads per layer."""

    num_heads: int
    encoder_layers: int
    decoder_layers: int

    @classmethod
    def of(cls, config: DictConfig) -> ModelShape:
        """The shape in a run's config (``model.num_heads``, ``model.num_{encoder,decoder}_layers``)."""
        values = [
            OmegaConf.select(config, f"model.{k}", default=None, throw_on_resolution_failure=False)
            for k in ("num_heads", "num_encoder_layers", "num_decoder_layers")
        ]
        if not all(isinstance(v, int) and v > 0 for v in values):
            raise ConfigError(
                "the config has no model shape (model.num_heads, model.num_encoder_layers, model.num_decoder_layers "
                f"must be positive integers, got {values})"
            )
        return cls(*values)

    def layers(self, kind: str) -> int:
        """Layers of one attention kind (the encoder's for ``enc_self``, the decoder's otherwise)."""
        return layers_of_kind(kind, self.encoder_layers, self.decoder_layers)

    def cover(self, other: ModelShape) -> ModelShape:
        """The smallest shape holding both (a sweep's jobs may differ)."""
        return ModelShape(
            max(self.num_heads, other.num_heads),
            max(self.encoder_layers, other.encoder_layers),
            max(self.decoder_layers, other.decoder_layers),
        )


@dataclass
class DashboardSource:
    """A run's or a sweep's folder, read: the config, the shape the panels cover, the sweep if any."""

    path: Path
    config: DictConfig
    shape: ModelShape
    sweep: Sweep | None = None


def read_source(path: str | Path) -> DashboardSource:
    """Read a run folder (``.hydra/config.yaml``) or a multirun folder (``multirun.yaml``)."""
    path = Path(path)
    if (path / MULTIRUN_FILE).is_file():
        return _read_sweep_source(path)
    config = _job_config(path)
    if config is None:
        raise DataError(
            f"{path} holds neither .hydra/config.yaml nor {MULTIRUN_FILE}; pass a run folder written by mha-train "
            "or a multirun folder (mha-train -m)"
        )
    return DashboardSource(path, config, ModelShape.of(config))


def _job_config(path: Path) -> DictConfig | None:
    for name in (".hydra/config.yaml", "job_config.yaml"):
        if (path / name).is_file():
            return OmegaConf.load(path / name)
    return None


def _read_sweep_source(path: Path) -> DashboardSource:
    """A sweep: panels cover the largest shape among the jobs' configs, the sweep's base config and the swept
    values of the shape's own keys (so jobs that have not started yet fit too)."""
    sweep = read_sweep(path)
    configs = [c for c in (_job_config(job.path) for job in sweep.jobs) if c is not None]
    shape = ModelShape.of(configs[0] if configs else sweep.config)
    for config in [*configs, sweep.config]:
        shape = shape.cover(ModelShape.of(config))
    for field, key in (
        ("num_heads", "model.num_heads"),
        ("encoder_layers", "model.num_encoder_layers"),
        ("decoder_layers", "model.num_decoder_layers"),
    ):
        numbers = [int(v) for v in sweep.swept.get(key, []) if v.isdigit()]
        if numbers:
            shape = dataclasses.replace(shape, **{field: max(getattr(shape, field), *numbers)})
    return DashboardSource(path, configs[0] if configs else sweep.config, shape, sweep)


# --------------------------------------------------------------------------- building the workspace
def build_workspace(source: DashboardSource, entity: str = "", project: str | None = None, name: str | None = None):
    """The ``wandb_workspaces.workspaces.Workspace`` for ``source`` (built offline; ``.save()`` uploads it)."""
    ws, wr = _workspaces()
    config, shape = source.config, source.shape
    monitor = OmegaConf.select(config, "monitor", default=None) or {}
    splits = ["train", "val"] if monitor.get("probe", True) else ["train"]
    sections = []
    if source.sweep is not None:
        sections.append(_sweep_section(source.sweep, ws, wr))
    sections.append(ws.Section(name="Training", panels=_training_panels(config, wr), is_open=True))
    if monitor.get("enabled", True):
        for kind in ATTENTION_KINDS:
            panels = [
                _entropy_plot(wr, kind, layer, shape.num_heads, split, normalised)
                for layer in range(shape.layers(kind))
                for split in splits
                for normalised in (False, True)
            ]
            sections.append(
                ws.Section(
                    name=f"Attention entropy: {KIND_LABELS[kind]}",
                    panels=panels,
                    is_open=True,
                    # one row per layer: raw and normalised, train (and probe)
                    layout_settings=ws.SectionLayoutSettings(columns=2 * len(splits), rows=shape.layers(kind)),
                )
            )
        if monitor.get("log_images", True):
            heatmaps = [
                wr.MediaBrowser(title=f"layer x head normalised entropy ({split})", media_keys=[heatmap_key(split)])
                for split in splits
            ]
            sections.append(ws.Section(name="Attention heatmaps", panels=heatmaps, is_open=True))
        threshold = monitor.get("collapse_threshold", 0.05)
        collapse = [
            wr.LinePlot(
                title=f"heads with normalised entropy < {threshold} ({split})",
                x=STEP_KEY,
                y=[collapse_key(split, kind) for kind in ATTENTION_KINDS],
                title_y="heads",
            )
            for split in splits
        ]
        sections.append(ws.Section(name="Entropy collapse", panels=collapse, is_open=True))
        if "val" in splits and monitor.get("importance", True):
            importance = [
                wr.LinePlot(
                    title=f"{kind} L{layer}: importance, val probe set",
                    x=STEP_KEY,
                    y=[importance_key(kind, layer, head) for head in range(shape.num_heads)],
                    title_y="mean |dL/d gate|",
                    range_y=(0, None),
                )
                for kind in ATTENTION_KINDS
                for layer in range(shape.layers(kind))
            ]
            layout = ws.SectionLayoutSettings(columns=max(shape.encoder_layers, shape.decoder_layers), rows=3)
            sections.append(
                ws.Section(
                    name="Head importance (Michel et al.)", panels=importance, is_open=True, layout_settings=layout
                )
            )
    jobs = len(source.sweep.jobs) if source.sweep is not None else 1
    planned = source.sweep.planned if source.sweep is not None and source.sweep.planned else jobs
    return ws.Workspace(
        entity=entity,
        project=project or _logger_setting(config, "project") or "mha_lightning",
        name=name or f"mha_lightning: {source.path.name}",
        sections=sections,
        settings=ws.WorkspaceSettings(x_axis=STEP_KEY, max_runs=min(100, max(10, planned))),
        runset_settings=ws.RunsetSettings(filters=_runset_filter(source)),
    )


def _workspaces():
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError:
        raise UserError(
            "mha-dashboard needs the optional package wandb-workspaces: pip install 'mha-lightning[dashboard]'"
        ) from None
    return ws, wr


def _entropy_plot(wr, kind: str, layer: int, num_heads: int, split: str, normalised: bool):
    what = "normalised entropy" if normalised else "entropy (nats)"
    where = "train" if split == "train" else f"{split} probe set"
    return wr.LinePlot(
        title=f"{kind} L{layer}: {what}, {where}",
        x=STEP_KEY,
        y=entropy_keys(kind, layer, num_heads, split, normalised),
        title_y=what,
        range_y=(0, 1) if normalised else (0, None),
    )


def _training_panels(config: DictConfig, wr) -> list:
    target = OmegaConf.select(config, "data._target_", default="", throw_on_resolution_failure=False)
    text = "TextDataModule" in str(target)
    scores = ["val/bleu", "val/chrf"] if text else ["val/exact_match", "val/acc"]
    return [
        wr.LinePlot(title="loss", x=STEP_KEY, y=["train/loss", "val/loss"]),
        wr.LinePlot(title="validation scores", x=STEP_KEY, y=scores),
        wr.LinePlot(title="learning rate", x=STEP_KEY, y=["train/lr"]),
    ]


def _sweep_section(sweep: Sweep, ws, wr):
    """Parallel coordinates of the swept values (as W&B config keys) against the objective (a summary metric)."""
    objective = sweep.objective.metric
    # A config group choice (model=small) is no config value of its own: W&B sees only the values it sets.
    keys = [k for k in sweep.swept if "." in k]
    columns = [wr.ParallelCoordinatesPlotColumn(metric=wr.Config(_RUN_CONFIG_PREFIX + k), display_name=k) for k in keys]
    columns.append(wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric(objective), display_name=objective))
    panels = [
        wr.ParallelCoordinatesPlot(title=f"swept values against {objective}", columns=columns),
        wr.ParameterImportancePlot(with_respect_to=objective),
        wr.MediaBrowser(title="sweep report", media_keys=["sweep/objective"]),
    ]
    return ws.Section(name=f"Sweep: {sweep.path.name}", panels=panels, is_open=True, pinned=True)


def _runset_filter(source: DashboardSource) -> str:
    """A sweep's runs only, when its jobs share a W&B group."""
    group = _logger_setting(source.config, "group") if source.sweep is not None else None
    return f"Metric('Group') == '{group}'" if group else ""


def _logger_setting(config: DictConfig, key: str) -> Any:
    return OmegaConf.select(config, f"logger.wandb.{key}", default=None, throw_on_resolution_failure=False)


# --------------------------------------------------------------------------- the specification as JSON
def workspace_spec(workspace) -> dict[str, Any]:
    """The workspace as plain JSON data: every dataclass (section, panel, metric) as a dict with its ``type``;
    unset (None) and private fields (ids the W&B app assigns) are left out."""
    return _plain(workspace)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {"type": type(value).__name__}
        for f in dataclasses.fields(value):
            if not f.name.startswith("_") and getattr(value, f.name) is not None:
                out[f.name] = _plain(getattr(value, f.name))
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def panels(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel of a workspace spec, in order."""
    return [panel for section in spec["sections"] for panel in section["panels"]]


# --------------------------------------------------------------------------- CLI
def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mha-dashboard",
        description="Build a W&B workspace for a run or a sweep (per-layer entropy plots with every head, heatmaps, "
        "collapse counts; for a sweep, parallel coordinates of the swept values against the objective) and save it "
        f"to W&B. The specification is always written as JSON (default: <dir>/{SPEC_FILE}).",
    )
    p.add_argument("path", metavar="RUN_OR_MULTIRUN_DIR", help="a run folder or a multirun folder")
    p.add_argument("--entity", help="W&B entity (default: logger.wandb.entity, else your default entity)")
    p.add_argument("--project", help="W&B project (default: logger.wandb.project of the run's config)")
    p.add_argument("--name", help="the workspace's name (default: mha_lightning: <folder name>)")
    p.add_argument("--output", metavar="FILE", help=f"where to write the JSON specification (<dir>/{SPEC_FILE})")
    p.add_argument("--dry-run", action="store_true", help="only write the specification; contact no server")
    return p


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    """``mha-dashboard`` entry point; returns the exit status (2 on a user error)."""
    args = _build_parser().parse_args(argv)
    source = read_source(args.path)
    offline = args.dry_run or os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun")
    entity = args.entity or _logger_setting(source.config, "entity") or ""
    if not entity and not offline:
        entity = _default_entity()
    workspace = build_workspace(source, entity=entity, project=args.project, name=args.name)
    out = Path(args.output) if args.output else source.path / SPEC_FILE
    spec = workspace_spec(workspace)
    out.write_text(json.dumps(spec, indent=2))
    print(f"workspace specification: {out} ({len(spec['sections'])} sections, {len(panels(spec))} panels)")
    if offline:
        why = "--dry-run" if args.dry_run else f"WANDB_MODE={os.environ.get('WANDB_MODE')}"
        print(f"not saved to W&B ({why}); save it with: WANDB_MODE=online mha-dashboard {args.path} --entity <entity>")
        return 0
    _save(workspace)
    return 0


def _default_entity() -> str:
    import wandb

    try:
        entity = wandb.Api().default_entity
    except (wandb.errors.Error, OSError) as e:
        why = first_line(e)
        raise UserError(f"cannot reach W&B for your default entity ({why}): pass --entity, or --dry-run") from None
    if not entity:
        raise UserError("no W&B entity: pass --entity (your user or team name), or log in with `wandb login`")
    return entity


def _save(workspace) -> None:
    import wandb

    try:
        workspace.save()
    except (wandb.errors.Error, OSError) as e:
        raise UserError(
            f"cannot save the workspace to W&B ({first_line(e)}): log in with `wandb login` (or set WANDB_API_KEY) "
            "and check --entity / --project, or use --dry-run"
        ) from None
    print(f"workspace saved: {workspace.url}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
