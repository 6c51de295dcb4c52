"""The paper's reported results, typed in from Yang et al. (2023) for comparison; nothing here is computed.

Mean Dice (pooled 2D, mean over the foreground classes) over 5 folds, with the authors' protocol (the
epoch chosen on the test fold). ``CHD_DICE`` is Table 1 for CHD, every method at every label budget M;
for ACDC the paper gives the KAF-pretrained KAF-UNet at every M and the two randomly initialised
networks at M = 6 (the architecture ablation).
"""

from __future__ import annotations

__all__ = ["CHD_BUDGETS", "ACDC_BUDGETS", "CHD_DICE", "ACDC_KAF_DICE", "ACDC_M6_RANDOM"]

CHD_BUDGETS = (2, 6, 10, 15, 20, 30, 51)
ACDC_BUDGETS = (2, 6, 10, 15, 20, 30, 80)
CHD_DICE = {
    "unet_random": (.184, .508, .584, .627, .658, .693, .754),
    "kaf_random": (.344, .576, .646, .686, .706, .728, .778),
    "simclr": (.192, .515, .599, .631, .666, .699, .756),
    "gcl": (.255, .564, .646, .669, .697, .725, .766),
    "pcl": (.356, .600, .661, .686, .716, .735, .774),
    "kaf": (.392, .636, .693, .712, .728, .754, .788),
}
ACDC_KAF_DICE = (.741, .873, .895, .908, .915, .921, .930)
ACDC_M6_RANDOM = {"unet_random": .782, "kaf_random": .827}
