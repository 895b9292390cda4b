"""Time a training step of the small-packages model on CUDA with each scan; print the fastest's name last."""
import sys
import time

import torch
from transformers import AutoModelForCausalLM

from trials.models.loading import use_scan
from trials.pretraining.pretrain import build_config, RECIPES

r = RECIPES["small-packages"]
best = None
for scan in ("torch", "mambapy"):
    torch.manual_seed(0)
    lm = use_scan(AutoModelForCausalLM.from_config(build_config(r["hidden"], r["layers"], r["state"])), scan).cuda()
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-3)
    x = torch.randint(3, 259, (r["batch"], r["length"]), device="cuda")
    for i in range(8):
        if i == 3:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        loss = lm(input_ids=x, labels=x, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / 5 * 1000
    print(f"scan {scan}: {ms:.1f} ms/step, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", file=sys.stderr)
    if best is None or ms < best[1]:
        best = (scan, ms)
    del lm, opt
    torch.cuda.empty_cache()
print(best[0])
