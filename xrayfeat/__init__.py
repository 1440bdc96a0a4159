"""xrayfeat: prepare chest radiographs, train a MiniVGGNet, evaluate it, and see what each layer sees."""

__version__ = "0.1.0"
