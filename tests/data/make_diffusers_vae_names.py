"""Writes diffusers_vae21_names.json: the state-dict names and shapes of diffusers'
`AutoencoderKLWan` for a few small configurations, so that the tests of
runtime/vae_diffusers.py run without diffusers installed.

    python tests/data/make_diffusers_vae_names.py   # needs diffusers (not a wanrt dependency)

Each Wan 2.1 structure (dim_mult, num_res_blocks, temperal_downsample) is written at
several base widths; one Wan 2.2 (is_residual) model is written for the refusal test.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

OUT = Path(__file__).with_name("diffusers_vae21_names.json")
WAN21 = [  # (config, base widths); the first is the real Wan 2.1 VAE's structure (base_dim 96). The
    # time stride stays 4: the official encoder and diffusers cut videos into 4-frame chunks
    (dict(z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True]), [8, 12, 96]),
    (dict(z_dim=16, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[True, True]), [8, 12]),
    (dict(z_dim=16, dim_mult=[1, 2, 2, 4], num_res_blocks=3, temperal_downsample=[True, True, False]), [8, 12]),
]
WAN22 = dict(base_dim=8, decoder_base_dim=12, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
             temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12, patch_size=2)


def shapes(**config) -> dict[str, list[int]]:
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        model = AutoencoderKLWan(attn_scales=[], **config)
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def main() -> int:
    try:
        import diffusers
    except ImportError:
        print("diffusers is not installed; nothing written (the committed fixture stays as it is)")
        return 0
    models = []
    for config, dims in WAN21:
        per_dim = [shapes(base_dim=d, **config) for d in dims]
        assert all(list(s) == list(per_dim[0]) for s in per_dim), "names must not depend on the width"
        models.append({"config": config, "base_dims": dims,
                       "tensors": {k: [s[k] for s in per_dim] for k in per_dim[0]}})
    wan22 = {"config": WAN22, "tensors": shapes(**WAN22)}
    lines = [f'{{"diffusers_version": {json.dumps(diffusers.__version__)},', ' "wan21": [']
    for i, m in enumerate(models):
        lines.append(f'  {{"config": {json.dumps(m["config"])}, "base_dims": {json.dumps(m["base_dims"])}, "tensors": {{')
        lines += [f'   {json.dumps(k)}: {json.dumps(v)}{"," if j < len(m["tensors"]) - 1 else ""}'
                  for j, (k, v) in enumerate(m["tensors"].items())]
        lines.append("  }}" + ("," if i < len(models) - 1 else ""))
    lines.append(" ],")
    lines.append(f' "wan22": {{"config": {json.dumps(wan22["config"])}, "tensors": {{')
    lines += [f'   {json.dumps(k)}: {json.dumps(v)}{"," if j < len(wan22["tensors"]) - 1 else ""}'
              for j, (k, v) in enumerate(wan22["tensors"].items())]
    lines.append(" }}")
    lines.append("}")
    text = "\n".join(lines) + "\n"
    json.loads(text)
    tmp = OUT.with_suffix(".json.tmp")
    tmp.write_text(text)
    tmp.replace(OUT)
    print(f"wrote {OUT} ({len(text)} bytes, {len(models)} Wan 2.1 structures + one Wan 2.2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
