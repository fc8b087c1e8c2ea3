"""Throughput of a batch job vs single NAGPipeline calls in a loop (images per second, side by side).

    python examples/batch_throughput.py [MODEL] [--images N] [--batch-size B] [--steps S] [--rounds R]

Both sides make the same images (NAG on, CFG off; prompt i with seed i) after a warm-up that
compiles them; the rounds alternate the two so machine load hits both alike. The load average
is printed before and after: on a shared machine the figures are only comparable to each other.
"""

import argparse
import os
import statistics
import tempfile
import time

from nag_jax import NAGPipeline
from nag_jax.batch import run_batch_job

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("model", nargs="?", default="sd-shapes")
parser.add_argument("--images", type=int, default=16)
parser.add_argument("--batch-size", type=int, default=8)
parser.add_argument("--steps", type=int, default=4)
parser.add_argument("--rounds", type=int, default=5)
args = parser.parse_args()

pipe = NAGPipeline.from_pretrained(args.model)
shapes, colours = ("circle", "square", "triangle"), ("red", "blue", "green", "yellow")
lines = [{"prompt": f"a {shapes[i % 3]}", "nag_negative_prompt": colours[i % 4], "nag_scale": 3.0,
          "guidance_scale": 1.0, "num_inference_steps": args.steps, "seed": i} for i in range(args.images)]


def batch_job():
    with tempfile.TemporaryDirectory() as folder:
        run_batch_job(pipe, lines, folder, batch_size=args.batch_size, progress=False)


def single_calls():
    for line in lines:
        pipe(**line).images[0].save(os.devnull, format="PNG")  # PNG encoding as the job does


sides = {"batch job": batch_job, "single calls": single_calls}
for run in sides.values():  # warm-up: compile both
    run()
print(f"load average before: {os.getloadavg()}")
seconds = {name: [] for name in sides}
for _ in range(args.rounds):
    for name, run in sides.items():
        started = time.perf_counter()
        run()
        seconds[name].append(time.perf_counter() - started)
print(f"load average after: {os.getloadavg()}")
for name, times in seconds.items():
    rates = [args.images / t for t in times]
    print(f"{name}: median {statistics.median(rates):.2f} images/s (rounds: {' / '.join(f'{r:.2f}' for r in rates)}; "
          f"{args.images} images, batch size {args.batch_size if name == 'batch job' else 1}, {args.steps} steps)")
