import pytest
import torch

from models.generator import Generator, split_edit_layer


@pytest.mark.parametrize("size", [(97, 131), (341, 512), (130, 72)])
def test_any_size_in_same_size_out_alpha_in_unit_range(size):
    torch.manual_seed(0)
    g = Generator()
    out = g(torch.rand(1, 3, *size))
    colour, alpha = split_edit_layer(out)
    assert out.shape == (1, 4, *size)
    assert colour.shape == (1, 3, *size) and alpha.shape == (1, 1, *size)
    assert out.min() >= 0 and out.max() <= 1


def test_architecture_follows_the_config():
    g = Generator(num_scales=3, skip_n33d=16, skip_n33u=8, skip_n11=2)
    assert len(g.downs) == 3 and len(g.ups) == 3
    assert g.downs[0].body[0].conv.out_channels == 16
    assert g.skips[0].conv.out_channels == 2 and g.skips[0].conv.kernel_size == (1, 1)
    assert g.ups[-1].conv3.conv.in_channels == 8 + 2 and g.head.out_channels == 4
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in g.modules())
    assert any(isinstance(m, torch.nn.LeakyReLU) for m in g.modules())


def test_gradients_reach_every_parameter():
    g = Generator(num_scales=3, skip_n33d=8, skip_n33u=8)
    g(torch.rand(1, 3, 40, 56)).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in g.parameters())


def test_too_small_input_is_a_clear_error():
    with pytest.raises(ValueError, match="too small for num_scales"):
        Generator(num_scales=7)(torch.rand(1, 3, 16, 16))
