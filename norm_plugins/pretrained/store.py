"""The cache of converted checkpoints and the ``norm_plugins://NAME`` checkpoint scheme.

A config writes ``init_cfg=dict(type='Pretrained', checkpoint='norm_plugins://resnet50_sn_8x2')``.
The loader resolves the manifest entry, finds its converted file in ``$NORM_PLUGINS_HOME/checkpoints``,
checks its sha256 and loads it with ``torch.load(weights_only=True)``. It never touches the network:
a missing file fails at once with the URLs to download from and the conversion command.

Converted files are named ``{name}-{first 8 hex digits of their sha256}.pth`` (OpenMMLab convention).
"""
import hashlib
import pickle
import re
import shlex
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from mmengine.runner import CheckpointLoader

from .errors import ChecksumMismatchError, ConversionError, PretrainedFileMissingError
from .manifest import SCHEME, PretrainedEntry, checkpoint_dir, get_entry

_CHUNK = 1 << 20
_CONVERT_TOOL = Path(__file__).resolve().parents[2] / 'tools' / 'convert_pretrained.py'


# How messages name each digest algorithm.
DIGEST_NAMES = {'sha256': 'sha256', 'md5': 'MD5'}


def file_digest(path: Union[str, Path], algorithm: str = 'sha256') -> str:
    """Hex digest of a file (``algorithm`` a hashlib name: ``'sha256'`` or ``'md5'``), read in 1 MiB chunks."""
    digest = hashlib.new(algorithm)
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(_CHUNK), b''):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Union[str, Path]) -> str:
    """sha256 of a file."""
    return file_digest(path, 'sha256')


def converted_file_name(name: str, sha256: str) -> str:
    return f'{name}-{sha256[:8]}.pth'


def verify_digest(path: Path, algorithm: str, expected: str, what: str,
                  advice: str = 'delete it and convert the source again') -> str:
    """Check ``path`` against an expected digest of ``algorithm`` ('sha256': the full hash or a published
    prefix; 'md5': the full hash); returns the file's actual digest."""
    actual = file_digest(path, algorithm)
    matches = actual.startswith(expected.lower()) if algorithm == 'sha256' else actual == expected.lower()
    if not matches:
        raise ChecksumMismatchError(
            f'{what}: {DIGEST_NAMES[algorithm]} mismatch for {path}: expected {expected}, got {actual}. The '
            f'file is corrupt, truncated or a different checkpoint; {advice}.')
    return actual


def verify_sha256(path: Path, expected: str, what: str) -> str:
    """Check ``path`` against a full sha256 or a published prefix of one; returns the actual hash."""
    return verify_digest(path, 'sha256', expected, what)


def verify_source(entry: PretrainedEntry, path: Path) -> str:
    """Check the authors' file against every digest the entry records (``Source.SHA256``, ``Source.MD5``);
    returns a sentence saying which were verified, for the conversion report.

    Raises:
        ChecksumMismatchError: naming the algorithm, the expected and the actual digest.
    """
    digests = entry.source_digests()
    what = f'source checkpoint of {entry.name}'
    for algorithm, expected in digests.items():
        verify_digest(path, algorithm, expected, what,
                      advice="download it again from the entry's Source.URLs (python tools/convert_pretrained.py "
                             '--list shows them)')
    if not digests:
        return f'source not verified: the authors published no digest of {entry.name}\'s file'
    checked = []
    for algorithm, expected in digests.items():
        kind = 'prefix ' if algorithm == 'sha256' and len(expected) < 64 else ''
        checked.append(f'{DIGEST_NAMES[algorithm]} {kind}{expected}')
    only_md5 = ' (no sha256 is published; MD5 detects a corrupt or different file, not a forged one)' \
        if 'sha256' not in digests else ''
    return f'source verified against the published {" and ".join(checked)}{only_md5}'


def conversion_command(entry: PretrainedEntry, source: str = '/path/to/downloaded/file') -> str:
    tool = _CONVERT_TOOL if _CONVERT_TOOL.is_file() else Path('tools/convert_pretrained.py')
    return f'python {shlex.quote(str(tool))} {entry.name} {shlex.quote(source)}'


def _missing_message(entry: PretrainedEntry, expected: str) -> str:
    urls = '\n'.join(f'  - {url}' for url in entry.source_urls) or '  (no URL recorded)'
    published = [f'sha256 {sha}' if len(sha) == 64 else f'sha256 starting with {sha}'
                 for sha in [entry.source_sha256] if sha]
    published += [f'MD5 {md5}' for md5 in [entry.source_md5] if md5]
    published = f' ({", ".join(published)})' if published else ''
    return (f'{SCHEME}{entry.name}: converted checkpoint not found: expected {expected} '
            '(norm_plugins never downloads).\n'
            f'Download the source checkpoint{published} from:\n{urls}\n'
            f'then convert it into the cache with:\n  {conversion_command(entry)}\n'
            f'The cache folder is $NORM_PLUGINS_HOME/checkpoints, here {checkpoint_dir()}; '
            'set NORM_PLUGINS_HOME to use another one.')


def locate_converted(entry: PretrainedEntry) -> Path:
    """Path of the entry's converted checkpoint in the cache; raises if absent or ambiguous.

    With a recorded ``Converted.File`` that exact file is expected; otherwise the one file named
    ``{name}-XXXXXXXX.pth``.
    """
    folder = checkpoint_dir()
    if entry.converted_file:
        path = folder / entry.converted_file
        if not path.is_file():
            raise PretrainedFileMissingError(_missing_message(entry, str(path)))
        return path
    pattern = re.compile(re.escape(entry.name) + r'-[0-9a-f]{8}\.pth')
    found = sorted(p for p in folder.glob(f'{entry.name}-*.pth') if pattern.fullmatch(p.name))
    if not found:
        raise PretrainedFileMissingError(_missing_message(entry, str(folder / f'{entry.name}-<sha256[:8]>.pth')))
    if len(found) > 1:
        raise PretrainedFileMissingError(
            f'{SCHEME}{entry.name}: several converted files match and the manifest records no '
            f'Converted.SHA256 to choose: {[str(p) for p in found]}. Delete the stale ones or record '
            'the hash of the right one in the manifest.')
    return found[0]


def verified_checkpoint_path(name: str) -> Path:
    """Locate the converted file of ``name`` and check it against the recorded sha256.

    Without a recorded hash the 8-digit suffix of the file name must still match the file.
    """
    entry = get_entry(name)
    path = locate_converted(entry)
    what = f'{SCHEME}{entry.name}'
    if entry.converted_sha256:
        verify_sha256(path, entry.converted_sha256, what)
    else:
        verify_sha256(path, path.stem.rsplit('-', 1)[1], what + ' (hash in the file name; none in the manifest)')
    return path


def load_state_dict_file(path: Path, map_location=None) -> Dict[str, torch.Tensor]:
    """Load a plain state dict of tensors, refusing any other pickled object."""
    try:
        state_dict = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ConversionError(
            f'{path} is not a plain state dict of tensors ({err}); converted checkpoints hold '
            'tensors only. Re-create it with tools/convert_pretrained.py.') from err
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ConversionError(f'{path} is not a plain state dict of tensors; re-create it with '
                                    'tools/convert_pretrained.py')
    return state_dict


def load_pretrained(name: str, map_location=None) -> Dict[str, torch.Tensor]:
    """The verified converted state dict of manifest entry ``name``."""
    return load_state_dict_file(verified_checkpoint_path(name), map_location)


def load_from_norm_plugins(filename: str, map_location: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """mmengine ``CheckpointLoader`` backend for ``norm_plugins://NAME``."""
    return load_pretrained(filename, map_location)


def register_scheme() -> None:
    """Register ``norm_plugins://`` with mmengine's CheckpointLoader (idempotent)."""
    existing = CheckpointLoader._schemes.get(SCHEME)
    if existing is not None and existing.__qualname__ != load_from_norm_plugins.__qualname__:
        raise KeyError(f'{SCHEME} is already registered with mmengine CheckpointLoader by '
                       f'{existing.__module__}.{existing.__qualname__}')
    CheckpointLoader.register_scheme(prefixes=SCHEME, loader=load_from_norm_plugins, force=True)
