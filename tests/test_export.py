"""Compact copies of trained networks (kpssl.train.export): what they keep, how close they are, what
they refuse."""

from __future__ import annotations

import pytest
import torch

from kpssl.settings import preset
from kpssl.train.common import save_checkpoint
from kpssl.train.evaluate import load_finetuned
from kpssl.train.export import HALF_MAX, compact_copy
from kpssl.train.finetune import load_encoder
from kpssl.train.networks import segmentation_model


def trained_like(method: str):
    """A network with weights of varied magnitude, as a trained one has."""
    settings = preset("tiny")
    torch.manual_seed(0)
    network = segmentation_model(method, settings.model)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.mul_(torch.exp(torch.randn_like(parameter) * 1.5))  # magnitudes over several decades
    return network, settings


def within_half_rounding(copy: torch.Tensor, original: torch.Tensor) -> bool:
    """|copy - original| <= 2^-11 |original| in float16's normal range, <= 2^-25 below it (round to nearest)."""
    error = (copy.double() - original.double()).abs()
    bound = torch.maximum(original.double().abs() * 2.0 ** -11, torch.full_like(error, 2.0 ** -25))
    return bool((error <= bound).all())


def test_a_fine_tuned_network_survives_the_copy_within_half_precision_rounding(tmp_path):
    network, settings = trained_like("kaf_random")
    state = {"kind": "finetuned", "method": "kaf_random", "model": network.state_dict(), "epoch": 7,
             "settings": settings.to_dict()}
    save_checkpoint(tmp_path / "best.pt", state)
    written = compact_copy(tmp_path / "best.pt", tmp_path / "small.pt", note="fold 0")
    assert written["compact"] == {"source": str(tmp_path / "best.pt"), "dtype": "float16", "note": "fold 0"}
    assert (tmp_path / "small.pt").stat().st_size < 0.6 * (tmp_path / "best.pt").stat().st_size
    loaded, loaded_settings, raw = load_finetuned(tmp_path / "small.pt")
    assert loaded_settings.to_dict() == settings.to_dict() and raw["epoch"] == 7
    for name, original in network.state_dict().items():
        copy = loaded.state_dict()[name]
        assert copy.dtype == original.dtype  # back in float32 (integers unchanged)
        if original.is_floating_point():
            assert within_half_rounding(copy, original), name
        else:
            assert torch.equal(copy, original), name


def test_an_encoder_copy_drops_the_decoder_and_still_initialises_fine_tuning(tmp_path):
    network, settings = trained_like("kaf")
    save_checkpoint(tmp_path / "encoder.pt", {"kind": "encoder", "method": "kaf", "model": network.state_dict(),
                                              "settings": settings.to_dict()})
    written = compact_copy(tmp_path / "encoder.pt", tmp_path / "small.pt")
    assert written["model"] and not any(k.startswith("decoder.") for k in written["model"])
    fresh = segmentation_model("kaf", settings.model)
    loaded = load_encoder(fresh, tmp_path / "small.pt", "kaf")
    assert loaded == sorted(k for k in network.state_dict() if not k.startswith("decoder."))
    for name in loaded:
        original = network.state_dict()[name]
        if original.is_floating_point():
            assert within_half_rounding(fresh.state_dict()[name], original), name


def test_a_tensor_beyond_half_range_stays_float32_and_training_checkpoints_are_refused(tmp_path):
    network, settings = trained_like("unet_random")
    state = network.state_dict()
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name].clone()
    state[name].view(-1)[0] = 2 * HALF_MAX
    save_checkpoint(tmp_path / "best.pt", {"kind": "finetuned", "method": "unet_random", "model": state,
                                           "epoch": 1, "settings": settings.to_dict()})
    written = compact_copy(tmp_path / "best.pt", tmp_path / "small.pt")
    assert written["model"][name].dtype == torch.float32
    assert sum(v.dtype == torch.float16 for v in written["model"].values()) > 10
    save_checkpoint(tmp_path / "checkpoint.pt", {"kind": "finetuned", "method": "unet_random", "model": state,
                                                 "optimiser": {}, "step": 3, "settings": settings.to_dict()})
    with pytest.raises(ValueError, match=r"checkpoint\.pt: a fine-tuning checkpoint\.pt"):
        compact_copy(tmp_path / "checkpoint.pt", tmp_path / "other.pt")
    save_checkpoint(tmp_path / "odd.pt", {"weights": 1})
    with pytest.raises(ValueError, match=r"odd\.pt: expected the best\.pt of kpssl finetune or the encoder\.pt"):
        compact_copy(tmp_path / "odd.pt", tmp_path / "other.pt")
    assert not (tmp_path / "other.pt").exists()
