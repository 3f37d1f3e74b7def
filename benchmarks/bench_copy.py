"""The reference bandwidth: a device-to-device copy (bytes read + written)."""

import torch


def test_copy_bandwidth(measure):
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    measure(lambda: dst.copy_(src), 2 * src.numel(), rounds=20)
