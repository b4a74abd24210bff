"""Plots, text and a one-page HTML report of what the cutoff drops (see :mod:`flow.query`).

Plots use matplotlib's object API (:class:`matplotlib.figure.Figure`, Agg canvas): no
display and no global pyplot state, so they work on headless machines and in worker threads.
Each plot function returns its figure and, given ``path``, saves it as a PNG of a fixed pixel
size (:data:`FIGSIZE` x :data:`DPI`; the top-dropped chart is :data:`BAR_FIGSIZE`).

:func:`write_report` is a compute boundary: it runs one drop-rate reduction (per group when
``group_by`` is given) and writes a self-contained HTML page with the plots embedded as
base64 PNGs.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .errors import InputError
from .query import (
    DEFAULT_CUTOFF,
    GeneDrop,
    coverage,
    coverage_summary,
    drop_rates,
)
from .retention import ALL_CELLS, RetentionResult, gene_retention

if TYPE_CHECKING:
    from collections.abc import Sequence

    from matplotlib.figure import Figure

    from .encode.store import EncodingStore
    from .query import Compute

__all__ = [
    "BAR_FIGSIZE",
    "DPI",
    "FIGSIZE",
    "format_cell_drop",
    "format_drop_rates",
    "format_gene_drop",
    "format_percent",
    "plot_coverage",
    "plot_detected_genes",
    "plot_fold_change",
    "plot_retention",
    "plot_top_dropped",
    "write_answer",
    "write_report",
]

FIGSIZE = (8.0, 4.5)
"""Size in inches of the coverage and detected-genes plots (800 x 450 pixels at :data:`DPI`)."""

BAR_FIGSIZE = (8.0, 6.0)
"""Size in inches of the top-dropped-genes chart (800 x 600 pixels at :data:`DPI`)."""

DPI = 100
MARKS = (2048, 4096)
"""Input sizes marked on the coverage curve: Geneformer V1 and V2."""

COST_HEADER = "cost = dense attention cost relative to an input of 2,048 tokens, (L / 2,048)^2"
"""What the "cost" of an input size L means wherever it is shown."""


def format_percent(fraction: float) -> str:
    """A fraction as a percent with the digits small rates need, never rounded to 0 or 100.

    Examples
    --------
    >>> [format_percent(f) for f in (0.0, 0.0004, 0.0031, 0.025, 0.4521, 0.9996, 1.0)]
    ['0%', '<0.1%', '0.31%', '2.5%', '45.2%', '>99.9%', '100%']
    >>> format_percent(float("nan"))
    '-'
    """
    if math.isnan(fraction):
        return "-"
    pct = 100 * fraction
    if pct in (0, 100):
        return f"{pct:.0f}%"
    if pct < 0.1:
        return "<0.1%"
    if pct > 99.9:
        return ">99.9%"
    return f"{pct:.2g}%" if pct < 1 else f"{pct:.1f}%"


def _figure(size: tuple[float, float]) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=size, dpi=DPI, layout="constrained")


def _save(fig: Figure, path: str | os.PathLike[str] | None) -> None:
    if path is not None:
        fig.savefig(os.fspath(path), format="png", dpi=DPI)


def _png_base64(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _passing_lengths(enc: EncodingStore) -> np.ndarray:
    keep = np.asarray(enc.cell_column("filter_pass")).astype(bool)
    lengths: np.ndarray = np.asarray(enc.lengths, dtype=np.int64)[keep]
    return lengths


# --------------------------------------------------------------------------------------------
# plots


def plot_coverage(
    enc: EncodingStore | pd.DataFrame,
    path: str | os.PathLike[str] | None = None,
    *,
    marks: Sequence[int] = MARKS,
) -> Figure:
    """The coverage curve: % of passing cells fully encoded vs input size, and attention cost.

    Left axis: percent of cells whose whole ranking fits in ``L`` tokens. Right axis: the
    relative attention cost ``(L / 2048) ** 2``. Dotted vertical lines at ``marks``, each
    labelled with its coverage. Reads the lengths only (or takes a :func:`flow.query.coverage`
    frame). Saved as an 800 x 450 PNG when ``path`` is given.
    """
    if isinstance(enc, pd.DataFrame):
        frame = enc
    else:  # every size up to a little past the longest cell and the last mark
        longest = int(_passing_lengths(enc).max(initial=0))
        upper = int(1.05 * max(longest, *marks, 1))
        frame = coverage(enc, np.arange(1, upper + 1))
    sizes = frame["input_size"].to_numpy()
    fig = _figure(FIGSIZE)
    ax = fig.add_subplot()
    (curve,) = ax.plot(
        sizes,
        100 * frame["fraction_covered"].to_numpy(),
        color="C0",
        lw=2,
        label="cells fully encoded (%)",
    )
    ax.set_xlabel("model input size L (tokens)")
    ax.set_ylabel("cells fully encoded (%)", color="C0")
    ax.set_ylim(0, 101)
    ax.set_xlim(0, float(sizes.max()) if sizes.size else 1.0)
    ax.grid(alpha=0.3)
    cost_ax = ax.twinx()
    (cost,) = cost_ax.plot(
        sizes,
        frame["attention_cost"].to_numpy(),
        color="C1",
        ls="--",
        label="attention cost (L / 2048)²",
    )
    cost_ax.set_ylabel("relative attention cost (L / 2048)²", color="C1")
    cost_ax.set_ylim(bottom=0)
    for mark in marks:
        hit = np.flatnonzero(sizes == mark)
        if not hit.size:
            continue
        pct = 100 * float(frame["fraction_covered"].iloc[hit[0]])
        ax.axvline(mark, color="0.3", ls=":", lw=1)
        ax.annotate(
            f"{mark:,}: {format_percent(pct / 100)} of cells",
            xy=(mark, 40),
            xytext=(-3, 0),
            textcoords="offset points",
            rotation=90,
            ha="right",
            va="bottom",
            fontsize=9,
            color="0.2",
        )
    ax.legend(handles=[curve, cost], loc="upper left", fontsize=9)
    ax.set_title("Coverage: cells whose full ranking fits the input size")
    _save(fig, path)
    return fig


def plot_detected_genes(
    enc: EncodingStore,
    path: str | os.PathLike[str] | None = None,
    *,
    cutoff: int = DEFAULT_CUTOFF,
    bins: int = 60,
) -> Figure:
    """Histogram of detected (ranked, in-vocabulary) genes per passing cell, cutoff marked.

    Reads the lengths only. Saved as an 800 x 450 PNG when ``path`` is given.
    """
    lengths = _passing_lengths(enc)
    fig = _figure(FIGSIZE)
    ax = fig.add_subplot()
    if lengths.size:
        ax.hist(lengths, bins=bins, color="C0", alpha=0.85)
        truncated = int(np.count_nonzero(lengths > cutoff))
        ax.axvline(
            cutoff,
            color="C3",
            ls="--",
            lw=1.5,
            label=f"cutoff {cutoff:,}: {truncated:,} cells "
            f"({format_percent(truncated / lengths.size)}) truncated",
        )
        ax.axvline(
            float(np.median(lengths)),
            color="0.3",
            ls=":",
            lw=1,
            label=f"median {float(np.median(lengths)):,.0f} genes",
        )
        ax.legend(fontsize=9)
    else:
        ax.text(0.5, 0.5, "no passing cells", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("detected vocabulary genes per cell (ranking length)")
    ax.set_ylabel("cells")
    ax.set_title(f"Detected genes per cell ({lengths.size:,} passing cells)")
    _save(fig, path)
    return fig


def plot_top_dropped(
    rates: pd.DataFrame,
    path: str | os.PathLike[str] | None = None,
    *,
    top: int = 20,
) -> Figure:
    """Bar chart of the genes dropped in most cells at the cutoff, with their drop rates.

    ``rates`` is :meth:`flow.query.DropRates.to_frame` (most dropped first). Saved as an
    800 x 600 PNG when ``path`` is given.
    """
    cutoff = rates.attrs.get("cutoff")
    shown = rates[rates["cells_dropped"] > 0].head(top)
    fig = _figure(BAR_FIGSIZE)
    ax = fig.add_subplot()
    if len(shown):
        labels = [s or g for s, g in zip(shown["symbol"], shown["gene_id"], strict=True)]
        y = np.arange(len(shown))[::-1]
        ax.barh(y, shown["cells_dropped"].to_numpy(), color="C3", alpha=0.85)
        ax.set_yticks(y, labels, fontsize=8)
        for yy, n, r in zip(y, shown["cells_dropped"], shown["rate"], strict=True):
            ax.annotate(f" {format_percent(r)} of expressing", xy=(n, yy), va="center", fontsize=7)
        ax.set_xlim(0, 1.25 * float(shown["cells_dropped"].max()))
    else:
        ax.text(
            0.5,
            0.5,
            "no gene is dropped at this cutoff",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    ax.set_xlabel("passing cells that drop the gene")
    where = f" at L = {cutoff:,}" if cutoff is not None else ""
    ax.set_title(f"Top dropped genes{where}")
    _save(fig, path)
    return fig


def plot_retention(
    result: RetentionResult,
    path: str | os.PathLike[str] | None = None,
    *,
    genes: list[str] | None = None,
    sets: list[str] | None = None,
    marks: Sequence[int] = MARKS,
) -> Figure:
    """Share of each chosen gene's or set's occurrences kept vs input size, and attention cost.

    Left axis: percent of the occurrences (expressing passing cells) whose rank is below ``L``,
    exact at the result's rank-bin edges (every cutoff is one; lines join them), per gene and
    gene set (default: the
    genes asked for and the sets, at most 8 each) and, when every gene was counted, all genes
    together. Right axis: the relative attention cost ``(L / 2048) ** 2``. Dotted lines at
    ``marks`` (V1 and V2 input sizes). Saved as an 800 x 450 PNG when ``path`` is given.
    """
    curves = result.kept_curve(genes, sets)
    sizes = curves["input_size"].to_numpy()
    right = 1.05 * max(float(sizes.max()), *marks)
    fig = _figure(FIGSIZE)
    ax = fig.add_subplot()
    handles = []
    for i, name in enumerate(c for c in curves.columns if c != "input_size"):
        share = 100 * curves[name].to_numpy()
        x, y = np.r_[0, sizes, right], np.r_[0, share, share[-1]]
        every = name == "all genes"
        style: dict[str, Any] = {"color": "k" if every else f"C{(i + 2) % 10}"}
        style["lw"] = 2.2 if every else 1.5
        (line,) = ax.plot(x, y, label=name, **style)
        handles.append(line)
    ax.set_xlabel("model input size L (tokens)")
    ax.set_ylabel("occurrences kept (%)")
    ax.set_ylim(0, 101)
    ax.set_xlim(0, right)
    ax.grid(alpha=0.3)
    cost_ax = ax.twinx()
    grid = np.linspace(0, right, 200)
    (cost,) = cost_ax.plot(grid, (grid / 2048) ** 2, color="0.5", ls=":", label="attention cost")
    cost_ax.set_ylabel("relative attention cost (L / 2048)²", color="0.4")
    cost_ax.set_ylim(bottom=0)
    for mark, name in zip(marks, ("V1", "V2", *[""] * len(marks)), strict=False):
        ax.axvline(mark, color="0.3", ls="--", lw=1)
        ax.annotate(
            f"{name} {mark:,}".strip(),
            xy=(mark, 3),
            xytext=(-3, 0),
            textcoords="offset points",
            rotation=90,
            ha="right",
            va="bottom",
            fontsize=9,
            color="0.2",
        )
    fig.legend(
        handles=[*handles, cost],
        loc="outside lower center",
        ncol=min(5, len(handles) + 1),
        fontsize=8,
    )
    ax.set_title("What input size keeps the genes: share of occurrences kept")
    _save(fig, path)
    return fig


def plot_fold_change(
    result: RetentionResult,
    path: str | os.PathLike[str] | None = None,
    *,
    cutoffs: Sequence[int] | None = None,
) -> Figure:
    """The fold change against the corpus (log2 of the ranking value) of kept vs dropped
    occurrences, one panel per cutoff (at most 4; every passing cell).

    Each part is drawn as a share of its occurrences per 1/16-octave bin; the line at 0 is
    the corpus median, and each panel names the share of each part below it. Saved as an
    800 x 450 PNG when ``path`` is given.
    """
    tail = result.tail_frame()
    if "group" in tail:
        tail = tail[tail["group"] == ALL_CELLS]
    chosen = list(result.spec.cutoffs if cutoffs is None else cutoffs)[-4:]
    fig = _figure(FIGSIZE)
    axes = fig.subplots(1, len(chosen), sharey=True, squeeze=False)[0]
    for ax, cutoff in zip(axes, chosen, strict=True):
        hist = result.fold_change_histogram(cutoff)
        notes = []
        for part, color in (("kept", "C0"), ("dropped", "C3")):
            counts = hist[part].to_numpy()
            row = tail[(tail["cutoff"] == cutoff) & (tail["part"] == part)].iloc[0]
            if counts.sum():
                ax.step(
                    hist["log2_fold_change"],
                    100 * counts / counts.sum(),
                    where="post",
                    color=color,
                    lw=1.4,
                    label=part,
                )
                notes.append(f"{part}: {format_percent(row.below_median_fraction)} < median")
            else:
                notes.append(f"nothing {part}")
        ax.axvline(0, color="0.3", ls=":", lw=1)
        ax.set_title(f"L = {cutoff:,}", fontsize=10)
        ax.text(0.02, 0.98, "\n".join(notes), transform=ax.transAxes, va="top", fontsize=7)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("share of the part's occurrences (%)")
    fig.supxlabel("log2 fold change against the corpus median (the ranking value)", fontsize=10)
    axes[0].legend(fontsize=8, loc="center left")
    fig.suptitle("Kept vs dropped occurrences: fold change against the corpus median")
    _save(fig, path)
    return fig


# --------------------------------------------------------------------------------------------
# text


def _fmt_table(frame: pd.DataFrame) -> str:
    return str(frame.to_string(index=False, float_format=lambda v: f"{v:.4g}"))


def format_cell_drop(frame: pd.DataFrame) -> str:
    """A readable answer to :func:`flow.query.dropped_genes` (header line + table)."""
    a = frame.attrs
    status = (
        "" if a.get("filter_pass", True) else "; does NOT pass filtering (not part of the corpus)"
    )
    head = (
        f"cell {a['cell']} (index {a['index']}{status}): {a['length']:,} genes ranked; "
        f"{len(frame):,} past input size {a['cutoff']:,}"
    )
    return head if frame.empty else f"{head}\n{_fmt_table(frame)}"


def _quantile_name(q: str) -> str:
    return {"0.0": "min", "1.0": "max"}.get(q, f"p{100 * float(q):g}")


def format_gene_drop(result: GeneDrop) -> str:
    """A readable answer to :func:`flow.query.gene_drop` (summary, quantiles, histogram)."""
    name = f"{result.gene_id} ({result.symbol})" if result.symbol else result.gene_id
    lines = [
        f"gene {name}, token {result.token}: expressed in {result.cells_expressing:,} passing cells"
    ]
    if not result.cells_expressing:
        return lines[0]
    lines[0] += (
        f"; dropped at input size {result.cutoff:,} in {result.cells_dropped:,} "
        f"({format_percent(result.rate)})"
    )
    q = result.quantiles
    lines.append(
        "rank (0-based) quantiles: "
        + ", ".join(f"{_quantile_name(k)} {v:,.0f}" for k, v in q.items())
    )
    lines.append("rank histogram (expressing cells):")
    hist = result.histogram
    peak = max(1, int(hist["cells"].max()))
    for row in hist.itertuples(index=False):
        bar = "#" * math.ceil(40 * row.cells / peak) if row.cells else ""
        past = "  (dropped)" if row.rank_from >= result.cutoff else ""
        lines.append(f"  {row.rank_from:>6,}-{row.rank_to - 1:<6,} {row.cells:>8,} {bar}{past}")
    return "\n".join(lines)


def format_drop_rates(frame: pd.DataFrame, *, top: int = 20) -> str:
    """The genes dropped in most cells (header + the first ``top`` rows)."""
    cutoff = frame.attrs.get("cutoff")
    dropped = frame[frame["cells_dropped"] > 0]
    head = (
        f"{len(dropped):,} of {len(frame):,} genes are dropped in at least one cell "
        f"at input size {cutoff:,}"
    )
    return (
        head
        if dropped.empty
        else f"{head}; top {min(top, len(dropped))}:\n{_fmt_table(dropped.head(top))}"
    )


def write_answer(
    answer: pd.DataFrame | GeneDrop, *, fmt: str = "table", path: str | None = None
) -> str | None:
    """Render a cell or gene answer as ``table`` text, ``csv`` or ``json``; or write it to
    ``path`` (format by suffix: .csv, .tsv, .json, .parquet; else ``fmt``).

    Returns the text to print (None when written to a file).
    """
    kind = fmt
    if path is not None:
        lower = path.lower()
        for suffix, name in (
            (".parquet", "parquet"),
            (".json", "json"),
            (".csv", "csv"),
            (".tsv", "tsv"),
        ):
            if lower.endswith(suffix):
                kind = name
    if kind == "table":
        text = (
            format_gene_drop(answer) if isinstance(answer, GeneDrop) else format_cell_drop(answer)
        )
    elif kind == "json":
        text = json.dumps(_as_json(answer), indent=2)
    elif kind in ("csv", "tsv", "parquet"):
        frame = answer.to_series().to_frame().T if isinstance(answer, GeneDrop) else answer
        if kind == "parquet":
            if path is None:
                msg = "Parquet output needs -o FILE.parquet."
                raise InputError(msg)
            frame.to_parquet(path, index=False)
            return None
        text = frame.to_csv(index=False, sep="\t" if kind == "tsv" else ",")
    else:
        msg = f"Unknown output format {kind!r}: use table, csv, json or a .parquet file."
        raise InputError(msg)
    if path is None:
        return text
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text if text.endswith("\n") else text + "\n")
    return None


def _as_json(answer: pd.DataFrame | GeneDrop) -> dict[str, Any]:
    if isinstance(answer, GeneDrop):
        return answer.as_dict()
    meta = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in answer.attrs.items()}
    return {**meta, "dropped": answer.to_dict(orient="records")}


# --------------------------------------------------------------------------------------------
# HTML report

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 60em; margin: 2em auto; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { padding: 0.25em 0.6em; border-bottom: 1px solid #e4e4e4; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; } .summary { font-size: 1.1em; background: #f6f8fa; padding: 0.6em; }
"""


def _html_table(frame: pd.DataFrame, table_id: str) -> str:
    body = frame.to_html(
        index=False,
        border=0,
        escape=True,
        table_id=table_id,
        na_rep="-",
        float_format=lambda v: f"{v:.3g}",
    )
    return str(body)


def _img(fig: Figure, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{_png_base64(fig)}">'


def _retention_section(
    enc: EncodingStore,
    retention: RetentionResult | bool,
    group_by: str | None,
    compute: Compute | None,
) -> list[str]:
    """The report's section on retention and the tail (plots, tail table, sets table);
    computes the retention unless it is given."""
    result = (
        retention
        if isinstance(retention, RetentionResult)
        else gene_retention(enc, group_by=group_by).compute(compute=compute)
    )
    tail = result.tail_frame()
    shown = tail.copy()
    shown["below_median_fraction"] = [format_percent(f) for f in shown["below_median_fraction"]]
    parts = [
        "<h2>Retention and the tail</h2>",
        "<p>Share of the genes' occurrences (expressing passing cells) kept by each input "
        "size, against the attention cost; then the fold change against the corpus median "
        "(the value the cell was ranked by) of the occurrences kept and dropped at each "
        "cutoff: the genes past a cutoff are those most down-regulated in their cell.</p>",
        _img(plot_retention(result), "retention by input size"),
        _img(plot_fold_change(result), "fold change of kept and dropped occurrences"),
        _html_table(shown, "tail"),
    ]
    if result.spec.set_names:
        parts += ["<h3>Gene sets</h3>", _html_table(result.sets_frame(), "sets")]
    return parts


def write_report(
    enc: EncodingStore,
    path: str | os.PathLike[str],
    cutoff: int = DEFAULT_CUTOFF,
    group_by: str | None = None,
    *,
    top: int = 20,
    compute: Compute | None = None,
    retention: RetentionResult | bool = False,
) -> str:
    """Write a one-page, self-contained HTML report of what ``cutoff`` drops (computes).

    Runs one drop-rate reduction over ``tokens[:, cutoff:]`` (per group when ``group_by`` is
    given; see :func:`flow.query.drop_rates`) with ``compute`` (default
    :func:`flow.cluster.compute`). The page holds: the coverage summary and curve, the
    distribution of detected genes per cell, the top dropped genes (chart and table), and
    with ``group_by`` (a carried cell column such as ``cell_type``) a table per group: cells,
    truncated cells and fraction, median length and top dropped genes. With ``retention``
    (a computed :class:`flow.retention.RetentionResult`, or True to compute one with the
    default cutoffs, per group with ``group_by``) a section on retention and the tail: the
    retention plot, the fold-change plot, the tail table and any gene sets' table. Plots are
    embedded as base64 PNGs. Returns the path written.
    """
    rates = drop_rates(enc, cutoff, group_by=group_by)
    counts = rates.compute(compute=compute)
    frame = rates.to_frame(counts)
    lengths = _passing_lengths(enc)
    n_cells = int(enc.attrs["n_cells"])
    truncated = int(np.count_nonzero(lengths > rates.cutoff))
    sizes = sorted(
        {512, 1024, 2048, 4096, rates.cutoff, *([int(lengths.max())] if lengths.size else [])}
    )
    cov = coverage(enc, sizes)
    cov_table = pd.DataFrame(
        {
            "input size": [f"{s:,}" for s in cov["input_size"]],
            "cells fully encoded": [f"{c:,}" for c in cov["cells_covered"]],
            "fraction": [format_percent(f) for f in cov["fraction_covered"]],
            "attention cost (L / 2,048)\u00b2": [f"{c:.3g}" for c in cov["attention_cost"]],
        }
    )
    shown = frame[frame["cells_dropped"] > 0].head(top).copy()
    shown["rate"] = [format_percent(r) for r in shown["rate"]]
    esc = html.escape
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>flow report: what input size {rates.cutoff:,} drops</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>What input size {rates.cutoff:,} drops</h1>",
        f"<p>Encoding store <code>{esc(enc.url)}</code>: {n_cells:,} cells, "
        f"{lengths.size:,} passing filter (only passing cells are counted). "
        f"{truncated:,} passing cells ({format_percent(truncated / max(1, lengths.size))}) "
        f"have more than {rates.cutoff:,} ranked genes.</p>",
        f'<p class="summary">{esc(coverage_summary(enc))}<br>({esc(COST_HEADER)})</p>',
        "<h2>Coverage curve</h2>",
        _img(plot_coverage(enc), "coverage curve"),
        _html_table(cov_table, "coverage"),
        "<h2>Detected genes per cell</h2>",
        _img(plot_detected_genes(enc, cutoff=rates.cutoff), "detected genes per cell"),
        f"<h2>Top dropped genes at {rates.cutoff:,}</h2>",
        "<p>Passing cells whose ranking puts the gene at rank &ge; the cutoff (the model "
        "never sees it there), and the rate among cells expressing it.</p>",
        _img(plot_top_dropped(frame, top=top), "top dropped genes"),
        _html_table(shown, "top-dropped")
        if len(shown)
        else "<p>No gene is dropped at this cutoff.</p>",
    ]
    if group_by is not None:
        groups = rates.group_summary(counts)
        groups = groups.rename(columns={"group": group_by})
        groups["fraction_truncated"] = [format_percent(f) for f in groups["fraction_truncated"]]
        parts += [f"<h2>By {esc(group_by)}</h2>", _html_table(groups, "groups")]
    if retention is not False:
        parts += _retention_section(enc, retention, group_by, compute)
    parts.append("</body></html>")
    out = os.fspath(path)
    with open(out, "w", encoding="utf-8") as fh:
        fh.write("\n".join(parts) + "\n")
    return out
