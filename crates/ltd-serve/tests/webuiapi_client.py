"""An unmodified AUTOMATIC1111 API client (the `webuiapi` package from PyPI) against ltd-serve.

Usage: python3 webuiapi_client.py HOST PORT API_KEY
Prints one JSON line of what the client saw; exits non-zero when something is off.
"""
import io
import json
import sys

import webuiapi

host, port, key = sys.argv[1], int(sys.argv[2]), sys.argv[3]
api = webuiapi.WebUIApi(host=host, port=port, sampler="Euler a", steps=4)
api.set_auth("user", key)
models = [m["title"] for m in api.get_sd_models()]
samplers = [s["name"] for s in api.get_samplers()]
result = api.txt2img(prompt="a red circle on a blue background", seed=42, width=64, height=64, cfg_scale=7)
assert result.image.size == (64, 64), result.image.size
png = io.BytesIO()
init = result.image
second = api.img2img(images=[init], prompt="a blue square", seed=3, denoising_strength=0.5, width=64, height=64)
assert second.image.size == (64, 64), second.image.size
progress = api.get_progress()
print(json.dumps({
    "models": models,
    "samplers": samplers,
    "seed": result.info["seed"],
    "all_seeds": result.info["all_seeds"],
    "infotext": result.info["infotexts"][0],
    "parameters_text": result.image.info.get("parameters"),
    "unsupported": result.info["unsupported"],
    "img2img_infotext": second.info["infotexts"][0],
    "progress_keys": sorted(progress.keys()),
    "checkpoint": api.get_options()["sd_model_checkpoint"],
}))
