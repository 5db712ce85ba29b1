"""FastMADGRAD: the madgrad package's arithmetic and state, in multi-tensor operations."""

import copy

import madgrad
import pytest
import torch

from training.optim import FastMADGRAD


def small_net(device="cpu"):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.LeakyReLU(),
                               torch.nn.Conv2d(8, 4, 3)).to(device)


def train(net, optimizer, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    device = next(net.parameters()).device
    for _ in range(steps):
        optimizer.zero_grad()
        net(torch.randn(2, 3, 12, 12, generator=gen).to(device)).square().mean().backward()
        optimizer.step()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_the_same_parameters_up_to_rounding():
    settings = dict(lr=0.0025, momentum=0.9, weight_decay=0.01)
    package, ours = small_net("cuda"), small_net("cuda")
    train(package, madgrad.MADGRAD(package.parameters(), **settings), 15)
    train(ours, FastMADGRAD(ours.parameters(), **settings), 15)
    for a, b in zip(package.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("settings", [dict(lr=0.0025, momentum=0.9, weight_decay=0.01), dict(lr=0.01, momentum=0.5),
                                      dict(lr=0.01, momentum=0.0, weight_decay=0.01)])
def test_the_same_parameters_as_the_madgrad_package(settings):
    package, ours = small_net(), small_net()
    train(package, madgrad.MADGRAD(package.parameters(), **settings), 15)
    train(ours, FastMADGRAD(ours.parameters(), **settings), 15)
    for a, b, start in zip(package.parameters(), ours.parameters(), small_net().parameters()):
        assert torch.equal(a, b) and not torch.equal(a, start)  # the same values, and they moved


def test_checkpoints_move_between_the_package_and_ours():
    settings = dict(lr=0.0025, momentum=0.9, weight_decay=0.01)
    reference = small_net()
    train(reference, madgrad.MADGRAD(reference.parameters(), **settings), 10)

    first = small_net()  # 5 steps with the package, then 5 with ours from its state
    opt = madgrad.MADGRAD(first.parameters(), **settings)
    train(first, opt, 5)
    second = copy.deepcopy(first)
    fast = FastMADGRAD(second.parameters(), **settings)
    fast.load_state_dict(opt.state_dict())
    gen_state = torch.Generator().manual_seed(1)
    for _ in range(5):  # the same inputs the reference saw in its steps 6-10
        torch.randn(2, 3, 12, 12, generator=gen_state)
    for _ in range(5):
        fast.zero_grad()
        second(torch.randn(2, 3, 12, 12, generator=gen_state)).square().mean().backward()
        fast.step()
    for a, b in zip(reference.parameters(), second.parameters()):
        assert torch.equal(a, b)
    back = madgrad.MADGRAD(small_net().parameters(), **settings)
    back.load_state_dict(fast.state_dict())  # and ours loads into the package
    assert int(back.state_dict()["state"]["k"]) == 10
