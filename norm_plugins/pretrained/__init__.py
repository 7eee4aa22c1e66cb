"""Named pretrained backbones: manifests, the ``norm_plugins://NAME`` checkpoint scheme, conversion
of the authors' checkpoints, and checks of a config against the backbones it loads."""
from .config_checks import (BatchComparison, PretrainedSettingsMismatchWarning, PretrainingBatchMismatchWarning,
                            check_backbone_fits, check_layer_settings, check_pretrained_config,
                            check_pretraining_batch, pretrained_references)
from .conversion import (LAYOUTS, ConversionReport, convert_state_dict, manifest_record,
                         read_source_checkpoint, save_converted, target_state_shapes, unwrap_state_dict)
from .errors import (ChecksumMismatchError, ConversionError, IncompatibleBackboneError, ManifestError,
                     PretrainedError, PretrainedFileMissingError, UnknownPretrainedError)
from .manifest import (SCHEME, PretrainedEntry, checkpoint_dir, get_entry, load_manifests, pretrained_home,
                       user_manifest_dir)
from .store import (file_sha256, load_from_norm_plugins, load_pretrained, locate_converted, register_scheme,
                    verified_checkpoint_path)

__all__ = [
    'BatchComparison', 'ChecksumMismatchError', 'ConversionError', 'ConversionReport', 'IncompatibleBackboneError',
    'LAYOUTS', 'ManifestError', 'PretrainedEntry', 'PretrainedError', 'PretrainedFileMissingError',
    'PretrainedSettingsMismatchWarning', 'PretrainingBatchMismatchWarning', 'SCHEME', 'UnknownPretrainedError',
    'check_backbone_fits', 'check_layer_settings', 'check_pretrained_config', 'check_pretraining_batch',
    'checkpoint_dir', 'convert_state_dict', 'file_sha256', 'get_entry', 'load_from_norm_plugins', 'load_manifests',
    'load_pretrained', 'locate_converted', 'manifest_record', 'pretrained_home', 'pretrained_references',
    'read_source_checkpoint', 'register_scheme', 'save_converted', 'target_state_shapes', 'unwrap_state_dict',
    'user_manifest_dir', 'verified_checkpoint_path'
]
