"""The torch-only core: in child processes where mmengine, mmcv, mmdet and mmseg cannot be imported
(tests/without_openmmlab.py), ``import norm_plugins`` warns and keeps the layers, every module of
``norm_plugins.layers`` and ``norm_plugins.ops`` imports, the OpenMMLab names raise an ImportError
that says what to install, the core of the layer tests passes (the torch path and Triton's
interpreter) and tools/benchmark_norm.py runs."""
import configparser
import json
import math
import re
import subprocess
import sys

import norm_plugins
from tools_helpers import REPO, tool_env

HIDDEN = ('mmengine', 'mmcv', 'mmdet', 'mmseg')
BOOTSTRAP = str(REPO / 'tests' / 'without_openmmlab.py')
# A quick cross-section of the layer suite: the four row-wise passes on both CPU routes (not the slow
# sweep of compiled shapes, which the main suite runs) and WSConv in full, SN and BCN against their
# float64 references, and the Triton kernels in the interpreter on a couple of shapes.
CORE_TESTS = [
    'tests/test_rowwise.py::test_passes_match_float64_formulas',
    'tests/test_rowwise.py::test_large_offsets_keep_float32_precision',
    'tests/test_rowwise.py::test_a_pass_that_cannot_compile_takes_the_aten_route',
    'tests/test_weight_standardization.py',
    'tests/test_switchable_norm.py::test_forward_matches_reference_train_and_eval',
    'tests/test_switchable_norm.py::test_gradients_match_autograd_of_reference',
    'tests/test_switchable_norm.py::test_half_inputs_accumulate_in_float32',
    'tests/test_batch_channel_norm.py::test_large_batch_matches_reference_in_train_and_eval',
    'tests/test_batch_channel_norm.py::test_micro_batch_matches_reference_over_steps_with_gradients',
    'tests/test_sync_switchable_norm.py::test_without_process_group_it_is_sn',
    'tests/test_triton_rowwise.py::test_float32_shapes_and_layouts[ragged-nlc-ncl]',
    'tests/test_triton_rowwise.py::test_float32_shapes_and_layouts[volume-ncl-nlc]',
    'tests/test_triton_rowwise.py::test_switchable_norm_on_kernels[default-channels_last]',
    'tests/test_triton_rowwise.py::test_batch_channel_norm_on_kernels',
    'tests/test_bcn_triton.py',
]
# Run in the child: what `import norm_plugins` and the OpenMMLab names do there, as JSON.
PROBE = '''
import importlib, json, pkgutil, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    import norm_plugins
import norm_plugins.layers, norm_plugins.ops
modules = [info.name for package in (norm_plugins.layers, norm_plugins.ops)
           for info in pkgutil.walk_packages(package.__path__, package.__name__ + '.')]
for name in modules:
    importlib.import_module(name)
errors = {}
for name in sorted(norm_plugins._OPENMMLAB_ONLY):
    try:
        getattr(norm_plugins, name)
        errors[name] = None
    except ImportError as err:
        errors[name] = [err.name, str(err)]
try:
    from norm_plugins import NormAwareOptimWrapperConstructor
    from_import = None
except ImportError as err:
    from_import = str(err)
hidden = {}
for name in %r:
    try:
        importlib.import_module(name)
        hidden[name] = None
    except ModuleNotFoundError as err:
        hidden[name] = err.name
star = {}
exec('from norm_plugins import *', star)
print(json.dumps(dict(
    warnings=[[w.category is norm_plugins.OpenMMLabMissingWarning, str(w.message), w.filename] for w in caught
              if issubclass(w.category, norm_plugins.OpenMMLabMissingWarning)],
    user_warning=issubclass(norm_plugins.OpenMMLabMissingWarning, UserWarning),
    layers=all(getattr(norm_plugins, name) is getattr(norm_plugins.layers, name)
               for name in norm_plugins.layers.__all__),
    all=norm_plugins.__all__, star=sorted(k for k in star if k != '__builtins__'), modules=modules,
    errors=errors, from_import=from_import, hidden=hidden, unknown=hasattr(norm_plugins, 'no_such_name'))))
''' % (HIDDEN,)


def run_hidden(*args, timeout=120):
    """``python tests/without_openmmlab.py ARGS`` from the repository, with the interpreter kernels on
    for CPU tensors; fails the test with the child's output unless it exits 0."""
    env = dict(tool_env(cpu_fusion=True), TRITON_INTERPRET='1')
    result = subprocess.run([sys.executable, BOOTSTRAP, *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=timeout)
    what = 'the probe' if args[0] == '-c' else ' '.join(args[:3])
    assert result.returncode == 0, f'{what} failed ({result.returncode}):\n{result.stdout[-6000:]}\n' \
                                   f'{result.stderr[-6000:]}'
    return result


def test_import_warns_keeps_the_layers_and_names_what_is_missing():
    probe = json.loads(run_hidden('-c', PROBE).stdout.splitlines()[-1])
    assert probe['hidden'] == {name: name for name in HIDDEN}, 'the packages must be unimportable in the child'
    assert probe['user_warning'] and len(probe['warnings']) == 1, probe['warnings']
    exact_class, message, filename = probe['warnings'][0]
    assert exact_class and filename == '<string>', 'the warning points at the importing line'
    for needed in ('mmengine is not installed', 'SwitchableNorm', 'SyncSwitchableNorm', 'BatchChannelNorm',
                   'WSConv1d/2d/3d', 'plain PyTorch', 'mmcv, mmdet and mmsegmentation', 'tools/setup_env.sh',
                   'pip install mmengine==0.10.7'):
        assert needed in message, (needed, message)
    assert probe['layers'] and probe['modules']
    torch_only = ['BatchChannelNorm', 'OpenMMLabMissingWarning', 'SparseSwitchableNorm', 'SwitchableNorm',
                  'SyncSparseSwitchableNorm', 'SyncSwitchableNorm', 'WSConv1d', 'WSConv2d', 'WSConv3d',
                  '__version__']
    assert probe['all'] == probe['star'] == torch_only
    assert {'norm_plugins.ops.triton_kernels', 'norm_plugins.layers.switchable_norm'} <= set(probe['modules'])
    assert set(probe['errors']) >= {'PreciseStatsHook', 'NormAwareOptimWrapperConstructor', 'register', 'hooks'}
    for name, error in probe['errors'].items():
        assert error is not None, f'norm_plugins.{name} did not raise ImportError'
        missing, text = error
        assert missing == 'mmengine' and text.startswith(f'norm_plugins.{name} needs mmengine, which is not '
                                                         'installed'), text
        assert 'tools/setup_env.sh' in text and 'pip install mmengine==0.10.7 mmcv==2.1.0' in text, text
    assert probe['from_import'].startswith('norm_plugins.NormAwareOptimWrapperConstructor needs mmengine')
    assert probe['unknown'] is False, 'other missing names stay AttributeErrors'


def test_layer_suite_core_passes():
    out = run_hidden('-m', 'pytest', '-q', '-p', 'no:cacheprovider', *CORE_TESTS).stdout
    summary = out.strip().splitlines()[-1]
    assert re.search(r'\d+ passed', summary), summary
    assert not re.search(r'skipped|failed|error|deselected', summary), f'every selected test must run: {summary}'


def test_benchmark_runs_on_the_cpu():
    out = run_hidden('tools/benchmark_norm.py', '--layers', 'BN', 'SN', 'BCN-micro', 'WSConv3x3', '--shapes',
                     '2x32x3x5', '--dtypes', 'float32', '--warmup', '0', '--repeats', '1', '--backend', 'torch',
                     'triton').stdout
    rows = {tuple(cell.strip() for cell in line.split('|')[1:3]): line.split('|')[5:-1]
            for line in out.splitlines() if line.startswith('| ') and not line.startswith(('| layer', '| ---'))}
    assert set(rows) == {('BN', '-'), ('SN', 'torch'), ('SN', 'triton'), ('BCN-micro', 'torch'),
                         ('BCN-micro', 'triton'), ('WSConv3x3', 'torch'), ('WSConv3x3', 'triton')}, out
    for key, (ms, ratio_bn, *_, memory) in rows.items():
        assert float(ms) > 0 and math.isfinite(float(ratio_bn)) and float(memory) > 0, (key, out)


def test_openmmlab_names_are_bound_with_mmengine_and_the_install_hint_matches_setup_cfg():
    """Here mmengine is installed: every name the torch-only import refuses exists, so the ImportError
    can only ever mean that mmengine is missing; and the pins it names are the package's own."""
    for name in norm_plugins._OPENMMLAB_ONLY:
        assert hasattr(norm_plugins, name), name
    config = configparser.ConfigParser()
    config.read(REPO / 'setup.cfg')
    pins = [line.strip() for line in config['options']['install_requires'].splitlines()
            if line.strip().startswith(('mmengine', 'mmcv', 'mmdet', 'mmsegmentation'))]
    assert len(pins) == 4 and all(pin in norm_plugins._OPENMMLAB_INSTALL for pin in pins), pins
