"""The GPU path, checked on the CPU where it can be (precision rule, RNG states, host synchronisations,
logging without a sync per step) and on CUDA where a GPU exists (resume of pretraining and fine-tuning,
the sparse fusion against its dense reference)."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kpssl.data.synthetic import write_synthetic_acdc
from small import small_settings as shared_small_settings
from kpssl.train import common
from kpssl.train.common import NonFiniteLossError, load_checkpoint, rng_state, runtime, save_checkpoint, set_rng_state

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def small_settings(**changes):
    """The training tests' small settings, with one pretraining epoch unless told otherwise."""
    return shared_small_settings(**{"pretrain.epochs": 1, **changes})


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_acdc(root, patients=4, seed=0)
    return root


def log_rows(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


# --- precision rule --------------------------------------------------------------------------------
@pytest.mark.parametrize("capability, expected", [((7, 5), torch.float16), ((7, 0), torch.float16),
                                                  ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_precision_follows_the_compute_capability(monkeypatch, capability, expected):
    """bf16 from capability 8.0 on, fp16 (with the gradient scaler) below, even where
    ``is_bf16_supported`` says yes (a T4 emulates bf16); float32 on the CPU."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    flags = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:  # runtime() sets these on CUDA; the other tests keep theirs
        rt = runtime(True, "cuda")
        assert rt.amp_dtype == expected and rt.channels_last
        assert runtime(False, "cuda").amp_dtype is None
        assert not runtime(True, "cuda", channels_last=False).channels_last
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
    assert common.amp_dtype_for(torch.device("cuda"), True) == expected
    cpu = runtime(True, "cpu")
    assert cpu.amp_dtype is None and not cpu.channels_last and cpu.memory_format == torch.contiguous_format


# --- RNG states ------------------------------------------------------------------------------------
def test_rng_states_come_back_on_the_cpu_whatever_the_map_location(tmp_path):
    """The resume crash on CUDA: ``load_checkpoint(path, "cuda")`` moved the generator states to the
    GPU and ``torch.set_rng_state`` refused them. Here the model goes to the 'meta' device (a non-CPU
    location this machine has); the states must stay CPU byte tensors and restore the generators exactly."""
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    save_checkpoint(tmp_path / "c.pt", {"model": {"w": torch.ones(3)}, "rng": rng_state()})
    expected = (torch.rand(3), np.random.rand(2), random.random())
    state = load_checkpoint(tmp_path / "c.pt", "meta")
    assert state["model"]["w"].device.type == "meta"
    assert state["rng"]["torch"].device.type == "cpu" and state["rng"]["torch"].dtype == torch.uint8
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    set_rng_state(state["rng"])
    again = (torch.rand(3), np.random.rand(2), random.random())
    assert torch.equal(again[0], expected[0]) and np.array_equal(again[1], expected[1]) and again[2] == expected[2]


# --- no host synchronisation in the KAF step -------------------------------------------------------
def host_reads(function) -> int:
    """How many times ``function`` reads a tensor value back on the host (``.item()``, ``bool()``, ...:
    each a synchronisation on a GPU and a graph break under ``torch.compile``)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    count = [0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, op, types, args=(), kwargs=None):
            if op.overloadpacket in (torch.ops.aten._local_scalar_dense, torch.ops.aten.item, torch.ops.aten.is_nonzero):
                count[0] += 1
            return op(*args, **(kwargs or {}))

    with Count():
        function()
    return count[0]


def test_kaf_pretraining_forward_reads_nothing_back_when_matches_are_checked_at_collate(data):
    from kpssl.data.slices import load_volumes
    from kpssl.keypoints import PairDataset, collate_pairs
    from kpssl.train.networks import PretrainNetwork

    settings = small_settings()
    volumes = load_volumes(data, settings.data, labels=False)
    dataset = PairDataset(volumes, settings, None, seed=0)
    batch = collate_pairs([dataset[i] for i in range(4)])
    network = PretrainNetwork("kaf", settings.model, settings.pretrain)
    assert host_reads(lambda: network(batch)) > 0  # the checking loss, as a chapter calls it
    network.matching_loss.check_matches = False  # as the training loop sets it
    assert host_reads(lambda: network(batch)) == 0


def test_collate_pairs_rejects_bad_matches_once_on_the_cpu(data):
    from kpssl.data.slices import load_volumes
    from kpssl.keypoints import PairDataset, check_pair_batch, collate_pairs

    settings = small_settings()
    dataset = PairDataset(load_volumes(data, settings.data, labels=False), settings, None, seed=0)
    items = [dataset[i] for i in range(2)]
    batch = collate_pairs(items)
    assert check_pair_batch(batch) is batch
    k = batch["match12"].shape[1]
    broken = dict(batch, match12=batch["match12"].clone())
    broken["match12"][0, 0] = k + 3
    with pytest.raises(ValueError, match=rf"pair batch: match12 entries must lie in \[-1, {k - 1}\]"):
        check_pair_batch(broken)
    one_way = dict(batch, valid1=torch.ones_like(batch["valid1"]), valid2=torch.ones_like(batch["valid2"]),
                   match12=torch.full_like(batch["match12"], -1), match21=torch.full_like(batch["match21"], -1))
    one_way["match12"][0, 0] = 1
    with pytest.raises(ValueError, match="pair batch: match12 and match21 disagree"):
        check_pair_batch(one_way)


# --- logging without a sync per step ---------------------------------------------------------------
def test_flushing_the_log_every_few_steps_changes_nothing(data, tmp_path):
    from kpssl.train.pretrain import pretrain

    settings = small_settings()
    every = pretrain(settings, data, "kaf", tmp_path / "every", max_steps=5, progress=False, log_every_steps=1)
    batched = pretrain(settings, data, "kaf", tmp_path / "batched", max_steps=5, progress=False,
                       log_every_steps=3)
    a, b = log_rows(tmp_path / "every" / "log.csv"), log_rows(tmp_path / "batched" / "log.csv")
    assert [int(r["step"]) for r in b] == [1, 2, 3, 4, 5]
    for key in ("epoch", "step", "lr", "total", "pcl", "global", "local"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    assert every.last_terms == batched.last_terms
    wa, wb = load_checkpoint(every.checkpoint)["model"], load_checkpoint(batched.checkpoint)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(ValueError, match="log_every_steps"):
        pretrain(settings, data, "kaf", tmp_path / "bad", max_steps=1, progress=False, log_every_steps=0)


def test_non_finite_loss_found_at_a_later_flush_names_its_step_and_blocks_the_checkpoint(data, tmp_path,
                                                                                          monkeypatch):
    from kpssl.train.networks import PretrainNetwork
    from kpssl.train.pretrain import pretrain

    real_forward = PretrainNetwork.forward

    def poisoned(self, batch):
        total, terms = real_forward(self, batch)
        if poisoned.calls == 1:
            terms["global"] = terms["global"] * float("nan")
            total = total * float("nan")
        poisoned.calls += 1
        return total, terms

    poisoned.calls = 0
    monkeypatch.setattr(PretrainNetwork, "forward", poisoned)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"step 1: loss term 'global' is nan"):
        pretrain(small_settings(), data, "kaf", out, progress=False, log_every_steps=4, checkpoint_every_steps=2)
    assert not (out / "checkpoint.pt").exists()  # the flush before the step-2 checkpoint found it
    assert [int(r["step"]) for r in log_rows(out / "log.csv")] == [1]
    saved = load_checkpoint(out / "nonfinite_step1.pt")
    assert saved["step"] == 1 and saved["last_checkpoint_step"] is None and len(saved["samples"]) == 4
    monkeypatch.setattr(PretrainNetwork, "forward", real_forward)
    network = PretrainNetwork("kaf", small_settings().model, small_settings().pretrain)
    _, terms = network(saved["batch"])  # the rebuilt batch is a complete pretraining batch
    assert torch.isfinite(terms["total"])


# --- CUDA ------------------------------------------------------------------------------------------
@cuda
def test_sparse_fusion_on_cuda_equals_the_dense_reference_float64():
    from kpssl.models import scatter_average, sparse_conv3x3

    torch.manual_seed(0)
    device = torch.device("cuda")
    size, k = 48, 200
    rows = torch.randint(0, size, (4, k), device=device)
    cols = torch.randint(0, size, (4, k), device=device)
    rows[:, :4], cols[:, :4] = 0, size - 1  # borders and collisions
    valid = torch.rand(4, k, device=device) < 0.6
    vectors = torch.randn(4, k, 32, dtype=torch.float64, device=device, requires_grad=True)
    weight = torch.randn(16, 32, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
    bias = torch.randn(16, dtype=torch.float64, device=device, requires_grad=True)
    sparse = sparse_conv3x3(vectors, rows, cols, valid, weight, bias, size, size)
    dense = F.conv2d(scatter_average(vectors, rows, cols, valid, size, size), weight, bias, padding=1)
    torch.testing.assert_close(sparse, dense)
    upstream = torch.randn_like(dense)
    for a, b in zip(torch.autograd.grad((sparse * upstream).sum(), [vectors, weight, bias]),
                    torch.autograd.grad((dense * upstream).sum(), [vectors, weight, bias])):
        torch.testing.assert_close(a, b)


@cuda
def test_pretraining_resumes_on_cuda(data, tmp_path, monkeypatch):
    import kpssl.train.pretrain as module

    settings = small_settings(**{"pretrain.epochs": 2})
    real_check = module.check_finite

    def killed_at_step_3(terms, step):
        if step == 3:
            raise KeyboardInterrupt
        return real_check(terms, step)

    monkeypatch.setattr(module, "check_finite", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        module.pretrain(settings, data, "kaf", tmp_path / "run", progress=False, device="cuda",
                        checkpoint_every_steps=2, log_every_steps=1)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 2
    monkeypatch.setattr(module, "check_finite", real_check)
    resumed = module.pretrain(settings, data, "kaf", tmp_path / "run", resume=True, progress=False, device="cuda")
    assert resumed.steps > 3 and resumed.network.backbone.blocks[0][0].weight.is_cuda
    assert all(np.isfinite(float(r["total"])) for r in log_rows(tmp_path / "run" / "log.csv"))


@cuda
def test_finetuning_resumes_on_cuda(data, tmp_path, monkeypatch):
    import kpssl.train.finetune as module

    settings = small_settings(**{"finetune.epochs": 3})
    module.finetune(settings, data, "unet_random", 0, 1, tmp_path / "ft", progress=False, device="cuda", max_epochs=1)
    result = module.finetune(settings, data, "unet_random", 0, 1, tmp_path / "ft", progress=False, device="cuda",
                             resume=True)
    assert 0 <= result.test["dice_3d"] <= 1
