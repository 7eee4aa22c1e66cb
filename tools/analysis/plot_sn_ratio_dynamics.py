"""SN ratios over training (logged by SNRatioLoggerHook): python tools/analysis/plot_sn_ratio_dynamics.py
WORK_DIR|SCALARS_JSON [--out PREFIX]."""
from norm_plugins.analysis.cli import ratio_dynamics_main
from norm_plugins.runner.entrypoints import run_tool

if __name__ == '__main__':
    run_tool(ratio_dynamics_main)
