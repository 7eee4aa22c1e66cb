"""Figures of SN ratios in the papers' style: per-layer stacked IN/LN/BN bars (SN paper Fig. 8),
per-layer divergence between two models (Fig. 5) and ratios over training iterations (Fig. 3).
Group-SN layers have one bar per channel group, labelled ``name[g]``. For SSN, the iteration at
which each ratio vector froze, coloured by the normalizer it selected.

Every function writes ``<prefix>.png`` and ``<prefix>.svg`` and returns both paths.
"""
import os
import os.path as osp
from typing import Dict, List, Sequence, Tuple

import matplotlib

matplotlib.use('Agg')  # files only; no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

from ..layers.switchable_norm import NORMALIZERS  # noqa: E402
from .ratios import LayerRatios  # noqa: E402

# The papers' colours: IN blue, LN red, BN green.
COLORS = {'in': '#1f77b4', 'ln': '#d62728', 'bn': '#2ca02c'}
FORMATS = ('png', 'svg')


def _save(fig, prefix: str) -> List[str]:
    folder = osp.dirname(prefix)
    if folder:
        os.makedirs(folder, exist_ok=True)
    paths = [f'{prefix}.{ext}' for ext in FORMATS]
    for path in paths:
        fig.savefig(path, dpi=120, bbox_inches='tight')
    plt.close(fig)
    return paths


def _group_spans(layers: Sequence[LayerRatios]) -> List[Tuple[str, int, int]]:
    """Consecutive runs of one group as ``(group, first index, last index)``."""
    spans: List[Tuple[str, int, int]] = []
    for i, layer in enumerate(layers):
        if spans and spans[-1][0] == layer.group:
            spans[-1] = (layer.group, spans[-1][1], i)
        else:
            spans.append((layer.group, i, i))
    return spans


def _mark_groups(ax, layers: Sequence[LayerRatios], top: float, step: float) -> None:
    """Separators between groups and their names above the bars, staggered so narrow ones stay legible."""
    for i, (group, first, last) in enumerate(_group_spans(layers)):
        if first > 0:
            ax.axvline(first - 0.5, color='black', linewidth=0.8)
        label = group[len('backbone.'):] if group.startswith('backbone.') else group.split('.')[-1]
        ax.text((first + last) / 2, top + step * (i % 2), label, ha='center', va='bottom', fontsize=7)


def _layer_axis(ax, layers: Sequence[LayerRatios]) -> None:
    ax.set_xlim(-0.6, len(layers) - 0.4)
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels([layer.label for layer in layers], rotation=90, fontsize=5)


def _width(count: int) -> float:
    return max(8.0, 0.16 * count + 2)


def plot_layer_ratios(layers: Sequence[LayerRatios], prefix: str, title: str = '') -> List[str]:
    """Stacked IN/LN/BN bars of the mean ratios (top) and variance ratios (bottom) of every layer."""
    if not layers:
        raise ValueError('no SN layers to plot')
    fig, axes = plt.subplots(2, 1, figsize=(_width(len(layers)), 7), sharex=True)
    x = range(len(layers))
    for ax, which in zip(axes, ('mean', 'var')):
        bottom = [0.0] * len(layers)
        for k, normalizer in enumerate(NORMALIZERS):
            heights = [float(getattr(layer, which)[k]) for layer in layers]
            ax.bar(x, heights, bottom=bottom, width=0.8, color=COLORS[normalizer], label=normalizer.upper())
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_ylim(0, 1.16)
        ax.set_ylabel('mean ratios' if which == 'mean' else 'variance ratios')
        _mark_groups(ax, layers, 1.005, 0.07)
        _layer_axis(ax, layers)
    axes[0].legend(loc='lower right', bbox_to_anchor=(1.0, 1.02), ncol=3, fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, prefix)


def plot_freezing(layers: Sequence[LayerRatios], prefix: str, title: str = '') -> List[str]:
    """SSN layers: the training iteration at which each mean (circles) and variance (triangles) ratio
    vector froze, coloured by the normalizer it froze to; vectors still free are drawn hollow at the
    top, vectors frozen at an unrecorded iteration (converted checkpoints) at the bottom."""
    sparse = [layer for layer in layers if layer.is_sparse]
    if not sparse:
        raise ValueError('no SSN layers to plot')
    known = [at for layer in sparse for at in layer.frozen_at if at is not None and at >= 0]
    top = max(known, default=0) * 1.1 or 1.0
    rows = {'free': top * 1.08, 'unknown': -top * 0.08}
    fig, ax = plt.subplots(figsize=(_width(len(sparse)), 4))
    for index, (which, marker, shift) in enumerate((('mean', 'o', -0.15), ('var', '^', 0.15))):
        for x, layer in enumerate(sparse):
            at = layer.frozen_at[index]
            color = COLORS[layer.choice(which)]
            if at is None:
                ax.scatter(x + shift, rows['free'], marker=marker, facecolors='none', edgecolors='grey', s=18)
            else:
                ax.scatter(x + shift, rows['unknown'] if at < 0 else at, marker=marker, color=color, s=18)
    handles = [plt.Line2D([], [], marker='o', linestyle='', color='black', label='mean'),
               plt.Line2D([], [], marker='^', linestyle='', color='black', label='variance')]
    handles += [plt.Line2D([], [], marker='s', linestyle='', color=COLORS[k], label=k.upper()) for k in NORMALIZERS]
    ax.legend(handles=handles, loc='lower right', bbox_to_anchor=(1.0, 1.0), ncol=5, fontsize=8)
    ax.axhline(rows['free'] - top * 0.04, color='grey', linewidth=0.5)
    ax.axhline(rows['unknown'] + top * 0.04, color='grey', linewidth=0.5)
    ax.set_ylim(rows['unknown'] - top * 0.06, rows['free'] + top * 0.12)
    ax.set_ylabel('iteration frozen (top: free; bottom: unrecorded)')
    _mark_groups(ax, sparse, rows['free'] + top * 0.05, top * 0.04)
    _layer_axis(ax, sparse)
    radii = sorted({layer.radius for layer in sparse})
    radius = f'radius {radii[0]:.4f}' if len(radii) == 1 else f'radius {radii[0]:.4f}-{radii[-1]:.4f}'
    ax.set_title(f'{title} ({radius})' if title else radius, pad=22, loc='left')
    return _save(fig, prefix)


def plot_divergence(rows: Sequence[Tuple[LayerRatios, float, float]], prefix: str, title: str = '') -> List[str]:
    """Per-layer ``D`` between two models' mean ratios and variance ratios, side by side."""
    if not rows:
        raise ValueError('no common SN layers to plot')
    layers = [row[0] for row in rows]
    fig, ax = plt.subplots(figsize=(_width(len(rows)), 4))
    x = list(range(len(rows)))
    ax.bar([i - 0.2 for i in x], [row[1] for row in rows], width=0.4, color='#9467bd', label='D(mean ratios)')
    ax.bar([i + 0.2 for i in x], [row[2] for row in rows], width=0.4, color='#ff7f0e', label='D(variance ratios)')
    top = max(max(row[1], row[2]) for row in rows) or 1.0
    ax.set_ylim(0, top * 1.2)
    ax.set_ylabel('symmetric KL divergence')
    _mark_groups(ax, layers, top * 1.01, top * 0.08)
    _layer_axis(ax, layers)
    ax.legend(loc='lower right', bbox_to_anchor=(1.0, 1.0), ncol=2, fontsize=8)
    if title:
        ax.set_title(title, pad=22, loc='left')
    return _save(fig, prefix)


def plot_ratio_dynamics(series: Dict[str, Dict[str, Dict[str, List[Tuple[int, float]]]]], prefix: str) -> List[str]:
    """One panel per group: ratios against iterations, solid for means, dashed for variances.

    ``series[group][which][normalizer]`` is a list of ``(iteration, ratio)``.
    """
    if not series:
        raise ValueError('no ratio series to plot')
    groups = list(series)
    columns = min(4, len(groups))
    rows = (len(groups) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
    for ax, group in zip(axes.flat, groups):
        for which, style in (('mean', '-'), ('var', '--')):
            for normalizer, points in series[group].get(which, {}).items():
                if points:
                    steps, values = zip(*points)
                    ax.plot(steps, values, style, color=COLORS[normalizer],
                            label=f"{normalizer.upper()} {'mean' if which == 'mean' else 'var'}")
        ax.set_title(group, fontsize=9)
        ax.set_ylim(0, 1)
        ax.set_xlabel('iteration', fontsize=8)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis('off')
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    return _save(fig, prefix)
