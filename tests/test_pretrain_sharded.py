"""Landmark-sharded memory bank on Gloo (CPU): equivalence with the replicated bank, epoch
coverage, sharded checkpoints resumed on other process counts, torchrun over two "nodes",
and a killed worker restarted by torchrun."""
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import drasclr
import drasclr.nn
from drasclr.pretrain.memory_bank import owned_landmarks
from drasclr.pretrain.moco import DrasCLR
from drasclr.pretrain.sampler import OwnedLandmarkBatchSampler
from drasclr.pretrain.sharded_checkpoints import POINTER, last_checkpoint
from helpers import make_store, rendezvous_store, worker_environment
from sharded_worker import TINY_SHARDED, train_and_record

WORKER = Path(__file__).with_name("sharded_worker.py")
NUM_LANDMARKS = 8  # 8 subjects x 8 landmarks: 8 steps of 8 pairs per epoch


def _process_entry(port, rank, world_size, target, args):
    os.environ.update(worker_environment(port.recv(), rank, world_size))
    torch.set_num_threads(1)
    try:
        target(*args)
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def run_processes(world_size, target, *args, timeout=120):
    """``target(*args)`` in ``world_size`` forked processes set up like torchrun's workers."""
    context = mp.get_context("fork")
    ports = [context.Pipe(duplex=False) for _ in range(world_size)]
    processes = [context.Process(target=_process_entry,
                                 args=(receiver, rank, world_size, target, args))
                 for rank, (receiver, _) in enumerate(ports)]
    for process in processes:
        process.start()
    # the store after the forks: a forked child must not copy the store's server thread
    store = rendezvous_store(world_size)
    for _, sender in ports:
        sender.send(store.port)
    for process in processes:
        process.join(timeout)
    exit_codes = [p.exitcode for p in processes]
    for process in processes:  # none is left behind when one hung
        process.kill()
        process.join()
    assert exit_codes == [0] * world_size


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store, atlas = make_store(tmp_path_factory.mktemp("sharded"), num_subjects=8, num_landmarks=NUM_LANDMARKS)
    return str(store), str(atlas)


@pytest.fixture(scope="module")
def two_process_run(store, tmp_path_factory):
    """An uninterrupted landmark-sharded run on 2 processes: 5 steps of epoch 1, checkpoints
    at steps 2, 4 and 5."""
    out_dir = tmp_path_factory.mktemp("two")
    run_processes(2, train_and_record, *store, str(out_dir), 5)
    return out_dir


def results(out_dir, world_size):
    return [torch.load(Path(out_dir) / f"result_rank{r}.pt") for r in range(world_size)]


def global_bank(shards):
    """(L, K, D) keys and (L,) pointers from every process's shard."""
    keys = torch.cat([s["keys"] for s in shards])
    pointers = torch.cat([s["pointers"] for s in shards])
    order = torch.argsort(torch.cat([s["landmarks"] for s in shards]))
    return keys[order], pointers[order]


# -- the bank itself: same losses and queues as replicated ----------------------------------
def _both_designs(out_dir, shuffle_bn):
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.distributed.init_process_group("gloo")
    rng = np.random.default_rng(5)  # the same global batches on every process
    coords = torch.from_numpy(rng.uniform(-1, 1, (NUM_LANDMARKS, 3)).astype(np.float32))
    models = {}
    for design, landmarks in (("replicated", None),
                              ("landmark", owned_landmarks(NUM_LANDMARKS, rank, world_size))):
        torch.manual_seed(0)
        encoder = drasclr.nn.Encoder(rep_dim=16, moco_dim=16, num_experts=2, backend="grouped")
        models[design] = DrasCLR(encoder, NUM_LANDMARKS, queue_size=6, momentum=0.5, shuffle_bn=shuffle_bn,
                                 generator=torch.Generator().manual_seed(1), bank_landmarks=landmarks)
    losses = {design: [] for design in models}
    for step in range(4):
        sizes = [5, 3] if step % 2 else [3, 4]  # uneven, as a landmark-sharded plan gives
        parts = [rng.choice(owned_landmarks(NUM_LANDMARKS, r, world_size), size)
                 for r, size in enumerate(sizes)]
        landmark = torch.from_numpy(parts[rank])
        n = len(landmark)
        views = torch.from_numpy(rng.standard_normal((sum(sizes), 3, 1, 32, 32, 32)).astype(np.float32))
        mine = views[sum(sizes[:rank]) : sum(sizes[: rank + 1])]
        for design, model in models.items():
            out = model(mine[:, 0], mine[:, 1], mine[:, 2:], coords[landmark], coords[landmark][:, None],
                        landmark, shuffle_generator=torch.Generator().manual_seed(step))
            losses[design].append(torch.stack(list(out)))
        # a gradient step, so the encoders move and the keys of later steps differ
        for model in models.values():
            with torch.no_grad():
                for p in model.encoder_q.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(step)))
        assert n == sizes[rank]
    torch.save({"losses": {d: torch.stack(v) for d, v in losses.items()},
                "replicated": models["replicated"].bank.state_dict(),
                "landmark": {**models["landmark"].bank.state_dict(),
                             "landmarks": models["landmark"].bank.landmarks}},
               Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("shuffle_bn", [True, False])
def test_sharded_bank_gives_the_replicated_losses_and_queues(tmp_path, shuffle_bn):
    run_processes(2, _both_designs, str(tmp_path), shuffle_bn)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for rank, state in enumerate(ranks):
        torch.testing.assert_close(state["losses"]["landmark"], state["losses"]["replicated"],
                                   rtol=1e-5, atol=1e-6)
        owned = owned_landmarks(NUM_LANDMARKS, rank, 2)
        sharded, replicated = state["landmark"], state["replicated"]
        # this process holds its landmarks' queues and nothing else
        assert sharded["landmarks"].tolist() == owned.tolist() and len(sharded["keys"]) == len(owned)
        torch.testing.assert_close(sharded["keys"], replicated["keys"][owned], rtol=1e-6, atol=1e-6)
        assert torch.equal(sharded["pointers"], replicated["pointers"][owned])
        assert torch.equal(replicated["keys"], ranks[0]["replicated"]["keys"])


# -- the plan --------------------------------------------------------------------------------
def _pairs(batches):
    return [(s, l) for b in batches for s, l in zip(b.subjects.tolist(), b.landmarks.tolist())]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_every_pair_once_per_epoch_on_its_owner(world_size):
    every_pair = sorted((s, l) for s in range(9) for l in range(11))
    pairs, steps = [], set()
    for rank in range(world_size):
        sampler = OwnedLandmarkBatchSampler(9, 11, 12, 3, seed=3, rank=rank, world_size=world_size)
        batches = list(sampler.batches(epoch=1))
        assert len(batches) == len(sampler) == 9
        assert all(np.all(b.landmarks % world_size == rank) for b in batches)
        pairs += _pairs(batches)
        steps.add(tuple(b.global_size for b in batches))
    assert sorted(pairs) == every_pair
    assert len(steps) == 1 and sum(next(iter(steps))) == 99  # every process agrees on the sizes


def test_epoch_continued_on_another_process_count_covers_every_pair_once():
    def sampler(rank, world_size):
        return OwnedLandmarkBatchSampler(9, 11, 12, 3, seed=3, rank=rank, world_size=world_size)

    done = _pairs(b for r in range(2) for b in list(sampler(r, 2).batches(1))[:4])
    segment = sampler(0, 3).resegment(1, sampler(0, 2).first_segment(), 4)
    rest = _pairs(b for r in range(3) for b in sampler(r, 3).batches(1, 4, segment))
    assert sorted(done + rest) == sorted((s, l) for s in range(9) for l in range(11))
    assert len(list(sampler(0, 3).batches(1, 4, segment))) == 9 - 4


def _expect_error(match, target, *args):
    with pytest.raises(ValueError, match=match):
        target(*args)


def test_more_processes_than_landmarks_is_a_clear_error(store, tmp_path):
    with pytest.raises(ValueError, match="9 processes but only 8 landmarks"):
        OwnedLandmarkBatchSampler(4, 8, 8, 2, rank=0, world_size=9)
    # from `drasclr.train` on every process, before any work
    run_processes(9, _expect_error, "9 processes but only 8 landmarks", train_and_record, *store,
                  str(tmp_path), 2)
    assert not (tmp_path / POINTER).exists()
    with pytest.raises(ValueError, match="fewer than 2 per batch"):
        list(OwnedLandmarkBatchSampler(4, 8, 8, 2, rank=0, world_size=8).batches(0))


# -- checkpoints -----------------------------------------------------------------------------
def test_each_process_holds_its_landmarks_and_writes_its_shard(two_process_run):
    shards = results(two_process_run, 2)
    for rank, shard in enumerate(shards):
        assert shard["landmarks"].tolist() == [rank, rank + 2, rank + 4, rank + 6]
        assert shard["keys"].shape == (4, TINY_SHARDED["queue_size"], TINY_SHARDED["moco_dim"])
        assert [h["step"] for h in shard["history"]] == [1, 2, 3, 4, 5]
    directory = last_checkpoint(two_process_run)
    assert directory.name == "step_00000005_epoch_0000"
    assert sorted(p.name for p in (directory / "bank").iterdir()) == [".metadata", "__0_0.distcp",
                                                                      "__1_0.distcp"]
    assert [p.name for p in (two_process_run / "checkpoints").iterdir()] == ["step_00000005_epoch_0000"]
    # the encoder loads on one process without the bank
    encoder = drasclr.load_encoder(shards[0]["checkpoint"])
    for name, tensor in encoder.state_dict().items():
        assert torch.equal(tensor, shards[0]["encoder_q"][name]), name


def _interrupted_save(*args, **kwargs):
    raise KeyboardInterrupt  # after this process's bank shard, before the pointer switch


@pytest.mark.parametrize("world_size", [1, 3])
def test_saved_on_two_resumes_on_other_counts_with_the_same_queues(store, two_process_run, tmp_path,
                                                                     world_size, monkeypatch):
    shutil.copytree(two_process_run, tmp_path, dirs_exist_ok=True)
    saved_keys, saved_pointers = global_bank(results(two_process_run, 2))
    # one more step: resharded by ownership, the epoch's plan continued on `world_size`
    if world_size == 1:
        # first a save that dies half-way: the previous checkpoint stays the one named
        with monkeypatch.context() as patch:
            patch.setattr("drasclr.pretrain.sharded_checkpoints.save_checkpoint", _interrupted_save)
            with pytest.raises(KeyboardInterrupt):
                train_and_record(*store, str(tmp_path), 6)
        assert (tmp_path / "checkpoints" / "step_00000006_epoch_0000" / "bank" / ".metadata").exists()
        assert last_checkpoint(tmp_path).name == "step_00000005_epoch_0000"
        train_and_record(*store, str(tmp_path), 6)
    else:
        run_processes(world_size, train_and_record, *store, str(tmp_path), 6)
    shards = results(tmp_path, world_size)
    for rank, shard in enumerate(shards):
        assert shard["landmarks"].tolist() == owned_landmarks(NUM_LANDMARKS, rank, world_size).tolist()
        assert [h["step"] for h in shard["history"]] == ([1, 2, 3, 4, 5, 6] if rank == 0 else [6])
    keys, pointers = global_bank(shards)
    queue_size = TINY_SHARDED["queue_size"]
    written = (pointers - saved_pointers) % queue_size  # keys step 6 put in each queue
    assert written.sum() > 0
    for landmark in range(NUM_LANDMARKS):  # every slot step 6 did not write is as saved
        slots = (saved_pointers[landmark] + torch.arange(queue_size)) % queue_size
        kept = slots[written[landmark]:]
        assert torch.equal(keys[landmark, kept], saved_keys[landmark, kept]), landmark
    assert last_checkpoint(tmp_path).name == "step_00000006_epoch_0000"


# -- torchrun --------------------------------------------------------------------------------
def torchrun(*args, **popen):
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], **popen)


def test_two_nodes_of_two_processes_over_loopback(store, tmp_path):
    # the rendezvous store is the test's, on a port the system picked: neither node hosts it
    rendezvous = rendezvous_store(2)
    nodes = [
        torchrun("--nnodes=2", f"--node-rank={node}", "--nproc-per-node=2", "--rdzv-backend=c10d",
                 f"--rdzv-endpoint=127.0.0.1:{rendezvous.port}", "--rdzv-id=sharded-test",
                 "--rdzv-conf=is_host=false", str(WORKER), *store, str(tmp_path), "2")
        for node in range(2)
    ]
    assert [node.wait(timeout=180) for node in nodes] == [0, 0]
    del rendezvous  # its server thread stops before run_processes forks below
    shards = results(tmp_path, 4)
    for rank, shard in enumerate(shards):  # a quarter of the bank each
        assert shard["landmarks"].tolist() == list(range(rank, NUM_LANDMARKS, 4))
    keys, pointers = global_bank(shards)
    assert pointers.sum() == 2 * 8  # two steps of 8 pairs, no queue wrapped yet
    assert last_checkpoint(tmp_path).name == "step_00000002_epoch_0000"
    # saved on 4, resumed on 2: each process reads its landmarks' queues from the 4 shards
    resumed = tmp_path / "on_two"
    shutil.copytree(tmp_path, resumed, ignore=shutil.ignore_patterns("result_rank*", "on_two"))
    run_processes(2, train_and_record, *store, str(resumed), 2)
    resumed_keys, resumed_pointers = global_bank(results(resumed, 2))
    assert torch.equal(resumed_keys, keys) and torch.equal(resumed_pointers, pointers)


def test_killed_worker_restarts_and_matches_the_uninterrupted_run(store, two_process_run, tmp_path):
    marker = tmp_path / "killed"
    launcher = torchrun("--standalone", "--nproc-per-node=2", "--max-restarts=1", str(WORKER), *store,
                        str(tmp_path / "run"), "5", "--kill-at=2", f"--marker={marker}")
    assert launcher.wait(timeout=240) == 0
    assert marker.exists()  # it did die once
    restarted, whole = results(tmp_path / "run", 2), results(two_process_run, 2)
    # resumed after step 2: rank 0 keeps the metrics rows of steps 1-2, nothing is repeated
    assert [h["step"] for h in restarted[0]["history"]] == [1, 2, 3, 4, 5]
    assert [h["step"] for h in restarted[1]["history"]] == [3, 4, 5]
    for rank, (a, b) in enumerate(zip(restarted, whole)):
        for name in ("keys", "pointers", "landmarks"):
            assert torch.equal(a[name], b[name]), name
        for name in a["encoder_q"]:
            # BatchNorm running statistics are per process and checkpointed from rank 0 (they do
            # not enter training, which normalises by batch statistics)
            if rank == 0 or not ("running" in name or "num_batches" in name):
                assert torch.equal(a["encoder_q"][name], b["encoder_q"][name]), (rank, name)
