"""The batch-size study (see norm_plugins/study/cli.py and docs/batch_size_study.md):
python tools/study_batch_size.py [--tiny | --device cuda] [--out DIR] [--tasks classification,detection] ..."""
from norm_plugins.study.cli import main

if __name__ == '__main__':
    main()
