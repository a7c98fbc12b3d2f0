"""Issue 16: what `load("smollm2-135m")` (float32, CPU) costs and how fast it runs, one process, public API only.

    cd <a worktree of any commit> && PYTHONPATH=. python <this file> <tag>    # prints one line: RESULT {json}

Only the public API (load, generate, lora), so the same file measures an older checkout too (docs/benchmarks.md,
"GGUF-block linear (issue 16)": old and new worktrees alternated, twice). Reported: load time, peak RSS (the
process's, imports included) and RSS growth over load, the bytes of the model's distinct state tensors (before
issue 16 the kept blocks were outside the state dict), greedy decode tok/s (64-token prompt, 32 new tokens),
prefill tok/s (512 tokens), scoring tok/s (1024 tokens, fused loss, no grad), a Curie LoRA step's tok/s (512 tokens,
float32, AdamW) and the process's peak RSS after it; medians of 3.
"""
import json
import resource
import statistics
import sys
import time

import torch

import lora
from model import load
from model.generate import generate



def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20



def med(fn, n=3):
    ts = []
    for _ in range(n):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return statistics.median(ts)


torch.manual_seed(0)
base_rss = rss_mb()
t = time.perf_counter()
model, tok = load("smollm2-135m")
load_s = time.perf_counter() - t
out = {"tag": sys.argv[1], "load_s": load_s,
       "peak_load_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
       "rss_after_load_mb": rss_mb() - base_rss,
       "held_mb": sum({t.data_ptr(): t.nbytes for t in model.state_dict().values()}.values()) / 2**20}
prompt = torch.randint(100, 40000, (64,)).tolist()
list(generate(model, prompt, 4))
out["decode_tok_s"] = 32 / med(lambda: list(generate(model, prompt, 32)))
long = torch.randint(100, 40000, (1, 512))
with torch.no_grad():
    model.prefill(long, model.make_cache(1, max_tokens=512))
    out["prefill_tok_s"] = 512 / med(lambda: model.prefill(long, model.make_cache(1, max_tokens=512)))
    doc = torch.randint(100, 40000, (1, 1025))
    model(doc[:, :-1], targets=doc[:, 1:])
    out["score_tok_s"] = 1024 / med(lambda: model(doc[:, :-1], targets=doc[:, 1:]))
out["rss_after_inference_mb"] = rss_mb() - base_rss
lora.inject_lora(model, lora.LoRAConfig.curie())
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
x = torch.randint(100, 40000, (1, 513))


def step():
    loss = model(x[:, :-1], targets=x[:, 1:]); loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)


step()
out["train_tok_s"] = 512 / med(step)
out["peak_all_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out["load_avg"] = open("/proc/loadavg").read().split()[0]
print("RESULT " + json.dumps(out), flush=True)
