"""The methods, named once: what each pretrains and which network each fine-tunes.

Fine-tuning methods and their initialisation:

``unet_random``  UNet from a random initialisation
``kaf_random``   KAF-UNet from a random initialisation
``simclr``       UNet, encoder pretrained with SimCLR's rule (Eq. 1, the other view only)
``gcl``          UNet, encoder pretrained with GCL's rule (Eq. 1, same partition)
``pcl``          UNet, encoder pretrained with PCL's rule (Eq. 1, nearby position)
``kaf``          KAF-UNet, encoder and KAF layers pretrained with Eq. 3

This module imports nothing heavy, so the command line can list the choices without loading torch.
"""

from __future__ import annotations

__all__ = ["PRETRAIN_METHODS", "FINETUNE_METHODS", "PRETRAINED", "KAF_NETWORK", "check_finetune_method"]

PRETRAIN_METHODS = ("kaf", "pcl", "gcl", "simclr")
FINETUNE_METHODS = ("unet_random", "kaf_random", "simclr", "gcl", "pcl", "kaf")
PRETRAINED = frozenset(PRETRAIN_METHODS)  # fine-tuning methods that start from a pretrained encoder
KAF_NETWORK = frozenset({"kaf", "kaf_random"})  # methods whose network is the KAF-UNet


def check_finetune_method(method: str, encoder: object | None) -> None:
    """Refuse an unknown method, a pretrained method without an encoder and a random one with one."""
    if method not in FINETUNE_METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(FINETUNE_METHODS)}")
    if (method in PRETRAINED) != (encoder is not None):
        need = "needs" if method in PRETRAINED else "takes no"
        raise ValueError(f"method {method!r} {need} a pretrained encoder (--encoder)")
