"""SSN outside the layer: the authors' SSN2d checkpoints convert strictly into mmdet's and mmseg's
ResNet with norm_cfg=dict(type='SSN') and compute what the authors' model computes (float64); frozen
choices, radius and group expansion; a finished SSN network deploys as plain layers; the ratio
analysis shows the radius and when each vector froze."""
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mmdet.registry import MODELS as MMDET_MODELS
from mmseg.registry import MODELS as MMSEG_MODELS

import norm_plugins  # noqa: F401 - registers SSN
import pretrained_helpers as authors
from norm_plugins.analysis import (UNKNOWN_ITERATION, frozen_summary, ratio_table, ratios_from_model,
                                   ratios_from_state_dict)
from norm_plugins.analysis.plots import plot_freezing
from norm_plugins.deploy import deploy_model
from norm_plugins.layers.sparse_switchable_norm import SparseSwitchableNorm
from norm_plugins.pretrained import (ConversionError, convert_state_dict, get_entry, read_source_checkpoint,
                                     unwrap_state_dict)
from tools_helpers import REPO

RADIUS = 0.3
INPUTS = {False: torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64),
          True: torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)}


@pytest.fixture(scope='module')
def home(tmp_path_factory):
    """Manifests of the test: a group-SSN entry converting the (8,2) file for ratio_groups=2."""
    root = tmp_path_factory.mktemp('ssn')
    patch = pytest.MonkeyPatch()
    patch.setenv('NORM_PLUGINS_HOME', str(root / 'home'))
    patch.setenv('NORM_PLUGINS_MANIFESTS', str(root / 'manifests'))
    (root / 'manifests').mkdir()
    raw = copy.deepcopy(get_entry('resnet50_ssn_8x2').raw)
    raw['Name'] = 'resnet50_ssn_8x2_g2'
    raw['Method']['norm_cfg']['ratio_groups'] = 2
    (root / 'manifests' / 'g2.yml').write_text(yaml.safe_dump({'Models': [raw]}, sort_keys=False))
    yield root
    patch.undo()


@pytest.fixture(scope='module')
def source(home):
    """(the authors' ResNet-50 SSN with mixed frozen/free states, its converted state dict)."""
    reference = authors.ssn_states_(authors.randomize_(authors.authors_ssn_resnet(50)), RADIUS)
    path = authors.save_authors_checkpoint(reference, home / 'ssn_8x2.pth')
    state = unwrap_state_dict(read_source_checkpoint(path))
    assert all(k.startswith(('conv1', 'sn1', 'layer', 'fc')) for k in state)  # module. stripped
    report = convert_state_dict(state, get_entry('resnet50_ssn_8x2'))
    assert [key for key, _ in report.dropped] == ['fc.weight', 'fc.bias']
    return reference, state, report


def _outputs(model, x, training):
    model = copy.deepcopy(model).double()
    model.train(training)  # mmdet's ResNet.train() returns None: no chaining
    with torch.no_grad():
        return model(x)


def _assert_same(model, reference):
    for training in (False, True):
        outs, expected = _outputs(model, INPUTS[training], training), _outputs(reference, INPUTS[training], training)
        assert len(outs) == len(expected) == 4
        for out, exp in zip(outs, expected):
            torch.testing.assert_close(out, exp, rtol=1e-9, atol=1e-9 * float(exp.abs().max()))


@pytest.mark.parametrize('registry', [MMDET_MODELS, MMSEG_MODELS], ids=['mmdet', 'mmseg'])
def test_converted_ssn_computes_what_the_authors_model_computes(source, registry):
    reference, _, report = source
    model = registry.build(get_entry('resnet50_ssn_8x2').backbone_cfg())
    result = model.load_state_dict(report.state_dict, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    layers = [m for m in model.modules() if isinstance(m, SparseSwitchableNorm)]
    assert len(layers) == 53 and all(m.unbiased_instance_var and m.momentum == 0.003 for m in layers)
    _assert_same(model, reference)


def test_frozen_choices_radius_and_added_tensors(source):
    reference, state, report = source
    converted = report.state_dict
    names = [k[:-len('.mean_fixed')] for k in state if k.endswith('.mean_fixed')]
    assert len(names) == 53
    for name in names:
        target = _target(name)
        for which in ('mean', 'var'):
            theirs = state[f'{name}.{which}_weight']
            expected = int(theirs.argmax()) if int(state[f'{name}.{which}_fixed']) else -1
            assert converted[f'{target}.{which}_fixed'].tolist() == [expected]
            assert converted[f'{target}.{which}_fixed_at'].tolist() == [-1]
            assert torch.equal(converted[f'{target}.{which}_weight'], theirs)
        assert converted[f'{target}.radius'].shape == () and float(converted[f'{target}.radius']) == \
            pytest.approx(RADIUS)
        assert converted[f'{target}.weight'].shape == (state[f'{name}.weight'].shape[1],)
        assert converted[f'{target}.num_batches_tracked'].item() == 0
    patterns = {(int(state[f'{n}.mean_fixed']), int(state[f'{n}.var_fixed'])) for n in names}
    assert patterns == {(1, 1), (1, 0), (0, 0)}
    assert sorted(report.added) == sorted(f'{_target(n)}.{k}' for n in names
                                          for k in ('num_batches_tracked', 'mean_fixed_at', 'var_fixed_at'))


def _target(name):
    """The mmdet name of the authors' norm ``name``: ``sn1`` -> ``ssn1``; shortcuts keep ``downsample.1``."""
    return name if name.endswith('downsample.1') else name.replace('.sn', '.ssn') if '.' in name else 's' + name


def test_single_group_ssn_converts_into_group_ssn(source):
    reference, state, _ = source
    report = convert_state_dict(state, get_entry('resnet50_ssn_8x2_g2'))
    assert len(report.expanded) == 53 * 6  # logits, fixed and fixed_at, of means and variances
    single = source[2].state_dict
    for key in ('layer1.0.ssn1.mean_fixed', 'layer1.0.ssn1.var_fixed_at', 'layer3.2.ssn2.var_weight'):
        assert torch.equal(report.state_dict[key], single[key].expand((2,) + single[key].shape[-1:]
                                                                      if single[key].dim() and key.endswith('weight')
                                                                      else (2,)))
    model = MMDET_MODELS.build(get_entry('resnet50_ssn_8x2_g2').backbone_cfg())
    model.load_state_dict(report.state_dict, strict=True)
    assert model.layer1[0].ssn1.mean_weight.shape == (2, 3)
    _assert_same(model, reference)


@pytest.mark.parametrize('flag, ratios, message', [
    (2, None, r"layer1.0.sn1.mean_fixed is \[2\]; the SSN authors' layer stores one flag, 0 \(free\) or 1"),
    (1, [0.6, 0.4, 0.0], r'layer1.0.sn1.mean_fixed is 1 \(frozen\), so layer1.0.sn1.mean_weight should hold '
                         r'one-hot ratios, but it holds \[0.6'),
])
def test_inconsistent_frozen_flags_are_refused(source, flag, ratios, message):
    state = dict(source[1])
    state['layer1.0.sn1.mean_fixed'] = torch.tensor([flag])
    if ratios is not None:
        state['layer1.0.sn1.mean_weight'] = torch.tensor(ratios)
    with pytest.raises(ConversionError, match=message):
        convert_state_dict(state, get_entry('resnet50_ssn_8x2'))


def test_ratio_analysis_shows_radius_and_freezing(source, tmp_path):
    _, state, report = source
    model = MMDET_MODELS.build(get_entry('resnet50_ssn_8x2').backbone_cfg())
    model.load_state_dict(report.state_dict)
    rows = ratios_from_model(model)
    assert len(rows) == 53 and all(row.is_sparse and row.radius == pytest.approx(RADIUS) for row in rows)
    stem = rows[0]
    assert stem.name == 'ssn1' and stem.frozen_at == (UNKNOWN_ITERATION, UNKNOWN_ITERATION)
    assert torch.equal(stem.mean, state['sn1.mean_weight'])  # the frozen one-hot vector
    free = next(row for row in rows if row.frozen_at == (None, None))
    source_name = free.name if free.name.endswith('downsample.1') else free.name.replace('ssn', 'sn')
    theirs = authors.sparsestmax_reference(state[f'{source_name}.mean_weight'], RADIUS)
    torch.testing.assert_close(free.mean.double(), theirs, rtol=1e-6, atol=1e-6)
    table = ratio_table(rows).splitlines()
    assert table[0].split()[-5:] == ['D(mean||var)', 'radius', 'frozen', 'at', 'mean/var']
    assert table[2].split()[-2:] == ['0.3000', '?/?']
    frozen_means = sum(int(state[k]) for k in state if k.endswith('.mean_fixed'))
    frozen_vars = sum(int(state[k]) for k in state if k.endswith('.var_fixed'))
    summary = frozen_summary(rows)
    assert summary.startswith('SSN ratio vectors (radius 0.3000): ')
    assert f'mean: {frozen_means}/53 frozen (' in summary and f'var: {frozen_vars}/53 frozen (' in summary
    for a, b in zip(rows, ratios_from_state_dict(model.state_dict())):
        assert a.label == b.label and a.frozen_at == b.frozen_at and a.radius == pytest.approx(b.radius)
        torch.testing.assert_close(a.mean, b.mean)
    for path in plot_freezing(rows, str(tmp_path / 'frozen')):
        assert Path(path).stat().st_size > 5000
    with pytest.raises(ValueError, match='lacks'):
        ratios_from_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith('ssn1.mean_fixed_at')})


def test_ratio_tool_reports_ssn_freezing(source, tmp_path):
    model = MMDET_MODELS.build(get_entry('resnet50_ssn_8x2').backbone_cfg())
    model.load_state_dict(source[2].state_dict)
    layer = model.layer2[0].ssn2
    layer.set_radius(RADIUS, iteration=700)
    layer.harden()  # freezes the free vectors now, recording iteration 700
    checkpoint = tmp_path / 'ssn.pth'
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in model.state_dict().items()}}, checkpoint)
    result = subprocess.run([sys.executable, 'tools/analysis/sn_ratios.py', str(checkpoint), '--out-dir',
                             str(tmp_path / 'out')], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'SSN ratio vectors (radius 0.3000)' in result.stdout
    row = next(line for line in result.stdout.splitlines() if line.startswith('backbone.layer2.0.ssn2 '))
    assert row.split()[-1] == '/'.join('?' if int(source[1][f'layer2.0.sn2.{w}_fixed']) else '700'
                                       for w in ('mean', 'var'))
    for name in ('ssn_frozen.png', 'ssn_frozen.svg', 'ssn_ratios.txt'):
        assert (tmp_path / 'out' / name).stat().st_size > 1000


def _finished_ssn_backbone(seed=0):
    """A ResNet-18 with SSN everywhere whose every vector froze, mean and variance to the same
    normalizer (the biased instance variance, so IN and LN are standard layers too)."""
    from mmdet.models.backbones import ResNet
    backbone = ResNet(depth=18, base_channels=8, norm_cfg=dict(type='SSN'), out_indices=(0, 3))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in backbone.modules():
            if isinstance(module, SparseSwitchableNorm):
                logits = torch.randn(3, generator=generator)
                module.mean_weight.copy_(logits)
                module.var_weight.copy_(logits)
                module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.num_features, generator=generator))
                module.set_radius(1.0, iteration=5)
    backbone.train()
    backbone(torch.randn(4, 3, 64, 64, generator=generator))  # radius 1: every vector freezes
    from norm_plugins.analysis import recompute_batch_stats
    recompute_batch_stats(backbone, [torch.randn(4, 3, 64, 64, generator=generator) for _ in range(2)], 2)
    return backbone


def test_finished_ssn_network_deploys_as_plain_layers():
    backbone = _finished_ssn_backbone()
    layers = [m for m in backbone.modules() if isinstance(m, SparseSwitchableNorm)]
    assert all(int(m.mean_fixed) >= 0 and int(m.var_fixed) >= 0 and int(m.mean_fixed_at) == 5 for m in layers)
    reference = copy.deepcopy(backbone)
    reference.eval()
    report = deploy_model(backbone)
    assert not any(isinstance(m, SparseSwitchableNorm) for m in backbone.modules())
    assert sum(report.values()) == len(layers) and all(what.startswith('SSN') for what in report)
    assert set(report) <= {'SSN(BN) folded into conv', 'SSN -> GroupNorm(C) (IN)', 'SSN -> GroupNorm(1) (LN)'}
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    deployed64 = copy.deepcopy(reference).double()
    deploy_model(deployed64)
    reference64 = copy.deepcopy(reference).double()
    with torch.no_grad():
        for out, expected in zip(deployed64(x), reference64(x)):
            torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_converted_authors_ssn_deploys_bn_and_keeps_unbiased_instance_layers(source):
    _, state, report = source
    model = MMDET_MODELS.build(get_entry('resnet50_ssn_8x2').backbone_cfg())
    model.load_state_dict(report.state_dict)
    deployed = deploy_model(copy.deepcopy(model))
    names = [k[:-len('.mean_fixed')] for k in state if k.endswith('.mean_fixed')]

    def eval_ratios(name, which):  # what the authors' layer mixes with in eval
        weight = state[f'{name}.{which}_weight']
        return weight.double() if int(state[f'{name}.{which}_fixed']) else authors.sparsestmax_reference(weight, RADIUS)

    ratios = {n: (eval_ratios(n, 'mean'), eval_ratios(n, 'var')) for n in names}
    soft = [n for n, pair in ratios.items() if any(float(r.max()) != 1.0 for r in pair)]
    both_bn = [n for n, pair in ratios.items() if n not in soft and all(int(r.argmax()) == 2 for r in pair)]
    assert soft and both_bn and len(soft) + len(both_bn) < len(names)
    # One-hot eval ratios (frozen, or SparsestMax one-hot at this radius) with BN for both: folded into
    # the conv before it (every norm of a ResNet follows one). Others stay SSN: soft ratios, or IN/LN
    # from the authors' unbiased instance variance, which no standard layer computes.
    assert deployed['SSN kept (soft ratios; harden first)'] == len(soft)
    assert deployed['SSN(BN) folded into conv'] == len(both_bn)
    hard_kept = {what: count for what, count in deployed.items() if what.startswith('SSN kept (hard')}
    assert sum(hard_kept.values()) == len(names) - len(soft) - len(both_bn)


def _config(tmp_path, norm, name='resnet50_ssn_8x2', batch_size=2):
    from mmengine.config import Config
    path = tmp_path / 'cfg.py'
    path.write_text(f"""
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['norm_plugins'], allow_failed_imports=False)
model = dict(backbone=dict(norm_cfg={norm}, norm_eval=False,
                           init_cfg=dict(type='Pretrained', checkpoint='norm_plugins://{name}')))
train_dataloader = dict(batch_size={batch_size})
""")
    return Config.fromfile(str(path))


def test_pretrained_checks_of_ssn_configs(home, tmp_path):
    import warnings
    from norm_plugins.pretrained import (IncompatibleBackboneError, PretrainedSettingsMismatchWarning,
                                         PretrainingBatchMismatchWarning, check_pretrained_config)
    authors_ssn = "dict(type='SSN', unbiased_instance_var=True, momentum=0.003)"
    matching = _config(tmp_path, authors_ssn)
    with warnings.catch_warnings():
        for category in (PretrainingBatchMismatchWarning, PretrainedSettingsMismatchWarning):
            warnings.simplefilter('error', category)
        assert [c.matches for c in check_pretrained_config(matching)] == [True]
    with pytest.warns(PretrainingBatchMismatchWarning, match=r"Entries pretrained with 4 images per GPU: "
                                                             r"\['resnet50_ssn_8x4'\]"):
        check_pretrained_config(_config(tmp_path, authors_ssn, batch_size=4))
    with pytest.warns(PretrainedSettingsMismatchWarning, match=r'trained with unbiased_instance_var=True'):
        check_pretrained_config(_config(tmp_path, "dict(type='SSN')"))
    with pytest.raises(IncompatibleBackboneError, match=r"norm_cfg=\{'type': 'SN'.* does not match the checkpoint's"):
        check_pretrained_config(_config(tmp_path, "dict(type='SN', unbiased_instance_var=True)"))
    with pytest.raises(IncompatibleBackboneError, match=r"ratio_groups=2 .*load one of \['resnet50_ssn_8x2_g2'\]"):
        check_pretrained_config(_config(tmp_path, "dict(type='SyncSSN', unbiased_instance_var=True, ratio_groups=2)"))
