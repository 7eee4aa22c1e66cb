"""Generate the synthetic shapes dataset used by configs/demo (see norm_plugins/demo/shapes.py)."""
from norm_plugins.demo.shapes import main

if __name__ == '__main__':
    main()
