"""SN ratios per layer: python tools/analysis/sn_ratios.py CHECKPOINT [--config CONFIG] [--compare OTHER]
[--out-dir DIR]."""
from norm_plugins.analysis.cli import sn_ratios_main
from norm_plugins.runner.entrypoints import run_tool

if __name__ == '__main__':
    run_tool(sn_ratios_main)
