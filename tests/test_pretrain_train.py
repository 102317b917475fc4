"""drasclr.train end to end on a tiny synthetic store: learning, exact resume, DDP, errors."""
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from helpers import TINY, make_store, rendezvous_store, worker_environment

import drasclr
import drasclr.nn
from drasclr import load_encoder
from drasclr.pretrain import TrainConfig
from drasclr.pretrain.checkpoints import load_checkpoint
from drasclr.pretrain.augment import PatchAugment

@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("pretrain"))


def _train(store_atlas, out_dir, **overrides):
    store, atlas = store_atlas
    return drasclr.train(store=str(store), atlas=str(atlas), out_dir=str(out_dir), **{**TINY, **overrides})


def _contrastive_task(encoder, store):
    """InfoNCE loss and top-1 of matching two augmented views of every patch among the
    patches of the same landmark (the local task, Yu et al. 2023, eq. 6), on a fixed set of
    draws."""
    from drasclr.data.atlas import Atlas
    from drasclr.data.store import PatchStore

    patches = PatchStore(store[0])
    coords = torch.from_numpy(Atlas.load(store[1]).coords)
    subjects, landmarks = np.divmod(np.arange(patches.num_subjects * patches.num_landmarks),
                                    patches.num_landmarks)
    hu = torch.from_numpy(patches.gather(subjects, landmarks))
    generator = torch.Generator().manual_seed(11)
    repeats = 3  # three view pairs per patch: a smoother top-1
    views = [PatchAugment()(hu.repeat(repeats, 1, 1, 1), generator) for _ in range(2)]
    landmarks = np.tile(landmarks, repeats)
    loc = coords[torch.from_numpy(landmarks)]
    encoder.train()  # batch statistics, as in training
    with torch.no_grad():
        z1, z2 = (torch.nn.functional.normalize(encoder.head(encoder(v, loc)), dim=1) for v in views)
    same_landmark = torch.from_numpy(landmarks[:, None] == landmarks[None, :])
    logits = (z1 @ z2.T / 0.2).masked_fill(~same_landmark, float("-inf"))
    target = torch.arange(len(logits))
    top1 = (logits.argmax(1) == target).float().mean().item()
    return torch.nn.functional.cross_entropy(logits, target).item(), top1


def test_short_run_lowers_loss_and_raises_top1(tmp_path):
    # More subjects than queue slots, as in the real setting (K = 4096 << subjects): a queue
    # holding the query's own subject's older keys would push its positive away.
    store = make_store(tmp_path / "data", num_subjects=16, num_landmarks=2, distinct_levels=True)
    result = _train(store, tmp_path / "run", epochs=20, max_steps=24, batch_size=8, k_neighbours=1,
                    queue_size=4, lr=0.05, momentum=0.9, tensorboard=True)
    torch.manual_seed(0)  # the trainer's initialisation (seed 0)
    initial = drasclr.nn.Encoder(**result.model.encoder_q.config)
    before = _contrastive_task(initial, store)
    after = _contrastive_task(load_encoder(result.checkpoint), store)
    print("loss, top-1 before", before, "after", after)
    chance_top1 = 1 / (16 * 3)  # 16 subjects x 3 view pairs compete at each landmark
    # Seeds 0-2 gave losses 3.89-3.95 -> 3.56-3.70 and top-1 0.010-0.042 -> 0.083-0.104.
    assert after[0] < before[0] - 0.15
    assert after[1] > before[1] and after[1] >= 3 * chance_top1

    history = result.history
    assert [h["step"] for h in history] == list(range(1, 25))
    assert history[-1]["lr"] < history[0]["lr"]  # cosine decay per step
    assert (tmp_path / "run" / "metrics.csv").read_text().count("\n") == 25
    assert list((tmp_path / "run" / "tensorboard").glob("events.*"))
    assert (tmp_path / "run" / "encoder_epoch_0001.pt").exists()  # 4 batches per epoch
    encoder = load_encoder(result.checkpoint)
    assert isinstance(encoder, drasclr.nn.Encoder) and not encoder.training
    for name, tensor in encoder.state_dict().items():
        assert torch.equal(tensor, result.model.encoder_q.state_dict()[name]), name


def test_resume_continues_bit_for_bit(tiny_store, tmp_path, monkeypatch):
    settings = dict(epochs=2, max_steps=4, checkpoint_every=2, batch_size=4, k_neighbours=1)
    whole = _train(tiny_store, tmp_path / "whole", **settings)

    from drasclr.pretrain.trainer import Trainer
    original = Trainer._train_step

    def interrupted_after_two(self, batch):
        if self.step == 2:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(Trainer, "_train_step", interrupted_after_two)
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_store, tmp_path / "split", **settings)
    monkeypatch.setattr(Trainer, "_train_step", original)
    assert load_checkpoint(tmp_path / "split" / "checkpoint_last.pt")["position"]["step"] == 2
    resumed = _train(tiny_store, tmp_path / "split", **settings)

    assert resumed.history == [{**h, "patches_per_s": r["patches_per_s"]}
                               for h, r in zip(whole.history, resumed.history)]
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert not torch.equal(a["bank.pointers"], torch.zeros_like(a["bank.pointers"]))


def _ddp_worker(rank, store_atlas, out_dir, port):
    os.environ.update(worker_environment(port, rank, 2))
    torch.set_num_threads(1)
    result = _train(store_atlas, out_dir, max_steps=2, batch_size=8, k_neighbours=1, device="cpu")
    torch.save({"bank": result.model.bank.state_dict(),
                "encoder_q": result.model.encoder_q.state_dict()}, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_process_gloo_run_ends_with_identical_banks(tiny_store, tmp_path):
    rendezvous = rendezvous_store(2)
    mp.spawn(_ddp_worker, args=(tiny_store, str(tmp_path), rendezvous.port), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for name in rank0["bank"]:
        assert torch.equal(rank0["bank"][name], rank1["bank"][name]), name
    # both steps enqueued the global batch: 8 keys each over 2 landmarks of 6
    assert rank0["bank"]["pointers"].sum() == 16
    for name in rank0["encoder_q"]:
        if "running" not in name and "num_batches" not in name:  # BN statistics stay per process
            torch.testing.assert_close(rank0["encoder_q"][name], rank1["encoder_q"][name])
    assert load_checkpoint(tmp_path / "checkpoint_last.pt")["position"]["step"] == 2


def test_non_finite_loss_stops_and_keeps_checkpoint(tiny_store, tmp_path, monkeypatch):
    from drasclr.pretrain import moco
    calls = []
    original = moco.drasclr_loss

    def poisoned(*args, **kwargs):
        calls.append(1)
        out = original(*args, **kwargs)
        return out._replace(loss=out.loss * float("nan")) if len(calls) == 2 else out

    monkeypatch.setattr(moco, "drasclr_loss", poisoned)
    with pytest.raises(FloatingPointError, match="step 2.*last good checkpoint"):
        _train(tiny_store, tmp_path, max_steps=3, checkpoint_every=1, batch_size=4, k_neighbours=0)
    state = load_checkpoint(tmp_path / "checkpoint_last.pt")
    assert state["position"]["step"] == 1
    assert all(torch.isfinite(v).all() for v in state["encoder_q"].values() if v.is_floating_point())


def test_bad_inputs_fail_before_work(tiny_store, tmp_path):
    store, atlas = tiny_store
    with pytest.raises(FileNotFoundError, match="no such patch store"):
        _train((tmp_path / "nowhere", atlas), tmp_path / "a")
    other = make_store(tmp_path / "other", num_subjects=1, num_landmarks=5)
    with pytest.raises(ValueError, match=rf"atlas {other[1]} \(5 landmarks\) is not the atlas the "
                                         rf"store {store} was cut with \({atlas}, 6 landmarks"):
        _train((store, other[1]), tmp_path / "b")
    with pytest.raises(ValueError, match="not divisible by landmarks_per_batch"):
        _train(tiny_store, tmp_path / "c", batch_size=6, landmarks_per_batch=4)
    with pytest.raises(ValueError, match="unknown key"):
        _train(tiny_store, tmp_path / "d", learning_rate=0.1)
    with pytest.raises(ValueError, match="k: expected 0..3"):
        _train(tiny_store, tmp_path / "e", k_neighbours=4)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_training_takes_the_atlas_from_the_store_record(tmp_path):
    store, atlas = make_store(tmp_path / "data", num_subjects=2)
    copy = tmp_path / "copy_of_the_atlas.npz"
    shutil.copy(atlas, copy)
    settings = dict(store=str(store), max_steps=1, k_neighbours=0, **TINY)
    runs = iter(tmp_path / f"run_{n}" for n in range(3))
    atlas.rename(tmp_path / "moved.npz")  # the store's record now points nowhere
    with pytest.raises(FileNotFoundError, match=rf"store.json: the store's atlas {atlas} is gone"):
        drasclr.train(out_dir=str(next(runs)), **settings)  # atlas unset: the record's file
    result = drasclr.train(atlas=str(copy), out_dir=str(next(runs)), **settings)  # the same atlas
    assert [row["step"] for row in result.history] == [1]
    (tmp_path / "moved.npz").rename(atlas)
    result = drasclr.train(out_dir=str(next(runs)), **settings)
    assert [row["step"] for row in result.history] == [1]


def test_cli_trains_from_config_file(tiny_store, tmp_path, capsys):
    from drasclr.cli import main
    store, atlas = tiny_store
    config = TrainConfig(store=str(store), atlas=str(atlas), out_dir=str(tmp_path / "run"), **TINY)
    path = config.save(tmp_path / "run.yaml")
    assert main(["train", "--config", str(path), "--max-steps", "1", "--k-neighbours", "0"]) == 0
    assert "checkpoint_last.pt" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "run" / "checkpoint_last.pt")["config"]["k_neighbours"] == 0
    (tmp_path / "typo.yaml").write_text("epoch: 3\n")
    assert main(["train", "--config", str(tmp_path / "typo.yaml")]) == 2
    assert "unknown key(s) ['epoch']" in capsys.readouterr().err
