import math

import numpy as np

from wanexp.evaluate.fidelity import video_psnr_ssim


def test_identical_videos_score_ssim_exactly_one_even_when_nearly_flat():
    """A BF16 run against its BF16 twin: torchmetrics alone gives 0.99996 on near-flat frames."""
    flat = np.full((5, 64, 64, 3), 90, dtype=np.uint8)  # torchmetrics: 0.99998 on this one
    assert video_psnr_ssim(flat, flat.copy()) == (math.inf, 1.0)
    other = flat.copy()
    other[0, 0, 0, 0] += 40
    psnr, ssim = video_psnr_ssim(flat, other)
    assert math.isfinite(psnr) and ssim < 1.0
