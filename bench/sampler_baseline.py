"""The sampling loop as plain eager PyTorch, for side-by-side timing against `ssb_fast.sampler.Sampler`.

I2SB's ddpm_sampling with classifier-free guidance written the straightforward way: every step builds
the network input with torch.cat and runs two forward passes, conditional and unconditional, whatever
the guidance (no shared first step, no half skipped), then applies guidance, x0̂, clamp and the
posterior as separate ops and draws noise with torch.randn. On CUDA it runs under bf16 autocast, the
way such loops are usually run. This is the benchmarks' baseline; the library never uses it.
"""

from __future__ import annotations

import torch

from ssb_fast.bridge import Bridge


@torch.inference_mode()
def eager_cfg_sampling(net, bridge: Bridge, scans: torch.Tensor, n_samples: int, nfe: int, guidance: float,
                       n_labels: int, max_batch: int = 32, generator: torch.Generator | None = None) -> torch.Tensor:
    """(S, N, H, W) uint8 masks from the eager loop, chunked like the Sampler."""
    steps = bridge.step_indices(nfe)
    n_scans, _, height, width = scans.shape
    masks = torch.zeros(n_scans, n_samples, height, width, dtype=torch.uint8)
    flat = [(s, i) for s in range(n_scans) for i in range(n_samples)]
    null = n_labels
    for start in range(0, len(flat), max_batch):
        chunk = flat[start:start + max_batch]
        scan = scans[[s for s, _ in chunk]]
        labels = torch.tensor([i % n_labels for _, i in chunk], device=scans.device)
        x = scan[:, :1].clone()
        batch = len(chunk)
        for prev, n in zip(steps[::-1][1:], steps[::-1][:-1]):
            inp = torch.cat([x, scan], dim=1)
            t = bridge.time_input(torch.full((batch,), n, device=scans.device))
            with torch.autocast(scans.device.type, dtype=torch.bfloat16, enabled=scans.device.type == "cuda"):
                cond = net(inp, t, labels).float()
                uncond = net(inp, t, torch.full_like(labels, null)).float()
            guided = uncond + guidance * (cond - uncond)
            x0 = bridge.compute_pred_x0(n, x, guided, clamp=True)
            mu_x0, mu_xn, std = bridge.posterior_coefs(prev, n)
            x = mu_x0 * x0 + mu_xn * x
            if prev > 0:
                x = x + std * torch.randn(x.shape, generator=generator, device=x.device)
        for (s, i), m in zip(chunk, (x0[:, 0] > 0).to(torch.uint8).cpu()):
            masks[s, i] = m
    return masks
