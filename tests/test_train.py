"""Pretraining, fine-tuning and the experiment runner on a tiny synthetic data set (CPU, seconds each)."""

from __future__ import annotations

import csv
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from kpssl.data.synthetic import write_synthetic_acdc
from kpssl.train import common
from kpssl.train.common import NonFiniteLossError, load_checkpoint
from kpssl.train.experiment import collect_table, run_experiment
from kpssl.train.finetune import finetune, load_encoder
from kpssl.train.networks import VIEWS, PretrainNetwork, segmentation_model
from kpssl.train.pretrain import pretrain
from small import small_settings


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_acdc(root, patients=6, seed=0)
    return root


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def log_rows(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


# --- pretraining ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["kaf", "pcl", "gcl", "simclr"])
def test_steps_on_a_fixed_batch_decrease_the_loss(data, method):
    from kpssl.data.slices import load_volumes
    from kpssl.keypoints import PairDataset, collate_pairs

    settings = small_settings()
    torch.manual_seed(0)
    volumes = load_volumes(data, settings.data, labels=False)
    dataset = PairDataset(volumes, settings, None, seed=0, views=VIEWS[method])
    batch = collate_pairs([dataset[i] for i in range(0, 24, 3)])
    network = PretrainNetwork(method, settings.model, settings.pretrain)
    optimiser = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(6):
        loss, terms = network(batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    if method == "kaf":
        assert set(terms) == {"pcl", "global", "local", "total"}


def test_each_view_is_encoded_in_its_own_pass(data):
    """BatchNorm never normalises a view together with its positive: in training mode, what the heads
    see of view 1 does not depend on view 2 at all (one joint batch would mix their statistics)."""
    from kpssl.data.slices import load_volumes
    from kpssl.keypoints import PairDataset, collate_pairs

    settings = small_settings()
    volumes = load_volumes(data, settings.data, labels=False)
    batch = collate_pairs([PairDataset(volumes, settings, None, seed=0)[i] for i in range(0, 24, 3)])
    torch.manual_seed(0)
    network = PretrainNetwork("kaf", settings.model, settings.pretrain).train()
    seen = []
    network.projection.register_forward_hook(lambda module, inputs, output: seen.append(output.detach()))
    network.keypoint_head.project.register_forward_hook(lambda module, inputs, output: seen.append(output.detach()))
    network(batch)
    changed = dict(batch, view2=batch["view2"].flip(-1) * 2 + 1)
    network(changed)
    bottleneck1, bottleneck2, keypoints1, keypoints2 = seen[:4]
    assert bottleneck1.shape[0] == batch["view1"].shape[0]  # one view per call, not both
    assert torch.equal(seen[4], bottleneck1) and torch.equal(seen[6], keypoints1)  # view 1: unchanged
    assert not torch.equal(seen[5], bottleneck2)  # view 2 itself did change


@pytest.mark.parametrize("method, views", [("kaf", "neighbour"), ("pcl", "same"), ("gcl", "same"),
                                           ("simclr", "same")])
def test_pretraining_uses_each_methods_views(data, tmp_path, monkeypatch, method, views):
    import kpssl.train.pretrain as module

    made = []
    original = module.PairDataset

    def recording(*args, **kwargs):
        dataset = original(*args, **kwargs)
        made.append(dataset)
        return dataset

    monkeypatch.setattr(module, "PairDataset", recording)
    pretrain(small_settings(), data, method, tmp_path / method, max_steps=1, progress=False)
    assert [d.views for d in made] == [views]
    item = made[0][5]
    assert (int(item["neighbour"]) == int(item["slice"])) == (views == "same")


def test_pretrain_writes_log_checkpoint_encoder(data, tmp_path):
    settings = small_settings()
    result = pretrain(settings, data, "kaf", tmp_path / "run", max_steps=3, progress=False)
    assert result.steps == 3
    rows = log_rows(tmp_path / "run" / "log.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert float(rows[0]["lr"]) == pytest.approx(settings.pretrain.lr)
    assert all(float(r["total"]) > 0 for r in rows)
    encoder = load_checkpoint(tmp_path / "run" / "encoder.pt")
    assert encoder["method"] == "kaf" and any(k.startswith("kaf.") for k in encoder["model"])
    assert json.loads((tmp_path / "run" / "result.json").read_text())["steps"] == 3
    with pytest.raises(ValueError, match="holds a previous run"):
        pretrain(settings, data, "kaf", tmp_path / "run", max_steps=1, progress=False)


def test_killed_and_resumed_run_ends_with_the_same_weights(data, tmp_path, monkeypatch):
    settings = small_settings()  # 2 epochs
    full = pretrain(settings, data, "kaf", tmp_path / "full", progress=False)
    assert full.steps > 4

    real_check = common.check_finite
    calls = {"n": 0}

    def killed_at_step_3(terms, step):
        calls["n"] += 1
        if step == 3:
            raise KeyboardInterrupt  # the process dies in the middle of epoch 0
        return real_check(terms, step)

    import kpssl.train.pretrain as module

    monkeypatch.setattr(module, "check_finite", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        pretrain(settings, data, "kaf", tmp_path / "resumed", progress=False, checkpoint_every_steps=2)
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["step"] == 2
    monkeypatch.setattr(module, "check_finite", real_check)
    resumed = pretrain(settings, data, "kaf", tmp_path / "resumed", resume=True, progress=False)
    assert resumed.steps == full.steps
    a, b = weights(tmp_path / "full" / "checkpoint.pt"), weights(tmp_path / "resumed" / "checkpoint.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["total"] for r in log_rows(tmp_path / "full" / "log.csv")] == \
        [r["total"] for r in log_rows(tmp_path / "resumed" / "log.csv")]
    seconds = [float(r["seconds"]) for r in log_rows(tmp_path / "resumed" / "log.csv")]
    assert seconds == sorted(seconds)  # training time counts on across the restart

    # resuming a finished run trains nothing and keeps its record
    before = json.loads((tmp_path / "resumed" / "result.json").read_text())
    again = pretrain(settings, data, "kaf", tmp_path / "resumed", resume=True, progress=False)
    after = json.loads((tmp_path / "resumed" / "result.json").read_text())
    assert again.steps == full.steps
    assert after["last_terms"] == pytest.approx(before["last_terms"], rel=1e-6) and after["last_terms"]
    assert after["seconds"] >= before["seconds"]


def test_non_finite_loss_stops_the_run_naming_step_and_term(data, tmp_path, monkeypatch):
    settings = small_settings()
    real_forward = PretrainNetwork.forward

    def poisoned(self, batch):
        total, terms = real_forward(self, batch)
        if poisoned.calls == 1:
            terms["global"] = torch.tensor(float("nan"))
            total = total * float("nan")
        poisoned.calls += 1
        return total, terms

    poisoned.calls = 0
    monkeypatch.setattr(PretrainNetwork, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"step 1: loss term 'global' is nan"):
        pretrain(settings, data, "kaf", tmp_path / "run", progress=False)
    saved = load_checkpoint(tmp_path / "run" / "nonfinite_step1.pt")
    assert saved["step"] == 1 and "view1" in saved["batch"]
    assert len(log_rows(tmp_path / "run" / "log.csv")) == 1  # the good step was logged, the bad one not


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, data: str, out: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    try:
        result = pretrain(small_settings(**{"pretrain.batch_size": 8}), data, "pcl", out, max_steps=3, progress=False)
        torch.save(result.network.state_dict(), Path(out) / f"rank{rank}_final.pt")  # each replica's weights
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def test_two_process_gloo_run_matches_one_process(data, tmp_path):
    single = pretrain(small_settings(**{"pretrain.batch_size": 8}), data, "pcl", tmp_path / "single",
                      max_steps=3, progress=False)
    assert single.steps == 3
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(data), str(tmp_path / "ddp")), nprocs=2, join=True)
    one = [float(r["total"]) for r in log_rows(tmp_path / "single" / "log.csv")]
    two = [float(r["total"]) for r in log_rows(tmp_path / "ddp" / "log.csv")]
    assert len(two) == 3
    # Same global batch of 8 and same samples; the global loss is gathered across processes exactly.
    # BatchNorm statistics are per process on the CPU (4 samples each), hence a tolerance.
    assert two == pytest.approx(one, rel=0.05)
    r0 = torch.load(tmp_path / "ddp" / "rank0_final.pt", weights_only=True)
    r1 = torch.load(tmp_path / "ddp" / "rank1_final.pt", weights_only=True)
    for key in r0:  # DDP keeps the replicas identical
        if "running" not in key and "num_batches" not in key:
            assert torch.equal(r0[key], r1[key]), key


# --- fine-tuning ---------------------------------------------------------------------------------
def test_finetune_improves_validation_dice_and_writes_results(data, tmp_path):
    settings = small_settings(**{"finetune.epochs": 6, "finetune.lr": 5e-3, "finetune.lr_min": 1e-3})
    result = finetune(settings, data, "unet_random", 0, 2, tmp_path / "ft", progress=False)
    assert result.validation["dice_3d"] > result.validation["initial_dice_3d"] + 0.05
    saved = json.loads((tmp_path / "ft" / "result.json").read_text())
    assert saved["labeled"] == 2 and saved["fold"] == 0 and len(saved["train_patients"]) == 2
    assert not set(saved["train_patients"]) & set(saved["test_patients"])
    assert {"dice_3d", "dice_2d_pooled", "hd95_mm"} <= set(saved["test"])
    assert saved["selection"] == "validation"


def test_finetune_kaf_from_a_pretrained_encoder(data, tmp_path):
    settings = small_settings()
    pretrain(settings, data, "kaf", tmp_path / "pre", max_steps=2, progress=False)
    encoder = tmp_path / "pre" / "encoder.pt"
    model = segmentation_model("kaf", settings.model)
    loaded = load_encoder(model, encoder, "kaf")
    assert loaded and not any(k.startswith("decoder.") for k in loaded)
    pre = load_checkpoint(encoder)["model"]
    assert torch.equal(model.state_dict()["blocks.0.0.weight"], pre["blocks.0.0.weight"])
    result = finetune(settings, data, "kaf", 1, 1, tmp_path / "ft", encoder=encoder, progress=False)
    assert 0 <= result.test["dice_3d"] <= 1


def test_bad_inputs_give_clear_errors(data, tmp_path):
    settings = small_settings()
    pretrain(settings, data, "pcl", tmp_path / "pre", max_steps=1, progress=False)
    wider = settings.replace(**{"model.width": 8})
    with pytest.raises(ValueError, match=r"encoder\.pt: does not fit this architecture"):
        load_encoder(segmentation_model("pcl", wider.model), tmp_path / "pre" / "encoder.pt", "pcl")
    with pytest.raises(ValueError, match=r"pretrained with 'pcl', cannot initialise 'gcl'"):
        load_encoder(segmentation_model("gcl", settings.model), tmp_path / "pre" / "encoder.pt", "gcl")
    with pytest.raises(ValueError, match="fold 7 does not exist"):
        finetune(settings, data, "unet_random", 7, 1, tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match=r"M = 9 labelled patients requested but fold 0 has only"):
        finetune(settings, data, "unet_random", 0, 9, tmp_path / "y", progress=False)
    with pytest.raises(ValueError, match="needs a pretrained encoder"):
        finetune(settings, data, "kaf", 0, 1, tmp_path / "z", progress=False)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"garbage\.pt: not a readable checkpoint"):
        load_encoder(segmentation_model("pcl", settings.model), garbage, "pcl")


# --- experiment runner ---------------------------------------------------------------------------
def test_experiment_resumes_without_redoing_finished_runs(data, tmp_path, monkeypatch):
    settings = small_settings()
    import kpssl.train.experiment as module

    real = module.finetune
    calls = []

    def dies_on_third(*args, **kwargs):
        calls.append(args[3:5])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "finetune", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(settings, data, ["unet_random"], [1, 2], [0, 1], tmp_path / "table", progress=False)
    first = tmp_path / "table" / "finetune" / "unet_random" / "M1" / "fold0" / "result.json"
    stamp = first.stat().st_mtime_ns
    table = (tmp_path / "table" / "table.csv").read_text().splitlines()
    assert table[0].startswith("method,M,dice_3d_mean") and len(table) == 3  # M1 and M2 of fold 0

    calls.clear()
    monkeypatch.setattr(module, "finetune", real)
    rows = run_experiment(settings, data, ["unet_random"], [1, 2], [0, 1], tmp_path / "table", progress=False)
    assert first.stat().st_mtime_ns == stamp
    assert [(r["method"], r["M"], r["folds"]) for r in rows] == [("unet_random", 1, 2), ("unet_random", 2, 2)]
    assert collect_table(tmp_path / "table") == rows
    meta = json.loads((tmp_path / "table" / "table.json").read_text())
    assert meta["rows"] == rows
    results = (tmp_path / "table" / "finetune").glob("*/M*/fold*/result.json")
    assert meta["seconds_in_runs"] == pytest.approx(sum(json.loads(f.read_text())["seconds"] for f in results), abs=0.1)
    with pytest.raises(ValueError, match="M = 9"):
        run_experiment(settings, data, ["unet_random"], [9], [0], tmp_path / "other", progress=False)


def test_sync_batchnorm_leaves_the_masked_keypoint_batchnorm_alone():
    from kpssl.models.attention import MaskedBatchNorm1d
    from kpssl.train.common import sync_batchnorm

    network = sync_batchnorm(PretrainNetwork("kaf", small_settings().model, small_settings().pretrain))
    kinds = {type(m) for m in network.modules()}
    assert torch.nn.SyncBatchNorm in kinds and MaskedBatchNorm1d in kinds
    assert torch.nn.BatchNorm2d not in kinds and torch.nn.BatchNorm1d not in kinds


def test_distribute_wraps_only_under_torchrun(monkeypatch):
    """One place wraps both training loops' networks: the network itself in one process; with several,
    DistributedDataParallel around it, its BatchNorm layers synchronised on CUDA only (in place)."""
    from kpssl.train.common import Runtime, distribute

    network = segmentation_model("unet_random", small_settings().model)
    assert distribute(network, Runtime(torch.device("cpu"), None)) is network
    wrapped = []
    monkeypatch.setattr(common, "DistributedDataParallel", lambda module, device_ids: wrapped.append(device_ids) or module)
    assert distribute(network, Runtime(torch.device("cpu"), None, rank=0, world=2)) is network
    assert wrapped == [None] and torch.nn.BatchNorm2d in {type(m) for m in network.modules()}  # gloo: kept
    assert distribute(network, Runtime(torch.device("cuda", 1), None, rank=1, world=2, local_rank=1)) is network
    kinds = {type(m) for m in network.modules()}
    assert wrapped[-1] == [1] and torch.nn.SyncBatchNorm in kinds and torch.nn.BatchNorm2d not in kinds
