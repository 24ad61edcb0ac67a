"""`train(cfg)` end to end on one device: checkpoints, real offline W&B, exact resume,
`mha-eval`, parallel text with BPE, and bad input through the real CLI."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.config import QUIET, compose_train_config, text_overrides
from helpers.corpus import write_corpus
from helpers.runs import cli_env, csv_train_rows
from helpers.wandb_offline import find_run_files, read_history, read_run_info
from mha_lightning import evaluate
from mha_lightning.analysis import run as analysis_run
from mha_lightning.analysis.scoring import TaskScorer
from mha_lightning.data import SyntheticDataModule
from mha_lightning.kinds import Head
from mha_lightning.train import METRICS_FILE, train

SMALL_EVAL = ["data.num_val=100", "data.num_test=100"]


def test_end_to_end_with_offline_wandb(make_cfg, tmp_path):
    cfg = make_cfg(
        *QUIET,
        *SMALL_EVAL,
        "data=reverse",
        "model=tiny",
        "logger=wandb",
        "trainer.max_steps=40",
        "trainer.val_check_interval=15",  # validations at 15 and 30, then one of the final weights (40)
        "trainer.log_every_n_steps=5",
    )
    run = Path(cfg.paths.output_dir)
    metrics = train(cfg)

    for key in ("train/loss", "val/loss", "val/exact_match", "val/acc", "test/loss", "test/exact_match"):
        assert math.isfinite(metrics[key]), key
    assert json.loads((run / METRICS_FILE).read_text()) == metrics

    # Checkpoints: last and the single best (save_top_k=1, by val/loss), both at known steps.
    ckpts = run / "checkpoints"
    best = sorted(ckpts.glob("step*.ckpt"))
    assert (ckpts / "last.ckpt").is_file() and len(best) == 1, sorted(p.name for p in ckpts.iterdir())
    last = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 40
    assert last["hyper_parameters"]["run_config"]["trainer"]["max_steps"] == 40
    best_step = torch.load(best[0], map_location="cpu", weights_only=False)["global_step"]
    assert best_step in (15, 30)  # saved by validations while fitting

    # What wandb wrote offline, read back from its run file.
    (run_file,) = find_run_files(run / "wandb")
    history = read_history(run_file)
    train_rows = [r for r in history if "train/loss" in r]
    # log_every_n_steps=5 over 40 steps: rows after optimizer steps 5, 10, ..., 40.
    assert [r["trainer/global_step"] for r in train_rows] == list(range(4, 40, 5))
    losses = [r["train/loss"] for r in train_rows]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    val_rows = [r for r in history if "val/loss" in r]
    assert len(val_rows) == 3 and all("val/exact_match" in r for r in val_rows)
    # The run's val metrics are the last weights' (step 40), not step 30's: 40 is no multiple of 15.
    # (Lightning logs a validation inside fit at step count - 1, as it logs training rows; after fit, at 40.)
    assert [r["trainer/global_step"] for r in val_rows] == [14, 29, 40]
    assert val_rows[-1]["val/loss"] == pytest.approx(metrics["val/loss"], rel=0, abs=0)
    best_val = min(r["val/loss"] for r in val_rows[:2])
    assert best_step == [15, 30][[r["val/loss"] for r in val_rows[:2]].index(best_val)]
    assert any("test/exact_match" in r for r in history)
    info = read_run_info(run_file)
    assert info["project"] == "mha_lightning"
    assert info["config"]["model_config"]["num_heads"] == 4
    assert info["config"]["run_config"]["data"]["task"] == "reverse"


def test_resume_mid_epoch_continues_exactly(make_cfg, tmp_path):
    """A run stopped at step 20 (mid-epoch) and resumed to 40 logs the same losses and learning
    rates as an uninterrupted 40-step run: weights, optimizer, scheduler, step and data position
    all come back."""
    # Dropout on: the random streams come back from the checkpoint too.
    common = [
        *QUIET,
        "data.num_val=50",
        "data.num_test=50",
        "logger=csv",
        "trainer.log_every_n_steps=1",
        "model.dropout=0.1",
        "model.attention_dropout=0.1",
        "trainer.val_check_interval=20",
        "test=false",
    ]
    a, b = tmp_path / "A", tmp_path / "B"
    train(compose_train_config(a, [*common, "trainer.max_steps=40"]))
    train(compose_train_config(b, [*common, "trainer.max_steps=20"]))
    stopped = torch.load(b / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    epoch_batches = len(SyntheticDataModule(num_train=20000, batch_size=64).train_dataloader())
    assert stopped["global_step"] == 20 < epoch_batches  # really mid-epoch
    train(compose_train_config(b, [*common, "trainer.max_steps=40", f"ckpt_path={b / 'checkpoints' / 'last.ckpt'}"]))

    full, resumed = csv_train_rows(a), csv_train_rows(b, version=1)
    assert sorted(full) == list(range(40))
    assert sorted(resumed) == list(range(20, 40)), "the resumed run must start at step 20"
    for step in range(20, 40):
        assert resumed[step] == full[step], f"step {step}: resumed {resumed[step]} != uninterrupted {full[step]}"


@pytest.fixture
def short_run(make_cfg):
    cfg = make_cfg(*QUIET, *SMALL_EVAL, "logger=none", "trainer.max_steps=20", "trainer.val_check_interval=20")
    metrics = train(cfg)
    return Path(cfg.paths.output_dir), metrics


def test_eval_scores_a_checkpoint(short_run, capsys, tmp_path):
    run, _ = short_run
    ckpt = run / "checkpoints" / "last.ckpt"
    assert evaluate.main([str(ckpt), "--split", "test"]) == 0
    result = json.loads(capsys.readouterr().out)
    hyp_file = Path(result["hypotheses"])
    assert hyp_file == ckpt.parent / "test.hyp.txt"
    hyps = hyp_file.read_text().splitlines()
    refs = [" ".join(map(str, t)) for _, t in SyntheticDataModule(num_test=100).splits["test"]]
    assert result["n"] == len(hyps) == len(refs) == 100
    assert result["test/exact_match"] == sum(h == r for h, r in zip(hyps, refs, strict=True)) / len(refs)
    assert result["decoding"]["strategy"] == "greedy"  # the checkpoint's own decoding settings

    # Translating a file: one hypothesis per input line, each made of the task's symbols.
    src = tmp_path / "in.txt"
    src.write_text("4 5 6 7\n9 8 7 6 5 4\n23 22 21 20\n")
    out = tmp_path / "out" / "hyp.txt"
    assert evaluate.main([str(ckpt), "--input", str(src), "--output", str(out), "--beam", "3"]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 3
    assert all(4 <= int(tok) < 24 for line in lines for tok in line.split())

    # An empty input file: one line and exit code 2, no hypotheses file.
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    capsys.readouterr()
    assert evaluate.main([str(ckpt), "--input", str(empty), "--output", str(tmp_path / "none.txt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and "is empty" in err[-1] and not (tmp_path / "none.txt").exists()


@pytest.mark.parametrize("kind", ["missing", "garbage", "not_a_run"])
def test_eval_bad_checkpoint_exits_2_with_one_line(kind, tmp_path, capsys):
    path = tmp_path / "model.ckpt"
    if kind == "garbage":
        path.write_bytes(b"not a checkpoint at all")
    elif kind == "not_a_run":
        torch.save({"state_dict": {}}, path)  # a torch file, but not from mha-train
    assert evaluate.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(path) in lines[0], err


# ------------------------------------------------------------------------------ text
def test_text_end_to_end_with_bpe(make_cfg, tmp_path, capsys):
    files = write_corpus(tmp_path / "corpus")
    # A short warmup so 200 steps learn the word-for-word mapping (val BLEU ~20, chrF ~57).
    cfg = make_cfg(
        *QUIET,
        *text_overrides(files),
        "logger=csv",
        "trainer.max_steps=200",
        "module.scheduler.warmup_steps=30",
        "trainer.val_check_interval=100",
        "trainer.log_every_n_steps=5",
    )
    run = Path(cfg.paths.output_dir)
    metrics = train(cfg)

    tokenizer = run / "tokenizer.json"
    assert tokenizer.is_file()
    for key in ("val/bleu", "val/chrf", "test/bleu", "test/chrf"):
        assert math.isfinite(metrics[key]), key
    assert 0 < metrics["val/bleu"] <= 1 and 0 < metrics["val/chrf"] <= 1
    logged = list(csv.DictReader(next(run.glob("csv/version_*/metrics.csv")).open()))
    assert sum(1 for r in logged if r["val/bleu"] and r["val/chrf"]) == 2

    # mha-eval reuses the run's tokenizer: with the training text changed it would train a
    # different one, but the file stays as the run left it.
    before = (tokenizer.read_bytes(), tokenizer.stat().st_mtime_ns)
    files["src"].write_text("ganz andere wörter\n" * 200, encoding="utf-8")
    files["tgt"].write_text("entirely different words\n" * 200, encoding="utf-8")
    capsys.readouterr()
    assert evaluate.main([str(run / "checkpoints" / "last.ckpt"), "--split", "val"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (tokenizer.read_bytes(), tokenizer.stat().st_mtime_ns) == before
    assert result["n"] == 40
    hyps = Path(result["hypotheses"]).read_text(encoding="utf-8").splitlines()
    assert len(hyps) == 40
    # One scoring path: mha-eval runs the module's own validation/test loop on the same weights,
    # so every number equals what training reported, exactly (not within a tolerance).
    for key in ("val/bleu", "val/chrf", "val/exact_match", "val/loss", "val/acc"):
        assert result[key] == metrics[key], key
    capsys.readouterr()
    assert evaluate.main([str(run / "checkpoints" / "last.ckpt"), "--split", "test"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("test/bleu", "test/chrf", "test/exact_match", "test/loss", "test/acc"):
        assert result[key] == metrics[key], key

    # mha-analyze's scorer on text: sacreBLEU of the decoded split, as validation reports it, and
    # head masks decoded side by side in one batch give what each gives decoded alone.
    module, data, pairs = analysis_run.load(str(run / "checkpoints" / "last.ckpt"), "val", 40)
    scorer = TaskScorer(module, data, pairs, 64, range(module.model.config.num_heads), progress=False)
    assert scorer.name == "bleu" and not scorer.teacher_forced
    masks = [[], [Head("cross", 0, h) for h in range(4)], [Head("enc_self", 1, 2)], [Head("dec_self", 0, 0)]]
    batched = scorer.scores(masks)
    assert batched == [scorer.scores([mask])[0] for mask in masks]
    assert batched[0] == pytest.approx(metrics["val/bleu"], abs=1e-6) and batched[1] < batched[0]


def _train_cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "mha_lightning.train",
        *QUIET,
        "logger=none",
        *overrides,
        f"hydra.run.dir={tmp_path / 'cli_run'}",
    ]
    return subprocess.run(cmd, cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=300)


def _assert_one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def test_cli_text_missing_file(tmp_path):
    files = write_corpus(tmp_path / "corpus")
    files["src"] = tmp_path / "corpus" / "no_such_file.de"
    line = _assert_one_error_line(_train_cli(tmp_path, *text_overrides(files)), str(files["src"]))
    assert "not found" in line


def test_cli_text_misaligned_files(tmp_path):
    files = write_corpus(tmp_path / "corpus")
    files["tgt"].write_text(files["tgt"].read_text() + "one line too many\n")
    line = _assert_one_error_line(_train_cli(tmp_path, *text_overrides(files)), str(files["src"]), str(files["tgt"]))
    assert "200" in line and "201" in line


def test_resume_in_a_new_run_dir_reuses_the_checkpoint_tokenizer_and_eval_needs_no_training_files(
    make_cfg, tmp_path, capsys
):
    files = write_corpus(tmp_path / "corpus")
    first = make_cfg(*QUIET, *text_overrides(files), "logger=none", "trainer.max_steps=10", "test=false")
    train(first)
    ckpt = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    original = (Path(first.paths.output_dir) / "tokenizer.json").read_bytes()

    # Same corpus path, different text: a retrained tokenizer would differ from the original.
    files["src"].write_text("völlig neue sätze hier\n" * 200, encoding="utf-8")
    files["tgt"].write_text("completely new sentences here\n" * 200, encoding="utf-8")

    second = compose_train_config(
        tmp_path / "run2",
        [*QUIET, *text_overrides(files), "logger=none", "trainer.max_steps=12", "test=false", f"ckpt_path={ckpt}"],
    )
    train(second)
    assert (tmp_path / "run2" / "tokenizer.json").read_bytes() == original

    # Evaluation reads only val/test: it still works once the training files are gone.
    files["src"].unlink()
    files["tgt"].unlink()
    capsys.readouterr()
    assert evaluate.main([str(ckpt), "--split", "val"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 40


def test_data_longer_than_the_model_reach_fails_before_training(make_cfg):
    from mha_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data.max_len \(200\).*model.max_len \(128\)"):
        train(make_cfg(*QUIET, "data.max_len=200", "logger=none"))
