"""kpssl: keypoint-augmented self-supervised learning for medical image segmentation with few labels.

A small library reproducing Yang et al., NeurIPS 2023 (arXiv:2310.01680), and the executable book that
teaches it. See the book's introduction for a tour of the modules.
"""

from .settings import Settings, load_settings, preset, save_settings

__version__ = "0.1.0"
__all__ = ["Settings", "preset", "load_settings", "save_settings", "__version__"]
