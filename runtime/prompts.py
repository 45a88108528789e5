"""Prompts the pipeline supplies when the user gives none.

The default negative prompt is the official one (`sample_neg_prompt` in
wan/configs/shared_config.py of github.com/Wan-Video/Wan2.2), used by every Wan 2.2 A14B
pipeline when the negative prompt is empty. Roughly: garish colours, overexposed, static,
blurry details, subtitles, style, artwork, painting, still frame, greyish, worst quality,
low quality, JPEG artefacts, ugly, mutilated, extra fingers, badly drawn hands and faces,
deformed, disfigured, malformed limbs, fused fingers, motionless frames, cluttered
background, three legs, crowded background, walking backwards.
"""
from __future__ import annotations

DEFAULT_NEGATIVE_PROMPT = (
    '色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走'
)
