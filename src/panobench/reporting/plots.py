"""The report's figures: one seaborn function per figure, each writing a PNG and returning its path.

Style is fixed here, not by callers: resamplers always appear in :data:`~panobench.reporting.tables.RESAMPLER_ORDER`
with the same colour in every figure. Every interval drawn is the report's one method,
:func:`~panobench.reporting.stats.t_interval` (Student t over seeds), passed to seaborn as ``errorbar=t_errorbar``. Every function takes the full ``results.csv`` table, keeps only the rows it
can draw (failed stages have NaN measurements and are dropped; they are listed in the report's tables instead), and
draws a labelled placeholder when nothing is left, so the report builds whatever failed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are only ever written to files, often on headless cluster nodes

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from panobench.reporting.paired import (  # noqa: E402
    KNOB_LABELS,
    REFERENCES,
    max_seeds,
    metrics_present,
    paired_differences,
    reference_differences,
    verdict_kind,
)
from panobench.reporting.stats import t_errorbar, t_interval  # noqa: E402
from panobench.reporting.tables import RESAMPLER_ORDER, memory_column, ok_rows, resampler_order  # noqa: E402
from panobench.stages import FINAL_STAGE, PER_CELL_STAGES  # noqa: E402
from panobench.utils.io import atomic_path  # noqa: E402

logger = logging.getLogger(__name__)
# Overlap labels like "0.50" are categorical on purpose; matplotlib would log an INFO line per figure about it.
logging.getLogger("matplotlib.category").setLevel(logging.WARNING)

DPI = 120
STYLE = "whitegrid"
CONTEXT = "notebook"
CAPTION_METRICS = (("CIDEr", "CIDEr"), ("Bleu_4", "BLEU-4"), ("METEOR", "METEOR"), ("ROUGE_L", "ROUGE-L"))
STAGES = PER_CELL_STAGES   # the stages with a results row per cell
_BASE_COLOURS = sns.color_palette("colorblind", 10)


def resampler_palette(names: list[str] | None = None) -> dict[str, tuple[float, float, float]]:
    """Colour of each resampler: fixed for the known four, then further colours for any others."""
    palette = {name: _BASE_COLOURS[i] for i, name in enumerate(RESAMPLER_ORDER)}
    extra = [n for n in (names or []) if n not in palette]
    for i, name in enumerate(extra):
        palette[name] = _BASE_COLOURS[(len(RESAMPLER_ORDER) + i) % len(_BASE_COLOURS)]
    return palette


def _n_seeds(df: pd.DataFrame) -> int:
    if df.empty:
        return 0
    return int(df.groupby(["vision_checkpoint", "resampler", "overlap"])["seed"].nunique().max())


def _errorbar(df: pd.DataFrame) -> Callable[[np.ndarray], tuple[float, float]] | None:
    return t_errorbar if _n_seeds(df) >= 2 else None


def _overlap_label(value: float) -> str:
    return f"{value:.2f}"


def _save(fig: plt.Figure, out_png: str | os.PathLike) -> Path:
    out = Path(out_png)
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=DPI, bbox_inches="tight", format="png")
    plt.close(fig)
    logger.info("wrote figure %s", out)
    return out


def _placeholder(out_png: str | os.PathLike, title: str, reason: str) -> Path:
    fig, ax = plt.subplots(figsize=(6, 2.5))
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, reason, ha="center", va="center", wrap=True, fontsize=11, color="0.35")
    return _save(fig, out_png)


def _styled(fn: Callable[..., Path]) -> Callable[..., Path]:
    """Run a figure function inside the fixed seaborn style/context without touching global rc state."""
    def wrapper(*args, **kwargs) -> Path:
        with sns.axes_style(STYLE), sns.plotting_context(CONTEXT):
            return fn(*args, **kwargs)
    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


@_styled
def plot_caption_metrics(df: pd.DataFrame, out_png: str | os.PathLike, stage: str = FINAL_STAGE) -> Path:
    """Bars of CIDEr, BLEU-4, METEOR, ROUGE-L per overlap (x) and resampler (hue), one row per vision checkpoint.

    Error bars: the Student-t 95% interval over seeds when any group has >= 2 seeds, else none.
    """
    title = f"Caption metrics after stage {stage}"
    data = ok_rows(df, stage)
    long = data.melt(id_vars=["vision_checkpoint", "resampler", "overlap", "seed"],
                     value_vars=[c for c, _ in CAPTION_METRICS], var_name="metric", value_name="value")
    long = long.dropna(subset=["value"])
    if long.empty:
        return _placeholder(out_png, title, f"no successful {stage} evaluations to plot")
    long["metric"] = long["metric"].map(dict(CAPTION_METRICS))
    long["overlap_label"] = long["overlap"].map(_overlap_label)
    hue_order = resampler_order(long["resampler"])
    errorbar = _errorbar(data)
    g = sns.catplot(data=long, kind="bar", x="overlap_label", y="value", hue="resampler", hue_order=hue_order,
                    palette=resampler_palette(hue_order), order=[_overlap_label(o) for o in sorted(long["overlap"].unique())],
                    col="metric", col_order=[label for _, label in CAPTION_METRICS], row="vision_checkpoint",
                    row_order=list(pd.unique(long["vision_checkpoint"])), sharey=False, errorbar=errorbar,
                    capsize=0.15 if errorbar else 0, height=3.0, aspect=1.0, seed=0)
    g.set_axis_labels("tile overlap", "score")
    g.set_titles(row_template="vision: {row_name}", col_template="{col_name}")
    note = "error bars: 95% t interval over seeds" if errorbar else "single seed: no error bars"
    g.figure.suptitle(f"{title} — {note}", y=1.02)
    return _save(g.figure, out_png)


def _line(ax: plt.Axes, data: pd.DataFrame, y: str, hue_order: list[str], errorbar, legend: bool) -> None:
    multi_vision = data["vision_checkpoint"].nunique() > 1
    kwargs = {"style": "vision_checkpoint", "markers": True} if multi_vision else {"marker": "o"}
    overlaps = sorted(data["overlap"].unique())
    if len(overlaps) == 1:
        # No line to follow at a single overlap: dodge the resamplers sideways so equal values stay visible.
        rank = {r: i for i, r in enumerate(hue_order)}
        data = data.assign(overlap=data["overlap"] + 0.03 * (data["resampler"].map(rank) - (len(hue_order) - 1) / 2))
    sns.lineplot(data=data, x="overlap", y=y, hue="resampler", hue_order=hue_order,
                 palette=resampler_palette(hue_order), errorbar=errorbar, ax=ax, legend=legend, seed=0, **kwargs)
    ax.set_xticks(overlaps)
    ax.set_xticklabels([_overlap_label(o) for o in overlaps])
    if len(overlaps) == 1:   # a single x value: give the markers some room instead of a zero-width axis
        ax.set_xlim(overlaps[0] - 0.15, overlaps[0] + 0.15)


def _stage_grid(df: pd.DataFrame, rows: list[tuple[str, str]], title: str, out_png: str | os.PathLike) -> Path:
    data = ok_rows(df)
    stages = [s for s in STAGES if not data[data["stage"] == s][[c for c, _ in rows]].isna().all(axis=None)]
    if not stages:
        return _placeholder(out_png, title, "no successful training stages with these measurements")
    hue_order = resampler_order(data["resampler"])
    errorbar = _errorbar(data)
    fig, axes = plt.subplots(len(rows), len(stages), figsize=(4.6 * len(stages), 3.3 * len(rows)), squeeze=False)
    for j, stage in enumerate(stages):
        sub = data[data["stage"] == stage]
        for i, (col, label) in enumerate(rows):
            ax = axes[i, j]
            plotted = sub.dropna(subset=[col])
            if plotted.empty:
                ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
            else:
                _line(ax, plotted, col, hue_order, errorbar, legend=(i == 0 and j == len(stages) - 1))
            ax.set_title(f"stage {stage}" if i == 0 else "")
            ax.set_xlabel("tile overlap")
            ax.set_ylabel(label)
    legend_ax = axes[0, len(stages) - 1]
    if legend_ax.get_legend() is not None:
        sns.move_legend(legend_ax, "upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    note = " — bands: 95% t interval over seeds" if errorbar else ""
    fig.suptitle(title + note)
    fig.tight_layout()
    return _save(fig, out_png)


@_styled
def plot_speed(df: pd.DataFrame, out_png: str | os.PathLike) -> Path:
    """Median step time and samples/s vs overlap, one line per resampler, one column per training stage."""
    return _stage_grid(df, [("step_time_median_s", "median step time (s)"), ("samples_per_s", "samples / s")],
                       "Training speed vs tile overlap", out_png)


@_styled
def plot_memory(df: pd.DataFrame, out_png: str | os.PathLike) -> Path:
    """Peak memory vs overlap per resampler: GPU allocated when recorded, else host RSS (the axis says which)."""
    column, label = memory_column(ok_rows(df))
    return _stage_grid(df, [(column, label)], "Peak training memory vs tile overlap", out_png)


def pareto_front(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of the points not dominated when maximising both x and y, sorted by x ascending."""
    order = np.lexsort((-y, -x))           # x descending, then y descending
    front, best_y = [], -np.inf
    for i in order:
        if y[i] > best_y:
            front.append(i)
            best_y = y[i]
    return np.array(front[::-1], dtype=int)


def _short_label(row: pd.Series, multi_seed: bool, multi_vision: bool) -> str:
    label = f"{row['resampler']} ov{row['overlap']:.2f}"
    if multi_vision:
        label += f" {row['vision_checkpoint']}"
    if multi_seed:
        label += f" s{int(row['seed'])}"
    return label


@_styled
def plot_pareto(df: pd.DataFrame, out_png: str | os.PathLike, stage: str = FINAL_STAGE,
                metric: str = "CIDEr") -> Path:
    """Quality (``metric``) vs training throughput; the Pareto front as a step line.

    One labelled point per cell with one seed; with several seeds, one point per setting (vision checkpoint x
    resampler x overlap) at the seed means, with the t intervals of both means as error bars (48 labelled cells
    would be unreadable, and the front of single seeds would chase noise).
    """
    title = f"{metric} vs training throughput (stage {stage})"
    data = ok_rows(df, stage).dropna(subset=["samples_per_s", metric]).reset_index(drop=True)
    if data.empty:
        return _placeholder(out_png, title, f"no successful {stage} cells with both samples/s and {metric}")
    hue_order = resampler_order(data["resampler"])
    multi_vision = data["vision_checkpoint"].nunique() > 1
    multi_seed = _n_seeds(data) >= 2
    if multi_seed:
        keys = ["vision_checkpoint", "resampler", "overlap"]
        points = data.groupby(keys, sort=False).agg(
            samples_per_s=("samples_per_s", "mean"), value=(metric, "mean"),
            x_err=("samples_per_s", lambda v: t_interval(v).halfwidth),
            y_err=(metric, lambda v: t_interval(v).halfwidth)).reset_index()
        points = points.rename(columns={"value": metric}).assign(seed=0)
        title += " — seed means, bars: 95% t interval"
    else:
        points = data
    palette = resampler_palette(hue_order)
    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    if multi_seed:
        for _, row in points.iterrows():
            ax.errorbar(row["samples_per_s"], row[metric], xerr=row["x_err"], yerr=row["y_err"], fmt="none",
                        ecolor=palette[row["resampler"]], elinewidth=1.0, alpha=0.7, capsize=2, zorder=2)
    sns.scatterplot(data=points, x="samples_per_s", y=metric, hue="resampler", hue_order=hue_order,
                    palette=palette, style="vision_checkpoint" if multi_vision else None, s=70, ax=ax, zorder=3)
    x, y = points["samples_per_s"].to_numpy(float), points[metric].to_numpy(float)
    front = pareto_front(x, y)
    ax.step(x[front], y[front], where="pre", color="0.3", linestyle="--", linewidth=1.2, zorder=2,
            label="Pareto front")
    # Points that land on the same spot share one stacked label instead of overprinting each other.
    labels: dict[tuple[float, float], list[str]] = {}
    for i, row in points.reset_index(drop=True).iterrows():
        labels.setdefault((round(x[i], 9), round(y[i], 9)), []).append(_short_label(row, False, multi_vision))
    for (px, py), names in labels.items():
        ax.annotate("\n".join(names), (px, py), xytext=(4, 4), textcoords="offset points", fontsize=7, color="0.2",
                    va="bottom")
    ax.set_xlabel(f"training samples / s (stage {stage})")
    ax.set_ylabel(metric)
    ax.set_title(title)
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    return _save(fig, out_png)


@_styled
def plot_baseline_deltas(df: pd.DataFrame, out_png: str | os.PathLike, metric: str = "CIDEr") -> Path:
    """Dumbbell per cell: untrained baseline, blind (finetuned model, grey panorama), stage resampler, stage finetune.

    The line spans the cell's values; the gap between the blind and the finetune marker is what the image adds.
    """
    title = f"{metric} per cell: untrained baseline, blind (grey image) and trained"
    data = ok_rows(df)
    cells = list(pd.unique(data["cell_id"]))
    if not cells:
        return _placeholder(out_png, title, "no successful training stages to compare with the baseline")
    res_rank = {r: i for i, r in enumerate(resampler_order(data["resampler"]))}
    vis_rank = {v: i for i, v in enumerate(pd.unique(data["vision_checkpoint"]))}
    first = data.drop_duplicates("cell_id").set_index("cell_id")
    cells.sort(key=lambda c: (res_rank[first.loc[c, "resampler"]], vis_rank[first.loc[c, "vision_checkpoint"]],
                              first.loc[c, "overlap"], first.loc[c, "seed"]))
    palette = resampler_palette(list(res_rank))
    fig, ax = plt.subplots(figsize=(8.0, 0.38 * len(cells) + 1.6))
    markers = {"baseline": ("o", "0.6"), "blind": ("X", "0.1"), "resampler": ("s", None), "finetune": ("D", None)}
    labels = {"baseline": "untrained baseline", "blind": "blind: finetuned, grey image", "resampler": "stage resampler",
              "finetune": "stage finetune"}
    for yi, cell in enumerate(cells):
        rows = data[data["cell_id"] == cell]
        colour = palette[first.loc[cell, "resampler"]]
        points = {ref: rows[f"{ref}_{metric}"].dropna().iloc[0] if rows[f"{ref}_{metric}"].notna().any() else np.nan
                  for ref in ("baseline", "blind")}
        for stage in STAGES:
            value = rows.loc[rows["stage"] == stage, metric]
            points[stage] = float(value.iloc[0]) if len(value) and value.notna().iloc[0] else np.nan
        finite = [v for v in points.values() if np.isfinite(v)]
        if len(finite) >= 2:
            ax.plot([min(finite), max(finite)], [yi, yi], color=colour, linewidth=2, alpha=0.6, zorder=1)
        for key, value in points.items():
            if np.isfinite(value):
                marker, fixed = markers[key]
                ax.scatter([value], [yi], marker=marker, color=fixed or colour, s=45, zorder=2,
                           edgecolor="0.2", linewidth=0.5)
    ax.set_yticks(range(len(cells)))
    ax.set_yticklabels(cells, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(metric)
    ax.set_title(title)
    handles = [plt.Line2D([], [], marker=m, linestyle="", color=c or "0.3", markeredgecolor="0.2", label=labels[k])
               for k, (m, c) in markers.items()]
    handles += [plt.Line2D([], [], color=palette[r], linewidth=3, label=r) for r in res_rank]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, fontsize=8)
    return _save(fig, out_png)


# Verdict -> (marker face colour, edge colour): the forest plots colour a row by what its interval says.
_VERDICT_COLOURS = {"b": ("#1b7837", "#1b7837"), "a": ("#b2182b", "#b2182b"), "none": ("0.45", "0.45"),
                    "untestable": ("white", "0.35")}


def _forest(ax: plt.Axes, rows: pd.DataFrame, labels: list[str], kinds: list[str], show_n: bool) -> None:
    """One horizontal interval per row (top to bottom), its mean as a dot, a zero line; NaN bounds draw no bar."""
    y = np.arange(len(rows))
    ax.axvline(0.0, color="0.2", linewidth=1.0, zorder=1)
    for yi, (_, r), kind in zip(y, rows.iterrows(), kinds, strict=True):
        face, edge = _VERDICT_COLOURS[kind]
        if np.isfinite(r["low"]) and np.isfinite(r["high"]):
            ax.plot([r["low"], r["high"]], [yi, yi], color=edge, linewidth=2.2, solid_capstyle="butt", zorder=2)
            for end in (r["low"], r["high"]):
                ax.plot([end, end], [yi - 0.15, yi + 0.15], color=edge, linewidth=1.2, zorder=2)
        if np.isfinite(r["mean"]):
            ax.scatter([r["mean"]], [yi], s=42, color=face, edgecolor=edge, linewidth=1.2, zorder=3)
        if show_n:
            ax.annotate(f"n={int(r['n'])}", (1.0, yi), xycoords=("axes fraction", "data"), xytext=(4, 0),
                        textcoords="offset points", va="center", fontsize=8, color="0.3")
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=9)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.margins(x=0.15)


def _forest_legend(fig: plt.Figure, higher: str = "B better", lower: str = "A better") -> None:
    names = {"b": f"{higher} (interval above 0)", "a": f"{lower} (interval below 0)",
             "none": "no detectable difference", "untestable": "one seed: not testable"}
    handles = [plt.Line2D([], [], marker="o", linestyle="-", color=_VERDICT_COLOURS[k][1],
                          markerfacecolor=_VERDICT_COLOURS[k][0], label=label) for k, label in names.items()]
    fig.legend(handles=handles, loc="lower center", ncol=4, frameon=False, fontsize=9, bbox_to_anchor=(0.5, -0.02))


@_styled
def plot_paired_differences(df: pd.DataFrame, out_png: str | os.PathLike) -> Path:
    """Forest plot of every knob's paired differences B − A (stage finetune), one column per caption metric.

    Dot: mean over seeds of the per-seed difference; bar: its Student-t 95% interval (none with one seed).
    """
    title = "Paired differences B − A (stage finetune, paired by seed)"
    summary, _ = paired_differences(df)
    if summary.empty:
        return _placeholder(out_png, title, "no knob with two levels and matched successful finetune cells")
    metrics = [(c, label) for c, label in metrics_present(ok_rows(df, FINAL_STAGE)) if c in set(summary["metric"])]
    comparisons = summary.drop_duplicates(["knob", "level_a", "level_b"])[["knob", "level_a", "level_b"]]
    labels = [f"{KNOB_LABELS[r.knob]}: {r.level_a.removeprefix('overlap ')} → {r.level_b.removeprefix('overlap ')}"
              for r in comparisons.itertuples()]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.4 * len(metrics) + 2.6, 0.42 * len(comparisons) + 2.6),
                             sharey=True, squeeze=False)
    for ax, (metric, label) in zip(axes[0], metrics, strict=True):
        rows = comparisons.merge(summary[summary["metric"] == metric], on=["knob", "level_a", "level_b"], how="left")
        kinds = [verdict_kind(str(r.verdict), f"{r.level_b} better", f"{r.level_a} better")
                 for r in rows.itertuples()]
        _forest(ax, rows, labels, kinds, show_n=ax is axes[0][-1])
        ax.set_title(label)
        ax.set_xlabel(f"Δ {label} (B − A)")
    seeds = max_seeds(df)
    note = "95% t interval over seeds" if seeds >= 2 else "one seed: differences are single observations, no intervals"
    fig.suptitle(f"{title} — {note}")
    _forest_legend(fig)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return _save(fig, out_png)


@_styled
def plot_image_effect(df: pd.DataFrame, out_png: str | os.PathLike, metric: str = "CIDEr") -> Path:
    """Forest plot of trained − untrained baseline and trained − blind (``metric``): all cells, then per setting."""
    title = f"Does training help, and does the model use the image? ({metric}, stage finetune)"
    refs = reference_differences(df)
    refs = refs[refs["metric"] == metric]
    if refs.empty:
        return _placeholder(out_png, title, "no successful finetune cells with a baseline or blind evaluation")
    present = [r for r in REFERENCES if r in set(refs["reference"])]
    settings = list(pd.unique(refs["setting"]))
    fig, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present) + 3.4, 0.36 * len(settings) + 2.6),
                             sharey=True, squeeze=False)
    for ax, reference in zip(axes[0], present, strict=True):
        _, name, helps, hurts = REFERENCES[reference]
        rows = pd.DataFrame({"setting": settings}).merge(refs[refs["reference"] == reference], on="setting",
                                                          how="left")
        kinds = [verdict_kind(str(v), helps, hurts) for v in rows["verdict"]]
        _forest(ax, rows, settings, kinds, show_n=ax is axes[0][-1])
        ax.set_title(f"{name} {metric}")
        ax.set_xlabel(f"Δ {metric}")
    seeds = max_seeds(df)
    note = "95% t interval over seeds" if seeds >= 2 else "one seed: no intervals"
    fig.suptitle(f"{title} — {note}")
    _forest_legend(fig, "trained higher", "reference higher")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return _save(fig, out_png)


# name -> (function, caption); the report shows them in this order (paired_differences and image_effect in their
# own sections).
FIGURES: dict[str, tuple[Callable[[pd.DataFrame, Path], Path], str]] = {
    "paired_differences": (plot_paired_differences, "Paired differences B − A per knob and caption metric: dot = "
                           "mean over seeds, bar = 95% t interval over seeds; green: B better, red: A better."),
    "image_effect": (plot_image_effect, "CIDEr of the finetuned model minus the untrained baseline and minus the "
                     "blind evaluation (grey panorama): over all cells, then per setting."),
    "baseline_deltas": (plot_baseline_deltas, "CIDEr per cell: untrained baseline, blind (finetuned model shown a "
                        "grey panorama), and each trained stage."),
    "caption_metrics": (plot_caption_metrics, "Caption metrics per resampler and tile overlap (stage finetune)."),
    "speed": (plot_speed, "Median training step time and throughput vs tile overlap."),
    "memory": (plot_memory, "Peak training memory vs tile overlap."),
    "pareto": (plot_pareto, "Caption quality vs training throughput; dashed: Pareto front (stage finetune)."),
}


def make_figures(df: pd.DataFrame, fig_dir: str | os.PathLike) -> dict[str, Path]:
    """Write every figure of :data:`FIGURES` into ``fig_dir``; returns name -> PNG path."""
    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    return {name: fn(df, fig_dir / f"{name}.png") for name, (fn, _) in FIGURES.items()}
