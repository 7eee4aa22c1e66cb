"""check_data_root: a config whose data is missing fails at once, naming the paths and the fix."""
import re
import shlex
from pathlib import Path

import pytest
from mmengine.config import Config

from norm_plugins.data_root import DataRootNotFoundError, check_data_root

CONFIGS = Path(__file__).resolve().parents[1] / 'configs'


def coco_like(root='data/coco/'):
    dataset = dict(type='CocoDataset', data_root=root, ann_file='annotations/instances_train2017.json',
                   data_prefix=dict(img='train2017/'))
    val = dict(dataset, ann_file='annotations/instances_val2017.json', data_prefix=dict(img='val2017/'))
    return Config(dict(
        train_dataloader=dict(batch_size=2, dataset=dataset),
        val_dataloader=dict(batch_size=1, dataset=val), val_cfg=dict(type='ValLoop'),
        val_evaluator=dict(type='CocoMetric', ann_file=root + 'annotations/instances_val2017.json'),
        test_dataloader=dict(batch_size=1, dataset=val), test_cfg=dict(type='TestLoop'),
        test_evaluator=dict(type='CocoMetric', ann_file=root + 'annotations/instances_val2017.json')))


def make_coco(root: Path):
    (root / 'annotations').mkdir(parents=True)
    for name in ('instances_train2017.json', 'instances_val2017.json'):
        (root / 'annotations' / name).write_text('{}')
    (root / 'train2017').mkdir()
    (root / 'val2017').mkdir()


def suggested_options(message: str) -> dict:
    """The key=value pairs after --cfg-options in the message, with /path/to/ left as written."""
    line = next(line for line in message.splitlines() if '--cfg-options' in line)
    return dict(item.split('=', 1) for item in shlex.split(line.split('--cfg-options', 1)[1]))


def test_missing_coco_names_every_path_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataRootNotFoundError) as info:
        check_data_root(coco_like())
    message = str(info.value)
    for path in ('data/coco/annotations/instances_train2017.json', 'data/coco/train2017/',
                 'data/coco/annotations/instances_val2017.json', 'data/coco/val2017/'):
        assert path in message
    assert str(tmp_path) in message
    assert suggested_options(message) == {
        'train_dataloader.dataset.data_root': '/path/to/coco/',
        'val_dataloader.dataset.data_root': '/path/to/coco/',
        'val_evaluator.ann_file': '/path/to/coco/annotations/instances_val2017.json'}
    assert isinstance(info.value, FileNotFoundError)


def test_following_the_suggested_options_fixes_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = coco_like()
    with pytest.raises(DataRootNotFoundError) as info:
        check_data_root(cfg)
    make_coco(tmp_path / 'elsewhere' / 'coco')
    options = {key: value.replace('/path/to/', str(tmp_path / 'elsewhere') + '/')
               for key, value in suggested_options(str(info.value)).items()}
    cfg.merge_from_dict(options)
    check_data_root(cfg)


def test_data_in_place_passes_and_only_missing_parts_are_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_coco(tmp_path / 'data' / 'coco')
    check_data_root(coco_like())
    (tmp_path / 'data/coco/val2017').rmdir()
    with pytest.raises(DataRootNotFoundError) as info:
        check_data_root(coco_like())
    message = str(info.value)
    assert 'data/coco/val2017/' in message and 'train2017' not in message


def test_phases(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'data/coco/annotations').mkdir(parents=True)
    (tmp_path / 'data/coco/annotations/instances_train2017.json').write_text('{}')
    (tmp_path / 'data/coco/train2017').mkdir()
    cfg = coco_like()
    check_data_root(cfg, phases=('train',))
    with pytest.raises(DataRootNotFoundError, match='test_dataloader'):
        check_data_root(cfg, phases=('test',))
    cfg.val_cfg = None  # no validation during training: the val set is not needed
    check_data_root(cfg)
    with pytest.raises(ValueError, match='unknown phases'):
        check_data_root(cfg, phases=('training',))


def test_dataset_wrappers_and_remote_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    inner = dict(type='CityscapesDataset', data_root='data/cityscapes/',
                 data_prefix=dict(img_path='leftImg8bit/train', seg_map_path='gtFine/train'))
    remote = dict(type='CocoDataset', data_root='s3://bucket/coco/', ann_file='a.json')
    cfg = Config(dict(train_dataloader=dict(dataset=dict(
        type='ConcatDataset', datasets=[dict(type='RepeatDataset', times=2, dataset=inner), remote])),
        val_cfg=None))
    with pytest.raises(DataRootNotFoundError) as info:
        check_data_root(cfg)
    message = str(info.value)
    assert 'data/cityscapes/leftImg8bit/train' in message and 'data/cityscapes/gtFine/train' in message
    assert 'train_dataloader.dataset.datasets.0.dataset.data_root=/path/to/cityscapes/' in message
    assert 's3://' not in message


def test_flagship_without_coco(tmp_path, monkeypatch):
    cfg = Config.fromfile(str(CONFIGS / 'mask_rcnn_sn.py'))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataRootNotFoundError) as info:
        check_data_root(cfg)
    message = str(info.value)
    assert 'mask_rcnn_sn.py' in message
    assert re.search(r'data/coco/annotations/instances_train2017\.json', message)
    assert 'train_dataloader.dataset.data_root=/path/to/coco/' in message
