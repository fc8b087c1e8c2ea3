"""Quickstart: NAG on the embedded shapes model, then on any diffusers-format pipeline.

    python examples/quickstart.py [PIPELINE_FOLDER | EMBEDDED_NAME | HUB_REPO_ID]
"""

import sys

from nag_jax import NAGPipeline

model = sys.argv[1] if len(sys.argv) > 1 else "sd-shapes"
pipe = NAGPipeline.from_pretrained(model)  # dtype="bfloat16" for large models on an accelerator

# The prompt leaves the colour open; NAG keeps the colour named by the negative prompt away.
# nag_scale follows the reference convention (paper phi + 1); NAG is on when it is > 1.
images = pipe("a circle", nag_negative_prompt="red", nag_scale=3.0, guidance_scale=1.0,
              num_inference_steps=4, num_images_per_prompt=4, seed=0).images
for index, image in enumerate(images):
    image.save(f"quickstart-{index}.png")
print(f"saved {len(images)} images: quickstart-0.png ... quickstart-{len(images) - 1}.png")
