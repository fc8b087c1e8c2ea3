"""LoRA files for the tests, written the ways published ones are, and diffusers' images with them.

- `save_peft_lora`: PEFT adapters with random factors added to a diffusers pipeline's components,
  saved by the pipeline class's own `save_lora_weights` (diffusers / PEFT format, PEFT's alpha in
  the header metadata), then removed again.
- `save_factors`: kohya / ComfyUI / XLabs files, which diffusers reads but does not write: random
  factors under the documented names.
- `reference_images`: diffusers' pipeline with LoRA files loaded by its `load_lora_weights` and
  weighted by `set_adapters` (diffusers' way of scaling LoRAs), unloaded afterwards.
- `assert_matches_diffusers`: our image with LoRAs loaded against that reference, the LoRAs'
  effect, and the image after unloading.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.numpy import save_file
from transformers.integrations import peft as transformers_peft

# transformers 5.24 asks for peft 0.22 (not yet released on the index); 0.21 reads and writes these adapters
transformers_peft.MIN_PEFT_VERSION = "0.21.0"


def save_peft_lora(pipe, path, targets: dict, rank: int = 4, alpha: float = 8.0, seed: int = 0, gain: float = 0.3):
    """`targets`: component attribute ("unet", "transformer", "text_encoder", ...) -> module names
    (PEFT `target_modules`). Factors are random (kaiming-uniform down, `gain`-scaled up) so the
    LoRA visibly changes the image; written to the file `path`, then the adapters are deleted."""
    torch.manual_seed(seed)
    layers, metadata = {}, {}
    for component, modules in targets.items():
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(modules), init_lora_weights=False)
        model = getattr(pipe, component)
        model.add_adapter(config, adapter_name="saved")
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.mul_(gain)
        layers[f"{component}_lora_layers"] = get_peft_model_state_dict(model, adapter_name="saved")
        metadata[f"{component}_lora_adapter_metadata"] = config.to_dict()
    pipe.save_lora_weights(str(path.parent), weight_name=path.name, **layers, **metadata)
    pipe.unload_lora_weights()
    return path


def save_factors(path, layers: dict, seed: int = 0, gain: float = 0.3):
    """`layers`: layer name -> (down shape, up shape, alpha or None, (down suffix, up suffix)).
    Random factors under `name + suffix`, `name + ".alpha"` when alpha is given."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, (down_shape, up_shape, alpha, (down_suffix, up_suffix)) in layers.items():
        fan_in = int(np.prod(down_shape[1:]))
        tensors[name + down_suffix] = (rng.uniform(-1, 1, down_shape) / np.sqrt(fan_in)).astype(np.float32)
        tensors[name + up_suffix] = (gain * rng.uniform(-1, 1, up_shape) / np.sqrt(up_shape[1])).astype(np.float32)
        if alpha is not None:
            tensors[name + ".alpha"] = np.array(alpha, np.float32)
    save_file(tensors, str(path))
    return path


def reference_images(pipe, loras, generate):
    """`generate()` of diffusers' `pipe` with `loras` [(path, scale)] loaded and weighted."""
    names = [f"lora{i}" for i in range(len(loras))]
    for name, (path, _) in zip(names, loras):
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
    try:
        with torch.no_grad():
            return generate()
    finally:
        pipe.unload_lora_weights()


def assert_matches_diffusers(ours, theirs, loras, our_image, their_image, base_image, moves=1e-2):
    """Our pipeline `ours` with `loras` [(path, scale)] gives diffusers' image (within 1e-3), moved
    from `base_image` by more than `moves`; unloaded, exactly `base_image` again.
    `our_image()` / `their_image()` generate with each pipeline."""
    for path, scale in loras:
        ours.load_lora_weights(path, scale)
    image = our_image()
    ours.unload_lora_weights()
    np.testing.assert_allclose(image, reference_images(theirs, loras, their_image), atol=1e-3)
    moved = np.abs(image - base_image).max()
    print(f"LoRA {[(Path(p).name, s) for p, s in loras]} moves the image by {moved:.3f}")
    assert moved > moves
    assert np.array_equal(our_image(), base_image)


KOHYA = (".lora_down.weight", ".lora_up.weight")
PEFT = (".lora_A.weight", ".lora_B.weight")
XLABS = (".down.weight", ".up.weight")
