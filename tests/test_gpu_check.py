"""tools/gpu_check.sh and its helpers, without a GPU and in seconds: the arguments, which stages run
what with and without a GPU, the stage bookkeeping under time limits (a stage killed at its limit,
with everything it started, and a report that is whole after every step), and the size check of the
folder carried to a GPU node. The full run on the reference node's stack is tools/gpu_rehearsal.sh,
for maintainers (it downloads GBs and builds CUDA code)."""
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location('gpu_check_helper', REPO / 'tools' / '_gpu_check.py')
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)

NODE = dict(python='3.12.3', executable='/opt/torch/.venv/bin/python3', cores=16, torch='2.11.0+cu130',
            cuda='13.0', gpu='NVIDIA H200 (sm_90)', triton='3.6.0', numpy='2.5.2')
CPU = dict(NODE, gpu=None, cores=2)


def _tool(script, *args, **env):
    return subprocess.run(['bash', str(REPO / 'tools' / script), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**os.environ, 'PYTHON': sys.executable, **env})


@pytest.mark.parametrize('args, needle', [
    (['--stages', '3'], "'3': give stage numbers from 1, 2"),
    (['--stages', 'one'], "'one': give stage numbers from 1, 2"),
    (['--limit', '2'], "'2': write STAGE=SECONDS"),
    (['--limit', '1=0'], "'1=0': write STAGE=SECONDS"),
    (['--wheelhouse', '/nonexistent/wheels'], 'no wheelhouse.txt there; make the folder with'),
    (['--bogus'], 'unrecognized arguments: --bogus'),
])
def test_gpu_check_refuses_bad_arguments_before_running_anything(tmp_path, args, needle):
    result = _tool('gpu_check.sh', *args, '--out', str(tmp_path / 'out'))
    assert result.returncode == 2 and needle in result.stderr, result.stderr
    assert not (tmp_path / 'out').exists()


def test_gpu_check_help_and_missing_interpreter():
    shown = _tool('gpu_check.sh', '--help')
    assert shown.returncode == 0 and '--stages' in shown.stdout and 'stage 1, nothing installed' in shown.stdout
    missing = _tool('gpu_check.sh', PYTHON='/nonexistent/python3')
    assert missing.returncode == 2 and 'no interpreter /nonexistent/python3' in missing.stderr


def _commands(stage):
    return {step.name: step for step in stage.steps}


def test_on_a_gpu_stage_1_runs_the_layer_tests_and_benchmark_with_the_tree_on_the_path(tmp_path):
    first, second = check.build_stages(NODE, check.DEFAULT_LIMITS, tmp_path / 'wheels', tmp_path / 'venv')
    steps = _commands(first)
    assert list(steps) == ['layer tests', 'benchmark_norm'] and first.limit == 300 and not first.notes
    assert not steps['layer tests'].note
    assert steps['layer tests'].argv[1:] == ['-m', 'pytest', '-q', '-rfEs', '-p', 'no:cacheprovider', '-m', 'cuda',
                                             'tests/test_cuda.py']
    assert steps['benchmark_norm'].argv[1:5] == ['tools/benchmark_norm.py', '--device', 'cuda', '--backend']
    for step in first.steps:
        assert step.argv[0] == sys.executable
        assert step.env['PYTHONPATH'].split(os.pathsep)[0] == str(REPO) and 'TRITON_INTERPRET' not in step.env
    steps = _commands(second)
    assert list(steps) == ['set-up', 'toolbox tests', 'benchmark_e2e'] and steps['set-up'].required
    assert steps['set-up'].argv == ['bash', 'tools/setup_env.sh', '--system-torch', '--wheelhouse',
                                    str(tmp_path / 'wheels')]
    assert steps['set-up'].env == {'PYTHON': sys.executable, 'NORM_PLUGINS_VENV': str(tmp_path / 'venv')}
    assert steps['toolbox tests'].argv[0] == str(tmp_path / 'venv' / 'bin' / 'python')
    assert steps['toolbox tests'].argv[-3:] == ['cuda', '--ignore=tests/test_cuda.py', 'tests']
    assert steps['benchmark_e2e'].argv[2:4] == ['--device', 'cuda']


def test_without_a_gpu_the_kernels_run_in_the_interpreter_and_the_gap_is_said_in_one_line(tmp_path):
    first, second = check.build_stages(CPU, {1: 60, 2: 70}, None, tmp_path / 'venv')
    assert (first.limit, second.limit) == (60, 70)
    steps = _commands(first)
    assert list(steps) == ['layer tests', 'kernel tests', 'kernels for sm_90', 'benchmark_norm']
    # The same command as on a GPU: it shows that tests/test_cuda.py imports with torch alone.
    assert steps['layer tests'].argv[-3:] == ['-m', 'cuda', 'tests/test_cuda.py']
    assert 'the module is collected (so it imports)' in steps['layer tests'].note
    tests = steps['kernel tests']
    assert {'tests/test_triton_rowwise.py', 'tests/test_bcn_triton.py'} <= set(tests.argv)
    assert tests.env['TRITON_INTERPRET'] == '1' and 'tests/test_cuda.py' not in tests.argv
    assert steps['kernels for sm_90'].argv[1:] == ['tools/triton_kernels_report.py']
    assert 'TRITON_INTERPRET' not in steps['kernels for sm_90'].env  # it compiles, for a GPU it does not need
    assert steps['benchmark_norm'].argv[2:4] == ['--device', 'cpu']
    assert first.notes == ['the GPU tests of tests/test_cuda.py and benchmark_norm --device cuda (no GPU is visible '
                           "to torch here; the kernel tests run in Triton's interpreter and the kernels are compiled "
                           'for sm_90 instead)']
    assert '--wheelhouse' not in _commands(second)['set-up'].argv and 'benchmark_e2e' not in _commands(second)
    assert second.notes == ['benchmark_e2e --device cuda (no GPU is visible to torch here)']
    assert 'every module is collected (so it imports)' in _commands(second)['toolbox tests'].note


def _py(code):
    return [sys.executable, '-c', code]


TABLE = 'print("# fake benchmark"); print("| layer | ms |"); print("| --- | --- |"); print("| SN | 1.0 |")'
# Starts a grandchild in its process group and records its pid: a kill at the limit must reach it.
SLOW = ('import subprocess, sys, time; child = subprocess.Popen(["sleep", "60"]); '
        'open(sys.argv[1], "w").write(str(child.pid)); print("slow step started", flush=True); time.sleep(60)')
PYTEST = 'print("FAILED tests/test_x.py::test_y - boom"); print("1 failed, 2 passed in 0.10s"); raise SystemExit(1)'


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child stays a zombie until its parent (here init, after the runner reaped the step) reaps it.
    return Path(f'/proc/{pid}/stat').read_text().split(') ')[1][0] != 'Z'


def _wait_dead(pid, seconds=10):
    end = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < end:
        time.sleep(0.1)
    return not _alive(pid)


def test_a_stage_killed_at_its_limit_is_reported_and_the_next_stage_still_runs(tmp_path, capsys):
    pid_file = tmp_path / 'grandchild.pid'
    stages = [
        check.Stage(1, 'fake slow stage', 2, [
            check.Step('table', _py(TABLE), stdout='table.md', kind='table'),
            check.Step('slow', _py(SLOW) + [str(pid_file)]),
            check.Step('after', _py('pass')),
        ]),
        check.Stage(2, 'independent stage', 30, [check.Step('tests', _py(PYTEST), kind='pytest')]),
    ]
    start = time.monotonic()
    assert check.Runner(stages, tmp_path, ['- fake machine'], {}).run() == 1
    assert time.monotonic() - start < 2 + check.KILL_GRACE
    assert _wait_dead(int(pid_file.read_text()))
    report = (tmp_path / 'report.md').read_text()
    assert '| 1: fake slow stage | 2 s | 0m02s | killed |' in report
    assert '| 2: independent stage | 30 s |' in report and '| failed |' in report
    assert '| table |' in report and '| ok |' in report and '| SN | 1.0 |' in report and '> fake benchmark' in report
    assert "| slow |" in report and "| killed: at the stage's limit (2 s) |" in report
    assert "| after | `" in report and "| not run: slow was killed at the stage's limit |" in report
    assert '| failed: exit 1: 1 failed, 2 passed in 0.10s |' in report
    assert 'FAILED tests/test_x.py::test_y - boom' in report
    assert 'slow step started' in (tmp_path / 'stage1.log').read_text()
    assert "[gpu_check]   slow killed in 0m02s: at the stage's limit (2 s)" in capsys.readouterr().out


def test_a_passed_step_shows_the_lines_it_keeps(tmp_path):
    stages = [check.Stage(1, 'set-up', 30, [check.Step('set-up', _py(
        'print("[setup] installing"); print("[setup] built mmcv==2.1.0 in 4m02s"); print("noise")'),
        keep=r'^\[setup\] built ')])]
    assert check.Runner(stages, tmp_path, [], {}).run() == 0
    assert '```\n[setup] built mmcv==2.1.0 in 4m02s\n```' in (tmp_path / 'report.md').read_text()


def test_pytest_modules_that_all_skip_themselves_are_reported_as_skipped_not_failed(tmp_path):
    skipping = ('print("SKIPPED [2] tests/interpreter.py:27: this triton cannot interpret"); '
                'print("2 skipped in 0.20s"); raise SystemExit(5)')
    stages = [check.Stage(1, 'interpreter', 30, [check.Step('kernel tests', _py(skipping), kind='pytest')])]
    assert check.Runner(stages, tmp_path, [], {}).run() == 0
    report = (tmp_path / 'report.md').read_text()
    assert '| 1: interpreter | 30 s | 0m00s | ok |' in report and '| skipped: 2 skipped in 0.20s |' in report
    assert 'SKIPPED [2] tests/interpreter.py:27: this triton cannot interpret' in report


def test_a_failed_required_step_skips_the_rest_of_its_stage_only(tmp_path):
    stages = [check.Stage(1, 'set-up fails', 30, [
        check.Step('set-up', _py('print("no wheel"); raise SystemExit(3)'), required=True),
        check.Step('tests', _py('pass')),
    ], notes=['benchmark_e2e --device cuda (no GPU)'])]
    assert check.Runner(stages, tmp_path, [], {2: '--stages 1'}).run() == 1
    report = (tmp_path / 'report.md').read_text()
    assert '| failed: exit 3 |' in report and '| not run: set-up failed |' in report
    assert '```\nno wheel\n```' in report  # the failed step's output
    assert '- skipped: benchmark_e2e --device cuda (no GPU)' in report and '| 2 | | | not run: --stages 1 |' in report


RUNNER = '''
import importlib.util, sys
spec = importlib.util.spec_from_file_location('gpu_check_helper', sys.argv[1])
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)
out, pid_file = check.Path(sys.argv[2]), sys.argv[3]
slow = [sys.executable, '-c', sys.argv[4], pid_file]
stages = [check.Stage(1, 'quick', 30, [check.Step('table', [sys.executable, '-c', sys.argv[5]], stdout='t.md',
                                                  kind='table')]),
          check.Stage(2, 'slow', 60, [check.Step('slow', slow)])]
sys.exit(check.Runner(stages, out, [], {}).run())
'''


def _start_runner(tmp_path):
    pid_file = tmp_path / 'grandchild.pid'
    runner = subprocess.Popen([sys.executable, '-c', RUNNER, str(REPO / 'tools' / '_gpu_check.py'), str(tmp_path),
                               str(pid_file), SLOW, TABLE], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    end = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < end:
        time.sleep(0.1)
    return runner, pid_file


def test_the_report_is_whole_when_the_whole_check_is_killed_mid_step(tmp_path):
    """As when a device command hits its limit: the runner dies at once (SIGKILL), and what the
    report and the log hold is all that comes back."""
    runner, pid_file = _start_runner(tmp_path)
    runner.kill()
    runner.communicate(timeout=30)
    os.killpg(os.getpgid(int(pid_file.read_text())), signal.SIGKILL)  # the step's group outlives a SIGKILLed runner
    report = (tmp_path / 'report.md').read_text()
    assert '| 1: quick | 30 s |' in report and '| ok |' in report and '| SN | 1.0 |' in report
    assert '| 2: slow | 60 s | - | running |' in report and '| slow | `' in report and '| - | running |' in report
    assert 'slow step started' in (tmp_path / 'stage2.log').read_text()


def test_sigterm_stops_the_running_step_with_its_children_and_reports_it(tmp_path):
    runner, pid_file = _start_runner(tmp_path)
    runner.send_signal(signal.SIGTERM)
    out, _ = runner.communicate(timeout=30)
    assert runner.returncode == 130, out
    assert _wait_dead(int(pid_file.read_text()))
    report = (tmp_path / 'report.md').read_text()
    assert '| 2: slow | 60 s |' in report and 'interrupted (SIGTERM during slow)' in report
    assert '| SN | 1.0 |' in report


def test_carry_size_check_names_the_limit_and_the_largest_files(tmp_path):
    carry = tmp_path / 'carry'
    (carry / 'wheelhouse').mkdir(parents=True)
    (carry / 'wheelhouse' / 'small.whl').write_bytes(b'x' * 1024)
    fits = _tool('make_carry.sh', '--check', str(carry))
    assert fits.returncode == 0 and f'{carry}: 1 MiB (limit 60)' in fits.stdout, fits.stdout + fits.stderr
    with open(carry / 'wheelhouse' / 'torch-big.whl', 'wb') as big:
        big.truncate(61 * 1024 * 1024)  # sparse: 61 MiB of apparent size, no disk
    over = _tool('make_carry.sh', '--check', str(carry))
    assert over.returncode == 1
    assert f'{carry} is 62 MiB, over the 60 MiB that may be carried to the node' in over.stderr
    assert 'wheelhouse/torch-big.whl' in over.stdout and '61.0 MiB' in over.stdout
    assert 'list more of the node' in over.stderr
    missing = _tool('make_carry.sh', '--check', str(tmp_path / 'none'))
    assert missing.returncode == 1 and 'no folder' in missing.stderr


@pytest.mark.parametrize('args, needle', [
    (['--dir', str(REPO / 'work_dirs' / 'rehearsal')], 'is inside the repository'),
    (['--frobnicate'], 'unknown option --frobnicate'),
    (['--limit'], '--limit needs a value'),
])
def test_rehearsal_refuses_bad_arguments_before_downloading(args, needle):
    result = _tool('gpu_rehearsal.sh', *args)
    assert result.returncode == 1 and needle in result.stderr, result.stderr
    assert not (REPO / 'work_dirs' / 'rehearsal').exists()
