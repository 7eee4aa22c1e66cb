"""The stages of tools/gpu_check.sh, each under its own time limit, and the report they write.

A GPU is lent in short leases, and a command there is killed at its limit. So the check runs in
stages, most valuable first, and rewrites ``report.md`` whenever a step starts or ends: whatever
stops the run, the report holds everything measured until then, and the running stage's log
(``stage<N>.log``) its output so far. A step still running at its stage's limit is killed with its
whole process group; the stage is then reported as killed and the next stage still runs.

- stage 1, nothing installed: the machine's own Python with ``PYTHONPATH=<repository>`` runs the
  layer-level GPU tests (tests/test_cuda.py) and tools/benchmark_norm.py on cuda. Without a GPU it
  runs the kernel tests in Triton's interpreter and a tiny benchmark_norm on the CPU instead.
- stage 2: tools/setup_env.sh --system-torch (mmcv's CUDA build, from a wheelhouse with no network),
  ``pytest -m cuda`` over the other test modules in that venv, tools/benchmark_e2e.py on cuda.

Only the standard library: this runs under the GPU machine's Python before anything is installed.
"""
import argparse
import datetime
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LIMITS = {1: 300, 2: 540}  # seconds; stage 1 alone and stage 2 alone each fit a 10-minute call
KILL_GRACE = 10  # seconds between SIGTERM and SIGKILL for a step killed at its stage's limit
REPORT_LINES = 30  # at most this many failure or output lines of one step in the report
PYTEST_NOTHING_COLLECTED = 5  # pytest's exit code when every test module skipped itself


@dataclass
class Step:
    name: str
    argv: List[str]
    env: Dict[str, str] = field(default_factory=dict)  # on top of this process's environment
    stdout: Optional[str] = None  # a file under --out for stdout (a benchmark's table); else the log
    kind: str = 'tail'  # how the report shows it: 'pytest' (summary and failures), 'table', 'tail'
    keep: str = ''  # a pattern: the report shows the output lines that match it (when the step passed)
    required: bool = False  # the stage's later steps need it
    note: str = ''  # one line for the log and the report, e.g. what a missing GPU leaves out


@dataclass
class Stage:
    number: int
    title: str
    limit: float
    steps: List[Step]
    notes: List[str] = field(default_factory=list)  # what the stage leaves out here, one line each


@dataclass
class Result:
    status: str  # running, ok, skipped, failed, killed, interrupted, not run
    seconds: float = 0.0
    detail: List[str] = field(default_factory=list)
    summary: str = ''


class Interrupted(Exception):
    """SIGTERM or SIGINT reached the runner: kill the running step and report."""


def _raise_interrupted(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def elapsed(seconds: float) -> str:
    seconds = int(round(seconds))
    return f'{seconds // 60}m{seconds % 60:02d}s'


def shown(argv: Sequence[str]) -> str:
    """A step's command as the report shows it: paths inside the repository relative to it."""
    return ' '.join(str(arg).replace(f'{ROOT}/', '') for arg in argv)


def pytest_summary(text: str):
    """(final count line, FAILED/ERROR/SKIPPED lines) of ``pytest -q -rfEs`` output."""
    counts = [line.strip('= ') for line in text.splitlines()
              if re.search(r'\b(passed|failed|errors?|skipped|deselected|no tests ran)\b.* in [\d.]+s', line)]
    reasons = [line for line in text.splitlines() if line.startswith(('FAILED ', 'ERROR ', 'SKIPPED '))]
    return (counts[-1] if counts else ''), reasons


def table_lines(text: str) -> List[str]:
    """A benchmark's Markdown table and its comment lines (as quotes), without other logging."""
    lines = []
    for line in text.splitlines():
        if line.startswith('|'):
            lines.append(line)
        elif line.startswith('# '):
            lines += [f'> {line[2:]}', '']
    return lines


class Runner:
    def __init__(self, stages: Sequence[Stage], out: Path, header: Sequence[str], skipped_stages: Dict[int, str]):
        self.stages, self.out, self.header = list(stages), out, list(header)
        self.skipped_stages = skipped_stages  # number -> why it does not run (e.g. --stages 1)
        self.results: Dict[int, Dict[str, Result]] = {stage.number: {} for stage in self.stages}
        self.stage_results: Dict[int, Result] = {}
        self.started = time.monotonic()

    def log_path(self, stage: Stage) -> Path:
        return self.out / f'stage{stage.number}.log'

    def say(self, text: str, log=None):
        print(f'[gpu_check] {text}', flush=True)
        if log is not None:
            log.write(f'[gpu_check] {text}\n')
            log.flush()

    def run(self) -> int:
        for stage in self.stages:
            for name in [f'stage{stage.number}.log'] + [step.stdout for step in stage.steps if step.stdout]:
                (self.out / name).unlink(missing_ok=True)
        self.write_report()
        previous = {sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGTERM, signal.SIGINT)}
        interrupted = False
        try:
            for stage in self.stages:
                self.run_stage(stage)
        except Interrupted:
            interrupted = True
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self.write_report()
        failed = [str(n) for n, result in self.stage_results.items() if result.status != 'ok']
        self.say(f'report: {self.out / "report.md"}; total {elapsed(time.monotonic() - self.started)}'
                 + (f'; stage {", ".join(failed)} did not pass' if failed else ''))
        return 130 if interrupted else 1 if failed else 0

    def run_stage(self, stage: Stage):
        start = time.monotonic()
        deadline = start + stage.limit
        outcome = Result('running')
        self.stage_results[stage.number] = outcome
        with open(self.log_path(stage), 'w') as log:
            self.say(f'stage {stage.number} ({stage.title}), limit {int(stage.limit)} s, '
                     f'log {self.log_path(stage)}', log)
            for note in stage.notes:
                self.say(f'  skipped: {note}', log)
            blocked = ''
            for step in stage.steps:
                results = self.results[stage.number]
                if blocked:
                    results[step.name] = Result('not run', summary=blocked)
                    continue
                if deadline - time.monotonic() <= 0:
                    results[step.name] = Result('not run', summary="the stage's limit was reached")
                    continue
                try:
                    result = self.run_step(stage, step, deadline, log)
                except Interrupted as signal_name:
                    outcome.status, outcome.seconds = 'interrupted', time.monotonic() - start
                    outcome.summary = f'{signal_name} during {step.name}'
                    raise
                if result.status == 'killed':
                    blocked = f'{step.name} was killed at the stage\'s limit'
                elif result.status == 'failed' and step.required:
                    blocked = f'{step.name} failed'
            statuses = {result.status for result in self.results[stage.number].values()}
            outcome.seconds = time.monotonic() - start
            outcome.status = ('killed' if 'killed' in statuses else
                              'failed' if statuses - {'ok', 'skipped'} else 'ok')
            self.say(f'stage {stage.number} {outcome.status} in {elapsed(outcome.seconds)}', log)
        self.write_report()

    def run_step(self, stage: Stage, step: Step, deadline: float, log) -> Result:
        results = self.results[stage.number]
        result = results[step.name] = Result('running')
        self.say(f'  {step.name}: {shown(step.argv)}', log)
        if step.note:
            self.say(f'  {step.note}', log)
        self.write_report()
        offset = log.tell()
        start = time.monotonic()
        stdout = open(self.out / step.stdout, 'w') if step.stdout else log
        try:
            # Its own process group, so that a kill at the limit reaches everything the step started.
            process = subprocess.Popen(step.argv, cwd=ROOT, env={**os.environ, **step.env}, stdout=stdout,
                                       stderr=log, stdin=subprocess.DEVNULL, preexec_fn=os.setpgrp)
        except OSError as error:
            result.status, result.summary = 'failed', f'could not start: {error}'
        else:
            try:
                returncode = process.wait(timeout=max(0.0, deadline - time.monotonic()))
                result.status = 'ok' if returncode == 0 else 'failed'
                result.summary = '' if returncode == 0 else f'exit {returncode}'
                if step.kind == 'pytest' and returncode == PYTEST_NOTHING_COLLECTED:
                    result.status, result.summary = 'skipped', ''  # whole modules skipped, with pytest's reasons
            except subprocess.TimeoutExpired:
                self.kill(process)
                result.status, result.summary = 'killed', f"at the stage's limit ({int(stage.limit)} s)"
            except Interrupted:
                self.kill(process)
                result.status, result.summary = 'interrupted', 'the check itself was stopped'
                result.seconds = time.monotonic() - start
                raise
            finally:
                if stdout is not log:
                    stdout.close()
                log.flush()
                result.seconds = time.monotonic() - start
        self.describe(stage, step, result, offset)
        self.say(f'  {step.name} {result.status} in {elapsed(result.seconds)}'
                 + (f': {result.summary}' if result.summary else ''), log)
        self.write_report()
        return result

    @staticmethod
    def kill(process: subprocess.Popen):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                return
            try:
                process.wait(timeout=KILL_GRACE)
                return
            except subprocess.TimeoutExpired:
                continue

    def describe(self, stage: Stage, step: Step, result: Result, offset: int):
        """The step's part of the report, from its output."""
        with open(self.log_path(stage)) as log:
            log.seek(offset)
            output = log.read()
        if step.kind == 'pytest':
            counts, reasons = pytest_summary(output)
            if counts:
                result.summary = f'{result.summary}: {counts}' if result.summary else counts
            result.detail = reasons[:REPORT_LINES] + (
                [f'... and {len(reasons) - REPORT_LINES} more in the log'] if len(reasons) > REPORT_LINES else [])
        elif step.kind == 'table' and result.status == 'ok':
            result.detail = table_lines((self.out / step.stdout).read_text())
        elif step.keep and result.status == 'ok':
            result.detail = [line for line in output.splitlines() if re.search(step.keep, line)]
        if result.status != 'ok' and not result.detail:
            result.detail = output.splitlines()[-REPORT_LINES:]

    def write_report(self):
        lines = ['# norm_plugins GPU check', '', *self.header, '',
                 f'{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M:%S} UTC, '
                 f'{elapsed(time.monotonic() - self.started)} so far', '',
                 '| stage | limit | time | result |', '| --- | --- | --- | --- |']
        for stage in self.stages:
            outcome = self.stage_results.get(stage.number)
            status = outcome.status if outcome else 'waiting'
            lines.append(f'| {stage.number}: {stage.title} | {int(stage.limit)} s | '
                         f'{elapsed(outcome.seconds) if outcome and outcome.status != "running" else "-"} | '
                         f'{status}{f" ({outcome.summary})" if outcome and outcome.summary else ""} |')
        for number, why in sorted(self.skipped_stages.items()):
            lines.append(f'| {number} | | | not run: {why} |')
        for stage in self.stages:
            if stage.number not in self.stage_results:
                continue
            lines += ['', f'## Stage {stage.number}: {stage.title}', '',
                      f'Log: {self.log_path(stage).name}.', '']
            lines += [f'- skipped: {note}' for note in stage.notes]
            lines += ['', '| step | command | time | result |', '| --- | --- | --- | --- |']
            results = self.results[stage.number]
            for step in stage.steps:
                result = results.get(step.name)
                time_shown = elapsed(result.seconds) if result and result.status != 'running' else '-'
                status = (f'{result.status}{f": {result.summary}" if result.summary else ""}'
                          if result else 'waiting')
                command = shown(step.argv).replace('|', '\\|')
                lines.append(f'| {step.name} | `{command}` | {time_shown} | {status} |')
            for step in stage.steps:
                result = results.get(step.name)
                if result and result.detail:
                    lines += ['', f'### {step.name}', '']
                    if step.note:
                        lines += [step.note, '']
                    if step.kind == 'table' and result.status == 'ok':
                        lines += result.detail
                    else:
                        lines += ['```', *result.detail, '```']
        path = self.out / 'report.md'
        partial = path.with_suffix('.md.part')
        partial.write_text('\n'.join(lines) + '\n')
        partial.replace(path)  # a reader (or a kill) never sees a half-written report


PROBE = """
import json, os, platform, sys
facts = dict(python=platform.python_version(), executable=sys.executable, cores=len(os.sched_getaffinity(0)))
import torch
facts.update(torch=torch.__version__, cuda=torch.version.cuda, gpu=None)
if torch.cuda.is_available():
    major, minor = torch.cuda.get_device_capability()
    facts['gpu'] = f'{torch.cuda.get_device_name()} (sm_{major}{minor})'
for name in ('triton', 'numpy'):
    try:
        facts[name] = __import__(name).__version__
    except ImportError:
        facts[name] = None
print(json.dumps(facts))
"""


def probe_machine() -> dict:
    found = subprocess.run([sys.executable, '-c', PROBE], capture_output=True, text=True)
    if found.returncode != 0:
        raise SystemExit(f'[gpu_check] ERROR: {sys.executable} cannot import torch:\n'
                         f'{found.stderr.strip()[-1500:]}\n'
                         '[gpu_check] fix: run with PYTHON set to the interpreter that holds the machine\'s torch')
    return json.loads(found.stdout)


def header(facts: dict) -> List[str]:
    try:
        commit = subprocess.run(['git', '-C', str(ROOT), 'describe', '--always', '--dirty'],
                                capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ''
    build = f'CUDA {facts["cuda"]}' if facts['cuda'] else 'CPU build'
    return [f'- machine: {platform.node()}, {facts["cores"]} cores, GPU: {facts["gpu"] or "none visible to torch"}',
            f'- Python {facts["python"]} ({facts["executable"]}), torch {facts["torch"]} ({build}), '
            f'triton {facts["triton"] or "missing"}, numpy {facts["numpy"] or "missing"}',
            f'- norm_plugins at {commit or "an unknown commit (no git here)"}']


def build_stages(facts: dict, limits: Dict[int, float], wheelhouse: Optional[Path], venv: Path) -> List[Stage]:
    python, gpu = sys.executable, facts['gpu'] is not None
    pytest = ['-m', 'pytest', '-q', '-rfEs', '-p', 'no:cacheprovider']
    plain = {'PYTHONPATH': os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')]))}
    no_gpu = 'no GPU is visible to torch here'
    collected = f'{no_gpu}: the module is collected (so it imports), its cuda tests are skipped'
    layer_tests = Step('layer tests', [python, *pytest, '-m', 'cuda', 'tests/test_cuda.py'], plain, kind='pytest',
                       note='' if gpu else collected)
    if gpu:
        first = Stage(1, 'layer-level GPU tests and benchmark_norm, nothing installed', limits[1], [
            layer_tests,
            Step('benchmark_norm', [python, 'tools/benchmark_norm.py', '--device', 'cuda', '--backend', 'triton',
                                    'torch', '--repeats', '10'], plain, stdout='benchmark_norm.md', kind='table'),
        ])
    else:
        interpreted = {**plain, 'TRITON_INTERPRET': '1'}
        first = Stage(1, 'layer tests collected, kernels in Triton\'s interpreter and compiled for sm_90, '
                         'a tiny benchmark_norm, nothing installed', limits[1], [
            layer_tests,
            Step('kernel tests', [python, *pytest, *sorted(str(p.relative_to(ROOT))
                                                          for p in ROOT.glob('tests/test_*triton*.py'))],
                 interpreted, kind='pytest'),
            Step('kernels for sm_90', [python, 'tools/triton_kernels_report.py'], plain, stdout='kernels.md',
                 kind='table'),
            Step('benchmark_norm', [python, 'tools/benchmark_norm.py', '--device', 'cpu', '--shapes', '2x32x8x8',
                                    '--warmup', '0', '--repeats', '1', '--backend', 'torch'],
                 plain, stdout='benchmark_norm.md', kind='table'),
        ], notes=[f'the GPU tests of tests/test_cuda.py and benchmark_norm --device cuda ({no_gpu}; the kernel '
                  'tests run in Triton\'s interpreter and the kernels are compiled for sm_90 instead)'])
    venv_python = str(venv / 'bin' / 'python')
    setup = ['bash', 'tools/setup_env.sh', '--system-torch'] + (['--wheelhouse', str(wheelhouse)] if wheelhouse else [])
    second = Stage(2, 'set-up (mmcv CUDA build), the other GPU tests, benchmark_e2e', limits[2], [
        Step('set-up', setup, {'PYTHON': python, 'NORM_PLUGINS_VENV': str(venv)}, required=True,
             keep=r'^\[setup\] (installed:|built |reusing|ready:|mmcv\.ops)'),
        Step('toolbox tests', [venv_python, *pytest, '-m', 'cuda', '--ignore=tests/test_cuda.py', 'tests'],
             kind='pytest', note='' if gpu else collected.replace('the module is', 'every module is')),
    ])
    if gpu:
        second.steps.append(Step('benchmark_e2e', [venv_python, 'tools/benchmark_e2e.py', '--device', 'cuda',
                                                   '--warmup', '2', '--iters', '5'],
                                 stdout='benchmark_e2e.md', kind='table'))
    else:
        second.notes.append(f'benchmark_e2e --device cuda ({no_gpu})')
    return [first, second]


def parse_stages(text: str) -> List[int]:
    try:
        numbers = sorted({int(part) for part in text.split(',')})
    except ValueError:
        numbers = []
    if not numbers or not set(numbers) <= set(DEFAULT_LIMITS):
        raise argparse.ArgumentTypeError(f'{text!r}: give stage numbers from {", ".join(map(str, DEFAULT_LIMITS))}, '
                                         'comma-separated (e.g. --stages 1)')
    return numbers


def parse_limit(text: str):
    found = re.fullmatch(r'(\d+)=(\d+)', text)
    if not found or int(found.group(1)) not in DEFAULT_LIMITS or int(found.group(2)) == 0:
        raise argparse.ArgumentTypeError(f'{text!r}: write STAGE=SECONDS, e.g. --limit 2=900')
    return int(found.group(1)), int(found.group(2))


def parse_wheelhouse(text: str) -> Path:
    path = Path(text).resolve()
    if not (path / 'wheelhouse.txt').is_file():
        raise argparse.ArgumentTypeError(f'{text}: no wheelhouse.txt there; make the folder with '
                                         'tools/make_wheelhouse.sh (or tools/make_carry.sh)')
    return path


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog='tools/gpu_check.sh', formatter_class=argparse.RawDescriptionHelpFormatter,
        description='\n\n'.join(__doc__.split('\n\n')[1:3]),
        epilog='PYTHON (default python3) is the machine\'s own interpreter, the one with its torch. '
               'NORM_PLUGINS_VENV is stage 2\'s venv (default .venv-gpu).')
    parser.add_argument('--stages', type=parse_stages, default=sorted(DEFAULT_LIMITS),
                        help='stages to run, comma-separated (default: all)')
    parser.add_argument('--wheelhouse', type=parse_wheelhouse,
                        help='stage 2 installs with no network, from this folder (tools/make_carry.sh)')
    parser.add_argument('--out', type=Path, default=ROOT / 'work_dirs' / 'gpu_check',
                        help='report.md and the stage logs (default work_dirs/gpu_check)')
    parser.add_argument('--limit', type=parse_limit, action='append', default=[], metavar='STAGE=SECONDS',
                        help='time limit of a stage (defaults: ' +
                             ', '.join(f'{n}={s}' for n, s in DEFAULT_LIMITS.items()) + ')')
    args = parser.parse_args(argv)
    limits = {**DEFAULT_LIMITS, **dict(args.limit)}
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    venv = Path(os.environ.get('NORM_PLUGINS_VENV') or ROOT / '.venv-gpu').resolve()
    facts = probe_machine()
    stages = build_stages(facts, limits, args.wheelhouse, venv)
    chosen = [stage for stage in stages if stage.number in args.stages]
    skipped = {stage.number: f'--stages {",".join(map(str, args.stages))}' for stage in stages
               if stage.number not in args.stages}
    return Runner(chosen, out, header(facts), skipped).run()


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
