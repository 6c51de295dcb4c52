"""Training: pretraining and fine-tuning loops, checkpoints, distribution, the experiment runner.

Import the submodules directly (``kpssl.train.pretrain``, ``kpssl.train.finetune``,
``kpssl.train.experiment``); this package keeps its import light.
"""
