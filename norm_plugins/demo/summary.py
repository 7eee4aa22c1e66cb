"""The closing line of tools/run_demo.sh: metrics, checkpoint and logs in one line."""
import argparse
import json


def summary_line(metrics_json: str, train_log: str) -> str:
    """``demo done: bbox mAP ..., segm mAP ... | checkpoint ... | train log ... | eval log ...``."""
    with open(metrics_json) as f:
        result = json.load(f)
    metrics = result['metrics']
    scores = ', '.join(f'{task} mAP {metrics[f"coco/{task}_mAP"]:.3f} (AP50 {metrics[f"coco/{task}_mAP_50"]:.3f})'
                       for task in ('bbox', 'segm') if f'coco/{task}_mAP' in metrics)
    return (f"demo done: {scores} | checkpoint {result['checkpoint']} | train log {train_log} | "
            f"eval log {result['log']}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('metrics_json', help='file written by tools/test.py --metrics-json')
    parser.add_argument('train_log', help='log file of the training run')
    args = parser.parse_args(argv)
    print(summary_line(args.metrics_json, args.train_log))


if __name__ == '__main__':
    main()
