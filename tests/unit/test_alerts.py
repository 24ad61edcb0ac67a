"""W&B alerts (run.alert) of real offline runs, read back from the run file: entropy collapse (WARN, once per head)
and a run stopped by a non-finite loss (ERROR)."""

from __future__ import annotations

import re

import pytest

from helpers.config import QUIET
from helpers.wandb_offline import find_run_files, read_records
from mha_lightning.errors import NonFiniteError
from mha_lightning.train import train

RUN = [*QUIET, "logger=wandb", "test=false", "data.num_train=300", "data.num_val=16", "data.num_test=16"]
HEADS = 3 * 2 * 4  # kinds x layers x heads of the tiny model


def alerts(root) -> list:
    (path,) = find_run_files(root)
    return [r.alert for r in read_records(path) if r.WhichOneof("record_type") == "alert"]


def test_entropy_collapse_alerts_once_per_head_with_head_step_and_value(make_cfg, tmp_path):
    # Threshold 1: every head of a fresh model (never exactly uniform) counts as collapsed at the first measurement.
    cfg = make_cfg(
        *RUN,
        "monitor.enabled=true",
        "monitor.collapse_threshold=1.0",
        "monitor.every_n_steps=2",
        "monitor.probe=false",
        "monitor.log_images=false",
        "monitor.render_plots=false",
        "trainer.max_steps=5",
        "trainer.val_check_interval=5",
    )
    train(cfg)
    found = alerts(tmp_path / "run")
    titles = [a.title for a in found]
    assert len(titles) == len(set(titles)) == HEADS  # measured at steps 0, 2 and 4: each head once
    for a in found:
        assert a.level == "WARN"
        head = re.fullmatch(r"attention entropy collapse: (enc_self|dec_self|cross)/L(\d)/H(\d)", a.title)
        assert head, a.title
        kind, layer, index = head.groups()
        value = re.search(r"normalised entropy (\d\.\d{4}) < monitor.collapse_threshold 1 at step 0 ", a.text)
        assert a.text.startswith(f"{kind} layer {layer} head {index}:") and value, a.text
        assert 0.0 < float(value[1]) < 1.0


def test_a_run_stopped_by_a_non_finite_loss_sends_an_error_alert(make_cfg, tmp_path):
    cfg = make_cfg(
        *RUN, "module.optimizer.lr=1e4", "trainer.gradient_clip_val=0", "trainer.max_steps=60", "monitor.enabled=false"
    )
    with pytest.raises(NonFiniteError) as stopped:
        train(cfg)
    (alert,) = alerts(tmp_path / "run")
    assert alert.level == "ERROR" and alert.title.startswith("training stopped: non-finite")
    assert alert.text == str(stopped.value).split("; last good checkpoint")[0]
