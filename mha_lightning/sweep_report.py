"""`mha-sweep-report`: every job of a Hydra multirun in one table, the best job, and the objective
against each swept value (docs/design.md, "Sweep reports and the W&B dashboard").

It reads what a sweep leaves in its folder: ``multirun.yaml`` (the sweep's config: what was swept,
the objective and its direction), each job folder's ``.hydra/overrides.yaml`` and ``metrics.json``
(which ``mha-train`` writes last, so a job without it has not finished), and the notes of
:class:`SweepReportCallback` (the sweep process, each job's end). It writes ``sweep_report.csv``,
``sweep_report.md`` and ``sweep_report.png`` into the sweep folder and, when the sweep logged to
W&B, logs the table and the figure to a W&B run of the sweep's group. It works on a sweep that is
still running (or that died): such jobs are marked and the best job is chosen among finished ones.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from mha_lightning.atomic import atomic_file, write_text_atomic
from mha_lightning.errors import ConfigError, DataError, UserError, exit_on_user_error, first_line
from mha_lightning.sweeps import DIRECTIONS, METRICS_FILE, Objective, default_direction

MULTIRUN_FILE = "multirun.yaml"
SWEEP_STATE_FILE = "sweep_state.json"  # the sweep process: pid, host, start, and its end once reached
JOB_STATE_FILE = "job_state.json"  # in a job folder, at the job's end: finished or failed, with the error
REPORT_CSV, REPORT_MD, REPORT_PNG = "sweep_report.csv", "sweep_report.md", "sweep_report.png"

FINISHED, RUNNING, FAILED, UNKNOWN = "finished", "running", "failed", "running or failed"


@dataclass
class Job:
    """One job folder of the sweep."""

    name: str
    path: Path
    status: str
    overrides: list[str]
    values: dict[str, str]  # swept key -> this job's value, as typed on the command line
    metrics: dict[str, float | None]
    error: str | None = None

    def objective(self, metric: str) -> float | None:
        """This job's value of ``metric`` as the sweeper saw it: its best over the run's validations
        (``<metric>_best``, what ``mha-train`` returns) where recorded, else its final value; None when
        missing or not finite."""
        value = self.metrics.get(f"{metric}_best", self.metrics.get(metric))
        return float(value) if value is not None and math.isfinite(value) else None


@dataclass
class Sweep:
    """What a multirun folder says about its jobs."""

    path: Path
    config: DictConfig  # multirun.yaml
    swept: dict[str, list[str]]  # key -> planned values (empty for a continuous range, e.g. Optuna's)
    jobs: list[Job]
    objective: Objective
    state: str  # finished | running | ended (the sweep process is gone) | unknown
    planned: int | None = None
    fixed: list[str] = field(default_factory=list)  # overrides every job shares

    @property
    def best(self) -> Job | None:
        """The finished job with the best finite objective."""
        best = None
        for job in self.jobs:
            value = job.objective(self.objective.metric)
            if job.status == FINISHED and value is not None:
                if best is None or self.objective.better(value, best.objective(self.objective.metric)):
                    best = job
        return best

    def counts(self) -> dict[str, int]:
        """Jobs per status."""
        out: dict[str, int] = {}
        for job in self.jobs:
            out[job.status] = out.get(job.status, 0) + 1
        return out

    @property
    def partial(self) -> bool:
        """Whether any job has not finished (or more are planned than have started)."""
        unfinished = any(job.status != FINISHED for job in self.jobs)
        return unfinished or (self.planned is not None and len(self.jobs) < self.planned)


# --------------------------------------------------------------------------- reading a sweep
def read_sweep(path: str | Path, metric: str | None = None, direction: str | None = None) -> Sweep:
    """Read the multirun folder ``path``; ``metric`` / ``direction`` override the sweep's objective."""
    path = Path(path)
    if not (path / MULTIRUN_FILE).is_file():
        hint = "a folder that `mha-train -m ...` wrote (hydra.sweep.dir, e.g. logs/train/multiruns/<time>)"
        raise DataError(f"{path} is not a Hydra multirun folder (no {MULTIRUN_FILE}); pass {hint}")
    config = _load_yaml(path / MULTIRUN_FILE)
    sweep_args = _sweep_arguments(config)
    swept = {o.key_or_group: _discrete_values(o) for o in _parse(sweep_args, path) if o.is_sweep_override()}
    state = sweep_process_state(path)
    job_dirs = sorted((d for d in path.iterdir() if _is_job_dir(d)), key=_job_order)
    jobs = [_read_job(d, swept, state) for d in job_dirs]
    recorded = [j.overrides for j in jobs if j.overrides]  # a job that has just started has none yet
    shared = set.intersection(*map(set, recorded)) if recorded else set()
    fixed = [o for o in (recorded[0] if recorded else []) if o in shared and o.split("=")[0].lstrip("+~") not in swept]
    return Sweep(
        path=path,
        config=config,
        swept=swept,
        jobs=jobs,
        objective=choose_objective(config, metric, direction),
        state=state,
        planned=_planned_jobs(config, swept),
        fixed=fixed,
    )


def _sweep_arguments(config: DictConfig) -> list[str]:
    """The sweep's overrides: the command line's, then the sweeper's ``params`` (as Hydra combines them)."""
    args = [str(a) for a in OmegaConf.select(config, "hydra.overrides.task", default=None) or []]
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    return [f"{k}={v}" for k, v in params.items()] + args


def _parse(overrides: Sequence[str], where: Path) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as e:
        raise DataError(f"cannot read the overrides recorded in {where}: {first_line(e)}") from None


def _discrete_values(override) -> list[str]:
    return list(override.sweep_string_iterator()) if override.is_discrete_sweep() else []


def _planned_jobs(config: DictConfig, swept: dict[str, list[str]]) -> int | None:
    """How many jobs the sweep will run: Optuna's ``n_trials``, or the basic sweeper's grid size."""
    trials = OmegaConf.select(config, "hydra.sweeper.n_trials", default=None)
    if isinstance(trials, int):
        return trials
    target = str(OmegaConf.select(config, "hydra.sweeper._target_", default=""))
    if target.endswith("BasicSweeper") and all(swept.values()):
        return math.prod(len(v) for v in swept.values())
    return None


def _is_job_dir(path: Path) -> bool:
    # Hydra names job folders by job number (hydra.sweep.subdir); a job that got far enough has a record.
    return path.is_dir() and (path.name.isdigit() or (path / ".hydra").is_dir() or (path / METRICS_FILE).exists())


def _job_order(path: Path) -> tuple:
    return (0, int(path.name), "") if path.name.isdigit() else (1, 0, path.name)


def _read_job(path: Path, swept: dict[str, list[str]], sweep_state: str) -> Job:
    overrides = read_overrides(path)
    parsed = {o.key_or_group: o for o in _parse(overrides, path / ".hydra" / "overrides.yaml")}
    values = {}
    for key in swept:
        if key in parsed:
            values[key] = parsed[key].get_value_element_as_str()
        else:  # a multi-process job relaunched from its resolved config records no overrides
            values[key] = value_from_config(path, key)
    metrics = _read_json(path / METRICS_FILE)
    note = _read_json(path / JOB_STATE_FILE) or {}
    if metrics is not None:
        status, error = FINISHED, None
    elif note.get("status") == FAILED:
        status, error = FAILED, note.get("error")
    elif sweep_state in ("finished", "ended"):
        # The sweep process is gone and this job never wrote its metrics.
        status, error = FAILED, note.get("error") or "the sweep process ended before this job finished"
    elif sweep_state == "running":
        status, error = RUNNING, None
    else:
        status, error = UNKNOWN, None
    return Job(path.name, path, status, overrides, values, metrics or {}, error)


def read_overrides(path: Path) -> list[str]:
    """A job folder's command-line overrides (``.hydra/overrides.yaml``; none where it saved none)."""
    record = path / ".hydra" / "overrides.yaml"
    if not record.is_file():
        return []
    return [str(o) for o in _load_yaml(record)]


def value_from_config(path: Path, key: str) -> str:
    """A swept key's value from the job's saved config ("?" where the job saved none yet)."""
    for name in (".hydra/config.yaml", "job_config.yaml"):
        if (path / name).is_file():
            value = OmegaConf.select(_load_yaml(path / name), key, default=None, throw_on_resolution_failure=False)
            if value is not None and not OmegaConf.is_config(value):
                return str(value)
    return "?"


def _load_yaml(path: Path):
    import yaml

    try:
        return OmegaConf.load(path)
    except (OSError, yaml.YAMLError) as e:
        raise DataError(f"cannot read {path}: {first_line(e)}") from None


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {first_line(e)}") from None


def choose_objective(config: DictConfig, metric: str | None = None, direction: str | None = None) -> Objective:
    """The objective: ``metric`` if given, else the sweep's ``optimized_metric`` (lightning-hydra-template's
    convention), else the checkpoint callback's monitor, else ``val/loss``. Its direction: ``direction`` if given
    (min/max or minimize/maximize), else the sweeper's (Optuna's ``hydra.sweeper.direction``), else
    ``optimized_direction`` for that metric, else the checkpoint callback's mode for its own metric, else from the
    name as the jobs infer it (``sweeps.default_direction``). One ``Objective``: the report ranks as the sweep
    optimised."""
    checkpoint = OmegaConf.select(config, "callbacks.model_checkpoint", default=None) or {}
    optimized = OmegaConf.select(config, "optimized_metric", default=None)
    if metric:
        source = "--metric"
    elif optimized:
        metric, source = str(optimized), "optimized_metric"
    elif checkpoint.get("monitor"):
        metric, source = str(checkpoint["monitor"]), "callbacks.model_checkpoint.monitor"
    else:
        metric, source = "val/loss", "default"
    sweeper_direction = OmegaConf.select(config, "hydra.sweeper.direction", default=None)
    if OmegaConf.is_list(sweeper_direction):  # multi-objective: the report ranks by the first
        sweeper_direction = sweeper_direction[0] if len(sweeper_direction) else None
    stated = OmegaConf.select(config, "optimized_direction", default=None) if metric == optimized else None
    if direction:
        how = "--direction"
        if direction not in ("min", "max", *DIRECTIONS):
            raise ConfigError(f"--direction must be min or max, got {direction!r}")
    elif sweeper_direction:
        direction, how = str(sweeper_direction), "hydra.sweeper.direction"
    elif stated:
        direction, how = str(stated), "optimized_direction"
    elif checkpoint.get("monitor") == metric and checkpoint.get("mode") in ("min", "max"):
        direction, how = checkpoint["mode"], "callbacks.model_checkpoint.mode"
    else:
        direction, how = default_direction(metric), "inferred from the name"
    direction = "minimize" if direction.startswith("min") else "maximize"
    return Objective(metric, direction, f"metric from {source}, direction {how}")


# --------------------------------------------------------------------------- the sweep process
def note_sweep_process(sweep_dir: str | Path, pid: int | None = None, finished: bool = False) -> Path:
    """Record the process that runs the sweep (``finished``: it reached the end), so a report can tell
    a running job from one whose sweep died."""
    path = Path(sweep_dir) / SWEEP_STATE_FILE
    note = _read_json(path) if finished and path.exists() else None
    note = note or {"pid": pid or os.getpid(), "host": socket.gethostname(), "started": time.time()}
    if finished:
        note["finished"] = time.time()
    write_text_atomic(path, json.dumps(note, indent=2))
    return path


def sweep_process_state(sweep_dir: str | Path) -> str:
    """``finished``, ``running`` (its process is alive on this host), ``ended`` (the process is gone before
    the end) or ``unknown`` (no note, or the sweep runs on another host)."""
    note = _read_json(Path(sweep_dir) / SWEEP_STATE_FILE)
    if note is None:
        return "unknown"
    if note.get("finished"):
        return "finished"
    if note.get("host") != socket.gethostname():
        return "unknown"
    return "running" if _process_alive(int(note["pid"])) else "ended"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


# --------------------------------------------------------------------------- writing the report
@dataclass
class ReportFiles:
    """Where the report went."""

    csv: Path
    markdown: Path
    png: Path
    wandb_run: Path | None = None


def table(sweep: Sweep) -> tuple[list[str], list[list[Any]]]:
    """The report's columns and one row per job: status, swept values, objective, every final metric."""
    metric_keys = sorted({k for job in sweep.jobs for k in job.metrics} - {sweep.objective.metric})
    columns = ["job", "status", "best", *sweep.swept, sweep.objective.metric, *metric_keys, "overrides", "error"]
    best = sweep.best
    rows = []
    for job in sweep.jobs:
        rows.append(
            [
                job.name,
                job.status,
                job is best,
                *(job.values[k] for k in sweep.swept),
                job.objective(sweep.objective.metric),
                *(job.metrics.get(k) for k in metric_keys),
                " ".join(job.overrides),
                job.error or "",
            ]
        )
    return columns, rows


def write_report(sweep: Sweep) -> ReportFiles:
    """Write the CSV, the Markdown (table, best job, the figure) and the PNG into the sweep folder."""
    files = ReportFiles(sweep.path / REPORT_CSV, sweep.path / REPORT_MD, sweep.path / REPORT_PNG)
    columns, rows = table(sweep)
    # A report is rewritten while people (or a browser) read it: never show a half-written file.
    with atomic_file(files.csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows([["" if v is None else v for v in row] for row in rows])
    render_figure(sweep, files.png)
    write_text_atomic(files.markdown, markdown(sweep, files.png.name))
    return files


def summary_line(sweep: Sweep) -> str:
    """E.g. ``4 jobs: 3 finished, 1 running (of 8 planned; the sweep is running)``."""
    counts = ", ".join(f"{n} {status}" for status, n in sweep.counts().items()) or "none started"
    planned = f"of {sweep.planned} planned; " if sweep.planned is not None else ""
    state = {
        "finished": "the sweep has finished",
        "running": "the sweep is running",
        "ended": "the sweep process ended early",
        "unknown": "the sweep's process is unknown here",
    }[sweep.state]
    return f"{len(sweep.jobs)} jobs: {counts} ({planned}{state})"


def markdown(sweep: Sweep, png_name: str) -> str:
    """The report as Markdown: what was swept, the best job, the table and the figure."""
    objective = sweep.objective
    best = sweep.best
    lines = [f"# Sweep report: {sweep.path.name}", "", f"Sweep folder: `{sweep.path}`", ""]
    if sweep.partial:
        lines += ["**Partial results**: not every job has finished; the best job is chosen among finished ones.", ""]
    lines += [
        f"- Jobs: {summary_line(sweep)}",
        f"- Objective: `{objective.metric}`, {'lower' if objective.lower_is_better else 'higher'} is better "
        f"({objective.source})",
        f"- Swept: {', '.join(f'`{k}`' for k in sweep.swept) or 'nothing'}",
    ]
    if sweep.fixed:
        lines.append(f"- Every job: `{' '.join(sweep.fixed)}`")
    if best is not None:
        values = ", ".join(f"{k}={best.values[k]}" for k in sweep.swept)
        value = _fmt(best.objective(objective.metric))
        lines.append(f"- **Best job: {best.name}** ({values}): {objective.metric} = {value}")
    else:
        lines.append(f"- Best job: none yet (no finished job has a finite `{objective.metric}`)")
    columns, rows = table(sweep)
    # The Markdown keeps the columns people compare; the CSV has every metric.
    shown = [i for i, c in enumerate(columns) if c not in ("overrides", "best") and not c.startswith("train/")]
    lines += ["", "| " + " | ".join(columns[i] for i in shown) + " |", "|" + "---|" * len(shown)]
    for row in rows:
        cells = [_fmt(row[i]) for i in shown]
        cells[0] = f"**{cells[0]}**" if row[columns.index("best")] else cells[0]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += ["", f"![{objective.metric} against each swept value]({png_name})", ""]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_figure(sweep: Sweep, path: Path) -> Path:
    """One subplot per swept key: the objective of every finished job against that key's value (numbers on
    a numeric axis, anything else as categories); the best job is a star."""
    from mha_lightning.monitor.plots import figure_to_png, new_figure

    metric = sweep.objective.metric
    keys = list(sweep.swept) or ["job"]
    fig = new_figure((4.2 * len(keys), 3.6))
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    done = [j for j in sweep.jobs if j.objective(metric) is not None]
    best = sweep.best
    for ax, key in zip(axes, keys, strict=True):
        raw = [j.name if key == "job" else j.values[key] for j in done]
        numeric = all(_is_number(v) for v in raw)
        if numeric:
            xs = [float(v) for v in raw]
            ticks = sorted(set(xs))
            if len(ticks) <= 12:  # the swept values themselves as ticks (1, 2, 4, 8 rather than 2.5, 5, 7.5)
                ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        else:  # categories, in the sweep's own order where it is known
            order = [v for v in sweep.swept.get(key, []) if v in raw] + sorted(set(raw) - set(sweep.swept.get(key, [])))
            xs = [order.index(v) for v in raw]
            ax.set_xticks(range(len(order)), order, rotation=30 if len(order) > 4 else 0)
        ys = [j.objective(metric) for j in done]
        ax.scatter(xs, ys, color="tab:blue", zorder=2)
        for x, y, job in zip(xs, ys, done, strict=True):
            ax.annotate(f"job {job.name}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            if job is best:
                ax.scatter([x], [y], marker="*", s=240, color="tab:orange", zorder=3, label=f"best (job {job.name})")
        if best is not None and best in done:
            ax.legend(loc="best", fontsize=8)
        ax.margins(x=0.15, y=0.15)
        ax.set_xlabel(key)
        ax.set_ylabel(f"{metric} ({'lower' if sweep.objective.lower_is_better else 'higher'} is better)")
        ax.grid(alpha=0.3)
    title = f"{sweep.path.name}: {len(done)} of {len(sweep.jobs)} jobs with a result"
    fig.suptitle(title + (" (partial results)" if sweep.partial else ""))
    return figure_to_png(fig, path)


def _is_number(value: str) -> bool:
    try:
        return math.isfinite(float(value))
    except ValueError:
        return False


# --------------------------------------------------------------------------- W&B
def wandb_settings(config: DictConfig) -> dict[str, Any] | None:
    """The sweep's W&B logger settings (project, group, tags, offline), or None when it did not log to W&B."""
    node = OmegaConf.select(config, "logger.wandb", default=None, throw_on_resolution_failure=False)
    if not node or "_target_" not in node:
        return None
    out = {}
    for key in ("project", "entity", "group", "tags", "offline"):
        value = OmegaConf.select(node, key, default=None, throw_on_resolution_failure=False)
        out[key] = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    return out


def log_to_wandb(sweep: Sweep, files: ReportFiles) -> Path | None:
    """Log the table, the figure and the best job to a W&B run in the sweep's group (the configured
    ``logger.wandb.group``, else the sweep folder's name); None when the sweep did not use W&B.

    The run's id is fixed by the sweep folder, so reporting again (a running sweep) continues that run."""
    settings = wandb_settings(sweep.config)
    if settings is None:
        return None
    import wandb

    from mha_lightning.loggers import wandb_mode

    columns, rows = table(sweep)
    best = sweep.best
    run_id = "sweep-report-" + hashlib.blake2b(str(sweep.path.resolve()).encode(), digest_size=6).hexdigest()
    run = wandb.init(
        project=settings["project"],
        entity=settings["entity"],
        group=settings["group"] or sweep.path.name,
        tags=list(settings["tags"] or []),
        job_type="sweep-report",
        name=f"sweep-report {sweep.path.name}",
        id=run_id,
        resume="allow",
        dir=str(sweep.path),
        mode=wandb_mode(settings["offline"]),
        config={
            "sweep_dir": str(sweep.path),
            "objective": sweep.objective.metric,
            "direction": sweep.objective.direction,
            "swept": list(sweep.swept),
        },
    )
    try:
        run.log(
            {
                "sweep/report": wandb.Table(columns=columns, data=[[_cell(v) for v in row] for row in rows]),
                "sweep/objective": wandb.Image(str(files.png), caption=summary_line(sweep)),
            }
        )
        run.summary["sweep/jobs"] = len(sweep.jobs)
        run.summary["sweep/finished"] = sweep.counts().get(FINISHED, 0)
        run.summary["sweep/partial"] = sweep.partial
        if best is not None:
            run.summary["sweep/best_job"] = best.name
            run.summary[f"sweep/best/{sweep.objective.metric}"] = best.objective(sweep.objective.metric)
        folder = Path(run.dir).parent
    finally:
        run.finish()
        wandb.teardown()  # finish() can return before the offline run file is complete
    return folder


def _cell(value: Any) -> Any:
    return "" if value is None else value


# --------------------------------------------------------------------------- the Hydra callback
class SweepReportCallback(Callback):
    """Hydra callback (``hydra.callbacks`` in ``conf/hydra/default.yaml``): notes the sweep process and each
    job's end, and writes the report when the sweep ends (also after a failed job: the basic sweeper stops
    there). A multirun only; plain runs are left alone."""

    def __init__(self, use_wandb: bool = True) -> None:
        self.use_wandb = use_wandb  # log the report to W&B when the sweep's jobs do

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Record the sweep process (pid, host) in the sweep folder, and the sweep's config where the
        launcher does not (Hydra's basic launcher writes multirun.yaml; the submitit launchers do not)."""
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        note_sweep_process(sweep_dir)
        if not (sweep_dir / MULTIRUN_FILE).exists():
            OmegaConf.save(config, sweep_dir / MULTIRUN_FILE)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        """Note whether the job finished or failed (with its error's first line) in its folder."""
        from hydra.core.utils import JobStatus
        from hydra.types import RunMode

        if config.hydra.mode != RunMode.MULTIRUN:
            return
        job_dir = Path(config.hydra.runtime.output_dir)
        note: dict[str, Any] = {"status": FINISHED if job_return.status == JobStatus.COMPLETED else FAILED}
        if job_return.status == JobStatus.FAILED:
            try:
                job_return.return_value  # noqa: B018  (raises the job's exception)
            except Exception as e:  # noqa: BLE001 - whatever the job raised is what the report names
                note["error"] = f"{type(e).__name__}: {first_line(e)}"
        elif isinstance(job_return.return_value, float) and not math.isfinite(job_return.return_value):
            # A trial that failed or diverged returns its objective's worst value so the sweep goes on
            # (docs/design.md, "Sweeps of multi-process jobs"): for the report it failed.
            note = {"status": FAILED, "error": f"the trial failed or diverged (reported {job_return.return_value})"}
        job_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(job_dir / JOB_STATE_FILE, json.dumps(note, indent=2))
        if note["status"] == FAILED:
            self._report(Path(config.hydra.sweep.dir), use_wandb=False)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Mark the sweep finished, write the report and log it to W&B when the sweep used W&B."""
        sweep_dir = Path(config.hydra.sweep.dir)
        note_sweep_process(sweep_dir, finished=True)
        self._report(sweep_dir, use_wandb=self.use_wandb)

    @staticmethod
    def _report(sweep_dir: Path, use_wandb: bool) -> None:
        # A folder the report cannot read must not turn a sweep's results into a traceback: one line instead.
        try:
            sweep = read_sweep(sweep_dir)
            files = write_report(sweep)
            run = log_to_wandb(sweep, files) if use_wandb else None
        except UserError as e:
            print(f"sweep report not written: {first_line(e)}; see mha-sweep-report {sweep_dir}", file=sys.stderr)
            return
        print(_where(files, run, sweep), flush=True)


def _where(files: ReportFiles, run: Path | None, sweep: Sweep) -> str:
    best = sweep.best
    lines = [f"sweep report: {files.markdown} ({summary_line(sweep)})", f"table: {files.csv}", f"figure: {files.png}"]
    if best is not None:
        metric = sweep.objective.metric
        lines.append(f"best job: {best.path} ({metric} = {_fmt(best.objective(metric))})")
    if run is not None:
        upload = f"  ->  upload with: wandb sync {run}" if run.name.startswith("offline-") else ""
        lines.append(f"W&B: {run}{upload}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI
def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mha-sweep-report",
        description="Report a Hydra multirun (finished or still running): a table of every job's swept values and "
        f"final metrics, the best job, and the objective against each swept value ({REPORT_CSV}, {REPORT_MD}, "
        f"{REPORT_PNG} in the sweep folder; also to W&B when the sweep logged to W&B).",
    )
    p.add_argument("sweep", metavar="MULTIRUN_DIR", help=f"the sweep folder (it holds {MULTIRUN_FILE})")
    p.add_argument("--metric", help="objective (default: the sweep's optimized_metric, else val/loss)")
    p.add_argument("--direction", choices=("min", "max"), help="default: the sweeper's, else inferred from the name")
    p.add_argument("--no-wandb", action="store_true", help="do not log the report to W&B")
    return p


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    """``mha-sweep-report`` entry point; returns the exit status (2 on a user error)."""
    args = _build_parser().parse_args(argv)
    sweep = read_sweep(args.sweep, metric=args.metric, direction=args.direction)
    files = write_report(sweep)
    run = None if args.no_wandb else log_to_wandb(sweep, files)
    print(_where(files, run, sweep), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
