"""flame-train: the LoRA trainer's command line.

    flame-train CONFIG.toml [--set section.key=value ...] [--output DIR] [--resume] [--check] [--quiet]
    flame-train --quickstart [--output DIR] [--set ...]
    flame-train sample CONFIG.toml --lora FILE [--set ...] [--output DIR]

--quickstart needs nothing downloaded: it writes a small synthetic captioned image set, a small
RANDOMLY initialised SD 1.x-structured checkpoint and a config file into DIR (default
./flame-quickstart), then trains a LoRA on them.
"""
from __future__ import annotations

import argparse
import os
import sys

from flame.ir.errors import FlameError

QUICKSTART_STEPS = 60

QUICKSTART_TOML = """\
# flame-train quickstart: a LoRA on synthetic shapes over a RANDOM tiny SD 1.x-structured model.
# Copy this file and point [model] and [[data]] at your own checkpoint and images.
# Every key is described in docs/TRAINING.md.

[model]
checkpoint = "model/{checkpoint}"      # an SD 1.x .safetensors file or a diffusers folder
tokenizer = "tokenizer"                # single files carry no tokenizer: SD 1.5's tokenizer/ folder
architecture = "tiny"                  # "sd15" for real SD 1.x single files

[[data]]
path = "data/{folder}"                 # "10_" means 10 repeats per epoch (or set repeats = N)
trigger = "{trigger}"
flip = true

[buckets]
resolution = 64                        # 512 for SD 1.5
step = 16                              # 64 for SD 1.5
min_size = 32
max_size = 128

[network]
rank = 8
alpha = 8.0

[train]
steps = {steps}
batch_size = 2
lr = 1e-3
lr_scheduler = "cosine"
warmup_steps = 10
seed = 0
backend = "auto"                       # cuda if a GPU is usable, else cpu

# [sample]                             # uncomment for preview images (DDIM, 20 steps) every 30 steps
# prompts = ["{trigger}, a red circle on a blue background", "{trigger}, green and yellow stripes"]
# every_steps = 30

[save]
output_dir = "output"
name = "flamequick"
dtype = "fp16"
"""


def write_quickstart(folder: str) -> str:
    """Write the quickstart's files and config into `folder`; returns the config's path."""
    from flame.train.quickstart_assets import CHECKPOINT_NAME, REPEATS, TRIGGER, write_quickstart as assets
    print(f"writing the quickstart's images, random checkpoint and tokenizer into {folder}", flush=True)
    assets(folder)
    path = os.path.join(folder, "quickstart.toml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(QUICKSTART_TOML.format(checkpoint=CHECKPOINT_NAME, folder=f"{REPEATS}_{TRIGGER}",
                                       trigger=TRIGGER, steps=QUICKSTART_STEPS))
    return path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flame-train", description="Train a Stable Diffusion 1.x LoRA on flame; "
                                "the file it writes loads in ComfyUI, A1111 and diffusers.",
                                epilog="flame-train sample CONFIG --lora FILE renders the config's [sample] "
                                       "prompts with a saved LoRA (flame-train sample --help).")
    p.add_argument("config", nargs="?", help="the run's TOML config (see docs/TRAINING.md)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=2e-4 --set train.steps=500 (repeatable)")
    p.add_argument("--output", metavar="DIR", help="where results go (overrides save.output_dir)")
    p.add_argument("--quickstart", nargs="?", const="flame-quickstart", metavar="DIR",
                   help="write a synthetic data set, a random tiny model and a config into DIR "
                        "(default ./flame-quickstart) and train on them; nothing is downloaded")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest training state in the output folder (saved every "
                        "save.every_steps steps, at the end and on Ctrl-C); the config must be the same but for [save]")
    p.add_argument("--check", action="store_true",
                   help="a dry run: validate the config, scan the images, count the steps and plan each "
                        "training graph's memory, without reading weights or training")
    p.add_argument("--quiet", action="store_true", help="no progress bar or messages (the log file still gets them)")
    return p


def sample_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flame-train sample", description="Render the config's [sample] prompts "
                                "with a saved LoRA, without training.")
    p.add_argument("config", help="the run's TOML config (its [model] and [sample] are used)")
    p.add_argument("--lora", required=True, metavar="FILE", help="the LoRA .safetensors to apply")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set sample.steps=30 (repeatable)")
    p.add_argument("--output", metavar="DIR", help="images go to DIR/samples (default: save.output_dir)")
    p.add_argument("--quiet", action="store_true")
    return p


def sample_main(argv) -> int:
    args = sample_parser().parse_args(argv)
    from flame.train import config as cfgmod
    from flame.train.render import render_lora
    try:
        cfg = cfgmod.load(args.config, args.set, args.output)
        render_lora(cfg, os.path.abspath(args.lora), args.config, args.quiet)
        return 0
    except FlameError as e:
        print(f"flame-train sample: error: {e}", file=sys.stderr)
        return 1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sample"]:
        return sample_main(argv[1:])
    args = parser().parse_args(argv)
    from flame.train import config as cfgmod
    from flame.train.trainer import run
    try:
        if args.quickstart is not None:
            if args.config:
                raise cfgmod.ConfigError("give a config file or --quickstart, not both")
            folder = os.path.abspath(args.quickstart)
            path = write_quickstart(folder)
            print("NOTE: the quickstart's base model is RANDOM (no weights are downloaded), so the LoRA "
                  "it trains only demonstrates the pipeline; its images would be noise.", flush=True)
        elif args.config:
            path = args.config
        else:
            parser().print_usage(sys.stderr)
            print("flame-train: give a config file (see docs/TRAINING.md), or try --quickstart", file=sys.stderr)
            return 2
        cfg = cfgmod.load(path, args.set, args.output)
        if args.check:
            from flame.train.check import dry_run
            from flame.train.trainer import Log
            dry_run(cfg, path, Log(None, args.quiet))
            return 0
        result = run(cfg, source=path, quiet=args.quiet, resume=args.resume)
        if result.interrupted:
            return 130
        if args.quickstart is not None:
            print(f"quickstart config (copy it for your own runs): {path}")
        return 0
    except FlameError as e:
        print(f"flame-train: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("flame-train: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
