"""The GPU check: ltd-gen on CUDA against the CPU goldens and against diffusers on the same GPU.

Run by `xtask/gpu/check.sh` on the lent GPU machine (no Rust toolchain, no network: the binary
and the diffusers wheels come in `.gpu/`, see `cargo xtask build-cuda`). Three parts, each
written to `<out>/gpu-check.json` as soon as it is done (a run cut short still reports what it
finished):

  parity-f32   every case of tests/fixtures/golden/e2e/cases.json through `ltd-gen --device
               cuda --dtype f32`, PSNR against diffusers' CPU float32 PNG: must be >= 50 dB, the
               CPU parity test's bound.
  parity-half  every case of tests/fixtures/golden/half_pipeline/cases.json through `ltd-gen
               --dtype f16|bf16` on CUDA, against diffusers run in that dtype on the same GPU
               (made here by the fixture section's own code): must be >= 40 dB. Also reported:
               the PSNR against diffusers' CPU half-precision PNG.
  speed        random-weight SD 1.5 (512², batch 1, guidance: U-Net batch 2) and SDXL (1024²)
               built by diffusers from configs/, saved in float16: per step (U-Net + guidance +
               sampler), VAE decode, a 50-step DPM++ 2M image and peak GPU memory, ltd-gen
               (every binary in .gpu/) and diffusers fp16 side by side, medians of repeats.
               diffusers' pure U-Net step is reported too.

ltd's per-step time is (t(50 steps) - t(2 steps)) / 48 of its own denoise timings, which end
with a device synchronisation; peak GPU memory is the largest `used_memory` nvidia-smi shows
for the process (CUDA context included), sampled every 20 ms, for both sides.

A dry run on the CPU (`--device cpu --dry-run`) runs a few parity cases and the speed part on
the tiny fixture pipelines, to check the script itself where no GPU is.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
sys.path.insert(0, str(FIXTURES))

F32_MIN_DB = 50.0
HALF_MIN_DB = 40.0
RESULTS: dict = {}


def log(msg):
    print(msg, flush=True)


def save(out: Path):
    (out / "gpu-check.json").write_text(json.dumps(RESULTS, indent=2, default=str))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("-inf")
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def rgb(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


class GpuMemory:
    """Peak `used_memory` (MiB) nvidia-smi reports for one process, sampled in a thread."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, None, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        if shutil.which("nvidia-smi"):
            self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                text = subprocess.run(
                    ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                    capture_output=True, text=True, timeout=5,
                ).stdout
                for line in text.splitlines():
                    pid, used = [s.strip() for s in line.split(",")[:2]]
                    if int(pid) == self.pid:
                        self.peak = max(self.peak or 0, int(used))
            except (OSError, ValueError, subprocess.SubprocessError):
                pass
            self._stop.wait(0.02)

    def stop(self):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        return self.peak


def ltd_gen(binary, args, timeout=600):
    """Runs ltd-gen with `--json`; returns (ok, summary or stderr, peak GPU MiB)."""
    proc = subprocess.Popen([str(binary), *args, "--json", "--quiet"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    mem = GpuMemory(proc.pid)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    peak = mem.stop()
    if proc.returncode != 0:
        return False, stderr.strip()[-2000:], peak
    return True, json.loads(stdout), peak


def case_args(case, out: Path):
    """ltd-gen's command line for an e2e-style case (as crates/ltd-cli/tests/parity.rs builds it)."""
    args = [case["prompt"]]
    if case["pipeline"] != "default":
        args += ["--model", str(FIXTURES / "pipelines" / case["pipeline"])]
    args += ["--seed", str(case["seed"]), "--steps", str(case["steps"]), "--guidance", str(case["guidance"])]
    if case.get("guidance_rescale", 0) > 0:
        args += ["--guidance-rescale", str(case["guidance_rescale"])]
    if case.get("negative") is not None:
        args += ["--negative", case["negative"]]
    if case.get("scheduler"):
        args += ["--scheduler", case["scheduler"]]
    if case.get("dynamic_threshold"):
        t = case["dynamic_threshold"]
        args += ["--dynamic-threshold", f"{t['ratio']},{t['max']}"]
    for key, flag in [("width", "--width"), ("height", "--height"), ("num_images", "--num-images")]:
        if case.get(key) is not None:
            args += [flag, str(case[key])]
    if case.get("init_image"):
        args += ["--init-image", str(FIXTURES / "golden/e2e" / case["init_image"]), "--strength", str(case["strength"])]
    return args + ["--output", str(out)]


def outputs(case, out: Path):
    n = len(case["images"])
    return [out] if n == 1 else [out.with_name(f"{out.stem}-{i}.png") for i in range(1, n + 1)]


def parity_f32(binary, device, out, limit):
    cases = json.loads((FIXTURES / "golden/e2e/cases.json").read_text())[:limit]
    rows, failures = [], []
    for case in cases:
        png = out / "f32" / f"{case['name']}.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        ok, res, _ = ltd_gen(binary, case_args(case, png) + ["--device", device, "--dtype", "f32"])
        if not ok:
            failures.append(f"{case['name']}: {res}")
            continue
        for want, got in zip(case["images"], outputs(case, png)):
            db = psnr(rgb(FIXTURES / "golden/e2e" / want), rgb(got))
            rows.append({"case": case["name"], "image": want, "psnr_db": round(db, 2)})
            if db < F32_MIN_DB:
                failures.append(f"{want}: {db:.2f} dB < {F32_MIN_DB}")
    worst = min((r["psnr_db"] for r in rows), default=None)
    return {"cases": len(cases), "worst_db": worst, "pass": not failures and bool(rows),
            "failures": failures, "images": rows}


def parity_half(binary, device, out, limit):
    import torch
    from gen import half_pipeline

    cases = json.loads((FIXTURES / "golden/half_pipeline/cases.json").read_text())[:limit]
    by_name = {c["name"]: c for c in __import__("gen.e2e", fromlist=["CASES"]).CASES}
    rows, failures = [], []
    for case in cases:
        png = out / "half" / f"{case['name']}.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        ok, res, _ = ltd_gen(binary, case_args(case, png) + ["--device", device, "--dtype", case["dtype"]])
        if not ok:
            failures.append(f"{case['name']}: {res}")
            continue
        e2e_case = by_name[case["name"].rsplit("-", 1)[0]]
        ref = half_pipeline.run(e2e_case, half_pipeline.DTYPES[case["dtype"]], device=device)
        ref_png = out / "half" / f"{case['name']}-diffusers-{device}.png"
        ref.save(ref_png)
        db = psnr(rgb(ref_png), rgb(png))
        db_cpu = psnr(rgb(FIXTURES / "golden/half_pipeline" / case["images"][0]), rgb(png))
        rows.append({"case": case["name"], "psnr_db": round(db, 2), "psnr_vs_cpu_diffusers_db": round(db_cpu, 2)})
        if db < HALF_MIN_DB:
            failures.append(f"{case['name']}: {db:.2f} dB < {HALF_MIN_DB}")
        del ref
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    worst = min((r["psnr_db"] for r in rows), default=None)
    return {"cases": len(cases), "worst_db": worst, "pass": not failures and bool(rows),
            "failures": failures, "images": rows}


# ---------------------------------------------------------------------------------------- speed

def build_random(kind, folder: Path, device):
    """A random-weight pipeline of SD 1.5's (`sd15`) or SDXL's (`sdxl`) architecture, in fp16."""
    import torch
    import transformers
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    cfg = REPO / "configs" / {"sd15": "stable-diffusion-v1-5", "sdxl": "stable-diffusion-xl-base-1.0"}[kind]
    tok = FIXTURES / "pipelines" / {"sd15": "sd1", "sdxl": "sdxl"}[kind]
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(cfg / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(cfg / "vae"))
        te = transformers.CLIPTextModel(transformers.CLIPTextConfig.from_pretrained(cfg / "text_encoder"))
        parts = dict(unet=unet, vae=vae, text_encoder=te,
                     tokenizer=transformers.CLIPTokenizer.from_pretrained(tok / "tokenizer"))
        if kind == "sdxl":
            parts["text_encoder_2"] = transformers.CLIPTextModelWithProjection(
                transformers.CLIPTextConfig.from_pretrained(cfg / "text_encoder_2"))
            parts["tokenizer_2"] = transformers.CLIPTokenizer.from_pretrained(tok / "tokenizer_2")
    from diffusers import DPMSolverMultistepScheduler

    parts["scheduler"] = DPMSolverMultistepScheduler.from_pretrained(cfg / "scheduler")
    if kind == "sd15":
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    else:
        pipe = StableDiffusionXLPipeline(**parts)
    pipe = pipe.to(dtype=torch.float16)
    pipe.save_pretrained(folder)
    return pipe


def tiny_pipeline(kind, folder: Path):
    """The dry run's stand-in: the tiny fixture pipeline, copied."""
    from gen.pipelines import load_pipeline

    shutil.copytree(FIXTURES / "pipelines" / {"sd15": "sd1", "sdxl": "sdxl"}[kind], folder, symlinks=False,
                    dirs_exist_ok=True)
    return load_pipeline({"sd15": "sd1", "sdxl": "sdxl"}[kind])


def cuda_sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, warmup, repeats):
    for _ in range(warmup):
        fn()
    cuda_sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        cuda_sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def diffusers_speed(kind, pipe, size, device, repeats, steps):
    import torch

    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    unet, vae = pipe.unet, pipe.vae
    lat = size // 8
    g = torch.Generator("cpu").manual_seed(0)
    x = torch.randn((2, unet.config.in_channels, lat, lat), generator=g).to(device, unet.dtype)
    ctx = torch.randn((2, 77, unet.config.cross_attention_dim), generator=g).to(device, unet.dtype)
    t = torch.tensor([981.0], device=device)
    added = None
    if kind == "sdxl":
        width = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.randn((2, width), generator=g).to(device, unet.dtype),
                 "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2, device=device, dtype=unet.dtype)}
    res = {}
    with torch.no_grad():
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        res["unet_step_s"] = timed(lambda: unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample,
                                   2, repeats * 3)
        if torch.cuda.is_available():
            res["unet_step_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        # As the pipeline decodes: in float32 when the VAE config says force_upcast (SDXL).
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            vae.to(torch.float32)
        z = torch.randn((1, vae.config.latent_channels, lat, lat), generator=g).to(device, vae.dtype)
        res["vae_decode_s"] = timed(lambda: vae.decode(z).sample, 1, repeats)
        res["vae_decode_dtype"] = str(vae.dtype)
        if upcast:
            vae.to(torch.float16)

    def image(n):
        return pipe("a cat in a hat", num_inference_steps=n, guidance_scale=7.5, height=size, width=size,
                    generator=torch.Generator("cpu").manual_seed(0), output_type="pil")

    mem = GpuMemory(os.getpid())
    res["image_s"] = timed(lambda: image(steps), 1, repeats)
    t2 = timed(lambda: image(2), 0, repeats)
    res["peak_gpu_mib"] = mem.stop()
    res["step_s"] = (res["image_s"] - t2) / (steps - 2)
    if torch.cuda.is_available():
        res["peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        res["peak_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    return res


def ltd_speed(binary, folder, size, device, dtype, repeats, steps, attention):
    runs = {}
    for n in (2, steps):
        results = []
        for _ in range(repeats):
            args = ["a cat in a hat", "--model", str(folder), "--steps", str(n), "--scheduler", "dpm++2m",
                    "--width", str(size), "--height", str(size), "--seed", "0", "--device", device,
                    "--dtype", dtype, "--attention", attention, "--output", str(folder.parent / "ltd.png")]
            ok, res, peak = ltd_gen(binary, args, timeout=900)
            if not ok:
                return {"error": res}
            t = res["timings"]
            results.append((t["encode_s"] + t["denoise_s"] + t["decode_s"], t["denoise_s"], t["decode_s"], peak))
        runs[n] = results
    med = lambda n, i: statistics.median(r[i] for r in runs[n])  # noqa: E731
    peaks = [r[3] for n in runs for r in runs[n] if r[3] is not None]
    return {
        "image_s": med(steps, 0),
        "step_s": (med(steps, 1) - med(2, 1)) / (steps - 2),
        "vae_decode_s": statistics.median(r[2] for n in runs for r in runs[n]),
        "peak_gpu_mib": max(peaks) if peaks else None,
    }


def speed(binaries, device, out, dry_run, repeats):
    import torch

    report = {}
    models = [("sd15", 64 if dry_run else 512), ("sdxl", 64 if dry_run else 1024)]
    steps = 6 if dry_run else 50
    for kind, size in models:
        folder = out / "models" / kind
        log(f"speed: building {kind}")
        pipe = tiny_pipeline(kind, folder) if dry_run else build_random(kind, folder, device)
        if dry_run:
            pipe = pipe.to(dtype=torch.float16 if device == "cuda" else torch.float32)
        entry = {"size": size, "steps": steps}
        log(f"speed: diffusers {kind}")
        entry["diffusers"] = diffusers_speed(kind, pipe, size, device, repeats, steps)
        pipe.to("cpu")
        del pipe
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        # One dtype for both sides: diffusers' fp16 (f32 in the CPU dry run).
        dtype = "f16" if device == "cuda" else "f32"
        for name, binary in binaries.items():
            for attention in (["auto", "chunked"] if "flash" in name else ["auto"]):
                log(f"speed: {name} --attention {attention} {kind}")
                entry[f"{name} --attention {attention}"] = ltd_speed(
                    binary, folder, size, device, dtype, repeats, steps, attention)
                RESULTS["speed"] = {**report, kind: entry}
                save(out)
        report[kind] = entry
        shutil.rmtree(folder, ignore_errors=True)
    return report


def environment():
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        info["diffusers"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    if shutil.which("nvidia-smi"):
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip()
    return info


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bin", action="append", required=True, help="NAME=PATH of an ltd-gen binary (repeatable)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--parts", default="parity-f32,parity-half,speed")
    p.add_argument("--dry-run", action="store_true", help="few cases, tiny models (a CPU check of the script)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    args.out.mkdir(parents=True, exist_ok=True)
    binaries = dict(b.split("=", 1) for b in args.bin)
    main_bin = binaries[next(iter(binaries))]
    limit = 3 if args.dry_run else None
    RESULTS["environment"] = environment()
    RESULTS["binaries"] = binaries
    log(json.dumps(RESULTS["environment"]))
    save(args.out)
    parts = args.parts.split(",")
    ok = True
    for part, run in [
        ("parity-f32", lambda: parity_f32(main_bin, args.device, args.out, limit)),
        ("parity-half", lambda: parity_half(main_bin, args.device, args.out, limit)),
        ("speed", lambda: speed(binaries, args.device, args.out, args.dry_run, 1 if args.dry_run else args.repeats)),
    ]:
        if part not in parts:
            continue
        log(f"[{part}]")
        t0 = time.time()
        try:
            RESULTS[part] = run()
        except Exception as e:  # noqa: BLE001 - a failed part is reported, the next one still runs
            import traceback

            RESULTS[part] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        RESULTS[part]["seconds"] = round(time.time() - t0, 1)
        ok &= RESULTS[part].get("pass", "error" not in RESULTS[part])
        summary = {k: v for k, v in RESULTS[part].items() if k not in ("images", "traceback")}
        log(f"[{part}] {json.dumps(summary, default=str)[:3000]}")
        save(args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
