"""The set-up for GPU machines and offline installs (tools/setup_env.sh, tools/make_wheelhouse.sh and
their decisions in tools/_setup_env.py): the mmcv wheel-cache flavours, the build plan and its stop
without nvcc, adoption of the old flat cache, the wheelhouse contents, and, end to end, a venv over a
system torch installed offline from a wheelhouse."""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib.metadata import distribution, distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location('setup_env_helper', REPO / 'tools' / '_setup_env.py')
helper = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helper)

CPU_MACHINE = dict(python=(3, 11), torch_version='2.13.0+cpu', torch_cuda=None, nvcc_cuda='13.0',
                   capabilities=[], env={}, cpus=2)
GPU_NODE = dict(python=(3, 12), torch_version='2.11.0', torch_cuda='13.0', nvcc_cuda='13.0',
                capabilities=[(9, 0)], env={}, cpus=16)


def test_cpu_torch_builds_cpu_ops_even_with_nvcc():
    plan = helper.build_plan(**CPU_MACHINE)
    assert plan == helper.BuildPlan('cpu', 'cp311-torch2.13.0+cpu-ops-cpu',
                                    {'MMCV_WITH_OPS': '1', 'MAX_JOBS': '2', 'FORCE_CUDA': '0'})


def test_cuda_torch_with_nvcc_builds_cuda_ops_for_the_visible_gpus():
    plan = helper.build_plan(**GPU_NODE)
    assert plan.ops == 'cuda'
    assert plan.flavour == 'cp312-torch2.11.0-cuda13.0-ops-cuda-sm9.0'
    assert plan.env == {'MMCV_WITH_OPS': '1', 'MAX_JOBS': '16', 'FORCE_CUDA': '1', 'TORCH_CUDA_ARCH_LIST': '9.0'}
    mixed = helper.build_plan(**{**GPU_NODE, 'capabilities': [(9, 0), (8, 0), (9, 0)]})
    assert mixed.env['TORCH_CUDA_ARCH_LIST'] == '8.0;9.0'
    chosen = helper.build_plan(**{**GPU_NODE, 'env': {'TORCH_CUDA_ARCH_LIST': '8.0;9.0+PTX', 'MAX_JOBS': '4'}})
    assert chosen.env['TORCH_CUDA_ARCH_LIST'] == '8.0;9.0+PTX' and chosen.env['MAX_JOBS'] == '4'
    assert chosen.flavour.endswith('-ops-cuda-sm8.0_9.0+PTX')


def test_every_difference_in_python_torch_or_device_is_another_cache_folder():
    variants = [CPU_MACHINE, GPU_NODE,
                {**CPU_MACHINE, 'python': (3, 12)},
                {**CPU_MACHINE, 'torch_version': '2.12.0+cpu'},
                {**GPU_NODE, 'torch_version': '2.11.0', 'torch_cuda': '12.8', 'nvcc_cuda': '12.8'},
                {**GPU_NODE, 'capabilities': [(8, 0)]},
                {**GPU_NODE, 'env': {'NORM_PLUGINS_MMCV_OPS': 'cpu'}}]
    flavours = [helper.build_plan(**variant).flavour for variant in variants]
    assert len(set(flavours)) == len(flavours), flavours
    # A CUDA torch asked for CPU ops hides its GPUs from mmcv's setup.py, which builds CUDA ops on sight.
    cpu_ops = helper.build_plan(**{**GPU_NODE, 'nvcc_cuda': None, 'env': {'NORM_PLUGINS_MMCV_OPS': 'cpu'}})
    assert cpu_ops.flavour == 'cp312-torch2.11.0-cuda13.0-ops-cpu'
    assert cpu_ops.env['CUDA_VISIBLE_DEVICES'] == '' and cpu_ops.env['FORCE_CUDA'] == '0'


def test_cuda_torch_without_nvcc_stops_with_what_to_do():
    with pytest.raises(helper.SetupError) as stop:
        helper.build_plan(**{**GPU_NODE, 'nvcc_cuda': None})
    problem, fix = stop.value.problem, stop.value.fix
    assert 'CUDA 13.0 build' in problem and 'nvcc' in problem and 'RoIAlign' in problem
    assert 'cuda-toolkit-13-0' in fix and 'CUDA_HOME' in fix
    assert 'NORM_PLUGINS_MMCV_OPS=cpu' in fix and 'only on CPU tensors' in fix
    assert 'MMCV_WITH_OPS=0' in fix and 'mmcv._ext' in fix


@pytest.mark.parametrize('change, needle', [
    (dict(nvcc_cuda='12.4'), 'nvcc is CUDA 12.4 but torch was built with CUDA 13.0'),
    (dict(capabilities=[]), 'TORCH_CUDA_ARCH_LIST'),
    (dict(env={'NORM_PLUGINS_MMCV_OPS': 'gpu'}), 'use auto, cpu or cuda'),
])
def test_other_cuda_set_up_problems_stop_clearly(change, needle):
    with pytest.raises(helper.SetupError, match=needle.replace('.', r'\.')):
        helper.build_plan(**{**GPU_NODE, **change})
    with pytest.raises(helper.SetupError, match='is a CPU build'):
        helper.build_plan(**{**CPU_MACHINE, 'env': {'NORM_PLUGINS_MMCV_OPS': 'cuda'}})


def test_cuda_library_headers_come_from_torchs_nvidia_wheels_when_the_toolkit_lacks_them(tmp_path):
    """torch's CUDA headers include cusparse.h and friends: a minimal toolkit (nvcc and the runtime)
    gets them from the nvidia-* wheels beside torch on CPATH, and neither having them stops early."""
    toolkit, nvidia = tmp_path / 'cuda', tmp_path / 'site' / 'nvidia'
    (toolkit / 'include').mkdir(parents=True)
    with pytest.raises(helper.SetupError, match='wrapper script') as stop:
        helper.cuda_header_dirs(str(toolkit), [nvidia])
    assert 'CUDA_HOME=/usr/local/cuda' in stop.value.fix
    (toolkit / 'include' / 'cuda_runtime.h').write_text('')
    with pytest.raises(helper.SetupError, match='no cusparse.h') as stop:
        helper.cuda_header_dirs(str(toolkit), [nvidia])
    assert 'cuda-libraries-dev-13-0' in stop.value.fix
    for library in ('cu13', 'nccl'):
        (nvidia / library / 'include').mkdir(parents=True)
    (nvidia / 'cu13' / 'include' / 'cusparse.h').write_text('')
    assert helper.cuda_header_dirs(str(toolkit), [nvidia]) == [str(nvidia / 'cu13' / 'include'),
                                                                str(nvidia / 'nccl' / 'include')]
    (toolkit / 'include' / 'cusparse.h').write_text('')
    assert helper.cuda_header_dirs(str(toolkit), [nvidia]) == []


def _fake_wheel(path: Path, tag: str = 'cp311', links_cuda: bool = False) -> Path:
    wheel = path / f'mmcv-2.1.0-{tag}-{tag}-linux_x86_64.whl'
    with zipfile.ZipFile(wheel, 'w') as archive:
        archive.writestr('mmcv/__init__.py', '')
        archive.writestr(f'mmcv/_ext.{tag}-x86_64-linux-gnu.so',
                         b'\x7fELF libc10.so libtorch_cpu.so' + (b' libc10_cuda.so' if links_cuda else b''))
    return wheel


def test_old_flat_cache_wheel_is_adopted_only_by_the_flavour_it_was_built_for(tmp_path):
    cache = tmp_path / 'wheels'
    cache.mkdir()
    wheel = _fake_wheel(cache)
    fits = dict(python=(3, 11), torch_version='2.13.0+cpu', plan_ops='cpu')
    assert helper.legacy_wheel_fits(wheel, **fits)
    for other in (dict(python=(3, 12)), dict(torch_version='2.12.0+cpu'), dict(plan_ops='cuda')):
        assert not helper.legacy_wheel_fits(wheel, **{**fits, **other}), other
    cuda_dir = tmp_path / 'cuda'
    cuda_dir.mkdir()
    assert not helper.legacy_wheel_fits(_fake_wheel(cuda_dir, links_cuda=True), **fits)

    assert helper.adopt_legacy_wheel(cache, cache / 'other', (3, 12), '2.13.0+cpu', 'cpu') is None
    assert wheel.exists()
    flavour_dir = cache / 'cp311-torch2.13.0+cpu-ops-cpu'
    assert helper.adopt_legacy_wheel(cache, flavour_dir, (3, 11), '2.13.0+cpu', 'cpu') == flavour_dir / wheel.name
    assert not wheel.exists() and (flavour_dir / wheel.name).is_file()
    assert 'torch 2.13.0' in (flavour_dir / 'built-with.txt').read_text()


def test_wheelhouse_requirements_follow_setup_cfg_extras_and_leave_out_what_the_target_has():
    setup_cfg = (REPO / 'setup.cfg').read_text()
    runtime = 'addict\nmmengine>=0.3.0\nnumpy\nPillow\nregex;sys_platform==\'win32\'\nyapf\n'
    names = lambda reqs: {helper._requirement_name(r) for r in reqs}  # noqa: E731
    full = helper.wheelhouse_requirements(setup_cfg, ['dev'], runtime, None, {})
    assert {'mmengine', 'mmdet', 'mmsegmentation', 'onnxruntime', 'scikit-learn', 'pytest', 'triton',
            'setuptools', 'ninja', 'numpy', 'addict', 'pillow', 'opencv-python'} <= names(full)
    assert not names(full) & {'torch', 'mmcv'}
    present = helper.read_present('numpy==1.26.4\nopencv==4.10.0+cuda\nsetuptools==82.0\nscipy\n'
                                  'torch==2.11.0a0+nv @ file:///x\n')
    assert present == {'numpy': '1.26.4', 'opencv': '4.10.0+cuda', 'scipy': None}
    slim = helper.wheelhouse_requirements(setup_cfg, ['test'], runtime, 'torch==2.13.0+cpu', present)
    assert names(slim) & {'numpy', 'opencv-python', 'onnxruntime', 'scikit-learn', 'triton'} == set()
    assert {'setuptools', 'pytest', 'torch'} <= names(slim)
    assert helper.present_pins(present) == ['numpy==1.26.4']


def test_prune_present_treats_any_target_cv2_as_opencv_python(tmp_path):
    for name in ('numpy-2.0.0-cp312-cp312-manylinux_2_28_x86_64.whl', 'yapf-0.43.0-py3-none-any.whl',
                 'opencv_python-4.11.0.86-cp37-abi3-manylinux2014_x86_64.whl', 'mmcv-2.1.0.tar.gz'):
        (tmp_path / name).write_bytes(b'')
    assert helper.prune_present(tmp_path, {'numpy': None, 'opencv': '4.10.0'}) == ['numpy', 'opencv-python']
    assert sorted(p.name for p in tmp_path.iterdir()) == ['mmcv-2.1.0.tar.gz', 'yapf-0.43.0-py3-none-any.whl']


def _purelib(python: Path) -> Path:
    return Path(subprocess.run([str(python), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                               capture_output=True, text=True, check=True).stdout.strip())


def test_a_venv_over_a_system_python_that_is_itself_a_venv_sees_its_packages(tmp_path):
    """The GPU node's python3 is a venv (/opt/torch/.venv). A --system-site-packages venv made by it
    sees the base Python's site-packages, not that venv's torch, until link-system-site adds them
    (after the new venv's own, so what setup_env.sh installs there comes first)."""
    system = tmp_path / 'system'
    subprocess.run([sys._base_executable, '-m', 'venv', '--without-pip', str(system)], check=True)
    system_python, system_site = system / 'bin' / 'python', _purelib(system / 'bin' / 'python')
    (system_site / 'probe_system_torch.py').write_text('')
    venv = tmp_path / 'venv'
    subprocess.run([str(system_python), '-m', 'venv', '--without-pip', '--system-site-packages', str(venv)], check=True)
    probe = [str(venv / 'bin' / 'python'), '-c', 'import sys, probe_system_torch; print("\\n".join(sys.path))']
    assert subprocess.run(probe, capture_output=True).returncode != 0
    venv_site = _purelib(venv / 'bin' / 'python')
    helper_command = [str(REPO / 'tools' / '_setup_env.py'), 'link-system-site', str(venv_site)]
    linked = subprocess.run([str(system_python), *helper_command], capture_output=True, text=True, check=True)
    assert 'is itself a venv' in linked.stdout and str(system_site) in linked.stdout
    path = subprocess.run(probe, capture_output=True, text=True, check=True).stdout.splitlines()
    assert path.index(str(venv_site)) < path.index(str(system_site))
    # A plain interpreter's venv sees its site-packages by itself: nothing to link, a stale link goes.
    plain = subprocess.run([sys._base_executable, *helper_command], capture_output=True, text=True, check=True)
    assert plain.stdout == '' and not (venv_site / helper.SYSTEM_SITE_PTH).exists()


# End to end: a "system" interpreter that is not a venv and holds torch, as in a GPU container.

PURELIB = Path(sysconfig.get_paths()['purelib'])


def _fake_system_python(root: Path, distributions, without_metadata=()) -> Path:
    """A copy of the base interpreter with its own prefix, so `python -m venv --system-site-packages`
    off it sees its site-packages as the system's. That holds this interpreter's installed
    ``distributions`` (linked); those in ``without_metadata`` lose their dist-info, as a package
    built from source in a container."""
    version = f'python{sys.version_info[0]}.{sys.version_info[1]}'
    (root / 'bin').mkdir(parents=True)
    python = root / 'bin' / version
    shutil.copy2(Path(sys._base_executable).resolve(), python)
    lib = root / 'lib' / version
    lib.mkdir(parents=True)
    for entry in Path(sysconfig.get_paths()['stdlib']).iterdir():
        if entry.name != 'site-packages':
            (lib / entry.name).symlink_to(entry)
    site = lib / 'site-packages'
    site.mkdir()
    for name in distributions:
        for top in {Path(file).parts[0] for file in distribution(name).files or ()}:
            if name in without_metadata and top.endswith('.dist-info'):
                continue
            if top != '..' and not (site / top).exists() and (PURELIB / top).exists():
                (site / top).symlink_to(PURELIB / top)
    return python


def _requirement_closure(name: str) -> set:
    seen, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for text in distribution(current).requires or ():
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({'extra': ''}):
                todo.append(requirement.name)
    return seen


def _run(command, env_changes, timeout=900):
    """Run a tool; ``env_changes`` values of None remove the variable."""
    env = {**os.environ, **env_changes}
    env = {key: value for key, value in env.items() if value is not None}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout + result.stderr


def _cached_wheel_env() -> dict:
    """The wheel cache of this suite's own set-up, which must hold mmcv for this interpreter's torch
    (the end-to-end tests reuse it; building mmcv takes 10 minutes)."""
    flavour = helper.current_plan({'NORM_PLUGINS_MMCV_OPS': 'cpu'}).flavour
    cache = Path(os.environ.get('NORM_PLUGINS_WHEEL_CACHE')
                 or Path(os.environ.get('XDG_CACHE_HOME', Path.home() / '.cache')) / 'norm_plugins' / 'wheels')
    if not list((cache / flavour).glob('mmcv-2.1.0-*.whl')):
        pytest.fail(f'no mmcv wheel in {cache / flavour}: run tools/setup_env.sh (tools/run_tests.sh does) first')
    return {'NORM_PLUGINS_WHEEL_CACHE': str(cache), 'NORM_PLUGINS_MMCV_OPS': 'cpu'}


def _venv_facts(venv: Path) -> dict:
    probe = ('import json, sysconfig, torch, mmcv, importlib.metadata as m; '
             'print(json.dumps(dict(torch=torch.__file__, mmcv=mmcv.__file__, '
             'purelib=sysconfig.get_paths()["purelib"], dists=sorted(d.metadata["Name"].lower().replace("_", "-") '
             'for d in m.distributions(path=[sysconfig.get_paths()["purelib"]])))))')
    import json
    return json.loads(subprocess.run([str(venv / 'bin' / 'python'), '-c', probe], capture_output=True,
                                     text=True, check=True).stdout)


@pytest.mark.slow
def test_offline_install_over_a_system_torch_from_a_wheelhouse(tmp_path):
    """A GPU container: torch, numpy, SciPy, matplotlib, Pillow and an OpenCV without pip metadata
    are there; everything else comes from a wheelhouse for this Python, installed with no index."""
    system = set()
    for name in ('torch', 'numpy', 'scipy', 'matplotlib', 'pillow', 'opencv-python'):
        system |= _requirement_closure(name)
    present = tmp_path / 'present.txt'
    present.write_text(''.join(f'{name}=={distribution(name).version}\n' for name in sorted(system)))
    version = f'{sys.version_info[0]}.{sys.version_info[1]}'
    wheelhouse = tmp_path / 'wheelhouse'
    out = _run(['bash', 'tools/make_wheelhouse.sh', '--python', version, '--out', str(wheelhouse),
                '--present', str(present)], {'PYTHON': sys.executable})
    files = sorted(p.name for p in wheelhouse.iterdir())
    assert 'mmcv-2.1.0.tar.gz' in files and any(f.startswith('mmdet-3.3.0-') for f in files)
    assert not [f for f in files if f.lower().startswith(('torch-', 'triton-', 'numpy-', 'scipy-', 'opencv'))]
    assert f'python={version}\nextras=test\ntorch=system\n' in (wheelhouse / 'wheelhouse.txt').read_text()
    assert 'MiB' in out

    python = _fake_system_python(tmp_path / 'system', sorted(system), without_metadata=('opencv-python',))
    venv = tmp_path / 'venv'
    offline = {'PYTHON': str(python), 'NORM_PLUGINS_VENV': str(venv), 'PIP_CONFIG_FILE': os.devnull,
               'PIP_FIND_LINKS': None, 'PIP_INDEX_URL': 'http://127.0.0.1:9/unreachable', **_cached_wheel_env()}
    out = _run(['bash', 'tools/setup_env.sh', '--system-torch', '--wheelhouse', str(wheelhouse)], offline)
    assert 'using the system torch (torch==' in out and 'recorded the system cv2 as opencv-python==' in out
    assert 'reusing cached mmcv wheel' in out and 'building mmcv' not in out
    assert 'mmcv.ops.roi_align runs on cpu' in out
    facts = _venv_facts(venv)
    assert Path(facts['torch']).resolve() == (PURELIB / 'torch' / '__init__.py').resolve()
    assert not {'torch', 'numpy', 'scipy'} & set(facts['dists'])
    assert {'mmcv', 'mmdet', 'mmsegmentation', 'mmengine', 'pytest', 'norm-plugins'} <= set(facts['dists'])
    assert (venv / 'norm_plugins-system-torch.txt').read_text().startswith(f'torch=={distribution("torch").version}')


FAKE_MMCV_SETUP = '''
import pathlib, sys, time
from setuptools import setup
if 'bdist_wheel' in sys.argv:
    # Stands for the compiler: two sources, one object, then a failure.
    ops = pathlib.Path('mmcv/ops/csrc/pytorch')
    (ops / 'cpu').mkdir(parents=True)
    (ops / 'nms.cpp').write_text('')
    (ops / 'cpu' / 'nms_cpu.cpp').write_text('')
    pathlib.Path('build/temp').mkdir(parents=True)
    pathlib.Path('build/temp/nms.o').write_text('')
    time.sleep(5)
    sys.exit('mmcv/ops/csrc/pytorch/cpu/nms_cpu.cpp:1:1: error: fake compiler error')
setup(name='mmcv', version='2.1.0', py_modules=[])
'''


def _fake_mmcv_sdist(tmp_path: Path, wheelhouse: Path):
    """Puts the stand-in mmcv 2.1.0 sdist (FAKE_MMCV_SETUP) into ``wheelhouse``."""
    source = tmp_path / 'mmcv-2.1.0'
    source.mkdir()
    (source / 'setup.py').write_text(FAKE_MMCV_SETUP)
    subprocess.run(['tar', '-czf', str(wheelhouse / 'mmcv-2.1.0.tar.gz'), '-C', str(tmp_path), 'mmcv-2.1.0'],
                   check=True)


@pytest.mark.slow
def test_mmcv_build_reports_progress_and_the_log_when_it_fails(tmp_path):
    """The build (here a stand-in sdist that compiles one of two files and fails) prints heartbeat
    lines with the compiled-file count, and on failure the end of its log and the log's path."""
    wheelhouse = tmp_path / 'wheelhouse'
    wheelhouse.mkdir()
    _fake_mmcv_sdist(tmp_path, wheelhouse)
    (wheelhouse / 'wheelhouse.txt').write_text(f'python={sys.version_info[0]}.{sys.version_info[1]}\nextras=test\n')
    # The new venv brings an older setuptools of its own; everything else is already in the "system",
    # so the offline install gets as far as the build.
    subprocess.run([sys.executable, '-m', 'pip', 'download', '-q', '--no-deps', '-d', str(wheelhouse),
                    f'setuptools=={distribution("setuptools").version}'], check=True, timeout=300)
    python = _fake_system_python(tmp_path / 'system', [d.metadata['Name'] for d in distributions()
                                                       if d.files and Path(d.locate_file('')) == PURELIB])
    cache = tmp_path / 'cache'
    env = {'PYTHON': str(python), 'NORM_PLUGINS_VENV': str(tmp_path / 'venv'), 'NORM_PLUGINS_WHEEL_CACHE': str(cache),
           'NORM_PLUGINS_HEARTBEAT': '2', 'NORM_PLUGINS_MMCV_OPS': 'cpu', 'PIP_CONFIG_FILE': os.devnull,
           'PIP_FIND_LINKS': None}
    result = subprocess.run(['bash', 'tools/setup_env.sh', '--system-torch', '--wheelhouse', str(wheelhouse)],
                            cwd=REPO, env={k: v for k, v in {**os.environ, **env}.items() if v is not None},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(r'\[setup\] building mmcv: 0m0\ds, 1/2 files compiled', result.stdout), result.stdout
    (log,) = cache.glob('*-ops-cpu/build.log')
    assert f'the whole log: {log}' in result.stderr and 'error: fake compiler error' in log.read_text()
    assert re.search(r'\[setup\] +mmcv/ops/csrc/pytorch/cpu/nms_cpu.cpp:1:1: error: fake compiler error\n',
                     result.stderr)


@pytest.mark.slow
def test_a_cached_wheel_that_does_not_load_here_is_built_again(tmp_path):
    """A wheel carried from another machine whose compiled ops do not load against this one's
    libraries (here: a stand-in whose _ext is no shared object) is set aside, and mmcv is built on
    this machine (here the stand-in sdist, whose build fails at once)."""
    system = set()
    for name in ('torch', 'numpy', 'scipy', 'matplotlib', 'pillow', 'opencv-python'):
        system |= _requirement_closure(name)
    present = tmp_path / 'present.txt'
    present.write_text(''.join(f'{name}=={distribution(name).version}\n' for name in sorted(system)))
    version = f'{sys.version_info[0]}.{sys.version_info[1]}'
    wheelhouse = tmp_path / 'wheelhouse'
    _run(['bash', 'tools/make_wheelhouse.sh', '--python', version, '--out', str(wheelhouse), '--present', str(present)],
         {'PYTHON': sys.executable})
    (wheelhouse / 'mmcv-2.1.0.tar.gz').unlink()
    _fake_mmcv_sdist(tmp_path, wheelhouse)
    cache = tmp_path / 'cache'
    flavour = cache / helper.current_plan({'NORM_PLUGINS_MMCV_OPS': 'cpu'}).flavour
    flavour.mkdir(parents=True)
    tag = helper.python_tag(sys.version_info)
    carried = flavour / f'mmcv-2.1.0-{tag}-{tag}-linux_x86_64.whl'
    info = 'mmcv-2.1.0.dist-info'
    with zipfile.ZipFile(carried, 'w') as wheel:
        wheel.writestr('mmcv/__init__.py', "__version__ = '2.1.0'\n")
        wheel.writestr(f'mmcv/_ext{sysconfig.get_config_var("EXT_SUFFIX")}', b'not a shared object')
        wheel.writestr(f'{info}/METADATA', 'Metadata-Version: 2.1\nName: mmcv\nVersion: 2.1.0\n')
        wheel.writestr(f'{info}/WHEEL', f'Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: {tag}-{tag}-linux_x86_64\n')
        wheel.writestr(f'{info}/RECORD', '')
    python = _fake_system_python(tmp_path / 'system', sorted(system), without_metadata=('opencv-python',))
    env = {'PYTHON': str(python), 'NORM_PLUGINS_VENV': str(tmp_path / 'venv'), 'NORM_PLUGINS_WHEEL_CACHE': str(cache),
           'NORM_PLUGINS_MMCV_OPS': 'cpu', 'PIP_CONFIG_FILE': os.devnull, 'PIP_FIND_LINKS': None}
    result = subprocess.run(['bash', 'tools/setup_env.sh', '--system-torch', '--wheelhouse', str(wheelhouse)],
                            cwd=REPO, env={k: v for k, v in {**os.environ, **env}.items() if v is not None},
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f'reusing cached mmcv wheel {carried}' in result.stdout
    assert re.search(rf'the cached {re.escape(carried.name)} does not load here \(ImportError: .*\); '
                     'building mmcv on this machine', result.stdout), result.stdout
    assert '[setup] building mmcv==2.1.0 with cpu ops' in result.stdout and 'fake compiler error' in result.stderr
    assert not carried.exists() and carried.with_name(carried.name + '.unloadable').is_file()
