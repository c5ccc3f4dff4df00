"""The diffusers/PyTorch side of `cargo xtask bench` (see xtask/src/bench.rs).

Runs one benchmark item and prints one JSON object on the last line of stdout, with the same
fields the Rust side reports. Run by the bench with the pinned reference environment
(tests/fixtures/requirements.txt); by hand:

    python xtask/bench/reference.py unet --steps 3 --threads 2 \
        --config configs/stable-diffusion-v1-5/unet/config.json

Items: `matmul` (a 4096³ f32 product), `unet` (one SD 1.5 U-Net step at 512×512, batch 2,
random weights), `small` (one step of the tiny SD 1.x U-Net of `xtask/bench/small-sd` on 32×32
latents, batch 2), `vae` (an SD 1.5 VAE decode at 512×512, batch 1, random weights), `load`
(`UNet2DConditionModel.from_pretrained` of a folder the bench wrote, with diffusers'
default `low_cpu_mem_usage`), `train-unet` and `train-vae` (one training step of the shapes
recipes, configs/train/shapes/: forward, loss, backward, `clip_grad_norm_(1.0)` and
`torch.optim.AdamW(lr=1e-3, weight_decay=1e-2)` on random data of the recipes' shapes, as
xtask/src/bench/train.rs does on ltd's side).

Peak memory is the process's peak resident set (`VmHWM`), reset just before the measured
part by writing 5 to /proc/self/clear_refs (Linux), exactly as the Rust side does.
"""

import argparse
import json
import os
import statistics
import sys
import time


def status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return None


def mib(kib):
    return None if kib is None else kib / 1024.0


def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def cpu_seconds():
    t = os.times()
    return t.user + t.system


def timed(fn, warmup, steps):
    """Runs `fn` `warmup` times, then `steps` times; returns per-run wall and CPU seconds."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), cpu_seconds()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(cpu_seconds() - c0)
    return wall, cpu


def result(item, wall, cpu, base_kib, **extra):
    import torch

    out = {
        "item": item,
        "implementation": "diffusers",
        "wall_s": wall,
        "cpu_s": cpu,
        "median_wall_s": statistics.median(wall),
        "median_cpu_s": statistics.median(cpu),
        "base_rss_mib": mib(base_kib),
        "peak_rss_mib": mib(status_kib("VmHWM:")),
        "threads": torch.get_num_threads(),
        "versions": version_info(),
    }
    out.update(extra)
    return out


def version_info():
    import torch

    info = {"torch": torch.__version__, "python": sys.version.split()[0]}
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    return info


def random_latents(shape, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g)


def torch_dtype(args):
    """The precision `--dtype` names: the weights drawn in f32, then rounded once."""
    import torch

    return {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]


def run_matmul(args):
    import torch

    n = 4096
    a, b = random_latents((n, n), 0), random_latents((n, n), 1)
    base = status_kib("VmRSS:")
    reset_peak()
    wall, cpu = timed(lambda: a @ b, args.warmup, args.steps)
    return result("matmul", wall, cpu, base)


def run_unet(args, item="unet", latent=64):
    import torch
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(os.path.dirname(args.config))
    torch.manual_seed(0)
    dtype = torch_dtype(args)
    unet = UNet2DConditionModel.from_config(config).eval().to(dtype)
    x = random_latents((2, config["in_channels"], latent, latent), 1).to(dtype)
    ctx = random_latents((2, 77, config["cross_attention_dim"]), 2).to(dtype)
    t = torch.tensor([981.0])
    base = status_kib("VmRSS:")
    reset_peak()
    with torch.no_grad():
        wall, cpu = timed(lambda: unet(x, t, encoder_hidden_states=ctx).sample, args.warmup, args.steps)
    return result(item, wall, cpu, base)


def run_small(args):
    """One step of the tiny SD 1.x U-Net (xtask/bench/small-sd) on 32×32 latents, batch 2."""
    return run_unet(args, "small", 32)


def run_vae(args):
    import torch
    from diffusers import AutoencoderKL

    config = AutoencoderKL.load_config(os.path.dirname(args.config))
    torch.manual_seed(0)
    dtype = torch_dtype(args)
    vae = AutoencoderKL.from_config(config).eval().to(dtype)
    z = random_latents((1, config["latent_channels"], 64, 64), 1).to(dtype)
    base = status_kib("VmRSS:")
    reset_peak()
    with torch.no_grad():
        wall, cpu = timed(lambda: vae.decode(z).sample, args.warmup, args.steps)
    return result("vae", wall, cpu, base)


def run_load(args):
    import torch
    import diffusers
    from diffusers import UNet2DConditionModel
    from diffusers.models import modeling_utils

    # Import everything first so that only the load itself is measured.
    base = status_kib("VmRSS:")
    reset_peak()
    t0, c0 = time.perf_counter(), cpu_seconds()
    unet = UNet2DConditionModel.from_pretrained(args.model_dir)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    params = sum(p.numel() for p in unet.parameters())
    default = modeling_utils._LOW_CPU_MEM_USAGE_DEFAULT
    low_cpu = default and diffusers.utils.is_accelerate_available()
    return result("load", [wall], [cpu], base, parameters=params, low_cpu_mem_usage=low_cpu)


def train_step(loss_fn, params, opt):
    import torch

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.item()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    return step


def read_config(path):
    with open(path) as f:
        return json.load(f)


def run_train_unet(args):
    import torch
    from diffusers import UNet2DConditionModel

    config = read_config(args.config)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config).train()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    c, b = config["in_channels"], 16
    noisy = random_latents((b, c, 8, 8), 1)
    target = random_latents((b, c, 8, 8), 2)
    ctx = random_latents((b, 77, config["cross_attention_dim"]), 3)
    t = torch.tensor([float(i * 61 % 1000) for i in range(b)])

    def loss_fn():
        pred = unet(noisy, t, encoder_hidden_states=ctx).sample
        return torch.nn.functional.mse_loss(pred, target)

    base = status_kib("VmRSS:")
    reset_peak()
    wall, cpu = timed(train_step(loss_fn, params, opt), args.warmup, args.steps)
    n = sum(p.numel() for p in params)
    return result("train-unet", wall, cpu, base, parameters=n)


def run_train_vae(args):
    import torch
    from diffusers import AutoencoderKL

    config = read_config(args.config)
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(config).train()
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    b, size = 16, 32
    g = torch.Generator().manual_seed(1)
    x = torch.rand((b, 3, size, size), generator=g) * 2 - 1
    w = torch.ones((b, 1, size, size))
    w[:, :, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 8.0
    factor = 2 ** (len(config["block_out_channels"]) - 1)
    noise = random_latents((b, config["latent_channels"], size // factor, size // factor), 2)
    elems = 3 * size * size

    def loss_fn():
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * noise
        diff = vae.decode(z).sample - x
        l1 = (diff.abs() * w).mean()
        mse = (diff.square() * w).mean()
        kl = post.kl().mean()
        return l1 + mse + kl * (1e-6 / elems)

    base = status_kib("VmRSS:")
    reset_peak()
    wall, cpu = timed(train_step(loss_fn, params, opt), args.warmup, args.steps)
    n = sum(p.numel() for p in params)
    return result("train-vae", wall, cpu, base, parameters=n)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("item", choices=["matmul", "unet", "vae", "load", "small", "train-unet", "train-vae"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument(
        "--dtype",
        choices=["f32", "bf16"],
        default="f32",
        help="precision of the unet, vae and small items: the model and its inputs in it",
    )
    p.add_argument("--config", help="config.json of the U-Net or VAE (unet, vae, train-unet, train-vae)")
    p.add_argument("--model-dir", help="the folder to load (load)")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    run = {
        "matmul": run_matmul,
        "unet": run_unet,
        "vae": run_vae,
        "load": run_load,
        "small": run_small,
        "train-unet": run_train_unet,
        "train-vae": run_train_vae,
    }[args.item]
    print(json.dumps(run(args)))


if __name__ == "__main__":
    main()
