"""Pictures, tables and ``report.md`` from an analysis's ``results.json`` and ``maps.pt``.

Rendering only (no model): one figure of every head's importance, confidence and entropy, one of
the Jensen-Shannon matrices of every layer, the pruning curves, and attention maps of a few
examples with their tokens.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.transforms import blended_transform_factory

from mha_lightning.analysis.roles import ROLES, SHARES
from mha_lightning.analysis.run import MAPS_FILE, RESULTS_FILE
from mha_lightning.kinds import ATTENTION_KINDS, Head
from mha_lightning.monitor.plots import figure_to_png, heatmap_panel, new_figure

HEADS_CSV = "heads.csv"
REPORT = "report.md"
HEAD_COLUMNS = ("importance", "importance_norm", "entropy", "entropy_norm", "confidence", "alignment")
# From removing each head alone (results["single_heads"]), where measured.
REMOVAL_COLUMNS = ("removal_loss_rise", "removal_metric_drop")
# A head's roles and their evidence (results["roles"], statistics["roles_share"]), where measured.
ROLE_COLUMNS = ("roles", *SHARES)
# What each role's evidence is, for the report's table.
ROLE_EVIDENCE = {
    "positional": ("previous", "same", "next"),
    "sink": ("sink",),
    "rare": ("rare",),
    "diffuse": ("entropy_norm",),
    "monotone": ("diagonal",),
    "alignment": ("alignment",),
}


def head_rows(
    stats: dict[str, Any], single: dict[str, Any] | None = None, roles: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """One row per head: its name, every per-head statistic (alignment empty where not measured), what
    removing it alone cost (empty where not measured, or for a head ``model.head_mask`` removed), and its
    roles with their evidence (empty where not measured or not applying to its kind)."""
    single = single or {}
    shares = stats.get("roles_share", {})
    rise = dict(zip(single.get("heads", []), single.get("loss_rise", []), strict=True))
    drop = dict(zip(single.get("heads", []), single.get("metric_drop", []), strict=False))
    rows = []
    for kind in ATTENTION_KINDS:
        for layer, values in enumerate(stats["importance"][kind]):
            for head in range(len(values)):
                name = str(Head(kind, layer, head))
                row: dict[str, Any] = {"head": name}
                for col in HEAD_COLUMNS:
                    table = stats[col].get(kind)
                    row[col] = float(table[layer][head]) if table is not None else None
                row["removal_loss_rise"], row["removal_metric_drop"] = rise.get(name), drop.get(name)
                row["roles"] = " ".join(roles[kind][layer][head]) if roles else None
                for share in SHARES:
                    value = shares[kind][share][layer][head] if kind in shares else None
                    row[share] = None if value is None or np.isnan(value) else float(value)
                rows.append(row)
    return rows


def similar_pairs(stats: dict[str, Any], count: int = 5) -> list[tuple[float, str, str]]:
    """The ``count`` most alike pairs of heads within a layer: (JS distance, head, head), closest first."""
    pairs = []
    for kind, layers in stats.get("js", {}).items():
        for layer, matrix in enumerate(layers):
            m = np.asarray(matrix)
            for i in range(len(m)):
                for j in range(i + 1, len(m)):
                    pairs.append((float(m[i, j]), str(Head(kind, layer, i)), str(Head(kind, layer, j))))
    return sorted(pairs)[:count]


HEAD_STATISTICS = (
    ("importance_norm", "importance (normalised per layer)"),
    ("confidence", "confidence (mean max weight)"),
    ("entropy_norm", "entropy / log(keys)"),
)


def _heads_figure(stats: dict[str, Any]):
    """Every per-head statistic of every kind in one figure: a row per kind, a column per statistic.

    One figure, not nine: a head's numbers side by side, one colour scale (all lie in [0, 1]), and
    about a second less drawing than nine separate figures."""
    layers = max(len(stats["importance"][kind]) for kind in ATTENTION_KINDS)
    heads = len(stats["importance"][ATTENTION_KINDS[0]][0])
    panel_w = min(6.0, 1.0 + 0.55 * heads)
    panel_h = min(4.5, 0.9 + 0.4 * max(layers, 1))
    fig = new_figure((0.8 + panel_w * len(HEAD_STATISTICS), 0.5 + panel_h * len(ATTENTION_KINDS)))
    grid = fig.subplots(len(ATTENTION_KINDS), len(HEAD_STATISTICS), squeeze=False)
    for row, kind in enumerate(ATTENTION_KINDS):
        for col, (key, label) in enumerate(HEAD_STATISTICS):
            ax = grid[row, col]
            im = heatmap_panel(ax, np.asarray(stats[key][kind], dtype=float), 0.0, 1.0)
            if row == 0:
                ax.set_title(label, fontsize=10)
            if col == 0:
                ax.set_ylabel(kind, fontsize=10)
    fig.colorbar(im, ax=grid.ravel().tolist(), shrink=0.6, pad=0.01)
    return fig


def _similarity_figure(js: dict[str, Any]):
    """Jensen-Shannon distance between every two heads: a row per kind, a panel per layer
    (encoder and decoder may differ in depth: a shallower kind's row leaves its last panels empty)."""
    kinds = [k for k in ATTENTION_KINDS if k in js]
    layers = max(len(js[kind]) for kind in kinds)
    heads = len(js[kinds[0]][0])
    side = min(3.2, max(2.0, 0.22 * heads))
    fig = new_figure((1.2 + side * layers, 0.4 + side * len(kinds)))
    grid = fig.subplots(len(kinds), layers, squeeze=False)
    names = [f"H{h}" for h in range(heads)]
    for row, kind in enumerate(kinds):
        for layer in range(layers):
            ax = grid[row, layer]
            if layer >= len(js[kind]):
                ax.set_axis_off()
                continue
            im = ax.imshow(np.asarray(js[kind][layer]), vmin=0.0, vmax=1.0, cmap="magma")
            ax.set_title(f"{kind} L{layer}", fontsize=9)
            ax.set_xticks(range(heads), names, fontsize=6)
            ax.set_yticks(range(heads), names, fontsize=6)
    fig.colorbar(im, ax=grid.ravel().tolist(), label="Jensen-Shannon distance", shrink=0.8)
    return fig


def _pruning_figure(pruning: dict[str, Any]):
    fig = new_figure((6.4, 4.0))
    ax = fig.subplots()
    points = pruning["points"]
    curves = pruning["curves"]
    randoms = np.array([c for name, c in curves.items() if name.startswith("random")])
    if len(randoms):
        ax.fill_between(points, randoms.min(0), randoms.max(0), color="grey", alpha=0.25, label="random (range)")
        ax.plot(points, randoms.mean(0), color="grey", marker=".", label=f"random (mean of {len(randoms)})")
    ax.plot(points, curves["importance"], marker="o", label="least important first")
    ax.plot(points, curves["entropy"], marker="s", label="most diffuse (entropy) first")
    for tolerance, style in ((pruning["tolerance"], "--"), (pruning.get("wide_tolerance"), ":")):
        if tolerance is not None:
            ax.axhline(
                pruning["baseline"] * (1 - tolerance),
                color="black",
                lw=0.8,
                ls=style,
                label=f"{tolerance:.0%} below full",
            )
    ax.set_xlabel("heads removed")
    ax.set_ylabel(pruning["metric"])
    ax.set_title("Pruning curve")
    ax.legend(fontsize=8)
    return fig


def _maps_figure(maps: list[torch.Tensor], example: int, kind: str, keys: list[str], queries: list[str]):
    """All heads of every layer of one example: a row per layer, the heads side by side in it.

    Each row is one image (the heads' maps with a blank column between them) on one Axes: a
    separate Axes per head laid out its own tick labels, which made the maps most of the report's
    rendering time (24 heads: about 1.3 s a figure against 0.3 s)."""
    layers, heads = len(maps), maps[0].shape[1]
    T, S = len(queries), len(keys)
    size = max(1.6, min(3.2, 0.16 * max(S, T)))
    fig = new_figure((0.8 + size * heads, 0.6 + size * layers))
    axes = fig.subplots(layers, 1, squeeze=False)[:, 0]
    stride = S + 1  # a blank (NaN) column after each head
    centres = [h * stride + (S - 1) / 2 for h in range(heads)]
    for layer, ax in enumerate(axes):
        row = np.full((T, heads * stride - 1), np.nan)
        for head in range(heads):
            row[:, head * stride : head * stride + S] = maps[layer][example, head, :T, :S].numpy()
        ax.imshow(row, vmin=0.0, vmax=1.0, cmap="Blues", aspect="auto", interpolation="nearest")
        ax.set_yticks(range(T), queries, fontsize=5)
        ax.set_ylabel(f"L{layer}", fontsize=8)
        for spine in ax.spines.values():
            spine.set_visible(False)
        if layer == 0:  # head names above the top row
            top = ax.secondary_xaxis("top")
            top.set_xticks(centres, [f"H{h}" for h in range(heads)], fontsize=8)
            top.tick_params(length=0)
            top.spines["top"].set_visible(False)
        if layer == layers - 1:  # key tokens under every head of the bottom row
            # Plain texts, not ticks: a tick is several artists, and heads x keys of them took
            # about a quarter of a maps figure's time.
            below = blended_transform_factory(ax.transData, ax.transAxes)
            for h in range(heads):
                for i, key in enumerate(keys):
                    ax.text(h * stride + i, -0.01, key, transform=below, rotation=90, ha="center", va="top", fontsize=5)
        ax.set_xticks([])
    fig.suptitle(f"{kind}: example {example} (rows: queries, columns: keys; one panel per head)", fontsize=10)
    return fig


def render(out: Path, token_text=None) -> Path:
    """Write heads.csv, the PNGs and report.md into ``out`` (which holds results.json and maps.pt) -> report.md.

    ``token_text(id) -> str`` labels map axes (default: the id)."""
    results = json.loads((out / RESULTS_FILE).read_text())
    stats = results["statistics"]
    rows = head_rows(stats, results.get("single_heads"), results.get("roles"))
    with (out / HEADS_CSV).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["head", *HEAD_COLUMNS, *REMOVAL_COLUMNS, *ROLE_COLUMNS])
        writer.writeheader()
        writer.writerows(rows)
    figure_to_png(_heads_figure(stats), out / "heads.png")
    images = [("Importance, confidence and entropy of every head", "heads.png")]
    if stats.get("js"):
        figure_to_png(_similarity_figure(stats["js"]), out / "similarity.png")
        images.append(("Jensen-Shannon distance between heads", "similarity.png"))
    maps_path = out / MAPS_FILE
    map_images = []
    if maps_path.exists():
        saved = torch.load(maps_path, weights_only=True)
        label = token_text or str
        for example, (src, tgt) in enumerate(saved["pairs"]):
            src_tokens = [label(t) for t in src] + ["</s>"]
            tgt_in = ["<s>"] + [label(t) for t in tgt]
            for kind, maps in saved["maps"].items():
                keys, queries = (
                    (src_tokens, src_tokens)
                    if kind == "enc_self"
                    else ((src_tokens, tgt_in) if kind == "cross" else (tgt_in, tgt_in))
                )
                name = f"maps_{example}_{kind}.png"
                figure_to_png(_maps_figure(maps, example, kind, keys, queries), out / name)
                map_images.append((f"example {example}, {kind}", name))
    if "pruning" in results:
        figure_to_png(_pruning_figure(results["pruning"]), out / "pruning.png")
    path = out / REPORT
    path.write_text(_markdown(results, rows, images, map_images))
    return path


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.3f}"


def _roles_section(rows: list[dict]) -> list[str]:
    """How many heads of each kind have each role, and the clearest examples with their evidence."""
    lines = [
        "",
        "## What the heads do",
        "",
        "Roles as Voita et al. (2019) found them in translation models, from where each head's largest weight "
        "falls (shares of queries; thresholds in `roles` of the analysis config; a head may have several or none). "
        "Every head's shares are in `heads.csv`.",
        "",
        "| role | "
        + " | ".join(ATTENTION_KINDS)
        + " | clearest heads with it (evidence) | strongest evidence of any head |",
        "|---|" + "---|" * len(ATTENTION_KINDS) + "---|---|",
    ]

    def evidence(row: dict, role: str) -> float:
        return max((row[name] for name in ROLE_EVIDENCE[role] if row.get(name) is not None), default=0.0)

    for role in ROLES:
        having = [r for r in rows if role in (r["roles"] or "").split()]
        counts = [sum(r["head"].startswith(kind + "/") for r in having) for kind in ATTENTION_KINDS]
        clearest = sorted(having, key=lambda r: -evidence(r, role))[:3]
        shown = ", ".join(f"{r['head']} ({evidence(r, role):.0%})" for r in clearest) or "none"
        # Below the threshold too: how close the nearest head comes (a small or short-trained model may have none).
        measured = [r for r in rows if any(r.get(name) is not None for name in ROLE_EVIDENCE[role])]
        strongest = max(measured, key=lambda r: evidence(r, role), default=None)
        near = f"{strongest['head']} ({evidence(strongest, role):.0%})" if strongest else "not measured"
        lines.append(f"| {role} | " + " | ".join(map(str, counts)) + f" | {shown} | {near} |")
    chance = [r["rare_chance"] for r in rows if r.get("rare_chance") is not None]
    if chance:
        lines += ["", f"A head attending at random would land on the rarest token {np.mean(chance):.0%} of the time."]
    none = sum(not r["roles"] for r in rows)
    lines += ["", f"{none} of {len(rows)} heads have none of these roles."]
    return lines


def _markdown(results: dict, rows: list[dict], images, map_images) -> str:
    stats = results["statistics"]
    m = results["model"]
    lines = [
        "# What the heads do",
        "",
        f"Checkpoint `{results['checkpoint']}`, split `{results['split']}`, {stats['examples']} examples; "
        f"{m['num_heads']} heads of {m['head_dim']} dimensions per attention, d_model {m['d_model']}, "
        f"{m['num_encoder_layers']}+{m['num_decoder_layers']} layers"
        + (f"; removed by model.head_mask: {', '.join(m['head_mask'])}" if m["head_mask"] else "")
        + ".",
        "",
    ]
    # Ranked by the raw importance: it predicts what removing a head costs (the normalised value serves
    # pruning across layers, where Michel et al. use it; "Does importance predict a head's effect?").
    top = sorted(rows, key=lambda r: -(r["importance"] or 0.0))[:5]
    lines += [
        "## The heads that matter",
        "",
        "Importance is the mean over examples of |dL/d gate| (Michel et al. 2019); normalised: per layer (L2).",
        "",
        "| head | importance | normalised | loss rise removed alone | confidence | entropy (norm.) | alignment |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in top:
        lines.append(
            f"| {r['head']} | {_fmt(r['importance'])} | {_fmt(r['importance_norm'])} | "
            f"{_fmt(r['removal_loss_rise'])} | {_fmt(r['confidence'])} | {_fmt(r['entropy_norm'])} | "
            f"{_fmt(r['alignment'])} |"
        )
    single = results.get("single_heads")
    if single:
        loss_r = single["spearman_loss_rise"]
        lines += [
            "",
            "## Does importance predict a head's effect?",
            "",
            f"Each of the {len(single['heads'])} heads removed alone, the teacher-forced token loss scored on the "
            f"same examples (full model: {single['loss']:.4f}). Spearman's rank correlation with the rise:",
            "",
            "| ranked by | loss rise | " + (f"{single['metric']} drop |" if "metric_drop" in single else ""),
            "|---|---|" + ("---|" if "metric_drop" in single else ""),
        ]
        for name, label in (
            ("importance", "importance"),
            ("importance_norm", "importance, normalised per layer"),
            ("entropy_norm", "normalised entropy"),
        ):
            cell = f" {single['spearman_metric_drop'][name]:.2f} |" if "metric_drop" in single else ""
            lines.append(f"| {label} | {loss_r[name]:.2f} |{cell}")
    if stats.get("alignment"):
        best = max((r for r in rows if r["alignment"] is not None), key=lambda r: r["alignment"])
        lines += [
            "",
            f"Best-aligned cross-attention head: {best['head']}, argmax on the gold source position "
            f"{best['alignment']:.1%} of the time.",
        ]
    if results.get("roles"):
        lines += _roles_section(rows)
    pairs = similar_pairs(stats)
    if pairs:
        lines += ["", "## The heads that look alike", ""]
        lines += [
            "Jensen-Shannon distance (0: same distributions, 1: disjoint), averaged over queries (Clark et al. 2019)."
        ]
        lines += ["", "| distance | head | head |", "|---|---|---|"]
        lines += [f"| {d:.3f} | {a} | {b} |" for d, a, b in pairs]
    pruning = results.get("pruning")
    if pruning:
        total = pruning["points"][-1]
        randoms = [v for k, v in pruning["removable"].items() if k.startswith("random")]
        abl = pruning["ablation"]
        lines += [
            "",
            "## How many heads can go",
            "",
            f"Full model: {pruning['metric']} {pruning['baseline']:.4f}. Removing heads in increasing importance, "
            f"**{pruning['removable']['importance']} of {total}** can go before the metric falls more than "
            f"{pruning['tolerance']:.0%} (by entropy: {pruning['removable']['entropy']}; random orders: "
            f"{', '.join(map(str, randoms))}, counted at the measured points {pruning['points']}; the importance "
            "order's count is exact, bisected between them)"
            + (
                f"; within {pruning['wide_tolerance']:.0%}: {pruning['removable_wide']['importance']}"
                if "removable_wide" in pruning
                else ""
            )
            + ".",
            "",
            f"Removing only the most important head ({abl['most_important']['head']}): "
            f"{abl['most_important']['metric']:.4f}; only the least important ({abl['least_important']['head']}): "
            f"{abl['least_important']['metric']:.4f}.",
            "",
            "![pruning curve](pruning.png)",
        ]
        if "removable_by_kind" in pruning:
            kinds = ", ".join(f"{kind} {n}" for kind, n in pruning["removable_by_kind"].items())
            lines += [
                "",
                f"The heads that can go, by kind: {kinds}; the first removed: {', '.join(pruning['first_removed'])}.",
            ]
        if pruning["baseline"] <= 0:
            lines += ["", f"**The full model scores 0 {pruning['metric']}: these counts say nothing; train longer.**"]
    lines += ["", "## Pictures", ""]
    lines += [f"### {title}\n\n![{title}]({name})\n" for title, name in images + map_images]
    lines += ["", f"Every head's numbers: `{HEADS_CSV}`; everything measured: `{RESULTS_FILE}`.", ""]
    return "\n".join(lines)
