"""DP-SGD under torch.distributed (gloo, 2 CPU processes): noise once, same weights, same update."""

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from privimage import distributed
from privimage.privacy.dpsgd import DPSGD
from privimage.privacy.noise import GaussianNoise

WORLD = 2
DIM = 100  # a DIM×DIM linear map: 10,000 noisy coordinates per update
CLIP, SIGMA, BATCH = 1.0, 2.0, 8.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _squared_error(forward, x, y):
    return (forward(x) - y).square().mean(dim=1)


def _zero_gradient(forward, x, y):
    return (forward(x) * 0).sum(dim=1)


def _engine(model, loss_fn, sigma, seed):
    return DPSGD(model, loss_fn, clip_norm=CLIP, noise_multiplier=sigma, expected_batch_size=BATCH,
                 max_physical_batch=4, loss_weight=0.0, noise=GaussianNoise(seed=seed))


def _data():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(8, DIM, generator=generator), torch.randn(8, DIM, generator=generator)


def _worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    x, y = _data()
    results = {}
    # 1. Without noise, two ranks with half a batch each make the single-process update on the whole batch.
    model = nn.Linear(DIM, DIM, bias=False)
    nn.init.constant_(model.weight, 0.01)
    _engine(model, _squared_error, 0.0, seed=rank).step(distributed.shard(x), distributed.shard(y),
                                                        torch.optim.SGD(model.parameters(), lr=1.0))
    results["exact"] = model.weight.detach().clone()
    # 2. With zero gradients the update is the noise alone: its variance tells how often it was added.
    model = nn.Linear(DIM, DIM, bias=False)
    nn.init.zeros_(model.weight)
    _engine(model, _zero_gradient, SIGMA, seed=100 + rank).step(distributed.shard(x), distributed.shard(y),
                                                                torch.optim.SGD(model.parameters(), lr=1.0))
    results["noisy"] = model.weight.detach().clone()
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, results)
    if rank == 0:
        torch.save(gathered, out)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp") / "results.pt")
    mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    return torch.load(out)


def test_every_rank_holds_the_same_weights_after_a_step(two_ranks):
    for key in ("exact", "noisy"):
        assert torch.equal(two_ranks[0][key], two_ranks[1][key]), key


def test_sharded_update_equals_the_single_process_update(two_ranks):
    x, y = _data()
    model = nn.Linear(DIM, DIM, bias=False)
    nn.init.constant_(model.weight, 0.01)
    _engine(model, _squared_error, 0.0, seed=0).step(x, y, torch.optim.SGD(model.parameters(), lr=1.0))
    torch.testing.assert_close(two_ranks[0]["exact"], model.weight.detach(), rtol=1e-5, atol=1e-7)


def test_noise_is_added_exactly_once_for_the_global_batch(two_ranks):
    update = two_ranks[0]["noisy"].flatten().double()
    expected = (SIGMA * CLIP / BATCH) ** 2  # once; twice would double it, never would make it 0
    ratio = update.var().item() / expected
    # 10,000 coordinates: the variance estimate has a relative standard error of sqrt(2/10,000) = 1.4 %.
    assert abs(ratio - 1) < 6 * math.sqrt(2 / update.numel()), ratio
    assert abs(update.mean().item()) < 6 * math.sqrt(expected / update.numel())
