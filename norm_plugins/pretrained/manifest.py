"""Pretrained-backbone manifests: YAML files in the schema of OpenMMLab's model-zoo metafiles.

A manifest holds ``Collections`` (one per method and paper) and ``Models`` (one per backbone). Each
model entry has, besides OpenMMLab's ``Name``, ``In Collection``, ``Metadata``, ``Results`` and
``Weights``:

- ``Method``: the ``norm_cfg`` / ``conv_cfg`` that reproduce the layers the weights were trained with;
- ``Architecture``: the mmdet/mmseg ``ResNet`` arguments the weights fit (type, depth, deep_stem, style);
- ``Source``: where the authors' file comes from (``URLs``, ``File``, published ``SHA256`` or its
  prefix, and ``MD5`` where the authors published only that digest) and its ``Key Layout`` (which
  converter reads it);
- ``Converted``: the converted file's name and sha256 once known;
- ``Unknowns``: for every null field, keyed by its dotted path, why it is unknown.

Manifests are read from the bundled folder (:func:`bundled_manifest_dir`: the repository's
``pretrained_manifests/``, or its copy inside an installed package), from the folders listed in
``$NORM_PLUGINS_MANIFESTS`` (``os.pathsep``-separated), and from ``$NORM_PLUGINS_HOME/manifests``
(where ``tools/register_pretrained.py`` writes).
"""
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import yaml

from .errors import ManifestError, UnknownPretrainedError

SCHEME = 'norm_plugins://'
# Fields that may be null as a real value rather than as "unknown".
NULL_IS_A_VALUE = frozenset({'Method.conv_cfg'})
REQUIRED_FIELDS = (
    'Name', 'In Collection', 'Metadata.Training Data', 'Metadata.GPUs', 'Metadata.Images Per GPU',
    'Metadata.Epochs', 'Method.norm_cfg', 'Method.conv_cfg', 'Architecture.type', 'Architecture.depth',
    'Architecture.deep_stem', 'Architecture.style', 'Results', 'Weights', 'Source.URLs', 'Source.File',
    'Source.SHA256', 'Source.Key Layout', 'Converted.File', 'Converted.SHA256')
# Digests the authors may publish of their source files: manifest field -> (hashlib name, what
# the field holds). The field names the algorithm: a 32-digit MD5 is never read as a sha256 prefix.
SOURCE_DIGESTS = {'SHA256': 'sha256', 'MD5': 'md5'}
_HEX = frozenset('0123456789abcdef')
_REPO_MANIFESTS = Path(__file__).resolve().parents[2] / 'pretrained_manifests'
# setup.py's build_py copies pretrained_manifests/*.yml here in wheels and regular installs.
_PACKAGED_MANIFESTS = Path(__file__).resolve().parent / 'manifests'


def pretrained_home() -> Path:
    """``$NORM_PLUGINS_HOME``, else ``$XDG_CACHE_HOME/norm_plugins`` (default ``~/.cache/norm_plugins``)."""
    home = os.environ.get('NORM_PLUGINS_HOME')
    if home:
        return Path(home).expanduser()
    return Path(os.environ.get('XDG_CACHE_HOME', '~/.cache')).expanduser() / 'norm_plugins'


def checkpoint_dir() -> Path:
    """Folder holding converted checkpoints: ``$NORM_PLUGINS_HOME/checkpoints``."""
    return pretrained_home() / 'checkpoints'


def user_manifest_dir() -> Path:
    """Folder for the user's own entries: ``$NORM_PLUGINS_HOME/manifests``."""
    return pretrained_home() / 'manifests'


def bundled_manifest_dir() -> Path:
    """The manifests shipped with norm_plugins: ``pretrained_manifests/`` next to the package in a
    source tree (editable installs included), else the copy installed inside the package."""
    return _REPO_MANIFESTS if _REPO_MANIFESTS.is_dir() else _PACKAGED_MANIFESTS


def manifest_dirs() -> List[Path]:
    """Folders searched for ``*.yml`` manifests, in order (missing folders are skipped)."""
    extra = [Path(p).expanduser() for p in os.environ.get('NORM_PLUGINS_MANIFESTS', '').split(os.pathsep) if p]
    return [bundled_manifest_dir(), *extra, user_manifest_dir()]


@dataclass(frozen=True)
class PretrainedEntry:
    """One ``Models`` entry of a manifest; ``raw`` keeps the whole YAML mapping."""
    name: str
    raw: Dict[str, Any] = field(repr=False)
    manifest: Path

    def get(self, dotted: str) -> Any:
        """Value at a dotted path such as ``'Metadata.Images Per GPU'`` (None when absent)."""
        return _lookup(self.raw, dotted)[1]

    @property
    def images_per_gpu(self) -> Optional[int]:
        return self.get('Metadata.Images Per GPU')

    @property
    def gpus(self) -> Optional[int]:
        return self.get('Metadata.GPUs')

    @property
    def norm_cfg(self) -> Dict[str, Any]:
        return dict(self.get('Method.norm_cfg'))

    @property
    def conv_cfg(self) -> Optional[Dict[str, Any]]:
        conv_cfg = self.get('Method.conv_cfg')
        return None if conv_cfg is None else dict(conv_cfg)

    @property
    def architecture(self) -> Dict[str, Any]:
        return dict(self.get('Architecture'))

    @property
    def key_layout(self) -> str:
        return self.get('Source.Key Layout')

    @property
    def source_urls(self) -> Tuple[str, ...]:
        return tuple(self.get('Source.URLs') or ())

    @property
    def source_sha256(self) -> Optional[str]:
        """The published sha256 of the authors' file, or its published prefix."""
        return self.get('Source.SHA256')

    @property
    def source_md5(self) -> Optional[str]:
        """The published MD5 of the authors' file (``Source.MD5``; absent for most entries)."""
        return self.get('Source.MD5')

    def source_digests(self) -> Dict[str, str]:
        """The published digests of the authors' file by hashlib name (``{'sha256': ..., 'md5': ...}``)."""
        return {algorithm: self.get(f'Source.{key}') for key, algorithm in SOURCE_DIGESTS.items()
                if self.get(f'Source.{key}')}

    @property
    def converted_file(self) -> Optional[str]:
        return self.get('Converted.File')

    @property
    def converted_sha256(self) -> Optional[str]:
        return self.get('Converted.SHA256')

    @property
    def uses_batch_statistics(self) -> bool:
        """Whether the pretrained norm layers normalize with statistics over the batch.

        True for SN and SSN mixing in 'bn' and for BCN; False for GN (+WS) and SN(8,1) without 'bn'.
        """
        norm_type = self.norm_cfg['type']
        if norm_type in ('SN', 'SyncSN', 'SSN', 'SyncSSN'):
            return 'bn' in self.norm_cfg.get('normalizers', ('in', 'ln', 'bn'))
        return norm_type in ('BCN', 'BN', 'SyncBN')

    def unknown_reason(self, dotted: str) -> Optional[str]:
        return (self.raw.get('Unknowns') or {}).get(dotted)

    def backbone_cfg(self) -> Dict[str, Any]:
        """The mmdet/mmseg backbone config these weights fit, without ``init_cfg``."""
        cfg = self.architecture
        cfg.update(norm_cfg=self.norm_cfg, conv_cfg=self.conv_cfg)
        return cfg


def _null_paths(value: Any, prefix: str = '') -> Iterator[str]:
    if value is None:
        yield prefix
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _null_paths(item, f'{prefix}.{key}' if prefix else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _null_paths(item, f'{prefix}.{index}')


def _lookup(raw: Dict[str, Any], dotted: str) -> Tuple[bool, Any]:
    """(whether the dotted path exists, its value or None); digits index lists (``Results.0``)."""
    value: Any = raw
    for part in dotted.split('.'):
        if isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            return False, None
    return True, value


def validate_entry(raw: Any, where: str) -> None:
    """Check one ``Models`` item; raises ManifestError naming the file, entry and field."""
    if not isinstance(raw, dict):
        raise ManifestError(f'{where}: a Models item must be a mapping, got {type(raw).__name__}')
    name = raw.get('Name', '<no Name>')
    where = f'{where}, entry {name!r}'
    missing = [f for f in REQUIRED_FIELDS if not _lookup(raw, f)[0]]
    if missing:
        raise ManifestError(f'{where}: missing field(s) {missing}; every entry needs {list(REQUIRED_FIELDS)}')
    if not isinstance(name, str) or not name or '/' in name or name != name.strip():
        raise ManifestError(f'{where}: Name must be a non-empty string without "/" or surrounding spaces')
    unknowns = raw.get('Unknowns') or {}
    if not isinstance(unknowns, dict) or not all(isinstance(v, str) and v.strip() for v in unknowns.values()):
        raise ManifestError(f'{where}: Unknowns must map dotted field paths to non-empty reasons')
    nulls = {p for p in _null_paths({k: v for k, v in raw.items() if k != 'Unknowns'})} - NULL_IS_A_VALUE
    unexplained = sorted(nulls - set(unknowns))
    if unexplained:
        raise ManifestError(f'{where}: null field(s) {unexplained} need a reason under Unknowns '
                            '(record facts only; say why a value is not known)')
    stale = sorted(set(unknowns) - nulls)
    if stale:
        raise ManifestError(f'{where}: Unknowns explains field(s) {stale} that are not null; '
                            'remove the stale reasons')
    norm_cfg = raw['Method']['norm_cfg']
    if not isinstance(norm_cfg, dict) or 'type' not in norm_cfg:
        raise ManifestError(f'{where}: Method.norm_cfg must be a mapping with a type')
    for key in ('Metadata.GPUs', 'Metadata.Images Per GPU'):
        value = _lookup(raw, key)[1]
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ManifestError(f'{where}: {key} must be a positive integer or null, got {value!r}')
    sha = raw['Converted']['SHA256']
    if sha is not None and not _is_hex(sha, 64):
        raise ManifestError(f'{where}: Converted.SHA256 must be 64 lowercase hex digits, got {sha!r}')
    _validate_source_digests(raw['Source'], where)


def _is_hex(value: Any, length: int) -> bool:
    return isinstance(value, str) and len(value) == length and set(value) <= _HEX


def _validate_source_digests(source: Dict[str, Any], where: str) -> None:
    """``Source.SHA256``: 8 to 64 lowercase hex digits (a published prefix or the full hash), but not
    32, the length of an MD5, which belongs under ``Source.MD5`` (exactly 32 digits)."""
    sha = source.get('SHA256')
    if sha is not None:
        if isinstance(sha, str) and len(sha) == 32 and set(sha) <= _HEX:
            raise ManifestError(f'{where}: Source.SHA256 {sha!r} has the 32 hex digits of an MD5. If the authors '
                                'published an MD5, record it as Source.MD5 (and Source.SHA256: null with a reason '
                                'under Unknowns); a sha256 prefix is recorded with the digits published.')
        if not (isinstance(sha, str) and 8 <= len(sha) <= 64 and set(sha) <= _HEX):
            raise ManifestError(f'{where}: Source.SHA256 must be the published sha256 or a prefix of it '
                                f'(8 to 64 lowercase hex digits), got {sha!r}')
    md5 = source.get('MD5')
    if md5 is not None and not _is_hex(md5, 32):
        raise ManifestError(f'{where}: Source.MD5 must be the 32 lowercase hex digits of the published MD5, '
                            f'got {md5!r}')


def read_manifest(path: Path) -> List[PretrainedEntry]:
    """Parse and validate one manifest file."""
    with open(path, encoding='utf-8') as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict) or not isinstance(data.get('Models', []), list):
        raise ManifestError(f'{path}: a manifest is a mapping with a Models list (OpenMMLab metafile schema)')
    entries = []
    for raw in data.get('Models', []):
        validate_entry(raw, str(path))
        entries.append(PretrainedEntry(raw['Name'], raw, Path(path)))
    return entries


def load_manifests() -> Dict[str, PretrainedEntry]:
    """All entries of all manifests by name; a name defined twice is an error."""
    entries: Dict[str, PretrainedEntry] = {}
    for folder in manifest_dirs():
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob('*.yml')):
            for entry in read_manifest(path):
                if entry.name in entries:
                    raise ManifestError(f'pretrained entry {entry.name!r} is defined in both '
                                        f'{entries[entry.name].manifest} and {path}; rename one')
                entries[entry.name] = entry
    return entries


def get_entry(name: str) -> PretrainedEntry:
    """The manifest entry called ``name`` (``norm_plugins://`` prefix allowed)."""
    if name.startswith(SCHEME):
        name = name[len(SCHEME):]
    entries = load_manifests()
    if name not in entries:
        known = ', '.join(sorted(entries)) or 'none'
        raise UnknownPretrainedError(
            f'no pretrained backbone named {name!r} in the manifests under '
            f'{", ".join(str(d) for d in manifest_dirs())}. Known names: {known}. '
            'Add your own checkpoint with tools/register_pretrained.py.')
    return entries[name]
