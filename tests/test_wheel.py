"""A built wheel carries the pretrained manifests: installed into a fresh folder, with neither the
source tree nor the editable install importable, it resolves every ``norm_plugins://`` name, and a
user's manifest folder ($NORM_PLUGINS_HOME/manifests) is still read; SyncSSN and SSNRadiusHook
register from the installed package."""
import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# What a wheel is built from: the files an sdist holds (MANIFEST.in) plus the package.
BUILD_INPUTS = ('setup.py', 'setup.cfg', 'pyproject.toml', 'README.md', 'MANIFEST.in', 'norm_plugins',
                'pretrained_manifests')

CHILD = """
import json, os, sys
# The environment's site-packages after the standard library, as site would place it (a backport
# there such as typing.py must not shadow the standard module).
sys.path.append(os.environ['SITE_PACKAGES'])
import norm_plugins
from norm_plugins.pretrained import get_entry, load_manifests
from norm_plugins.pretrained.manifest import manifest_dirs
names = sorted(load_manifests())
resolved = [get_entry('norm_plugins://' + name).name for name in names]
# The layers and hooks added since the manifests (SSN) come with the wheel and register.
from mmcv.cnn import build_norm_layer
from mmengine.registry import HOOKS
ssn = build_norm_layer(dict(type='SyncSSN', ratio_groups=2), 4)[1]
ssn.set_radius(0.9)
ssn(__import__('torch').randn(2, 4, 3, 3))
layers = dict(ssn=sys.modules[type(ssn).__module__].__file__, frozen=ssn.mean_fixed.tolist(),
              hook=sys.modules[HOOKS.get('SSNRadiusHook').__module__].__file__)
print(json.dumps(dict(package=norm_plugins.__file__, names=names, resolved=resolved,
                      dirs=[str(d) for d in manifest_dirs()], layers=layers)))
"""


def _shipped_names():
    names = []
    for path in sorted((REPO / 'pretrained_manifests').glob('*.yml')):
        names += [model['Name'] for model in yaml.safe_load(path.read_text())['Models']]
    return names


def _user_manifest(home: Path) -> str:
    """$NORM_PLUGINS_HOME/manifests/local.yml with one shipped entry under a new name, as
    tools/register_pretrained.py would write it."""
    entry = yaml.safe_load((REPO / 'pretrained_manifests' / 'switchable_norm.yml').read_text())['Models'][0]
    entry['Name'] = 'my_registered_backbone'
    (home / 'manifests').mkdir(parents=True)
    (home / 'manifests' / 'local.yml').write_text(yaml.safe_dump({'Models': [entry]}))
    return entry['Name']


@pytest.mark.slow
def test_installed_wheel_resolves_every_manifest_name(tmp_path):
    source = tmp_path / 'source'
    source.mkdir()
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns('__pycache__'))
        else:
            shutil.copy2(REPO / name, source / name)
    pip = [sys.executable, '-m', 'pip', '--disable-pip-version-check']
    subprocess.run(pip + ['wheel', '.', '--no-deps', '--no-build-isolation', '-q', '-w', str(tmp_path / 'dist')],
                   cwd=source, check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / 'dist').glob('norm_plugins-*.whl')
    target = tmp_path / 'target'
    subprocess.run(pip + ['install', '--no-deps', '-q', '--target', str(target), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    assert not (target / 'pretrained_manifests').exists()
    home = tmp_path / 'home'
    user_name = _user_manifest(home)
    run_dir = tmp_path / 'elsewhere'
    run_dir.mkdir()
    # -S: no site processing, so the editable install's path hook is not loaded; sys.path is the
    # installed wheel, the standard library, then the environment's site-packages for torch,
    # mmengine, mmdet, mmseg.
    env = {'PYTHONPATH': str(target), 'SITE_PACKAGES': sysconfig.get_paths()['purelib'],
           'NORM_PLUGINS_HOME': str(home), 'PATH': '/usr/bin:/bin', 'OMP_NUM_THREADS': '1'}
    result = subprocess.run([sys.executable, '-S', '-c', CHILD], cwd=run_dir, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(found['package']).is_relative_to(target)
    assert Path(found['layers']['ssn']).is_relative_to(target) and Path(found['layers']['hook']).is_relative_to(target)
    assert found['layers']['frozen'] == [0, 0]  # past the vertex: both groups one-hot (IN, the equal logits' first)
    assert found['dirs'][0] == str(target / 'norm_plugins' / 'pretrained' / 'manifests')
    expected = sorted(_shipped_names() + [user_name])
    assert len(_shipped_names()) >= 9
    assert found['names'] == found['resolved'] == expected
