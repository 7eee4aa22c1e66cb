"""Convert an authors' ImageNet checkpoint into the mmdet/mmseg backbone of a manifest entry.

    python tools/convert_pretrained.py resnet50_sn_8x2 ~/Downloads/resnet50_sn_8x2.pth
    python tools/convert_pretrained.py --list

Writes ``{name}-{sha256[:8]}.pth`` (a plain state dict of tensors) into the cache folder that
``norm_plugins://name`` reads ($NORM_PLUGINS_HOME/checkpoints, default ~/.cache/norm_plugins/checkpoints)
and prints the ``Converted`` block to record in the manifest. Conversion is strict: it fails, listing
the keys, unless every backbone tensor is filled and every source tensor is used or dropped on purpose.
"""
import argparse
import sys

from norm_plugins.pretrained import PretrainedError, get_entry, load_manifests, manifest_record
from norm_plugins.pretrained.conversion import RUNNING_STATS, convert_checkpoint_file


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('name', nargs='?', help='manifest entry, e.g. resnet50_sn_8x2')
    parser.add_argument('source', nargs='?', help="the authors' checkpoint file, downloaded from the entry's URLs")
    parser.add_argument('--out-dir', help='write here instead of the cache folder')
    parser.add_argument('--running-stats', choices=RUNNING_STATS, default='keep',
                        help="keep the source's running statistics (default), or reset them to mean 0 / var 1 "
                             'to re-estimate them on the target data')
    parser.add_argument('--trust-pickle', action='store_true',
                        help='allow unpickling non-tensor objects in the source (only for files you trust)')
    parser.add_argument('--list', action='store_true', help='list the manifest entries and exit')
    args = parser.parse_args(argv)
    if not args.list and (args.name is None or args.source is None):
        parser.error('give NAME and SOURCE, or --list')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.list:
            for entry in load_manifests().values():
                print(f'{entry.name:28s} {entry.key_layout:14s} images/GPU={entry.images_per_gpu}  '
                      f'{entry.source_urls[0] if entry.source_urls else "(no URL)"}')
            return 0
        path, sha256, report = convert_checkpoint_file(args.name, args.source, args.out_dir, args.running_stats,
                                                       args.trust_pickle)
    except (PretrainedError, FileNotFoundError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    print(report.summary())
    print(f'wrote {path}\nsha256 {sha256}')
    backbone = get_entry(args.name).backbone_cfg()
    print(f'fits the mmdet/mmseg backbone {backbone} (not ResNetV1c/ResNetV1d, whose deep stem differs); '
          f"load it with init_cfg=dict(type='Pretrained', checkpoint='norm_plugins://{args.name}')")
    print(manifest_record(args.name, sha256))
    return 0


if __name__ == '__main__':
    sys.exit(main())
