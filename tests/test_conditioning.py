"""The I2V condition y = mask ⊕ VAE latent, for one image and for first + last frame."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from runtime.conditioning import condition_video, frame_mask, image_condition, latent_frames


def official_mask(frames: int, lat_h: int, lat_w: int, last_frame: bool) -> torch.Tensor:
    """The official construction, op for op (wan/image2video.py; with a last frame
    Wan 2.1's wan/first_last_frame2video.py, there with 81 in place of F)."""
    msk = torch.ones(1, frames, lat_h, lat_w)
    if last_frame:
        msk[:, 1:-1] = 0
    else:
        msk[:, 1:] = 0
    msk = torch.concat([torch.repeat_interleave(msk[:, 0:1], repeats=4, dim=1), msk[:, 1:]], dim=1)
    msk = msk.view(1, msk.shape[1] // 4, 4, lat_h, lat_w)
    return msk.transpose(1, 2)[0]


@pytest.mark.golden
def test_mask_matches_the_golden_run(golden):
    trace = load_file(golden / "pipeline" / "trace.safetensors")
    mask = trace["mask"]
    _, f_lat, lat_h, lat_w = mask.shape
    frames = 4 * (f_lat - 1) + 1
    assert torch.equal(frame_mask(frames, lat_h, lat_w), mask)
    assert torch.equal(trace["y"][:4], mask)


@pytest.mark.parametrize("frames,last", [(1, False), (5, False), (21, False), (81, False),
                                         (5, True), (9, True), (21, True), (81, True)])
def test_mask_matches_the_official_construction(frames, last):
    got = frame_mask(frames, 3, 5, last_frame=last)
    assert got.shape == (4, latent_frames(frames), 3, 5)
    assert torch.equal(got, official_mask(frames, 3, 5, last))


def test_flf2v_mask_marks_only_the_last_pixel_frame_of_the_last_latent_frame():
    m = frame_mask(9, 2, 2, last_frame=True)[:, :, 0, 0]  # [4, F_lat]
    assert m[:, 0].tolist() == [1, 1, 1, 1]
    assert m[:, 1].tolist() == [0, 0, 0, 0]
    assert m[:, -1].tolist() == [0, 0, 0, 1]  # channel k of latent frame j = pixel frame 4j + k - 3


def test_condition_video_layout():
    first, last = torch.randn(3, 16, 24), torch.randn(3, 16, 24)
    v = condition_video(first, 9)
    assert v.shape == (3, 9, 16, 24)
    assert torch.equal(v[:, 0], first) and not v[:, 1:].any()
    v = condition_video(first, 9, last)
    assert torch.equal(v[:, 0], first) and torch.equal(v[:, -1], last) and not v[:, 1:-1].any()


class RecordingVAE:
    """Stands in for the VAE: records each encode call and returns a latent of the right shape."""

    def __init__(self):
        self.calls = []

    def encode(self, videos):
        self.calls.append([v.clone() for v in videos])
        out = []
        for v in videos:
            _, f, h, w = v.shape
            out.append(torch.full((16, (f - 1) // 4 + 1, h // 8, w // 8), 7.0))
        return out


def test_image_condition_encodes_the_whole_video_in_one_call():
    vae = RecordingVAE()
    first, last = torch.randn(3, 32, 48), torch.randn(3, 32, 48)
    y = image_condition(vae, first, 13, last)
    assert len(vae.calls) == 1 and len(vae.calls[0]) == 1
    video = vae.calls[0][0]
    assert video.shape == (3, 13, 32, 48)
    assert torch.equal(video[:, 0], first) and torch.equal(video[:, -1], last) and not video[:, 1:-1].any()
    assert y.shape == (20, 4, 4, 6)
    assert torch.equal(y[:4], frame_mask(13, 4, 6, last_frame=True))
    assert (y[4:] == 7).all()


def test_refusals():
    with pytest.raises(ValueError, match="4n \\+ 1"):
        frame_mask(8, 2, 2)
    with pytest.raises(ValueError, match="last frame has shape"):
        condition_video(torch.zeros(3, 16, 16), 9, torch.zeros(3, 16, 32))
    with pytest.raises(ValueError, match="at least 5 frames"):
        condition_video(torch.zeros(3, 16, 16), 1, torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="\\[3, h, w\\]"):
        condition_video(torch.zeros(16, 16), 5)
