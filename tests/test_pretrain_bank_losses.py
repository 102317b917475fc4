"""Memory bank and losses against plain Python / float64 formulas (Yu et al. 2023, eqs. 6 and 8)."""
import pytest
import torch
import torch.nn.functional as F

from drasclr.conv_common import LandmarkPartition
from drasclr.pretrain.losses import drasclr_loss, info_nce
from drasclr.pretrain.memory_bank import LandmarkMemoryBank


def _bank(num_landmarks=5, queue_size=6, dim=4, dtype=torch.float64, seed=0):
    bank = LandmarkMemoryBank(num_landmarks, queue_size, dim, generator=torch.Generator().manual_seed(seed))
    # float64 storage is not offered to users; tests compare against float64 formulas
    bank.keys = bank.keys.to(dtype)
    return bank


def test_initial_bank_is_unit_vectors():
    bank = LandmarkMemoryBank(3, 7, 16, generator=torch.Generator().manual_seed(1))
    assert bank.keys.shape == (3, 7, 16)
    torch.testing.assert_close(bank.keys.norm(dim=-1), torch.ones(3, 7))
    assert bank.keys.std() > 0.1 and torch.equal(bank.pointers, torch.zeros(3, dtype=torch.long))


def test_enqueue_matches_python_ring_buffers_with_wrap():
    gen = torch.Generator().manual_seed(2)
    num_landmarks, queue_size, dim = 4, 5, 3
    bank = _bank(num_landmarks, queue_size, dim)
    queues = bank.keys.clone().tolist()
    pointers = [0] * num_landmarks
    for _ in range(7):  # enough steps that every ring wraps several times
        n = int(torch.randint(1, 12, (1,), generator=gen))
        landmark = torch.randint(0, num_landmarks, (n,), generator=gen)
        if torch.bincount(landmark).max() > queue_size:
            continue
        keys = torch.randn(n, dim, generator=gen, dtype=torch.float64)
        bank.enqueue(keys, landmark)
        for key, l in zip(keys.tolist(), landmark.tolist()):
            queues[l][pointers[l]] = key
            pointers[l] = (pointers[l] + 1) % queue_size
        assert bank.pointers.tolist() == pointers
        torch.testing.assert_close(bank.keys, torch.tensor(queues, dtype=torch.float64), rtol=0, atol=0)


def test_enqueue_bfloat16_storage():
    bank = LandmarkMemoryBank(2, 4, 3, dtype=torch.bfloat16)
    keys = torch.randn(3, 3)
    bank.enqueue(keys, torch.tensor([1, 1, 0]))
    assert bank.keys.dtype == torch.bfloat16
    torch.testing.assert_close(bank.keys[1, :2].float(), keys[:2].to(torch.bfloat16).float())
    assert bank.pointers.tolist() == [1, 2]


def _batch(landmark, num_landmarks=5, dim=4, seed=3):
    gen = torch.Generator().manual_seed(seed)
    table = torch.rand(num_landmarks, 3, generator=gen, dtype=torch.float64) * 2 - 1
    loc = table[landmark]
    partition = LandmarkPartition.from_loc(loc, len(landmark))
    def unit(*shape):
        return F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)

    return partition, unit(len(landmark), dim), unit(len(landmark), dim), unit(len(landmark), 2, dim)


@pytest.mark.parametrize("landmark", [
    [3, 3, 1, 1, 0, 0],          # uniform groups (landmark-grouped batch), unsorted landmarks
    [4, 0, 4, 2, 4, 0, 1],       # uneven partition, interleaved
])
def test_negative_logits_use_only_own_landmark_queue(landmark):
    landmark = torch.tensor(landmark)
    bank = _bank()
    partition, query, _, _ = _batch(landmark)
    query.requires_grad_(True)
    logits = bank.negative_logits(query, landmark, partition)
    expected = torch.stack([bank.keys[l] @ q for q, l in zip(query, landmark.tolist())])
    torch.testing.assert_close(logits, expected)
    logits.sum().backward()  # gradient reaches the queries: sum over own queue
    torch.testing.assert_close(query.grad, bank.keys[landmark].sum(1))


def _reference_losses(query, key, neighbours, bank, landmark, temperature, beta, mode):
    """Direct float64 formulas, one sample at a time (the reference's einsums)."""
    local, neigh, local_hit, neigh_hit = [], [], [], []
    for i, l in enumerate(landmark.tolist()):
        queue = bank.keys[l]
        logits = torch.cat([(query[i] @ key[i])[None], queue @ query[i]]) / temperature
        local.append(-torch.log_softmax(logits, 0)[0])
        local_hit.append(float(logits.argmax() == 0))
        if mode == "sum":
            logits = torch.cat([(neighbours[i] @ key[i]).sum()[None], (queue @ neighbours[i].T).sum(1)])
            neigh.append(-torch.log_softmax(logits / temperature, 0)[0])
            neigh_hit.append(float(logits.argmax() == 0))
        else:
            for r in neighbours[i]:
                logits = torch.cat([(r @ key[i])[None], queue @ r]) / temperature
                neigh.append(-torch.log_softmax(logits, 0)[0])
                neigh_hit.append(float(logits.argmax() == 0))
    local, neigh = torch.stack(local).mean(), torch.stack(neigh).mean()
    return (local + beta * neigh, local, neigh, sum(local_hit) / len(local_hit),
            sum(neigh_hit) / len(neigh_hit))


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("landmark", [[2, 2, 0, 0, 4, 4], [1, 3, 1, 0, 3]])
def test_losses_match_float64_formula(mode, landmark):
    landmark = torch.tensor(landmark)
    bank = _bank(queue_size=9)
    partition, query, key, neighbours = _batch(landmark, seed=7)
    key = F.normalize(query + 0.3 * key, dim=-1)  # some positives win, some lose: top-1 is informative
    out = drasclr_loss(query, key, neighbours, bank, landmark, partition, temperature=0.2, beta=0.7,
                       neighbour_mode=mode)
    expected = _reference_losses(query, key, neighbours, bank, landmark, 0.2, 0.7, mode)
    for got, want in zip(out, expected):
        torch.testing.assert_close(got.double(), torch.as_tensor(want, dtype=torch.float64))


def test_info_nce_top1_and_value():
    positive = torch.tensor([2.0, -1.0])
    negatives = torch.tensor([[0.5, 1.0], [0.0, 3.0]])
    loss, top1 = info_nce(positive, negatives, temperature=0.5)
    logits = torch.tensor([[2.0, 0.5, 1.0], [-1.0, 0.0, 3.0]]) / 0.5
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.zeros(2, dtype=torch.long)))
    assert top1.item() == 0.5


def test_bad_neighbour_mode():
    landmark = torch.tensor([0, 0])
    partition, query, key, neighbours = _batch(landmark)
    with pytest.raises(ValueError, match="neighbour_mode"):
        drasclr_loss(query, key, neighbours, _bank(), landmark, partition, 0.2, neighbour_mode="max")


@pytest.mark.parametrize("splits", [1, 3])
def test_one_process_keys_get_statistics_of_random_sub_batches(splits):
    """Shuffled BN on one process: each key is what the key encoder gives inside its random
    sub-batch (its own BatchNorm statistics), returned in batch order; a float64 reference."""
    from drasclr.nn import Encoder
    from drasclr.pretrain.moco import DrasCLR

    torch.manual_seed(0)
    model = DrasCLR(Encoder(num_experts=2, backend="grouped"), 4, queue_size=16,
                    key_bn_splits=splits).double().train()
    batch = 9
    view_k = torch.randn(batch, 1, 32, 32, 32, dtype=torch.float64)
    landmark = torch.randint(0, 4, (batch,))
    loc = torch.rand(4, 3, dtype=torch.float64)[landmark] * 2 - 1
    partition = LandmarkPartition.from_loc(loc, batch)
    key, enqueued, enqueued_landmark = model._encode_keys(
        view_k, loc, landmark, partition, torch.Generator().manual_seed(5))

    whole = model.embed(model.encoder_k, view_k, partition)
    expected = torch.empty_like(whole)
    shuffle = torch.randperm(batch, generator=torch.Generator().manual_seed(5))
    for part in shuffle.tensor_split(splits):
        expected[part] = model.embed(model.encoder_k, view_k[part],
                                     LandmarkPartition.from_loc(loc[part], len(part)))
    torch.testing.assert_close(key, whole if splits == 1 else expected)
    assert splits == 1 or not torch.allclose(key, whole, rtol=1e-3, atol=0)
    assert enqueued is key and torch.equal(enqueued_landmark, landmark)


def test_key_sub_batches_need_two_samples_each():
    from drasclr.pretrain.config import TrainConfig

    config = TrainConfig(store="s", atlas="a", batch_size=16, landmarks_per_batch=4,
                         queue_size=64, key_bn_splits=9)
    with pytest.raises(ValueError, match="key_bn_splits 9"):
        config.validate()
    config.key_bn_splits = 8
    config.validate()
