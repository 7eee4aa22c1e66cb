"""Packaging is declared in setup.cfg. This file only ships the top-level ``pretrained_manifests/*.yml``
inside the package, as ``norm_plugins/pretrained/manifests/``, where an installed norm_plugins reads
them (:func:`norm_plugins.pretrained.manifest.bundled_manifest_dir`)."""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

MANIFESTS = Path(__file__).resolve().parent / 'pretrained_manifests'
TARGET = ('norm_plugins', 'pretrained', 'manifests')


class BuildPyWithManifests(build_py):
    """build_py plus a copy of the manifests into the built package."""

    def run(self):
        super().run()
        if self.editable_mode:  # an editable install reads pretrained_manifests/ in place
            return
        manifests = sorted(MANIFESTS.glob('*.yml'))
        if not manifests:
            raise FileNotFoundError(f'no manifests in {MANIFESTS}; build from a full checkout or sdist')
        target = Path(self.build_lib, *TARGET)
        self.mkpath(str(target))
        for path in manifests:
            self.copy_file(str(path), str(target / path.name))


setup(cmdclass={'build_py': BuildPyWithManifests})
