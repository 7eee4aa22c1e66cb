"""Register one's own pretrained ResNet backbone as a manifest entry usable as ``norm_plugins://NAME``.

    python tools/register_pretrained.py work_dirs/r50_sn_8x16/backbone.pth --name resnet50_sn_8x16 \\
        --depth 50 --norm-cfg type=SN "normalizers=['in','ln','bn']" --gpus 8 --images-per-gpu 16 \\
        --epochs 100 --top1 76.7

The checkpoint must be named like the mmdet/mmseg ResNet it was trained as (``module.`` prefix and a
``state_dict`` wrapper are fine; ``--prefix backbone.`` takes the backbone out of a whole model). It is
checked key by key against that backbone, copied into $NORM_PLUGINS_HOME/checkpoints as
``{name}-{sha256[:8]}.pth`` and described in $NORM_PLUGINS_HOME/manifests/local.yml (or --manifest),
with its sha256 and batch setting.
"""
import argparse
import sys
from pathlib import Path

from mmengine.config import DictAction

from norm_plugins.pretrained import PretrainedError
from norm_plugins.pretrained.manifest import manifest_dirs
from norm_plugins.pretrained.registration import register_checkpoint


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('checkpoint', help='state dict file of the pretrained backbone')
    parser.add_argument('--name', required=True, help='entry name, e.g. resnet50_sn_8x16')
    parser.add_argument('--depth', type=int, required=True, choices=(18, 34, 50, 101, 152))
    parser.add_argument('--norm-cfg', nargs='+', action=DictAction, required=True,
                        help="norm_cfg the backbone was trained with, e.g. type=SN \"normalizers=['in','ln']\"")
    parser.add_argument('--conv-cfg', nargs='+', action=DictAction, help='conv_cfg, e.g. type=WSConv formula=paper')
    parser.add_argument('--gpus', type=int, required=True, help='GPUs used in pretraining')
    parser.add_argument('--images-per-gpu', type=int, required=True, help='images per GPU in pretraining')
    parser.add_argument('--epochs', type=int)
    parser.add_argument('--top1', type=float, help='top-1 accuracy (%%) on the pretraining validation set')
    parser.add_argument('--top5', type=float, help='top-5 accuracy (%%)')
    parser.add_argument('--dataset', default='ImageNet-1k')
    parser.add_argument('--prefix', default='', help="keep only keys under this prefix, e.g. 'backbone.'")
    parser.add_argument('--manifest', help='manifest file to add to (default $NORM_PLUGINS_HOME/manifests/local.yml)')
    parser.add_argument('--notes', help='free text recorded with the entry')
    parser.add_argument('--trust-pickle', action='store_true',
                        help='allow unpickling non-tensor objects in the checkpoint (only for files you trust)')
    args = parser.parse_args(argv)
    if args.gpus < 1 or args.images_per_gpu < 1:
        parser.error('--gpus and --images-per-gpu must be positive')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        entry, path = register_checkpoint(
            args.checkpoint, args.name, args.depth, args.norm_cfg, args.gpus, args.images_per_gpu,
            conv_cfg=args.conv_cfg, epochs=args.epochs, top1=args.top1, top5=args.top5, dataset=args.dataset,
            prefix=args.prefix, manifest=args.manifest, notes=args.notes, trust_pickle=args.trust_pickle)
    except (PretrainedError, FileNotFoundError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    print(f"registered {entry['Name']}: {path} (sha256 {entry['Converted']['SHA256']})")
    print(f"use it with init_cfg=dict(type='Pretrained', checkpoint='norm_plugins://{entry['Name']}')")
    if args.manifest and Path(args.manifest).expanduser().resolve().parent not in [d.resolve() for d in manifest_dirs()]:
        print(f'note: {args.manifest} is outside the folders searched for manifests; add its folder to '
              'NORM_PLUGINS_MANIFESTS', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
