"""The decisions behind tools/setup_env.sh and tools/make_wheelhouse.sh, kept in Python so that tests
can drive them with chosen inputs:

- the build plan of mmcv 2.1.0 for the installed torch: CPU ops, CUDA ops (``FORCE_CUDA=1``, the arch
  list of the visible GPUs, ``MAX_JOBS`` from the cores, the CUDA libraries' headers of torch's
  nvidia-* wheels where the toolkit lacks them), or a stop that says what to install;
- the wheel-cache flavour: one folder per (Python, torch build, ops and CUDA archs), so a wheel built
  for one torch or device is never installed against another;
- adoption of a wheel from the flat cache that earlier versions of setup_env.sh wrote;
- the check after installing that ``mmcv.ops`` runs on the device it was built for;
- the requirement list of an offline wheelhouse;
- a system interpreter that is itself a venv, whose packages a ``--system-site-packages`` venv
  would not see by itself.

Run as ``python tools/_setup_env.py COMMAND ...``; only ``plan``, ``check-ops`` and ``torch-pins``
import torch.
"""
import argparse
import configparser
import os
import re
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

MMCV_VERSION = '2.1.0'
# mmcv's setup.py imports torch (for the extension) and pkg_resources (gone in setuptools 81).
BUILD_PINS = ('setuptools>=77,<81', 'wheel', 'ninja', 'psutil', 'numpy')
# The only torch earlier versions of setup_env.sh ever built mmcv against (and only with CPU ops).
LEGACY_TORCH = '2.13.0'


class SetupError(Exception):
    """A stop with what went wrong and how to fix it."""

    def __init__(self, problem: str, fix: str):
        super().__init__(f'{problem}\nfix: {fix}')
        self.problem = problem
        self.fix = fix


class BuildPlan(NamedTuple):
    ops: str  # 'cpu' or 'cuda': where mmcv's compiled ops will run
    flavour: str  # the wheel-cache folder name
    env: Dict[str, str]  # environment of the mmcv build


def python_tag(version: Sequence[int]) -> str:
    return f'cp{version[0]}{version[1]}'


def public_version(version: str) -> str:
    """'2.13.0+cpu' -> '2.13.0'."""
    return version.split('+', 1)[0]


def cuda_arch_list(requested: Optional[str], capabilities: Iterable[Tuple[int, int]]) -> str:
    """TORCH_CUDA_ARCH_LIST: the user's if set, else the compute capabilities of the visible GPUs
    (only those: torch's default list compiles every architecture and takes hours)."""
    if requested and requested.strip():
        return requested.strip()
    archs = sorted({(major, minor) for major, minor in capabilities})
    if not archs:
        raise SetupError('torch is a CUDA build but no GPU is visible, so the GPUs to compile mmcv for are unknown',
                         'set TORCH_CUDA_ARCH_LIST to the compute capabilities of the GPUs you will run on, '
                         'e.g. TORCH_CUDA_ARCH_LIST=9.0 (H100) or "8.0;9.0" (A100 and H100)')
    return ';'.join(f'{major}.{minor}' for major, minor in archs)


def nvcc_missing(torch_cuda: str) -> SetupError:
    major = torch_cuda.split('.')[0]
    return SetupError(
        f'torch is a CUDA {torch_cuda} build, but nvcc (the CUDA compiler) is not found, so mmcv cannot '
        'build its CUDA ops (RoIAlign, NMS, deformable convolution: Mask R-CNN and Faster R-CNN need '
        'them on the GPU)',
        f'install the CUDA {major}.x toolkit (e.g. apt-get install cuda-toolkit-{torch_cuda.replace(".", "-")}, '
        f'or conda install -c nvidia cuda-nvcc={torch_cuda}) and put nvcc on PATH or set CUDA_HOME; '
        'or set NORM_PLUGINS_MMCV_OPS=cpu to build CPU ops only: the norm layers and segmentation '
        'models then run on the GPU, but detection models (RoIAlign, NMS) only on CPU tensors. '
        'MMCV_WITH_OPS=0 is no way out: without mmcv._ext, mmdet and mmseg cannot import their models')


def build_plan(*, python: Sequence[int], torch_version: str, torch_cuda: Optional[str],
               nvcc_cuda: Optional[str], capabilities: Iterable[Tuple[int, int]],
               env: Mapping[str, str], cpus: int) -> BuildPlan:
    """How to build mmcv for this torch. ``nvcc_cuda`` is the CUDA version of the nvcc torch would
    use (None: no nvcc); ``env`` supplies NORM_PLUGINS_MMCV_OPS (auto/cpu/cuda),
    TORCH_CUDA_ARCH_LIST and MAX_JOBS."""
    ops = env.get('NORM_PLUGINS_MMCV_OPS', 'auto') or 'auto'
    if ops not in ('auto', 'cpu', 'cuda'):
        raise SetupError(f'NORM_PLUGINS_MMCV_OPS={ops} is not a choice', 'use auto, cpu or cuda')
    if ops == 'cuda' and torch_cuda is None:
        raise SetupError(f'NORM_PLUGINS_MMCV_OPS=cuda, but torch {torch_version} is a CPU build',
                         'install a CUDA build of torch (or use --system-torch where one is installed)')
    build_env = {'MMCV_WITH_OPS': '1', 'MAX_JOBS': env.get('MAX_JOBS') or str(max(1, cpus))}
    flavour = f'{python_tag(python)}-torch{torch_version}' + (f'-cuda{torch_cuda}' if torch_cuda else '')
    if torch_cuda is None or ops == 'cpu':
        build_env['FORCE_CUDA'] = '0'
        if torch_cuda is not None:
            build_env['CUDA_VISIBLE_DEVICES'] = ''  # mmcv builds CUDA ops whenever it sees a GPU
        return BuildPlan('cpu', f'{flavour}-ops-cpu', build_env)
    if nvcc_cuda is None:
        raise nvcc_missing(torch_cuda)
    if nvcc_cuda.split('.')[0] != torch_cuda.split('.')[0]:
        raise SetupError(f'nvcc is CUDA {nvcc_cuda} but torch was built with CUDA {torch_cuda}',
                         f'put a CUDA {torch_cuda.split(".")[0]}.x nvcc first on PATH or set CUDA_HOME to it')
    archs = cuda_arch_list(env.get('TORCH_CUDA_ARCH_LIST'), capabilities)
    build_env.update(FORCE_CUDA='1', TORCH_CUDA_ARCH_LIST=archs)
    return BuildPlan('cuda', f'{flavour}-ops-cuda-sm{re.sub(r"[^0-9A-Za-z.+]+", "_", archs)}', build_env)


def cuda_header_dirs(cuda_home: Optional[str], nvidia_roots: Iterable[Path]) -> List[str]:
    """Folders to put on CPATH for the mmcv build. torch's CUDA headers include the CUDA libraries'
    headers (ATen/cuda/CUDAContextLight.h: cusparse.h, cublas_v2.h, cusolverDn.h). A full toolkit
    has them; a minimal one (nvcc and the runtime only) does not, but a CUDA torch from PyPI brings
    them in its nvidia-* wheels (nvidia/cu13/include, or nvidia/<library>/include for CUDA 12).
    Stops before the build, which would otherwise fail minutes in."""
    if not cuda_home or not Path(cuda_home, 'include', 'cuda_runtime.h').is_file():
        raise SetupError(f'the CUDA toolkit torch found ({cuda_home}) has no include/cuda_runtime.h; the nvcc on '
                         'PATH may be a wrapper script outside the toolkit',
                         'set CUDA_HOME to the toolkit, the folder that holds bin/nvcc and include/ '
                         '(e.g. CUDA_HOME=/usr/local/cuda)')
    if Path(cuda_home, 'include', 'cusparse.h').is_file():
        return []
    wheels = sorted(str(include.parent) for root in nvidia_roots for include in Path(root).glob('*/include/cusparse.h'))
    if not wheels:
        raise SetupError(f'the CUDA toolkit at {cuda_home} has no cusparse.h, and no nvidia-* wheel beside torch '
                         'has it either; torch\'s CUDA headers include it',
                         'install the CUDA libraries\' headers (e.g. apt-get install cuda-libraries-dev-13-0), '
                         'or set CUDA_HOME to a full toolkit')
    return sorted(str(include) for root in nvidia_roots for include in Path(root).glob('*/include')
                  if include.is_dir())


def _nvcc_cuda() -> Optional[str]:
    """CUDA version of the nvcc that torch's extension builder will use, or None."""
    import subprocess
    from torch.utils.cpp_extension import CUDA_HOME
    nvcc = Path(CUDA_HOME or '/nonexistent', 'bin', 'nvcc')
    if not nvcc.is_file():
        return None
    out = subprocess.run([str(nvcc), '--version'], capture_output=True, text=True).stdout
    found = re.search(r'release (\d+\.\d+)', out)
    return found.group(1) if found else None


def current_plan(env: Mapping[str, str]) -> BuildPlan:
    import importlib.util
    import torch
    cuda = torch.version.cuda
    capabilities = []
    if cuda and env.get('NORM_PLUGINS_MMCV_OPS') != 'cpu' and torch.cuda.is_available():
        capabilities = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    plan = build_plan(python=sys.version_info, torch_version=torch.__version__, torch_cuda=cuda,
                      nvcc_cuda=_nvcc_cuda() if cuda and env.get('NORM_PLUGINS_MMCV_OPS') != 'cpu' else None,
                      capabilities=capabilities, env=env, cpus=len(os.sched_getaffinity(0)))
    if plan.ops == 'cuda':
        from torch.utils.cpp_extension import CUDA_HOME
        nvidia = importlib.util.find_spec('nvidia')
        headers = cuda_header_dirs(CUDA_HOME, nvidia.submodule_search_locations if nvidia else ())
        if headers:
            plan.env['CPATH'] = os.pathsep.join(headers + ([env['CPATH']] if env.get('CPATH') else []))
    return plan


def torch_build() -> str:
    import torch
    return f'torch {torch.__version__} ({f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU"} build)'


def _wheel_links_cuda(wheel: Path) -> bool:
    """Whether the wheel's compiled ops were built with CUDA (they then link torch's CUDA runtime)."""
    with zipfile.ZipFile(wheel) as archive:
        return any(b'c10_cuda' in archive.read(name) or b'libcudart' in archive.read(name)
                   for name in archive.namelist() if name.startswith('mmcv/_ext') and name.endswith('.so'))


def legacy_wheel_fits(wheel: Path, python: Sequence[int], torch_version: str, plan_ops: str) -> bool:
    """Whether a wheel of the old flat cache fits this flavour. The old script always installed
    torch 2.13.0 before building, so such a wheel fits a torch 2.13.0 with CPU ops, for its own
    Python tag, when its ``_ext`` links no CUDA."""
    tag = python_tag(python)
    return (wheel.name == f'mmcv-{MMCV_VERSION}-{tag}-{tag}-linux_x86_64.whl' and plan_ops == 'cpu'
            and public_version(torch_version) == LEGACY_TORCH and not _wheel_links_cuda(wheel))


def adopt_legacy_wheel(cache: Path, flavour_dir: Path, python: Sequence[int], torch_version: str,
                       plan_ops: str) -> Optional[Path]:
    """Move a fitting wheel from the flat cache into this flavour's folder (so it is not built again)."""
    for wheel in sorted(cache.glob(f'mmcv-{MMCV_VERSION}-*.whl')):
        if legacy_wheel_fits(wheel, python, torch_version, plan_ops):
            flavour_dir.mkdir(parents=True, exist_ok=True)
            target = flavour_dir / wheel.name
            shutil.move(str(wheel), str(target))
            (flavour_dir / 'built-with.txt').write_text(
                f'adopted from the flat cache of an earlier setup_env.sh: torch {LEGACY_TORCH}, CPU ops\n')
            return target
    return None


def check_ops(ops: str) -> str:
    """roi_align of a linear ramp on the CPU, and on the GPU when the ops are CUDA ops and a GPU is
    visible: bilinear sampling reproduces a linear function exactly, so the 1x1 average over box
    (0, 0, 3, 3) is the ramp at the box centre, 1.5 * 4 + 1.5."""
    import torch
    from mmcv.ops import roi_align
    devices = ['cpu'] + (['cuda'] if ops == 'cuda' and torch.cuda.is_available() else [])
    for device in devices:
        ramp = torch.arange(16, dtype=torch.float32, device=device).reshape(1, 1, 4, 4)
        rois = torch.tensor([[0.0, 0.0, 0.0, 3.0, 3.0]], device=device)
        value = float(roi_align(ramp, rois, (1, 1), 1.0, 2, 'avg', False).item())
        if abs(value - 7.5) > 1e-5:
            raise SetupError(f'mmcv.ops.roi_align on {device} gave {value}, expected 7.5',
                             'delete the cached mmcv wheel folder and rerun to rebuild it')
    unchecked = ' (CUDA ops built, but no GPU is visible to run them)' if ops == 'cuda' and len(devices) == 1 else ''
    return f'mmcv.ops.roi_align runs on {" and ".join(devices)}{unchecked}'


SYSTEM_SITE_PTH = 'norm_plugins-system-site.pth'


def link_system_site(venv_site: Path) -> List[str]:
    """Let a venv made with ``--system-site-packages`` by this interpreter see its packages, also
    when this interpreter is itself a venv (a GPU image's ``python3`` often is: /opt/torch/.venv).
    ``venv`` bases a new environment on ``sys._base_executable``, so "system" then means the base
    Python's site-packages, without this venv's torch. A ``.pth`` file in the new venv adds this
    interpreter's site-packages after the new venv's own. Returns the folders linked (none for a
    plain system interpreter, whose site-packages the new venv sees already)."""
    import site
    linked = []
    if sys.prefix != sys.base_prefix:
        linked = list(dict.fromkeys(path for path in site.getsitepackages() if Path(path).is_dir()))
    target = venv_site / SYSTEM_SITE_PTH
    if linked:
        target.write_text(''.join(f'{path}\n' for path in linked))
    elif target.exists():
        target.unlink()
    return linked


def _requirement_name(requirement: str) -> str:
    return re.split(r'[\s\[<>=!~;@]', requirement.strip(), maxsplit=1)[0].lower().replace('_', '-')


def package_requirements(setup_cfg: str, extras: Iterable[str]) -> List[str]:
    """install_requires of setup.cfg plus the named extras (following ``norm_plugins[...]`` inside
    extras), comments dropped."""
    config = configparser.ConfigParser()
    config.read_string(setup_cfg)
    name = _requirement_name(config['metadata']['name'])
    extras_table = config['options.extras_require'] if config.has_section('options.extras_require') else {}

    def lines(text: str) -> List[str]:
        return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith('#')]

    result, seen, todo = lines(config['options']['install_requires']), set(), list(extras)
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        if extra not in extras_table:
            raise SetupError(f'setup.cfg has no extra named {extra!r}', f'choose from {", ".join(extras_table)}')
        seen.add(extra)
        for requirement in lines(extras_table[extra]):
            if _requirement_name(requirement) == name:
                todo += re.search(r'\[(.*)\]', requirement).group(1).split(',')
            else:
                result.append(requirement)
    return result


# Needed in the venv whatever the target has: its setuptools may be too new for mmcv's setup.py.
NEVER_PRESENT = ('setuptools',)


def read_present(text: str) -> Dict[str, Optional[str]]:
    """Packages the target already has: ``pip list --format=freeze`` lines or bare names."""
    present = {}
    for line in text.splitlines():
        line = line.split('#', 1)[0].strip()
        if not line or ' @ ' in line:
            continue
        name, _, version = line.partition('==')
        if _requirement_name(name) not in NEVER_PRESENT:
            present[_requirement_name(name)] = version.strip() or None
    return present


def present_pins(present: Mapping[str, Optional[str]]) -> List[str]:
    """Constraints for the target's packages that have plain release versions (a local or
    pre-release version of a container's own build is on no index)."""
    return [f'{name}=={version}' for name, version in present.items()
            if version and re.fullmatch(r'\d+(\.\d+)*', version)]


def _has_cv2(present: Iterable[str]) -> bool:
    return any(name.startswith('opencv') or name == 'cv2' for name in present)


def prune_present(folder: Path, present: Mapping[str, Optional[str]]) -> List[str]:
    """Delete the wheels of packages the target has; returns their names. A target cv2 of any
    distribution stands for opencv-python (see :func:`record_system_cv2`)."""
    pruned, have = [], set(present) | ({'opencv-python'} if _has_cv2(present) else set())
    for wheel in sorted(folder.glob('*.whl')):
        name = _requirement_name(wheel.name.split('-', 1)[0])
        if name in have:
            wheel.unlink()
            pruned.append(name)
    return pruned


def wheelhouse_requirements(setup_cfg: str, extras: Iterable[str], mmcv_runtime: str, with_torch: Optional[str],
                            present: Mapping[str, Optional[str]]) -> List[str]:
    """What a wheelhouse must hold besides the mmcv sdist: the package's requirements (torch only
    as ``with_torch``), mmcv's runtime requirements and its build tools, less what the target has."""
    wanted = []
    for requirement in (*package_requirements(setup_cfg, extras), *BUILD_PINS,
                        *(line.strip() for line in mmcv_runtime.splitlines())):
        name = _requirement_name(requirement) if requirement else ''
        if name and name not in ('mmcv', 'torch') and name not in present and requirement not in wanted:
            wanted.append(requirement)
    # mmcv's setup.py requires opencv-python when no cv2 is installed where it builds.
    if not _has_cv2(present):
        wanted.append('opencv-python>=3')
    if with_torch:
        wanted.append(with_torch)
    return wanted


def record_system_cv2(site: Path) -> Optional[str]:
    """mmengine requires the distribution ``opencv-python``. A container's cv2, built from source or
    installed under another name, is invisible to pip, which would then put a second OpenCV (60 MiB,
    not in a small wheelhouse) over it. Record the importable cv2 as ``opencv-python`` in the venv
    (metadata only: uninstalling it removes nothing). Returns the recorded version, or None when
    pip already knows an opencv-python or no cv2 imports."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        version('opencv-python')
        return None
    except PackageNotFoundError:
        pass
    try:
        import cv2
    except ImportError:
        return None
    release = re.match(r'\d+(\.\d+)*', cv2.__version__).group(0)
    info = site / f'opencv_python-{release}.dist-info'
    info.mkdir(parents=True, exist_ok=True)
    (info / 'METADATA').write_text(f'Metadata-Version: 2.1\nName: opencv-python\nVersion: {release}\n'
                                   f'Summary: the system cv2 {cv2.__version__} at {cv2.__file__}\n')
    (info / 'INSTALLER').write_text('norm_plugins tools/setup_env.sh\n')
    (info / 'RECORD').write_text('')
    return release


def _main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    commands = parser.add_subparsers(dest='command', required=True)
    commands.add_parser('plan', help='print FLAVOUR, OPS, BUILD_ENV and TORCH_BUILD as shell assignments')
    adopt = commands.add_parser('adopt-legacy', help='move a fitting flat-cache wheel into the flavour folder')
    adopt.add_argument('cache', type=Path)
    adopt.add_argument('flavour_dir', type=Path)
    adopt.add_argument('ops')
    commands.add_parser('check-ops', help='run mmcv.ops.roi_align where the ops can run').add_argument('ops')
    commands.add_parser('record-system-cv2', help='record a system cv2 as opencv-python').add_argument(
        'site', type=Path)
    commands.add_parser('link-system-site', help="let a --system-site-packages venv see this venv's "
                        'packages').add_argument('venv_site', type=Path)
    commands.add_parser('build-pins', help='print the build tools of mmcv, one per line')
    commands.add_parser('torch-pins', help='print pins of the installed torch (and triton), for pip -c')
    wheelhouse = commands.add_parser('wheelhouse-requirements', help='print what a wheelhouse holds, one per line')
    wheelhouse.add_argument('setup_cfg', type=Path)
    wheelhouse.add_argument('mmcv_runtime', type=Path)
    wheelhouse.add_argument('--extras', default='')
    wheelhouse.add_argument('--with-torch')
    wheelhouse.add_argument('--present', type=Path)
    for command, text in (('present-pins', 'print constraints pinning the target\'s release versions'),
                          ('prune-present', 'delete the wheels of packages the target has')):
        sub = commands.add_parser(command, help=text)
        if command == 'prune-present':
            sub.add_argument('folder', type=Path)
        sub.add_argument('present', type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == 'plan':
            import shlex
            plan = current_plan(os.environ)
            print(f'FLAVOUR={shlex.quote(plan.flavour)}\nOPS={plan.ops}\nTORCH_BUILD={shlex.quote(torch_build())}')
            print('BUILD_ENV=(' + ' '.join(shlex.quote(f'{k}={v}') for k, v in plan.env.items()) + ')')
        elif args.command == 'adopt-legacy':
            import torch
            adopted = adopt_legacy_wheel(args.cache, args.flavour_dir, sys.version_info, torch.__version__, args.ops)
            if adopted:
                print(adopted.name)
        elif args.command == 'check-ops':
            print(check_ops(args.ops))
        elif args.command == 'record-system-cv2':
            recorded = record_system_cv2(args.site)
            if recorded:
                print(f'recorded the system cv2 as opencv-python=={recorded}')
        elif args.command == 'link-system-site':
            linked = link_system_site(args.venv_site)
            if linked:
                print(f'{sys.executable} is itself a venv: its packages ({", ".join(linked)}) are linked in')
        elif args.command == 'build-pins':
            print('\n'.join(BUILD_PINS))
        elif args.command == 'torch-pins':
            from importlib.metadata import PackageNotFoundError, version
            for name in ('torch', 'triton', 'pytorch-triton'):
                try:
                    print(f'{name}=={version(name)}')
                except PackageNotFoundError:
                    pass
        elif args.command == 'wheelhouse-requirements':
            present = read_present(args.present.read_text()) if args.present else {}
            extras = [extra for extra in args.extras.split(',') if extra]
            print('\n'.join(wheelhouse_requirements(args.setup_cfg.read_text(), extras,
                                                    args.mmcv_runtime.read_text(), args.with_torch, present)))
        elif args.command == 'present-pins':
            print('\n'.join(present_pins(read_present(args.present.read_text()))))
        elif args.command == 'prune-present':
            print(' '.join(prune_present(args.folder, read_present(args.present.read_text()))))
    except SetupError as error:
        print(f'ERROR: {error.problem}\nfix: {error.fix}', file=sys.stderr)
        return 3
    return 0


if __name__ == '__main__':
    sys.exit(_main(sys.argv[1:]))
