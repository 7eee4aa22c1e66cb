"""Instruments of the SN papers: batch-average statistics and importance-ratio analysis."""
from .precise_stats import batch_stat_layers, recompute_batch_stats
from .ratio_logs import ratio_scalars, read_ratio_series
from .ratios import (UNKNOWN_ITERATION, LayerRatios, collect_ratios, compare_ratios, frozen_summary, group_means,
                     group_of, ratio_table, ratios_from_model, ratios_from_state_dict, symmetric_kl)

__all__ = ['LayerRatios', 'UNKNOWN_ITERATION', 'batch_stat_layers', 'collect_ratios', 'compare_ratios',
           'frozen_summary', 'group_means', 'group_of', 'ratio_scalars', 'ratio_table', 'ratios_from_model',
           'ratios_from_state_dict', 'read_ratio_series', 'recompute_batch_stats', 'symmetric_kl']
