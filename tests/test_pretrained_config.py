"""norm_plugins:// inside full mmdet/mmseg configs: init_weights() loads the converted backbone, the
batch check warns when the per-GPU batch differs from pretraining, mismatched backbones are refused,
and the convert/register tools work end to end."""
import importlib.util
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from mmengine.config import Config
from mmengine.registry import DefaultScope

import pretrained_helpers as authors
from norm_plugins.pretrained import (ConversionError, IncompatibleBackboneError, ManifestError,
                                     PretrainedSettingsMismatchWarning, PretrainingBatchMismatchWarning,
                                     UnknownPretrainedError, check_pretrained_config, check_pretraining_batch,
                                     file_sha256, get_entry, load_pretrained)

TOOLS = Path(__file__).resolve().parents[1] / 'tools'
SN_NORM = "dict(type='SN', normalizers=('in', 'ln', 'bn'), unbiased_instance_var=True)"


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def home(tmp_path_factory):
    """A cache holding resnet50_sn_8x2 converted by tools/convert_pretrained.py from a synthetic
    checkpoint in the SN authors' layout."""
    root = tmp_path_factory.mktemp('pretrained')
    patch = pytest.MonkeyPatch()
    patch.setenv('NORM_PLUGINS_HOME', str(root / 'home'))
    patch.delenv('NORM_PLUGINS_MANIFESTS', raising=False)
    source = authors.save_authors_checkpoint(authors.randomize_(authors.authors_sn_resnet(50)), root / 'sn_8x2.pth')
    assert _tool('convert_pretrained').main(['resnet50_sn_8x2', str(source)]) == 0
    yield root / 'home'
    patch.undo()


def _config(tmp_path, text):
    path = tmp_path / 'cfg.py'
    path.write_text(text)
    return Config.fromfile(str(path))


def _faster_rcnn(tmp_path, name, batch_size=2, norm=SN_NORM):
    return _config(tmp_path, f"""
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['norm_plugins'], allow_failed_imports=False)
model = dict(backbone=dict(
    norm_cfg={norm}, norm_eval=False,
    init_cfg=dict(type='Pretrained', checkpoint='norm_plugins://{name}')))
train_dataloader = dict(batch_size={batch_size})
""")


def test_full_mmdet_config_initializes_from_the_scheme(home, tmp_path):
    cfg = _faster_rcnn(tmp_path, 'resnet50_sn_8x2')
    from mmdet.registry import MODELS
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(cfg.model)
    model.init_weights()
    expected = load_pretrained('resnet50_sn_8x2')
    state = model.backbone.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def test_matching_batch_gives_no_warning(home, tmp_path):
    cfg = _faster_rcnn(tmp_path, 'resnet50_sn_8x2', batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter('error', PretrainingBatchMismatchWarning)
        (result,) = check_pretrained_config(cfg)
    assert (result.where, result.name, result.finetune_images_per_gpu, result.pretrain_images_per_gpu) == \
        ('model.backbone', 'resnet50_sn_8x2', 2, 2)
    assert result.matches


def test_batch_mismatch_warns_citing_the_papers(home, tmp_path):
    cfg = _faster_rcnn(tmp_path, 'resnet50_sn_8x32', batch_size=2)
    with pytest.warns(PretrainingBatchMismatchWarning) as record:
        (result,) = check_pretraining_batch(cfg)
    assert not result.matches
    message = str(record[0].message)
    assert 'pretrained with 32 images per GPU, but train_dataloader.batch_size is 2' in message
    assert 'comparable batch size would be a best practice' in message
    assert "['resnet50_sn_8x2']" in message


def test_batch_independent_backbones_are_not_warned_about(home, tmp_path):
    cfg = _faster_rcnn(tmp_path, 'resnet50_gn_ws', batch_size=2, norm="dict(type='GN', num_groups=32)")
    cfg.model.backbone.conv_cfg = dict(type='WSConv', formula='convws')
    with warnings.catch_warnings():
        warnings.simplefilter('error', PretrainingBatchMismatchWarning)
        (result,) = check_pretrained_config(cfg)
    assert not result.matches and not result.uses_batch_statistics


@pytest.mark.parametrize('estimate', [True, False])
def test_micro_batch_bcn_finetuning_is_not_warned_about(home, tmp_path, estimate):
    """Algorithm 1 is the BCN paper's way to finetune a large-batch backbone at 2 images per GPU."""
    cfg = _faster_rcnn(tmp_path, 'resnet50_bcn_ws', batch_size=2,
                       norm=f"dict(type='BCN', num_groups=32, estimate={estimate})")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        (result,) = check_pretraining_batch(cfg)
    warned = [w for w in caught if issubclass(w.category, PretrainingBatchMismatchWarning)]
    assert result.uses_batch_statistics == bool(warned) == (not estimate)


def test_mmseg_resnetv1c_config_is_refused(home, tmp_path):
    cfg = _config(tmp_path, f"""
_base_ = 'mmseg::deeplabv3/deeplabv3_r50-d8_4xb2-40k_cityscapes-512x1024.py'
model = dict(pretrained='norm_plugins://resnet50_sn_8x2', backbone=dict(norm_cfg={SN_NORM}))
""")
    with pytest.raises(IncompatibleBackboneError,
                       match=r"model.backbone \(type='ResNetV1c'\) cannot load norm_plugins://resnet50_sn_8x2:\n"
                             r"  - it has a deep stem"):
        check_pretrained_config(cfg)
    cfg.model.backbone.type = 'ResNet'
    assert check_pretrained_config(cfg)[0].matches


def test_norm_type_mismatch_is_refused(home, tmp_path):
    cfg = _faster_rcnn(tmp_path, 'resnet50_sn_8x1')
    with pytest.raises(IncompatibleBackboneError, match=r'norm_cfg=.* does not match'):
        check_pretrained_config(cfg)


@pytest.mark.parametrize('name, norm, conv, use', [
    # GN+WS weights were trained with the authors' (W - mean) / (std + eps); WSConv defaults to 'paper'.
    ('resnet50_gn_ws', "dict(type='GN', num_groups=32)", dict(type='WSConv'),
     "Use conv_cfg=dict(type='WSConv', formula='convws')."),
    # The SN authors' weights divide the instance variance by L - 1.
    # The base config's requires_grad=True is kept in the advice.
    ('resnet50_sn_8x2', "dict(type='SN')", None,
     "Use norm_cfg=dict(type='SN', requires_grad=True, unbiased_instance_var=True)."),
    ('resnet50_sn_8x2', "dict(type='SyncSN', unbiased_instance_var=True, eps=1e-3)", None,
     "Use norm_cfg=dict(type='SyncSN', requires_grad=True, unbiased_instance_var=True, eps=1e-05)."),
    ('resnet50_bcn_ws', "dict(type='BCN', num_groups=32)", dict(type='WSConv', formula='bcn', eps=1e-4),
     "Use conv_cfg=dict(type='WSConv', formula='bcn', eps=1e-05)."),
])
def test_settings_that_change_the_numbers_warn_with_the_cfg_to_use(home, tmp_path, name, norm, conv, use):
    cfg = _faster_rcnn(tmp_path, name, norm=norm)
    cfg.model.backbone.conv_cfg = conv
    with pytest.warns(PretrainedSettingsMismatchWarning) as record:
        check_pretrained_config(cfg)
    (message,) = [str(w.message) for w in record if issubclass(w.category, PretrainedSettingsMismatchWarning)]
    assert message.startswith(f'model.backbone loads norm_plugins://{name}, whose layers were trained with ')
    assert message.endswith(use)


@pytest.mark.parametrize('name, norm, conv', [
    ('resnet50_gn_ws', "dict(type='GN', num_groups=32, eps=1e-5)", dict(type='WSConv', formula='convws')),
    ('resnet50_sn_8x2', SN_NORM, None),
    ('resnet50_sn_8x2', "dict(type='SyncSN', unbiased_instance_var=True, momentum=0.01)", None),
    ('resnet50_bcn_ws', "dict(type='BCN', num_groups=32, estimate=True)", dict(type='WSConv', formula='bcn')),
])
def test_matching_settings_do_not_warn(home, tmp_path, name, norm, conv):
    cfg = _faster_rcnn(tmp_path, name, norm=norm)
    cfg.model.backbone.conv_cfg = conv
    with warnings.catch_warnings():
        warnings.simplefilter('error', PretrainedSettingsMismatchWarning)
        check_pretrained_config(cfg)


def test_register_tool_adds_a_loadable_entry(home, tmp_path):
    converted = load_pretrained('resnet50_sn_8x2')
    checkpoint = tmp_path / 'epoch_100.pth'
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in converted.items()},
                'meta': {'epoch': 100}}, checkpoint)
    register = _tool('register_pretrained')
    argv = [str(checkpoint), '--name', 'my_resnet50_sn_8x16', '--depth', '50', '--norm-cfg', 'type=SN',
            "normalizers=['in','ln','bn']", 'unbiased_instance_var=True', '--gpus', '8', '--images-per-gpu', '16',
            '--top1', '76.7', '--prefix', 'backbone.']
    assert register.main(argv) == 0
    entry = get_entry('my_resnet50_sn_8x16')
    assert (entry.gpus, entry.images_per_gpu, entry.key_layout) == (8, 16, 'mmdet_resnet')
    assert entry.get('Results.0.Metrics.Top 1 Accuracy') == 76.7
    assert entry.source_sha256 == file_sha256(checkpoint)
    assert entry.manifest == home / 'manifests' / 'local.yml'
    assert yaml.safe_load(entry.manifest.read_text())['Models'][-1]['Converted']['SHA256'] == entry.converted_sha256
    loaded = load_pretrained('my_resnet50_sn_8x16')
    assert all(torch.equal(loaded[k], v) for k, v in converted.items())
    with pytest.raises(ManifestError, match="'my_resnet50_sn_8x16' already exists"):
        register.register_checkpoint(checkpoint, 'my_resnet50_sn_8x16', 50, dict(type='SN'), 8, 16,
                                     prefix='backbone.')


def test_register_refuses_a_checkpoint_of_other_layers(home, tmp_path):
    checkpoint = tmp_path / 'sn.pth'
    torch.save(load_pretrained('resnet50_sn_8x2'), checkpoint)
    register = _tool('register_pretrained')
    with pytest.raises(ConversionError, match=r'shape mismatches: \[.*mean_weight'):
        register.register_checkpoint(checkpoint, 'my_sn_8x1', 50, dict(type='SN', normalizers=('in', 'ln')), 8, 1)
    with pytest.raises(UnknownPretrainedError):
        get_entry('my_sn_8x1')


def test_convert_tool_reports_errors_without_a_traceback(home, tmp_path, capsys):
    source = tmp_path / 'bad.pth'
    torch.save({'state_dict': {'conv1.weight': torch.ones(64, 3, 7, 7)}}, source)
    assert _tool('convert_pretrained').main(['resnet50_sn_8x4', str(source)]) == 1
    assert 'backbone keys left unfilled' in capsys.readouterr().err
