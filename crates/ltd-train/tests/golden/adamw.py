"""Golden values for ltd-train's AdamW and gradient clipping (tests/optim.rs).

Run with the reference environment: /root/venvs/ref/bin/python adamw.py > adamw.json
"""
import json

import torch

p = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0, 0.0, 3.0]))
config = {"lr": 0.1, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}
opt = torch.optim.AdamW([p], lr=config["lr"], betas=tuple(config["betas"]), eps=config["eps"],
                        weight_decay=config["weight_decay"])
grads = [[0.1, -0.2, 0.3, 0.0, 1.0], [1.0, 2.0, -3.0, 0.5, 0.0], [-0.5, 0.25, 0.125, 2.0, -1.0]]
params = []
for g in grads:
    p.grad = torch.tensor(g)
    opt.step()
    params.append(p.detach().tolist())
state = opt.state[p]

a = torch.nn.Parameter(torch.zeros(3))
b = torch.nn.Parameter(torch.zeros(2))
a.grad = torch.tensor([3.0, 0.0, 4.0])
b.grad = torch.tensor([0.0, 12.0])
norm = torch.nn.utils.clip_grad_norm_([a, b], 1.0)

print(json.dumps({
    "torch": torch.__version__,
    "config": config,
    "initial": [0.5, -1.0, 2.0, 0.0, 3.0],
    "grads": grads,
    "params": params,
    "exp_avg": state["exp_avg"].tolist(),
    "exp_avg_sq": state["exp_avg_sq"].tolist(),
    "clip": {"grads": [[3.0, 0.0, 4.0], [0.0, 12.0]], "max_norm": 1.0, "norm": norm.item(),
             "clipped": [a.grad.tolist(), b.grad.tolist()]},
}, indent=1))
