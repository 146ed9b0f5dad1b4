"""raytimm: train, tune and serve timm image classifiers on Ray."""
__version__ = "0.1.0"
