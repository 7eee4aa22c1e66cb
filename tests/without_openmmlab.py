"""Run Python as if mmengine, mmcv, mmdet and mmseg were not installed (tests/test_torch_only.py).

    python tests/without_openmmlab.py -m pytest tests/test_rowwise.py
    python tests/without_openmmlab.py -c "import norm_plugins"
    python tests/without_openmmlab.py tools/benchmark_norm.py --shapes 2x32x3x5

A finder at the front of ``sys.meta_path`` answers every import of those packages with the error an
absent package gives, before any other finder can locate the installed copy; then the module, code
or script runs as ``python -m``, ``python -c`` or ``python SCRIPT`` would run it. Only this process is
affected: processes it starts (``torch.multiprocessing.spawn``, ``subprocess``) can import them again.
"""
import os
import runpy
import sys

HIDDEN = ('mmengine', 'mmcv', 'mmdet', 'mmseg')


class HideOpenMMLab:
    """A meta-path finder under which the ``HIDDEN`` packages cannot be imported."""

    def find_spec(self, name, path=None, target=None):
        if name.partition('.')[0] in HIDDEN:
            raise ModuleNotFoundError(f'No module named {name!r}', name=name)
        return None


def main(argv):
    already = sorted(name for name in sys.modules if name.partition('.')[0] in HIDDEN)
    if already:  # e.g. imported by a .pth file at start-up: hiding them now would prove nothing
        sys.exit(f'without_openmmlab: {", ".join(already)} imported before the finder was installed')
    if len(argv) < 1 or (argv[0] in ('-m', '-c') and len(argv) < 2):
        sys.exit(__doc__)
    sys.meta_path.insert(0, HideOpenMMLab())
    if argv[0] == '-m':
        sys.path[0] = os.getcwd()
        sys.argv = [argv[1]] + argv[2:]
        runpy.run_module(argv[1], run_name='__main__', alter_sys=True)
    elif argv[0] == '-c':
        sys.path[0] = ''
        sys.argv = ['-c'] + argv[2:]
        exec(compile(argv[1], '<string>', 'exec'), {'__name__': '__main__'})
    else:
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
        sys.argv = argv
        runpy.run_path(argv[0], run_name='__main__')


if __name__ == '__main__':
    main(sys.argv[1:])
