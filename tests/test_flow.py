import numpy as np
import pytest
import skimage.data
import torch

from datasets.flow import consistent, dis_flow, video_flows


def shifted_pair(dx=3, dy=2):
    photo = np.asarray(skimage.data.astronaut())[100:260, 100:300]  # 160x200 real texture
    a = photo[10:130, 10:170]
    b = photo[10 - dy:130 - dy, 10 - dx:170 - dx]  # content moves by (+dx, +dy)
    return np.ascontiguousarray(a), np.ascontiguousarray(b)


def test_dis_recovers_a_known_shift():
    a, b = shifted_pair(3, 2)
    flow = dis_flow(a, b)
    inner = flow[15:-15, 15:-15]
    assert np.allclose(np.median(inner[..., 0]), 3, atol=0.3)
    assert np.allclose(np.median(inner[..., 1]), 2, atol=0.3)


def test_consistency_check_masks_inconsistent_flow():
    H, W = 20, 30
    forward = np.zeros((H, W, 2), np.float32)
    forward[..., 0] = 2.0
    backward = np.zeros((H, W, 2), np.float32)
    backward[..., 0] = -2.0
    backward[:, 20:, 0] = 5.0  # an occlusion: going back does not return
    ok = consistent(forward, backward)
    assert ok[:, :15].all()
    assert not ok[:, 20:].any()
    assert not ok[:, -2:].any()  # leaves the frame


def test_video_flows_shapes_and_cache(tmp_path):
    a, b = shifted_pair()
    frames = torch.from_numpy(np.stack([a, b, a])).permute(0, 3, 1, 2).float() / 255
    flows = video_flows(frames, cache_dir=tmp_path, progress=False)
    assert flows["forward"].shape == (2, 120, 160, 2) and flows["forward_ok"].dtype == torch.bool
    assert flows["forward_ok"].float().mean() > 0.5
    files = list(tmp_path.glob("flows_*.npz"))
    assert len(files) == 1
    again = video_flows(frames, cache_dir=tmp_path, progress=False)
    assert torch.equal(again["backward"], flows["backward"])


def test_flow_between_frames_further_apart_is_cached_separately(tmp_path):
    a, b = shifted_pair(2, 1)  # a -> b moves by (2, 1)
    photo = np.asarray(skimage.data.astronaut())[100:260, 100:300]
    c = np.ascontiguousarray(photo[11:131, 12:172])  # c -> a moves by (2, 1) too, so c -> b by (4, 2)
    frames = torch.from_numpy(np.stack([c, a, b])).permute(0, 3, 1, 2).float() / 255
    consecutive = video_flows(frames, cache_dir=tmp_path, progress=False)
    two_apart = video_flows(frames, cache_dir=tmp_path, progress=False, gap=2)
    assert consecutive["forward"].shape[0] == 2 and two_apart["forward"].shape == (1, 120, 160, 2)
    inner = two_apart["forward"][0, 20:-20, 20:-20]
    assert torch.allclose(inner.median(dim=0).values.median(dim=0).values, torch.tensor([4.0, 2.0]), atol=0.4)
    assert len(list(tmp_path.glob("flows_*.npz"))) == 2  # one file per gap
    with pytest.raises(ValueError, match="needs at least 4 frames"):
        video_flows(frames, progress=False, gap=3)
