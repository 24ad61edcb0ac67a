"""`mha-analyze` on the tiny model trained on `reverse` (the session's `trained_reverse` run).

`reverse` has a known alignment (output position t copies input position n-1-t), so what the
analysis finds can be checked: some cross-attention head must follow that alignment, and the
heads it ranks as important must matter more than the ones it ranks as unimportant."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys

import pytest
import torch

from helpers.runs import cli_env
from helpers.wandb_offline import find_run_files, read_history
from mha_lightning import evaluate
from mha_lightning.analysis import run, study
from mha_lightning.analysis.pruning import random_order
from mha_lightning.analysis.scoring import TaskScorer
from mha_lightning.data.batching import collate
from mha_lightning.kinds import Head

pytestmark = pytest.mark.slow


def run_analyze(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mha_lightning.analysis.cli", *overrides]
    return subprocess.run(cmd, cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=600)


def test_analysis_finds_the_alignment_head_and_ranks_heads_by_what_removing_them_costs(
    trained_reverse, tmp_path, capsys
):
    out = tmp_path / "analysis"
    done = run_analyze(
        tmp_path,
        f"ckpt={trained_reverse.checkpoint}",
        "examples=120",
        "prune.points=5",
        "prune.random_orders=1",
        "maps.examples=1",
        "wandb.enabled=true",
        f"hydra.run.dir={out}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"report: {out / 'report.md'}" in done.stdout
    results = json.loads((out / "results.json").read_text())
    stats, pruning = results["statistics"], results["pruning"]
    assert stats["examples"] == 120

    # A cross-attention head attends, by argmax, to the source token it must copy.
    best_alignment = max(max(layer) for layer in stats["alignment"]["cross"])
    assert best_alignment > 0.9, stats["alignment"]["cross"]

    # Removing the most important head costs more than removing the least important one.
    ablation = pruning["ablation"]
    assert ablation["most_important"]["metric"] < ablation["least_important"]["metric"], ablation
    assert pruning["baseline"] >= 0.99  # the trained model, nothing removed
    assert pruning["points"][0] == 0 and pruning["points"][-1] == 24  # 4 heads x (2 + 2 + 2) attentions
    assert set(pruning["curves"]) == {"importance", "entropy", "random_0"}
    # With every head gone the model cannot reverse anything.
    assert all(curve[-1] < 0.05 for curve in pruning["curves"].values()), pruning["curves"]

    # Per-layer normalised importance has unit L2 norm; JS matrices are symmetric with a zero diagonal.
    for kind, layers in stats["importance_norm"].items():
        for row in layers:
            assert sum(v * v for v in row) == pytest.approx(1.0), kind
    for kind, layers in stats["js"].items():
        for m in layers:
            for i in range(4):
                assert m[i][i] == pytest.approx(0.0, abs=1e-6), kind
                for j in range(4):
                    assert m[i][j] == pytest.approx(m[j][i], abs=1e-9)

    # The report: every picture it shows exists as a PNG; every head has a row in heads.csv.
    report = (out / "report.md").read_text()
    for section in ("## The heads that matter", "## The heads that look alike", "## How many heads can go"):
        assert section in report
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    maps = {f"maps_{example}_{kind}.png" for example in (0,) for kind in ("enc_self", "dec_self", "cross")}
    assert set(images) == {"heads.png", "similarity.png", "pruning.png"} | maps, images
    for name in images:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    rows = list(csv.DictReader((out / "heads.csv").open()))
    assert len(rows) == 24 and rows[0]["head"] == "enc_self/L0/H0"

    # Each head removed alone: the raw importance ranks heads as the rise in token loss does.
    single = results["single_heads"]
    assert len(single["heads"]) == len(single["loss_rise"]) == len(single["metric_drop"]) == 24
    assert single["spearman_loss_rise"]["importance"] > 0.5, single["spearman_loss_rise"]
    by_head = {r["head"]: r for r in rows}
    assert float(by_head[single["heads"][0]]["removal_loss_rise"]) == pytest.approx(single["loss_rise"][0])
    assert "## Does importance predict a head's effect?" in report

    # Roles: the head that follows reverse's alignment has that role, with its evidence in heads.csv.
    best = max((r for r in rows if r["alignment"]), key=lambda r: float(r["alignment"]))
    assert "alignment" in best["roles"].split(), best
    assert "## What the heads do" in report
    assert all(r["sink"] != "" and r["rare"] != "" for r in rows)  # measured for every head
    assert all((r["previous"] == "") == r["head"].startswith("cross/") for r in rows)  # not for cross-attention

    # W&B (offline): one analysis run holding the headline numbers and every picture.
    (run_file,) = find_run_files(out / "wandb")
    (row,) = read_history(run_file)
    assert row["analysis/baseline"] == pruning["baseline"]
    assert row["analysis/removable/importance"] == pruning["removable"]["importance"]
    assert {f"analysis/{name[:-4]}" for name in images} <= set(row), sorted(row)

    # The same heads removed in mha-eval (the run's own test loop over the whole split): the most
    # important one costs clearly more than the least important one there too.
    def exact_match_without(head: str) -> float:
        capsys.readouterr()
        assert evaluate.main([str(trained_reverse.checkpoint), "--split", "val", "--head-mask", head]) == 0
        return json.loads(capsys.readouterr().out)["val/exact_match"]

    without_most = exact_match_without(ablation["most_important"]["head"])
    without_least = exact_match_without(ablation["least_important"]["head"])
    assert without_most < without_least - 0.03, (ablation, without_most, without_least)


def test_analyze_rejects_a_bad_setting_in_one_line(tmp_path):
    done = run_analyze(tmp_path, "ckpt=nowhere.ckpt", "prune.points=1")
    assert done.returncode == 2
    assert done.stderr.strip() == "error: prune.points must be an integer of at least 2, got 1"
    done = run_analyze(tmp_path)
    assert done.returncode == 2 and "ckpt is required" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_heads_study_gathers_the_finished_jobs_of_a_sweep_into_one_table(trained_reverse, tmp_path):
    def multirun_with_one_job(name: str, seed: int):
        multirun = tmp_path / name
        (multirun / "0" / ".hydra").mkdir(parents=True)
        (multirun / "0" / "checkpoints").symlink_to(trained_reverse.checkpoint.parent)
        (multirun / "0" / ".hydra" / "config.yaml").write_text(f"seed: {seed}\n")  # as Hydra saves it
        return multirun

    multirun = multirun_with_one_job("multirun", seed=3)
    (multirun / "1").mkdir()  # a job still running: no checkpoint yet, not in the table
    assert study.main([str(multirun), "--examples", "40", "--points", "3"]) == 0
    out = multirun / "heads_study"
    (row,) = csv.DictReader((out / "study.csv").open())
    assert (row["job"], row["num_heads"], row["head_dim"], row["seed"], row["metric"]) == (
        "0",
        "4",
        "16",
        "3",
        "exact_match",
    )
    assert float(row["value"]) >= 0.99
    assert row["val_chrf"] == "nan"  # reverse: no chrF (a text job's comes from its metrics.json)
    assert 0 < float(row["mean_js"]) < 1 and float(row["entropy_spread"]) > 0
    assert 0 <= float(row["share_removable"]) < 1
    assert (out / "study.png").read_bytes()[:4] == b"\x89PNG" and "| 4 | 16 | 3 |" in (out / "study.md").read_text()
    assert row["variant"] == "head_dim = d_model / num_heads"  # no head_dim override: read from the shape

    # A seed added later lands in a multirun of its own: both gathered into one table.
    later = multirun_with_one_job("multirun_seed4", seed=4)
    both = tmp_path / "both"
    assert study.main([str(multirun), str(later), "--examples", "40", "--points", "3", "--out", str(both)]) == 0
    rows = list(csv.DictReader((both / "study.csv").open()))
    assert [(r["job"], r["seed"]) for r in rows] == [("multirun/0", "3"), ("multirun_seed4/0", "4")]
    assert rows[0]["value"] == row["value"]  # the same job, analysed the same way
    assert (both / "multirun_seed4" / "0" / "results.json").exists()


def test_batched_scoring_of_head_masks_equals_decoding_each_mask(trained_reverse):
    """The pruning curves' scorer: exact match from one teacher-forced pass, several masks a batch,
    is the number greedy decoding gives mask by mask, on masks from harmless to fatal."""
    module, data, pairs = run.load(str(trained_reverse.checkpoint), "val", 150)
    every = [
        Head(kind, layer, h)
        for kind, mods in module.model.attention_layers().items()
        for layer in range(len(mods))
        for h in range(4)
    ]
    masks = [[], *([every[i]] for i in range(0, 24, 5)), random_order(every, 1)[:6], random_order(every, 2)[:12], every]
    heads = range(module.model.config.num_heads)
    fast = TaskScorer(module, data, pairs, 64, heads, progress=False)
    slow = TaskScorer(module, data, pairs, 64, heads, teacher_forced=False, progress=False)
    assert fast.teacher_forced and not slow.teacher_forced
    batched = fast.scores(masks)
    one_by_one = [slow.scores([mask])[0] for mask in masks]
    assert batched == one_by_one
    assert batched[0] >= 0.99 and batched[-1] == 0.0 and len(set(batched)) >= 4, batched
    assert fast.passes == 2 + 2 + 1  # batches of 64, 64, 22 examples; a pass holds 512 rows (8 masks of 64)
    # Decoding batches masks too, with the same numbers; the model's own gates are back afterwards.
    assert slow.scores(masks) == one_by_one
    assert all(attn.head_gate is None for mods in module.model.attention_layers().values() for attn in mods)

    # Token losses: masks side by side equal one mask at a time, and the full model's is its evaluation's
    # teacher-forced negative log-likelihood per token.
    losses = fast.token_losses(masks)
    assert losses == pytest.approx([fast.token_losses([mask])[0] for mask in masks], rel=1e-5)
    batch = {k: v for k, v in collate(fast.pairs).items()}
    with torch.no_grad():
        _, nll_sum, _ = module.model.teacher_forced_scores(batch["src"], batch["tgt_in"], batch["tgt_out"])
    assert losses[0] == pytest.approx(float(nll_sum) / int((batch["tgt_out"] != 0).sum()), rel=1e-5)
    assert losses[-1] > losses[0] + 1.0  # every head gone: the model is lost
    assert all(attn.head_gate is None for mods in module.model.attention_layers().values() for attn in mods)
