"""`mha-heads-study`: gather finished runs of a heads sweep into one table and one figure.

    mha-train experiment=heads_study_reverse            # a multirun: num_heads x head_dim
    mha-heads-study logs/heads_study_reverse/multiruns/<time>
    mha-heads-study <multirun of seed 0> <multirun of seed 1> --out study_2seeds   # several, one table

Each job's last checkpoint is analysed (``mha-analyze``'s own code, in-process) and reduced to
the study's numbers (docs/design.md, "Analysing heads"): the task metric, the spread of
normalised entropy across a layer's heads, the mean Jensen-Shannon distance between a layer's
heads, and the share of heads removable within 1% of the metric (least important first).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from mha_lightning.errors import DataError, exit_on_user_error
from mha_lightning.sweep_report import read_overrides, value_from_config
from mha_lightning.sweeps import METRICS_FILE

STUDY_DIR = "heads_study"
SPLIT = "head_dim = d_model / num_heads"
COLUMNS = (
    "job",
    "variant",
    "num_heads",
    "head_dim",
    "seed",
    "metric",
    "value",
    "val_chrf",
    "entropy_spread",
    "mean_js",
    "share_removable",
)
ANALYSIS = {
    "examples": 500,
    "batch_size": 64,
    "similarity": True,
    "prune": {
        "enabled": True,
        "points": 9,
        "random_orders": 1,
        "examples": 200,
        "tolerance": 0.01,
        "wide_tolerance": 0.05,
        "single_heads": False,
        "single_heads_metric": False,
    },
    "roles": {"enabled": False},
    "maps": {"examples": 0},
    "trainer": {"devices": 1},
    "split": "val",
    "seed": 0,
}


def summarise(results: dict[str, Any]) -> dict[str, float]:
    """One analysis -> the study's numbers (NaN where a number needs two heads, or a model that scores)."""
    stats, pruning = results["statistics"], results["pruning"]
    spreads = [np.std(row) for layers in stats["entropy_norm"].values() for row in np.asarray(layers)]
    js = []
    for layers in stats["js"].values():
        for m in np.asarray(layers):
            upper = m[np.triu_indices(len(m), k=1)]
            js += upper.tolist()
    return {
        "metric": pruning["metric"],
        "value": pruning["baseline"],
        "entropy_spread": float(np.mean(spreads)),
        "mean_js": float(np.mean(js)) if js else math.nan,
        # A model that scores 0 loses nothing to any removal: "removable" says nothing there.
        "share_removable": pruning["removable"]["importance"] / pruning["points"][-1]
        if pruning["baseline"] > 0
        else math.nan,
    }


def job_dirs(multirun: Path) -> list[Path]:
    """The sweep's job folders that hold a finished run (a last checkpoint), in job order."""
    jobs = [p for p in multirun.iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted((p for p in jobs if (p / "checkpoints" / "last.ckpt").exists()), key=lambda p: int(p.name))


def study(multiruns: list[Path], examples: int = 500, points: int = 9, out: Path | None = None) -> Path:
    """Analyse every finished job of the ``multiruns`` (one sweep, or several: seeds added later land
    in a multirun of their own) on ``examples`` validation examples, ``points`` pruning points each
    -> the study's folder (study.csv, study.md, study.png; default ``<first multirun>/heads_study``)."""
    from mha_lightning.analysis.run import analyze

    for multirun in multiruns:
        if not multirun.is_dir():
            raise DataError(f"{multirun} is not a folder; give the multirun folder of a heads study")
        if not job_dirs(multirun):
            raise DataError(f"{multirun} holds no finished job (no <job>/checkpoints/last.ckpt yet)")
    out = out or multiruns[0] / STUDY_DIR
    rows = []
    for multirun in multiruns:
        for job in job_dirs(multirun):
            # One folder of jobs keeps Hydra's job numbers; several are told apart by their names.
            name = job.name if len(multiruns) == 1 else f"{multirun.name}/{job.name}"
            settings = {**ANALYSIS, "ckpt": str(job / "checkpoints" / "last.ckpt"), "examples": examples}
            settings["prune"] = {**ANALYSIS["prune"], "points": points, "examples": min(examples, 200)}
            results, _ = analyze(settings, out / name)
            model = results["model"]
            shape = (model["num_heads"], model["head_dim"], model["d_model"])
            row = {"job": name, "variant": variant(job, *shape), "num_heads": shape[0], "head_dim": shape[1]}
            row["seed"], row["val_chrf"] = job_seed(job), job_metric(job, "val/chrf")
            rows.append({**row, **summarise(results)})
    out.mkdir(parents=True, exist_ok=True)
    with (out / "study.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    _figure(rows, out / "study.png")
    (out / "study.md").write_text(_markdown(rows, multiruns))
    (out / "study.json").write_text(json.dumps(rows, indent=1))
    return out


def variant(job: Path, num_heads: int, head_dim: int, d_model: int) -> str:
    """Which arm of the study a job is: its ``model.head_dim`` override (``null``: the width split into
    heads), else read from its shape."""
    for item in read_overrides(job):
        key, _, value = item.partition("=")
        if key.lstrip("+~") == "model.head_dim":
            return SPLIT if value in ("null", "None", "") else f"head_dim fixed at {value}"
    return SPLIT if num_heads * head_dim == d_model else f"head_dim {head_dim}"


def job_metric(job: Path, key: str) -> float:
    """The job's own last validation ``key`` (its metrics.json, the whole split), NaN where it has none."""
    path = job / METRICS_FILE
    try:
        return float(json.loads(path.read_text()).get(key, math.nan)) if path.is_file() else math.nan
    except (ValueError, TypeError):
        return math.nan


def job_seed(job: Path) -> int | str:
    """The job's ``seed`` (from the config Hydra saved beside it), "" where it saved none."""
    seed = value_from_config(job, "seed")
    return "" if seed == "?" else int(seed)


def _figure(rows: list[dict[str, Any]], path: Path) -> None:
    """One panel per number against num_heads, a line per variant: the mean over seeds, and the
    seeds' range as error bars where a configuration ran with more than one."""
    from mha_lightning.monitor.plots import figure_to_png, new_figure

    fig = new_figure((12.0, 3.2))
    axes = fig.subplots(1, 4)
    variants: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        variants.setdefault(row["variant"], []).append(row)
    titles = {
        "value": rows[0]["metric"],
        "entropy_spread": "entropy spread across heads",
        "mean_js": "mean JS distance between heads",
        "share_removable": "share of heads removable (1%)",
    }
    for ax, (key, title) in zip(axes, titles.items(), strict=True):
        for name, group in variants.items():
            by_heads: dict[int, list[float]] = {}
            for r in group:
                by_heads.setdefault(r["num_heads"], []).append(r[key])
            heads = sorted(by_heads)
            values = [np.asarray(by_heads[h], dtype=float) for h in heads]
            mean = np.array([v.mean() for v in values])
            low, high = np.array([v.min() for v in values]), np.array([v.max() for v in values])
            spread = np.stack([mean - low, high - mean])  # (2, len(heads)): below and above the mean
            ax.errorbar(heads, mean, yerr=spread, marker="o", capsize=3, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("num_heads")
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    figure_to_png(fig, path)


def _markdown(rows: list[dict[str, Any]], multiruns: list[Path]) -> str:
    lines = ["# Heads study: " + ", ".join(f"`{m}`" for m in multiruns), "", "![study](study.png)", ""]
    lines += [
        "| variant | num_heads | head_dim | seed | " + rows[0]["metric"] + " | chrF (run's validation) "
        "| entropy spread | mean JS | removable |"
    ]
    lines += ["|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["variant"], r["num_heads"], str(r["seed"]))):
        lines.append(
            f"| {r['variant']} | {r['num_heads']} | {r['head_dim']} | {r['seed']} | {r['value']:.3f} | "
            f"{_fmt(r['val_chrf'], '.2f')} | {r['entropy_spread']:.3f} | {_fmt(r['mean_js'], '.3f')} | "
            f"{_fmt(r['share_removable'], '.0%')} |"
        )
    return "\n".join(lines) + "\n"


def _fmt(value: float, spec: str) -> str:
    """``value`` formatted, or "-" where it is undefined (NaN)."""
    return "-" if math.isnan(value) else format(value, spec)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    """`mha-heads-study` entry point."""
    parser = argparse.ArgumentParser(
        prog="mha-heads-study", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "multiruns",
        type=Path,
        nargs="+",
        help="the multirun folder of a heads study (or any num_heads sweep); several are gathered into one table",
    )
    parser.add_argument("--examples", type=int, default=500, help="validation examples analysed per job")
    parser.add_argument("--points", type=int, default=9, help="pruning-curve points per job")
    parser.add_argument("--out", type=Path, help="the study's folder (default: <first multirun>/heads_study)")
    args = parser.parse_args(argv)
    if args.examples < 1 or args.points < 2:
        raise DataError(f"--examples must be at least 1 and --points at least 2, got {args.examples} and {args.points}")
    out = study(args.multiruns, args.examples, args.points, args.out)
    print(f"study: {out / 'study.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
