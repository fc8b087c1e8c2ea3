"""A resumable batch job through the Python API: a prompt list -> PNGs + manifest.jsonl in a folder.

    python examples/batch_generate.py [MODEL] [OUTPUT_DIR]

Run it again after an interruption: finished images are skipped (see docs/batch-jobs.md).
"""

import sys

from nag_jax import NAGPipeline
from nag_jax.batch import run_batch_job

model = sys.argv[1] if len(sys.argv) > 1 else "sd-shapes"
output = sys.argv[2] if len(sys.argv) > 2 else "batch-output"
pipe = NAGPipeline.from_pretrained(model)

# One dict of NAGPipeline call arguments per line; image k of a line equals image k of pipe(**line).
lines = [{"prompt": f"a {shape}", "nag_negative_prompt": colour, "nag_scale": 3.0, "guidance_scale": 1.0,
          "num_inference_steps": 4, "seed": seed, "num_images_per_prompt": 2}
         for seed, (shape, colour) in enumerate([("circle", "red"), ("square", "blue"), ("triangle", "green")])]
result = run_batch_job(pipe, lines, output, batch_size=4)
print(result.summary)
