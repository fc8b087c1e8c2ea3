"""The `nag-jax` command: generate images, convert checkpoints, show the demo grid, benchmark.

    nag-jax demo                                  # a NAG / CFG / no-guidance grid on the embedded models
    nag-jax generate --prompt "a circle" --nag-negative-prompt red --output out/
    nag-jax generate --model WAN --prompt "a cat" --num-frames 33 --output clip.mp4   # [--image first.png]
    nag-jax convert SRC DST [--dtype bfloat16]    # diffusers folder or single file -> fast-loading folder
    nag-jax bench [--efficacy | --clip-score --clip-model CLIP --prompts FILE]

Errors the user can fix (a bad value, a missing file, a checkpoint that does not fit) are
printed as one line `nag-jax: error: ...` with exit status 2, without a traceback. Values that
need no model (ranges, counts, the output path) are checked before the model is loaded.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from nag_jax.resolve import EMBEDDED_MODELS, embedded_model, resolve_model

IMAGE_SUFFIXES = (".png",)
VIDEO_SUFFIXES = (".mp4", ".webp", ".gif")  # nag_jax.video.export_to_video's formats
DEMO_PAIRS = (("a circle", "red"), ("a square on a gray background", "blue"), ("a triangle on a black background",
                                                                                 "yellow"))
DEMO_STEPS = (1, 2, 4)
ATTENTION_BACKENDS = ("auto", "xla", "blockwise", "cudnn", "splash")  # attention.BACKENDS, without importing jax
CACHE_VARIABLE = "NAG_JAX_COMPILATION_CACHE"  # the cache folder; empty: no cache


def compilation_cache_folder() -> Path | None:
    """$NAG_JAX_COMPILATION_CACHE, else $XDG_CACHE_HOME/nag-jax/jax (default ~/.cache/nag-jax/jax)."""
    if CACHE_VARIABLE in os.environ:
        return Path(os.environ[CACHE_VARIABLE]) if os.environ[CACHE_VARIABLE] else None
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nag-jax" / "jax"


def use_compilation_cache(folder: Path) -> None:
    """JAX's persistent compilation cache in `folder`: a later process with the same model and shapes loads the
    compiled programs instead of compiling (every program is cached, however fast it compiled)."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def model_folder(model: str | None) -> Path:
    """--model: a pipeline folder, an embedded model's name or a Hugging Face repo id (None: the
    embedded sd-shapes), errors naming --model."""
    try:
        return resolve_model(model)
    except OSError as error:
        raise ValueError(f"--model: {error}") from None


# ----------------------------------------------------------------------------- generate


class OneLineParser(argparse.ArgumentParser):
    """argparse's errors as one line on stderr (no usage block), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """An argparse type: an integer > 0."""
    try:
        if int(text) > 0:
            return int(text)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")


def frame_count(text: str) -> int:
    """An argparse type: a video frame count 4k + 1 (the Wan VAE's temporal compression)."""
    if text.isdigit() and int(text) % 4 == 1:
        return int(text)
    raise argparse.ArgumentTypeError(f"must be a frame count of the form 4k + 1 (1, 5, ..., 33, ..., 81), got {text!r}")


def in_range(name: str):
    """An argparse type: a number in the pipeline's allowed range for the call argument `name`."""
    def parse(text: str) -> float:
        from nag_jax.pipeline import check_argument

        try:
            value = float(text)
        except ValueError:
            value = text  # not a number: check_argument says so, with the text
        try:
            return check_argument(name, value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def lora_argument(text: str) -> tuple[Path, float]:
    """An argparse type: PATH or PATH:SCALE of an existing LoRA file (scale 1 when not given)."""
    path, _, scale = text.rpartition(":")
    try:
        path, scale = (Path(path), float(scale)) if path else (Path(text), 1.0)
    except ValueError:
        path, scale = Path(text), 1.0  # a colon inside the path itself
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"must be PATH or PATH:SCALE of a LoRA safetensors file, got {text!r} "
                                         f"({path} is not a file)")
    return path, scale


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="what the image should show")
    source.add_argument("--prompts", metavar="FILE",
                        help="a batch job into the --output folder: a .txt file (one prompt per line; line i gets seed "
                             "--seed + i) or a .jsonl file (per line \"prompt\" and optionally negative_prompt, "
                             "nag_negative_prompt, seed, num_images and the NAG/CFG/PAG settings by their Python "
                             "names); resumable: rerun the same command after a crash (docs/batch-jobs.md)")
    parser.add_argument("--model", help="pipeline folder (diffusers layout or converted), an embedded model ("
                                        f"{', '.join(EMBEDDED_MODELS)}; default {EMBEDDED_MODELS[0]}) or a Hugging "
                                        "Face repo id (from its cache; downloaded unless HF_HUB_OFFLINE=1)")
    parser.add_argument("--image", metavar="PATH",
                        help="an input image: the image to edit (Flux Kontext) or the first frame (image-to-video)")
    kontext = parser.add_argument_group("Flux Kontext (image editing)")
    kontext.add_argument("--max-area", type=positive_int, metavar="PIXELS",
                         help="output pixels: --height x --width refitted to this area (default 1024*1024)")
    kontext.add_argument("--no-auto-resize", action="store_true",
                         help="keep the input image's size instead of the nearest preferred Kontext resolution")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="parameter and activation dtype (default float32)")
    parser.add_argument("--lora", type=lora_argument, action="append", default=[], metavar="PATH[:SCALE]",
                        help="merge a LoRA file (diffusers/PEFT, kohya, ComfyUI, XLabs) times SCALE (default 1); "
                             "repeat to stack several")
    parser.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS,
                        help="the denoiser's attention implementation, see docs/attention.md (default auto)")
    add_cache_argument(parser)
    nag = parser.add_argument_group("NAG (normalized attention guidance)")
    nag.add_argument("--nag-negative-prompt", metavar="TEXT",
                     help="what the image should not show; turns NAG on at the model family's default scale")
    nag.add_argument("--nag-scale", type=in_range("nag_scale"), metavar="S",
                     help="NAG strength, reference convention (paper phi + 1); NAG is on when > 1")
    nag.add_argument("--nag-tau", type=in_range("nag_tau"), metavar="T",
                     help="normalization threshold (family default)")
    nag.add_argument("--nag-alpha", type=in_range("nag_alpha"), metavar="A",
                     help="blend with the positive branch (family default)")
    nag.add_argument("--nag-end", type=in_range("nag_end"), metavar="E",
                     help="fraction of the denoising run that gets NAG (family default: 1.0, Flux Kontext 0.25)")
    nag.add_argument("--nag-norm", choices=("l1", "l2"), default="l1",  # guidance.NAG_NORMS, without importing jax
                     help="norm of NAG's ratio: l1 (the paper, default) or l2 (the reference's Flux processors)")
    pag = parser.add_argument_group("PAG (perturbed-attention guidance; UNet and SD3 families)")
    pag.add_argument("--pag-scale", type=in_range("pag_scale"), default=0.0, metavar="S",
                     help="PAG strength, on when > 0 (default 0)")
    pag.add_argument("--pag-adaptive-scale", type=in_range("pag_adaptive_scale"), default=0.0, metavar="A",
                     help="lower the PAG scale by A per unit of (1000 - t) (default 0: constant)")
    pag.add_argument("--pag-applied-layers", nargs="+", metavar="PATTERN",
                     help="self-attention layers to perturb, diffusers' regular expressions over its module names "
                          "(default: mid for the UNets, blocks.1 for SD3)")
    cfg = parser.add_argument_group("CFG (classifier-free guidance)")
    cfg.add_argument("--negative-prompt", metavar="TEXT", help="CFG's negative prompt (also NAG's when "
                                                               "--nag-negative-prompt is absent)")
    cfg.add_argument("--guidance-scale", type=in_range("guidance_scale"), metavar="G",
                     help="CFG scale, on when > 1 (family default; 1 turns CFG off); for Flux the distilled guidance "
                          "of dev-like models, not CFG")
    cfg.add_argument("--true-cfg-scale", type=in_range("true_cfg_scale"), metavar="G",
                     help="Flux only: real CFG with --negative-prompt, on when > 1 (default 1)")
    cfg.add_argument("--guidance-scale-2", type=in_range("guidance_scale_2"), metavar="G",
                     help="Wan2.2 A14B only: the low-noise expert's CFG scale (default: --guidance-scale)")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--steps", type=positive_int, metavar="N", help="denoising steps (family default)")
    sampling.add_argument("--height", type=positive_int, metavar="H", help="image height in pixels (model default)")
    sampling.add_argument("--width", type=positive_int, metavar="W", help="image width in pixels (model default)")
    sampling.add_argument("--seed", type=int, default=0, help="random seed; image k uses (seed, k) (default 0)")
    sampling.add_argument("--num-images", type=positive_int, default=1, metavar="K", help="images to make (default 1)")
    sampling.add_argument("--batch-invariant", action="store_true",
                          help="make each image alone (bit-identical whatever --num-images and the device count, see "
                               "docs/reproducibility.md; slower)")
    sampling.add_argument("--no-progress", action="store_true", help="no progress bar")
    video = parser.add_argument_group("video (Wan)")
    video.add_argument("--num-frames", type=frame_count, metavar="F", help="frames, 4k + 1 (model default: 81)")
    video.add_argument("--fps", type=positive_int, default=16, help="frames per second of the file (default 16)")
    video.add_argument("--offload-inactive-expert", action="store_true",
                       help="Wan2.2 A14B: keep only the running expert on the devices, the other in host memory")
    batch = parser.add_argument_group("batch jobs (--prompts)")
    batch.add_argument("--batch-size", type=positive_int, metavar="B",
                       help="images per compiled sampling call (default 4 per device)")
    batch.add_argument("--overwrite", action="store_true",
                       help="remake finished images whose settings changed instead of stopping with an error")
    parser.add_argument("--output", default="nag-jax-output",
                        help="a .png file (video models: .mp4, .webp or .gif), or a folder (created) for one file "
                             "per image or video; with several, NAME.png becomes NAME-0.png, NAME-1.png, ... "
                             "(default: nag-jax-output/)")


def output_paths(output: str, count: int, video: bool = False) -> list[Path]:
    """The output rule: a path without a file suffix is a folder with one PNG (MP4) per image
    (video); a .png (.mp4/.webp/.gif) path takes one, or gets numbered files for several."""
    path = Path(output)
    if path.suffix.lower() in (VIDEO_SUFFIXES if video else IMAGE_SUFFIXES):
        if count == 1:
            return [path]
        return [path.with_name(f"{path.stem}-{k}{path.suffix}") for k in range(count)]
    if path.suffix:
        wanted = "videos are written as MP4, WebP or GIF; give a .mp4, .webp or .gif file" if video else (
            "images are written as PNG; give a .png file")
        raise ValueError(f"--output {output}: {wanted} or a folder")
    return [path / (f"video-{k}.mp4" if video else f"image-{k}.png") for k in range(count)]


def check_writable(output: str, paths: list[Path]) -> None:
    """Each image's folder exists as a writable folder, or can be created in one."""
    for folder in {path.parent for path in paths}:
        existing = next(p for p in (folder.absolute(), *folder.absolute().parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise ValueError(f"--output {output}: cannot write there ({existing} is not a writable folder)")


def resolve_settings(args, defaults: dict) -> dict:
    """The pipeline call's settings: the family's defaults for everything left unset; a NAG
    negative prompt without --nag-scale gets the family's default NAG scale."""
    nag_scale = args.nag_scale
    if nag_scale is None:
        nag_scale = defaults["nag_scale"] if args.nag_negative_prompt is not None else 1.0
    return {
        "prompt": args.prompt,
        "nag_negative_prompt": args.nag_negative_prompt,
        "nag_scale": nag_scale,
        "nag_tau": defaults["nag_tau"] if args.nag_tau is None else args.nag_tau,
        "nag_alpha": defaults["nag_alpha"] if args.nag_alpha is None else args.nag_alpha,
        "nag_end": defaults.get("nag_end", 1.0) if args.nag_end is None else args.nag_end,
        "nag_norm": args.nag_norm,
        "pag_scale": args.pag_scale,
        "pag_adaptive_scale": args.pag_adaptive_scale,
        "pag_applied_layers": args.pag_applied_layers,
        "negative_prompt": args.negative_prompt,
        "guidance_scale": defaults["guidance_scale"] if args.guidance_scale is None else args.guidance_scale,
        **({} if args.true_cfg_scale is None else {"true_cfg_scale": args.true_cfg_scale}),  # a Flux option
        **({} if args.guidance_scale_2 is None else {"guidance_scale_2": args.guidance_scale_2}),  # Wan2.2 A14B
        **({} if args.max_area is None else {"max_area": args.max_area}),  # Kontext options
        **({"auto_resize": False} if args.no_auto_resize else {}),
        "num_inference_steps": defaults["num_inference_steps"] if args.steps is None else args.steps,
        "height": args.height,
        "width": args.width,
        "seed": args.seed,
        "num_images_per_prompt": args.num_images,
        "batch_invariant": args.batch_invariant,
        **{name: value for name, value in (("num_frames", args.num_frames), ("image", args.image)) if value is not None},
    }


def png_info(settings: dict, model: str, dtype: str, index: int):
    """PNG text chunks: every generation parameter, and one JSON chunk that reproduces the image."""
    from nag_jax.batch import png_info as record_png_info

    return record_png_info(dict(settings, model=model, dtype=dtype, image_index=index))


def add_cache_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-compilation-cache", action="store_true",
                        help=f"do not keep compiled programs between runs (default: kept in ${CACHE_VARIABLE}, else "
                             "$XDG_CACHE_HOME/nag-jax/jax or ~/.cache/nag-jax/jax)")


def load_pipeline(model: Path, dtype: str = "float32", loras=(), attention_backend: str = "auto",
                  offload_inactive_expert: bool = False):
    """NAGPipeline.from_pretrained with the --lora files merged, its errors (missing files,
    damaged or mismatched weights) naming the flag."""
    from nag_jax.pipeline import NAGPipeline

    try:
        pipe = NAGPipeline.from_pretrained(model, dtype=dtype, attention_backend=attention_backend,
                                           offload_inactive_expert=offload_inactive_expert)
    except (ValueError, OSError) as error:
        raise ValueError(f"--model: {error}") from None
    for lora, scale in loras:
        try:
            pipe.load_lora_weights(lora, scale)
        except (ValueError, OSError) as error:
            raise ValueError(f"--lora: {error}") from None
    return pipe


# JSONL keys of a batch job line -> the generate options they replace
LINE_OPTIONS = {"num_images": "num_images", "num_inference_steps": "steps"}


def generate_batch(args) -> int:
    """--prompts: each line's settings are the command's with the line's own keys replacing them."""
    from nag_jax.batch import read_prompts_file, run_batch_job

    lines = read_prompts_file(args.prompts)
    model = model_folder(args.model)
    if Path(args.output).suffix:
        raise ValueError(f"--output {args.output}: a batch job writes into a folder; give a folder name")
    check_writable(args.output, [Path(args.output) / "manifest.jsonl"])
    pipe = load_pipeline(model, args.dtype, args.lora, args.attention_backend, args.offload_inactive_expert)
    calls = []
    for index, line in enumerate(lines):
        options = {LINE_OPTIONS.get(key, key): value for key, value in line.items()}
        options.setdefault("seed", args.seed + index)
        calls.append(resolve_settings(argparse.Namespace(**{**vars(args), **options}), pipe.family.defaults))
    result = run_batch_job(pipe, calls, args.output, args.batch_size, args.overwrite, progress=not args.no_progress,
                           job={"model": str(model), "dtype": args.dtype,
                                **({"loras": [f"{lora}:{scale}" for lora, scale in args.lora]} if args.lora else {})})
    print(f"{result.summary}; manifest: {Path(args.output) / 'manifest.jsonl'}")
    return 0


def open_image(path: str):
    """--image as an RGB PIL image, or an error naming the flag."""
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path).convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"--image {path}: cannot read it as an image ({error})") from None


def generate(args) -> int:
    if args.prompts is not None:
        return generate_batch(args)
    model = model_folder(args.model)
    video = args.num_frames is not None or Path(args.output).suffix.lower() in VIDEO_SUFFIXES
    paths = output_paths(args.output, args.num_images, video)  # checked before the slow part
    check_writable(args.output, paths)
    image = {} if args.image is None else {"image": open_image(args.image)}  # read before the slow part
    pipe = load_pipeline(model, args.dtype, args.lora, args.attention_backend, args.offload_inactive_expert)
    if video and not pipe.family.video:
        raise ValueError(f"--model {model} makes images: --num-frames and video outputs are for video models")
    if pipe.family.video and not video:
        paths = output_paths(args.output, args.num_images, video=True)  # a folder: one MP4 per video
    settings = resolve_settings(args, pipe.family.defaults)  # "image" stays the path, for the records
    if pipe.family.video:
        return write_videos(pipe, settings, image, paths, args, model)
    images = pipe(**{**settings, **image}, progress=not args.no_progress, check_finite=True).images
    settings.update(height=images[0].height, width=images[0].width)
    record = dict(settings, loras=[f"{lora}:{scale}" for lora, scale in args.lora]) if args.lora else settings
    for index, (image, path) in enumerate(zip(images, paths)):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, pnginfo=png_info(record, str(model), args.dtype, index))
        print(path)
    return 0


def write_videos(pipe, settings: dict, image: dict, paths: list[Path], args, model: Path) -> int:
    """Generate with a video family (`image`: the opened --image, if any) and write each video with
    its parameters in the file's metadata."""
    from nag_jax.video import export_to_video

    frames = pipe(**{**settings, **image}, output_type="np", progress=not args.no_progress, check_finite=True).frames
    settings.update(num_frames=frames.shape[1], height=frames.shape[2], width=frames.shape[3])
    for index, (video, path) in enumerate(zip(frames, paths)):
        path.parent.mkdir(parents=True, exist_ok=True)
        loras = {"loras": [f"{lora}:{scale}" for lora, scale in args.lora]} if args.lora else {}
        export_to_video(video, path, fps=args.fps,
                        metadata=dict(settings, model=str(model), dtype=args.dtype, video_index=index, **loras))
        print(path)
    return 0


# ----------------------------------------------------------------------------- demo


DEMO_CELL, DEMO_LABEL_WIDTH, DEMO_HEADER, DEMO_PAD = 128, 260, 36, 4  # grid layout, pixels
DEMO_METHOD_LABELS = {"none": "no guidance"}


def demo_rows(pipe, pairs=DEMO_PAIRS, steps=DEMO_STEPS, seed: int = 0) -> tuple[list[tuple], list[list]]:
    """(column labels (method, steps), a row of images per (prompt, negative) pair): no guidance,
    NAG and CFG at the family's defaults (nag_jax.efficacy.guidance_methods), at each step count."""
    from nag_jax.efficacy import guidance_methods

    prompts, negatives = [p for p, _ in pairs], [n for _, n in pairs]
    columns, rows = [], [[] for _ in pairs]
    for n in steps:
        for name, settings in guidance_methods(pipe.family, negatives).items():
            # one batched call per column: every row's prompt at once
            output = pipe(prompts, num_inference_steps=n, seed=seed, check_finite=True, **settings)
            images = output.frames if pipe.family.video else output.images  # video: lists of PIL frames
            columns.append((DEMO_METHOD_LABELS.get(name, name), f"{n} step{'s' if n > 1 else ''}"))
            for row, image in zip(rows, images):
                row.append(image)
    return columns, rows


def demo_blocks(pipes: dict, pairs=DEMO_PAIRS, steps=DEMO_STEPS, seed: int = 0) -> dict:
    """Per model (name -> pipeline): (its (prompt, negative) pairs, demo_rows' columns and rows);
    video models take DEMO_VIDEO_PAIRS."""
    from nag_jax.demo_video import DEMO_VIDEO_PAIRS

    blocks = {}
    for name, pipe in pipes.items():
        model_pairs = DEMO_VIDEO_PAIRS if pipe.family.video else pairs
        blocks[name] = (model_pairs, *demo_rows(pipe, model_pairs, steps, seed))
    return blocks


def demo_grid(blocks: dict):
    """A labelled PIL grid of `demo_blocks`: per model a block of rows, one per (prompt, negative)
    pair; a column per (steps, method). A video is shown as a still strip of frames."""
    from PIL import Image, ImageDraw

    from nag_jax.demo_video import still_strip

    columns = next(iter(blocks.values()))[1]
    step = DEMO_CELL + DEMO_PAD
    height = DEMO_HEADER + sum(len(pairs) for pairs, _, _ in blocks.values()) * step
    grid = Image.new("RGB", (DEMO_LABEL_WIDTH + len(columns) * step, height), "white")
    draw = ImageDraw.Draw(grid)
    for c, (method, count) in enumerate(columns):
        draw.text((DEMO_LABEL_WIDTH + c * step + 2, 2), method, fill="black")
        draw.text((DEMO_LABEL_WIDTH + c * step + 2, 18), count, fill="gray")
    y = DEMO_HEADER
    for name, (pairs, _, rows) in blocks.items():
        for (prompt, negative), row in zip(pairs, rows):
            middle = y + DEMO_CELL // 2
            draw.text((4, middle - 22), name, fill="navy")
            draw.text((4, middle - 6), f'prompt: "{prompt}"', fill="black")
            draw.text((4, middle + 10), f'negative: "{negative}"', fill="darkred")
            for c, image in enumerate(row):
                cell = still_strip(image, DEMO_CELL) if isinstance(image, list) else image.resize(
                    (DEMO_CELL, DEMO_CELL), Image.NEAREST)
                grid.paste(cell, (DEMO_LABEL_WIDTH + c * step, y))
            y += step
    return grid


def demo(args) -> int:
    models = [model_folder(args.model)] if args.model else [embedded_model(name) for name in EMBEDDED_MODELS]
    pipes = {model.name: load_pipeline(model) for model in models}  # every model found before sampling starts
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "nag-demo.png"
    print(f"sampling {len(pipes) * len(DEMO_PAIRS) * len(DEMO_STEPS) * 3} images and videos on {', '.join(pipes)} "
          "...", file=sys.stderr)
    blocks = demo_blocks(pipes, DEMO_PAIRS, DEMO_STEPS)  # read now: tests shorten DEMO_STEPS
    demo_grid(blocks).save(path)
    print(f"saved the comparison grid (rows: model, prompt / negative; columns: no guidance, NAG, CFG at "
          f"{', '.join(map(str, DEMO_STEPS))} steps; videos as first / middle / last frame) to {path.resolve()}")
    for name, (pairs, columns, rows) in blocks.items():
        if pipes[name].family.video:  # the clips at the largest step count (the last three columns), animated
            from nag_jax.demo_video import write_video_grid

            video = write_video_grid(output_dir / f"nag-demo-{name}.webp", name, pairs, columns[-3:],
                                     [row[-3:] for row in rows], DEMO_CELL)
            print(f"saved the animated video grid of {name} to {video.resolve()}")
    return 0


# ----------------------------------------------------------------------------- convert, bench


def convert(args) -> int:
    from nag_jax.converted import convert_pipeline

    out = convert_pipeline(args.src, args.dst, dtype=args.dtype, allow_pickle=args.allow_pickle,
                           progress=not args.no_progress, template=args.template)
    print(out)
    return 0


def bench(args, rest: list[str]) -> int:
    if args.clip_score:
        from nag_jax.clip_score import main as clip_score_main

        return clip_score_main(rest)
    if args.efficacy:
        from nag_jax.efficacy import main as efficacy_main

        return efficacy_main(rest)
    from nag_jax.bench import main as bench_main

    return bench_main(rest)


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="nag-jax",
        description="Normalized Attention Guidance (NAG) for diffusion models in JAX. Without --model, commands "
                    "use the small embedded models (64x64 shapes: circles, squares, triangles in six colours): "
                    "the SD-style sd-shapes, and for `demo` also the Flux-style flux-shapes and the video model "
                    "wan-shapes (32x32, 9 frames, the shapes moving).",
        epilog="Start with `nag-jax demo`. `nag-jax COMMAND --help` lists each command's options.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = commands.add_parser("generate", help="text to image, with NAG and/or CFG",
                              description="Generate images. Unset settings take the model family's defaults; "
                                          "--nag-negative-prompt alone turns NAG on at the family's default scale.")
    add_generate_arguments(gen)

    dem = commands.add_parser("demo", help="a labelled no-guidance / NAG / CFG grid at 1, 2 and 4 steps",
                              description="Sample the embedded models (sd-shapes, flux-shapes, the video model "
                                          "wan-shapes) without guidance, with NAG and with CFG (Flux: true CFG, "
                                          "true_cfg_scale with the negative prompt) at 1, 2 and 4 steps and save a "
                                          "labelled grid PNG (videos as still strips of frames) and, for a video "
                                          "model, an animated WebP grid.")
    dem.add_argument("--output-dir", default=".", help="folder for nag-demo.png (default: current folder)")
    dem.add_argument("--model", help="one pipeline folder or embedded model name instead of the embedded models")
    add_cache_argument(dem)

    con = commands.add_parser("convert", help="checkpoint -> fast-loading nag-jax folder",
                              description="Convert a diffusers pipeline folder or a single checkpoint file into a "
                                          "folder that NAGPipeline.from_pretrained loads without converting again.")
    con.add_argument("src", help="diffusers pipeline folder or single checkpoint file")
    con.add_argument("dst", help="output folder (must not exist)")
    con.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                     help="stored parameter dtype (default float32)")
    con.add_argument("--allow-pickle", action="store_true",
                     help="allow a pickled .ckpt/.pt single file (read with torch's weights-only loader)")
    con.add_argument("--template", help="for a single file: the diffusers folder with its configs and tokenizers")
    con.add_argument("--no-progress", action="store_true", help="no progress bar")

    ben = commands.add_parser("bench", help="speed/FLOP benchmarks, or --efficacy", add_help=False,
                              description="Benchmarks; the remaining options go to the chosen benchmark.")
    ben.add_argument("--efficacy", action="store_true",
                     help="measure how often the negative colour appears without guidance, with NAG and with CFG")
    ben.add_argument("--clip-score", action="store_true",
                     help="the paper's Table 1 CLIP column: mean CLIP score of baseline and NAG images "
                          "(--clip-model, --prompts, --negative; see nag-jax bench --clip-score --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    cache = compilation_cache_folder()
    if args.command in ("generate", "demo") and not args.no_compilation_cache and cache is not None:
        use_compilation_cache(cache)
    try:
        if args.command == "generate":
            return generate(args)
        if args.command == "demo":
            return demo(args)
        if args.command == "convert":
            return convert(args)
        return bench(args, rest)
    except (ValueError, OSError, FloatingPointError) as error:
        # convert's CheckpointError and ConversionError are ValueErrors; a ConversionError lists
        # every problem on its own line: joined here, so an error is always one line.
        print("nag-jax: error: " + "; ".join(line.strip() for line in str(error).splitlines()), file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
