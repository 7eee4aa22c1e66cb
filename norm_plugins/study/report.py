"""Tables and plots of the batch-size study: per-run CSVs, a summary CSV (mean, sample standard
deviation and count over seeds), a Markdown report and two PNG plots."""
import csv
import math
import os.path as osp
from collections import defaultdict
from typing import Dict, Iterable, List, Sequence, Tuple

RATIO_NAMES = (('in', 'IN'), ('ln', 'LN'), ('bn', 'BN'))
#: SSN: ratio vectors per model, how many mean/variance vectors froze to each normalizer, final radius.
SSN_COLUMNS = ('ssn_vectors',) + tuple(f'ssn_frozen_{kind}_{k}' for kind in ('mean', 'var') for k, _ in RATIO_NAMES) \
    + ('ssn_radius',)
SN_RATIO_COLUMNS = ('sn_mean_in', 'sn_mean_ln', 'sn_mean_bn', 'sn_var_in', 'sn_var_ln', 'sn_var_bn')
RUN_COLUMNS = ('task', 'normalizer', 'images_per_process', 'processes', 'seed', 'steps', 'images',
               'peak_lr', 'accuracy', 'bbox_mAP', 'bbox_mAP_50', 'final_train_loss', 'train_seconds') \
    + SN_RATIO_COLUMNS + SSN_COLUMNS
SUMMARY_COLUMNS = ('task', 'normalizer', 'images_per_process', 'metric', 'mean', 'std', 'n')
#: Metrics summarized per task, in table order.
METRICS = {'classification': ('accuracy', 'final_train_loss') + SN_RATIO_COLUMNS + SSN_COLUMNS,
           'detection': ('bbox_mAP', 'bbox_mAP_50') + SN_RATIO_COLUMNS + SSN_COLUMNS}


def write_runs_csv(rows: Sequence[Dict], path: str) -> None:
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=RUN_COLUMNS, extrasaction='ignore')
        writer.writeheader()
        for row in rows:
            writer.writerow(row)


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarize(rows: Iterable[Dict]) -> List[Dict]:
    """One summary row per (task, normalizer, images per process, metric) present in ``rows``."""
    groups = defaultdict(list)
    order = []
    for row in rows:
        key = (row['task'], row['normalizer'], row['images_per_process'])
        if key not in groups:
            order.append(key)
        groups[key].append(row)
    summary = []
    for key in order:
        for metric in METRICS[key[0]]:
            values = [float(r[metric]) for r in groups[key] if r.get(metric) is not None]
            if values:
                mean, std = mean_std(values)
                summary.append(dict(zip(SUMMARY_COLUMNS, (*key, metric, round(mean, 4), round(std, 4),
                                                          len(values)))))
    return summary


def write_summary_csv(summary: Sequence[Dict], path: str) -> None:
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerows(summary)


def _lookup(summary: Sequence[Dict]) -> Dict:
    return {(s['task'], s['normalizer'], s['images_per_process'], s['metric']): s for s in summary}


def _ordered(values: Iterable) -> list:
    seen = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


def _cell(entry: Dict, digits: int) -> str:
    if entry is None:
        return '-'
    return f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}"


def metric_table(summary: Sequence[Dict], task: str, metric: str, digits: int = 1) -> str:
    """Markdown table: a row per normalizer, a column per images-per-process value, 'mean ± std'."""
    rows = [s for s in summary if s['task'] == task and s['metric'] == metric]
    if not rows:
        return ''
    table = _lookup(summary)
    normalizers = _ordered(s['normalizer'] for s in rows)
    batches = sorted(_ordered(s['images_per_process'] for s in rows))
    counts = sorted({s['n'] for s in rows})
    lines = ['| normalizer | ' + ' | '.join(f'{b} img/process' for b in batches) + ' |',
             '| --- |' + ' ---: |' * len(batches)]
    for n in normalizers:
        lines.append(f'| {n} | ' + ' | '.join(_cell(table.get((task, n, b, metric)), digits) for b in batches)
                     + ' |')
    seeds = '/'.join(str(c) for c in counts)
    return '\n'.join(lines) + f'\n\nmean ± sample standard deviation over {seeds} seed(s).\n'


def ratio_table(summary: Sequence[Dict], task: str = 'classification') -> str:
    """Markdown table of SN's mean ratios (IN/LN/BN, of means and of variances) per images per process."""
    rows = [s for s in summary if s['task'] == task and s['metric'].startswith('sn_')]
    if not rows:
        return ''
    table = _lookup(summary)
    lines = ['| normalizer | img/process | mean IN | mean LN | mean BN | var IN | var LN | var BN |',
             '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']
    for n in _ordered(s['normalizer'] for s in rows):
        for b in sorted(_ordered(s['images_per_process'] for s in rows if s['normalizer'] == n)):
            cells = [_cell(table.get((task, n, b, f'sn_{kind}_{k}')), 3)
                     for kind in ('mean', 'var') for k, _ in RATIO_NAMES]
            lines.append(f'| {n} | {b} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def freezing_table(summary: Sequence[Dict], task: str = 'classification') -> str:
    """Markdown table of SSN's frozen ratio vectors: per images per process, the vectors per model and
    how many mean and variance vectors froze to IN, LN and BN (mean ± std over seeds), and the radius."""
    rows = [s for s in summary if s['task'] == task and s['metric'] in SSN_COLUMNS]
    if not rows:
        return ''
    table = _lookup(summary)
    lines = ['| normalizer | img/process | vectors | mean→IN | mean→LN | mean→BN | var→IN | var→LN | var→BN | radius |',
             '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']
    for n in _ordered(s['normalizer'] for s in rows):
        for b in sorted(_ordered(s['images_per_process'] for s in rows if s['normalizer'] == n)):
            cells = [_cell(table.get((task, n, b, metric)), 2 if metric == 'ssn_radius' else 1)
                     for metric in SSN_COLUMNS]
            lines.append(f'| {n} | {b} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def plot_metric(summary: Sequence[Dict], task: str, metric: str, ylabel: str, path: str) -> None:
    """Mean (with a ±std error bar) of ``metric`` against images per process, one line per normalizer."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = [s for s in summary if s['task'] == task and s['metric'] == metric]
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=100)
    for n in _ordered(s['normalizer'] for s in rows):
        points = sorted((s['images_per_process'], s['mean'], s['std']) for s in rows if s['normalizer'] == n)
        xs, ys, errs = zip(*points)
        ax.errorbar(xs, ys, yerr=errs, marker='o', capsize=3, label=n)
    ax.set_xscale('log', base=2)
    batches = sorted(_ordered(s['images_per_process'] for s in rows))
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel('images per process')
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_sn_ratios(summary: Sequence[Dict], path: str) -> None:
    """SN's layer-averaged IN/LN/BN ratios against images per process: means (left), variances (right);
    one line style per SN kind in the order they appear (solid, dashed, dotted, dash-dotted)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = [s for s in summary if s['metric'].startswith('sn_')]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5), dpi=100, sharey=True)
    colors = dict(zip((k for k, _ in RATIO_NAMES), ('tab:blue', 'tab:orange', 'tab:green')))
    names = _ordered(s['normalizer'] for s in rows)
    styles = ('-', '--', ':', '-.')
    if len(names) > len(styles):
        raise ValueError(f'the ratio plot tells {len(styles)} SN kinds apart by line style, got {names}')
    for ax, kind in zip(axes, ('mean', 'var')):
        for n, style in zip(names, styles):
            for k, label in RATIO_NAMES:
                points = sorted((s['images_per_process'], s['mean'], s['std']) for s in rows
                                if s['normalizer'] == n and s['metric'] == f'sn_{kind}_{k}')
                if points:
                    xs, ys, errs = zip(*points)
                    ax.errorbar(xs, ys, yerr=errs, linestyle=style, marker='o', capsize=3, color=colors[k],
                                label=f'{n} {label}')
        batches = sorted(_ordered(s['images_per_process'] for s in rows))
        ax.set_xscale('log', base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel('images per process')
        ax.set_title(f'ratios of the {"means" if kind == "mean" else "variances"}')
        ax.grid(alpha=0.3)
    axes[0].set_ylabel('ratio (mean over SN layers)')
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(rows: Sequence[Dict], out_dir: str, command: str, settings: Dict) -> Dict[str, str]:
    """Write every output file into ``out_dir`` and return their paths by kind."""
    paths = dict(summary_csv=osp.join(out_dir, 'summary.csv'), markdown=osp.join(out_dir, 'results.md'))
    summary = summarize(rows)
    write_summary_csv(summary, paths['summary_csv'])
    sections = ['# Batch-size study results', '', f'Command: `{command}`', '']
    for key, value in settings.items():
        sections.append(f'- {key}: `{value}`')
    sections.append('')
    for task in ('classification', 'detection'):
        task_rows = [r for r in rows if r['task'] == task]
        if not task_rows:
            continue
        paths[f'{task}_csv'] = osp.join(out_dir, f'{task}_runs.csv')
        write_runs_csv(task_rows, paths[f'{task}_csv'])
    if 'classification_csv' in paths:
        paths['accuracy_plot'] = osp.join(out_dir, 'accuracy_vs_batch.png')
        plot_metric(summary, 'classification', 'accuracy', 'test accuracy (%)', paths['accuracy_plot'])
        sections += ['## Classification: digits test accuracy (%)', '',
                     metric_table(summary, 'classification', 'accuracy'),
                     '## Classification: final training loss', '',
                     metric_table(summary, 'classification', 'final_train_loss', digits=3),
                     '![accuracy against images per process](accuracy_vs_batch.png)', '']
        ratios = ratio_table(summary)
        if ratios:
            paths['ratio_plot'] = osp.join(out_dir, 'sn_ratios_vs_batch.png')
            plot_sn_ratios([s for s in summary if s['task'] == 'classification'], paths['ratio_plot'])
            sections += ['## SN importance ratios (mean over layers)', '', ratios,
                         '![SN ratios against images per process](sn_ratios_vs_batch.png)', '']
        frozen = freezing_table(summary)
        if frozen:
            sections += ['## SSN: frozen ratio vectors (count per model)', '', frozen]
    if 'detection_csv' in paths:
        sections += ['## Detection from scratch: COCO box mAP (%)', '',
                     metric_table(summary, 'detection', 'bbox_mAP'),
                     '## Detection from scratch: box AP50 (%)', '',
                     metric_table(summary, 'detection', 'bbox_mAP_50')]
        ratios, frozen = ratio_table(summary, 'detection'), freezing_table(summary, 'detection')
        if ratios:
            sections += ['## Detection: SN importance ratios (mean over layers)', '', ratios]
        if frozen:
            sections += ['## Detection: SSN frozen ratio vectors (count per model)', '', frozen]
    with open(paths['markdown'], 'w') as f:
        f.write('\n'.join(sections).rstrip() + '\n')
    return paths
