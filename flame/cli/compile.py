"""flame-compile: trace a function or module from a Python file and print its graph dump.

    flame-compile model.py:loss --arg x:f32[32,4] --arg y:f32[32,1] --grad
    flame-compile model.py:Block --arg x:f32[2,8,4,4] --init channels=8 --after-each-pass
    flame-compile --model sd15-unet --grad --summary      the full SD 1.5 UNet training step, summarised

With no target it dumps its built-in default, the training step of flame/examples/mlp.py.
Exit status: 0 ok, 1 the traced code failed (a shape error names its file:line), 2 a bad
command line.
"""
from __future__ import annotations

import argparse
import ast
import functools
import importlib.util
import inspect
import os
import re
import sys

import flame
from flame.ir import dtypes
from flame.ir import passes as P
from flame.ir.errors import FlameError

PASSES = {p.__name__: p for p in P.DEFAULT_PASSES}
DEFAULT_PASS_ORDER = ",".join(p.__name__ for p in P.DEFAULT_PASSES)
DTYPES = [d.name for d in dtypes.ALL]
LOSSES = {"sum": lambda t: t.sum(), "mean": lambda t: t.mean()}

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
DEFAULT_TARGET = os.path.join(EXAMPLES, "mlp.py") + ":loss"
DEFAULT_ARGS = ["x:f32[32,4]", "y:f32[32,1]"]
DEFAULT_NOTE = (
    "# above: flame-compile's built-in default, the training step (loss and gradients) of the MLP in flame/examples/mlp.py\n"
    "# dump your own: flame-compile path.py:fn --arg x:f32[2,4] --grad   (see flame-compile --help)\n")

_ARG_RE = re.compile(r"^([A-Za-z_]\w*):(\w+)\[([^\]]*)\]$")


class UsageError(Exception):
    """A mistake on the command line (exit status 2)."""


def parse_arg(text: str):
    """'x:f32[2,4]' -> ('x', flame.spec((2, 4), 'f32')); 'f32[]' is a scalar."""
    m = _ARG_RE.match(text.replace(" ", ""))
    if m is None:
        raise UsageError(f"bad --arg {text!r}: expected NAME:DTYPE[d0,d1,...], e.g. x:f32[2,4] (f32[] is a scalar)")
    name, dtype, dims = m.groups()
    if dtype not in DTYPES:
        raise UsageError(f"bad --arg {text!r}: unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    try:
        shape = tuple(int(d) for d in dims.split(",")) if dims else ()
    except ValueError:
        shape = None
    if shape is None or any(d < 0 for d in shape):
        raise UsageError(f"bad --arg {text!r}: dimensions must be non-negative integers, e.g. x:{dtype}[2,4]")
    return name, flame.spec(shape, dtype)


def parse_init(items) -> dict:
    out = {}
    for text in items:
        key, eq, value = text.partition("=")
        if not eq or not key.isidentifier():
            raise UsageError(f"bad --init {text!r}: expected KEY=VALUE, e.g. channels=8")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise UsageError(f"bad --init {text!r}: {value!r} is not a Python literal "
                             f"(quote strings: {key}=\"'{value}'\")") from None
    return out


def load_target(target: str):
    """'path/to/file.py:name' -> the object `name` defined in that file."""
    path, colon, name = target.rpartition(":")
    if not colon or not path or not name:
        raise UsageError(f"bad target {target!r}: expected FILE.py:NAME, e.g. model.py:loss")
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file")
    path = os.path.abspath(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    mod_name = f"_flame_compile_{stem}"   # a private name: a user's csv.py must not shadow the stdlib's
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None:
        raise UsageError(f"{path}: cannot import it as Python source")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    sys.path.insert(0, os.path.dirname(path))   # so the file's own sibling imports work
    flame.manual_seed(0)                         # models built at import get the same weights every run
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(os.path.dirname(path))
    if not hasattr(module, name):
        public = sorted(k for k, v in vars(module).items()
                        if not k.startswith("_") and callable(v) and getattr(v, "__module__", None) == mod_name)
        raise UsageError(f"{os.path.relpath(path)} defines no {name!r}"
                         + (f"; it defines {', '.join(public)}" if public else ""))
    return getattr(module, name)


def positional_params(fn, what: str) -> list:
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    kwonly = [p.name for p in sig.parameters.values() if p.kind == p.KEYWORD_ONLY and p.default is p.empty]
    if kwonly:
        raise UsageError(f"{what} has required keyword-only parameters ({', '.join(kwonly)}): flame-compile passes arguments by position")
    return params


def match_args(params, given: list, what: str) -> list:
    """Order the --arg specs by the function's parameter names."""
    names = [p.name for p in params]
    specs = {}
    for name, s in given:
        if name not in names:
            raise UsageError(f"--arg {name}: {what} has no parameter {name!r}; its parameters are: {', '.join(names) or '(none)'}")
        if name in specs:
            raise UsageError(f"--arg {name} is given twice")
        specs[name] = s
    missing = [p.name for p in params if p.default is p.empty and p.name not in specs]
    if missing:
        raise UsageError(f"{what} needs " + ", ".join(f"--arg {m}:DTYPE[...]" for m in missing))
    last = max((names.index(n) for n in specs), default=-1)
    gaps = [n for n in names[:last + 1] if n not in specs]
    if gaps:   # arguments are passed by position, so an earlier default cannot be skipped
        raise UsageError(f"{what}: give --arg for {', '.join(gaps)} too (arguments are passed by position, up to {names[last]})")
    return [(n, specs[n]) for n in names[:last + 1]]


def build(obj, init: dict, what: str):
    """-> (callable to trace, its module or None, the signature source)."""
    if isinstance(obj, type):
        if not issubclass(obj, flame.nn.Module):
            raise UsageError(f"{what} is a class but not a flame.nn.Module")
        try:
            inspect.signature(obj).bind(**init)
        except TypeError as e:
            raise UsageError(f"--init: cannot build {what}({', '.join(f'{k}={v!r}' for k, v in init.items())}): {e}") from None
        flame.manual_seed(0)   # reproducible weights (they are inputs: the dump does not show them)
        module = obj(**init)
        return module, module, module.forward
    if init:
        raise UsageError(f"--init only applies to a module class; {what} is not a class")
    if isinstance(obj, flame.nn.Module):
        return obj, obj, obj.forward
    if not callable(obj):
        raise UsageError(f"{what} is a {type(obj).__name__}, not a function or module class")
    return obj, None, obj


def named(fn, sig_source):
    """fn with sig_source's signature (the tracer names graph inputs after it)."""
    @functools.wraps(sig_source)
    def call(*args):
        return fn(*args)
    return call


def trace_target(fn, module, sig_source, specs: list, grad: bool, loss: str | None, name: str):
    args = [s for _, s in specs]
    if loss is not None:
        reduce = LOSSES[loss]
        base = fn
        fn = lambda *a: reduce(base(*a))   # noqa: E731
    f = named(fn, sig_source)
    if not grad:
        return flame.trace(f, *args, name=name)
    # a first, plain trace: the output must be one scalar, and it lists the Parameters read
    plain = flame.trace(f, *args, name=name)
    out = plain.outputs
    if len(out) != 1 or out[0].shape != () or not out[0].dtype.is_float:
        what = ", ".join(o.type_str for o in out) or "nothing"
        raise UsageError(f"--grad needs one floating-point scalar output, but {name} returns {what}: "
                         "pass --loss sum or --loss mean to reduce it first")
    argnums = tuple(i for i, s in enumerate(args) if s.dtype.is_float)
    if module is not None:
        params = module if module.parameters() else None
    else:
        params = {k: p for k, p in plain.params.items() if p.requires_grad} or None
    if not argnums and params is None:
        raise UsageError(f"--grad: {name} has no floating-point arguments and reads no parameters")
    vg = flame.value_and_grad(f, argnums=argnums or None, params=params)
    return flame.trace(named(vg, sig_source), *args, name=f"{name}_grad")


# ---------------------------------------------------------------- --model: the Stable Diffusion presets

PRESETS = ("sd15-unet", "sd15-vae", "sd15-clip")
PRESET_CONFIGS = ("tiny", "sd15")
TOKENS = 77   # CLIP's context length: prompts are padded to it
PRESET_HELP = (   # the help formatter keeps these line breaks
    "sd15-unet  unet(x:f32[B,4,L,L], timesteps:i64[B], context:f32[B,77,C]) -> noise_pred;\n"
    "           --grad: loss = mse(noise_pred, target:f32[B,4,L,L])\n"
    "sd15-vae   encode and decode in one graph: vae(image:f32[B,3,F*L,F*L]) -> (mean, logvar,\n"
    "           decoded = decode(mean)), F = 2^(blocks-1) (8 for sd15, 2 for tiny);\n"
    "           --grad: loss = mse(decoded, image), the reconstruction error\n"
    "sd15-clip  clip(input_ids:i64[B,77]) -> hidden, the last hidden state;\n"
    "           --grad: loss = mean(hidden * hidden)\n"
    "--grad dumps the loss and the gradients of every parameter (not of the inputs).")


def preset_configs(config: str):
    from flame.models import configs, configs_clip
    if config == "tiny":
        return configs.TINY_UNET, configs.TINY_VAE, configs_clip.TINY_TEXT
    return configs.SD15_UNET, configs.SD15_VAE, configs_clip.SD15_TEXT


def _out(t, name: str):
    """Name an output in the dump (`noise_pred:f32[...] = ...` rather than `%3088`)."""
    t.name_hint = name
    return t


def build_preset(opts):
    """-> (fn, module, specs, name) for --model. The model is built shape-only (no weights are
    allocated: the dump needs shapes, so the full SD 1.5 UNet builds and traces in a second)."""
    import flame.nn.functional as F
    from flame.models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel
    from flame.nn.init import shape_only
    b = 1 if opts.batch is None else opts.batch   # None: not given (so a target can refuse it)
    config, f32 = opts.config or "sd15", "f32"
    if b < 1:
        raise UsageError(f"--batch {b}: must be at least 1")
    unet_cfg, vae_cfg, text_cfg = preset_configs(config)
    if opts.model == "sd15-clip":
        if opts.latent_size is not None:
            raise UsageError(f"--latent-size does not apply to sd15-clip (it reads {TOKENS} tokens)")
        with shape_only():
            model = CLIPTextModel(text_cfg)

        def clip(input_ids):
            return _out(model(input_ids), "hidden")

        def clip_loss(input_ids):
            h = model(input_ids)
            return (h * h).mean()
        return (clip_loss if opts.grad else clip), model, [("input_ids", flame.spec((b, TOKENS), "i64"))], "clip"
    side = unet_cfg.sample_size if opts.latent_size is None else opts.latent_size
    if side < 1:
        raise UsageError(f"--latent-size {side}: must be at least 1")
    if opts.model == "sd15-vae":
        with shape_only():
            model = AutoencoderKL(vae_cfg)
        px = side * vae_cfg.downsampling
        image = [("image", flame.spec((b, vae_cfg.in_channels, px, px), f32))]

        def vae(image):
            mean, logvar = model.encode(image)
            return _out(mean, "mean"), _out(logvar, "logvar"), _out(model.decode(mean), "decoded")

        def vae_loss(image):
            return F.mse_loss(model.decode(model.encode(image)[0]), image)
        return (vae_loss if opts.grad else vae), model, image, "vae"
    k = unet_cfg.downsampling
    if side % k:
        raise UsageError(f"--latent-size {side}: the {config} UNet needs a multiple of {k}")
    with shape_only():
        model = UNet2DConditionModel(unet_cfg)
    latent = (b, unet_cfg.in_channels, side, side)
    specs = [("x", flame.spec(latent, f32)), ("timesteps", flame.spec((b,), "i64")),
             ("context", flame.spec((b, TOKENS, unet_cfg.cross_attention_dim), f32))]

    def unet(x, timesteps, context):
        return _out(model(x, timesteps, context), "noise_pred")

    def unet_loss(x, timesteps, context, target):
        return F.mse_loss(model(x, timesteps, context), target)
    if opts.grad:
        return unet_loss, model, specs + [("target", flame.spec((b, unet_cfg.out_channels, side, side), f32))], "unet"
    return unet, model, specs, "unet"


def trace_preset(opts):
    fn, model, specs, name = build_preset(opts)
    args = [s for _, s in specs]
    if not opts.grad:
        return flame.trace(fn, *args, name=name)
    # the parameters' gradients only: the training step of the model, not of its inputs
    vg = flame.value_and_grad(fn, argnums=None, params=model)
    return flame.trace(named(vg, fn), *args, name=f"{name}_grad")


_SUMMARY_LINE = re.compile(r"^(def |# \S)")


def summarize(dump: str) -> str:
    """--summary: the `def` line and the dump's top-level comment lines (nodes, ops, parameters,
    saved for backward, schedule totals, memory); no equations, no per-kernel schedule lines."""
    return "".join(l for l in dump.splitlines(True) if _SUMMARY_LINE.match(l))


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flame-compile",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Trace a function or flame.nn.Module class from a Python file, optionally\n"
                    "differentiate it, run the graph passes and print the graph: one equation per\n"
                    "line, with the source line and module scope of every forward node and the\n"
                    "autodiff rule of every backward node.",
        epilog="examples:\n"
               "  flame-compile                     the built-in default: an MLP training step\n"
               "  flame-compile model.py:loss --arg x:f32[32,4] --arg y:f32[32,1] --grad\n"
               "  flame-compile model.py:Block --init channels=16 --arg x:f32[2,16,8,8] --after-each-pass\n"
               "  flame-compile model.py:net --arg x:f32[8,3] --grad --loss mean --passes simplify,dce\n"
               "  flame-compile --schedule cuda --kernels   the default's fused CUDA kernels, as source\n"
               "  flame-compile --model sd15-unet --grad --summary   SD 1.5 UNet training step: counts only\n"
               "  flame-compile --model sd15-vae --config tiny --latent-size 16 --schedule cpu\n"
               "\nexit status: 0 ok, 1 the traced code failed (e.g. a shape error, reported with its\n"
               "file:line), 2 a bad command line.")
    p.add_argument("target", nargs="?",
                   help="FILE.py:NAME, a function or a flame.nn.Module class (or instance) defined in FILE.py; "
                        "without it, dump the built-in default (" + " ".join(
                            ["flame/examples/mlp.py:loss"] + [f"--arg {a}" for a in DEFAULT_ARGS] + ["--grad"]) + ")")
    p.add_argument("--arg", action="append", default=[], metavar="NAME:DTYPE[d0,d1,...]",
                   help="the shape and dtype of the parameter NAME of the function (of forward() for a "
                        f"module); repeat for each argument. DTYPE is one of {', '.join(DTYPES)}; f32[] is a scalar")
    p.add_argument("--init", action="append", default=[], metavar="KEY=VALUE",
                   help="a constructor argument for a module class, as a Python literal (channels=8, "
                        "sizes=(4,8)); the class is built with flame.manual_seed(0)")
    p.add_argument("--grad", action="store_true",
                   help="dump the training step: the scalar output and its gradients with respect to the "
                        "floating-point arguments and every parameter it reads (flame.value_and_grad)")
    p.add_argument("--loss", choices=sorted(LOSSES),
                   help="reduce the output to a scalar first (needed by --grad when the output is not a scalar)")
    p.add_argument("--after-each-pass", action="store_true",
                   help="print the traced graph, then the graph after every pass under a '# after PASS' header")
    p.add_argument("--schedule", choices=("cpu", "cuda"),
                   help="also fuse and plan memory for a backend and print the schedule: each kernel, "
                        "what it fuses, what it could not fuse and why, launches, arena bytes (no GPU needed)")
    p.add_argument("--kernels", action="store_true",
                   help="also print every generated kernel's source (for --schedule's backend, default cuda)")
    p.add_argument("--summary", action="store_true",
                   help="print only the def line and the summary lines (nodes, ops, parameters, saved for "
                        "backward; with --schedule: launches and arena bytes), not the equations or the "
                        "per-kernel schedule lines")
    v = p.add_argument_group("graph viewer (written besides the dump; the kernels and memory plan are "
                             "--schedule's backend, default cuda)")
    v.add_argument("--html", metavar="PATH",
                   help="write the graph as one self-contained HTML page (works offline): module scopes "
                        "that open and close, search, each node's details with its kernel's source, and the "
                        "arena usage over the schedule")
    v.add_argument("--dot", metavar="PATH", help="write the graph as Graphviz DOT (a cluster per module scope)")
    m = p.add_argument_group("Stable Diffusion presets (--model instead of FILE.py:NAME)", PRESET_HELP)
    m.add_argument("--model", choices=PRESETS,
                   help="dump a Stable Diffusion 1.5 model, built shape-only (no weights) and traced")
    m.add_argument("--config", choices=PRESET_CONFIGS,
                   help="the real SD 1.5 sizes, or the tiny test configuration of the same structure (default sd15)")
    m.add_argument("--batch", type=int, metavar="N", help="batch size B (default 1)")
    m.add_argument("--latent-size", type=int, metavar="N",
                   help="latent height = width L (default 64 for sd15 = 512 px images, 8 for tiny)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--passes", metavar="P1,P2,...",
                   help=f"the passes to run, in order (default {DEFAULT_PASS_ORDER}); known: {', '.join(PASSES)}")
    g.add_argument("--no-opt", action="store_true", help="run no passes: print the graph as traced")
    return p


def select_passes(text: str | None, no_opt: bool) -> list:
    if no_opt:
        return []
    if text is None:
        return list(P.DEFAULT_PASSES)
    out = []
    for name in (s.strip() for s in text.split(",")):
        if name and name not in PASSES:
            raise UsageError(f"--passes: unknown pass {name!r}; valid passes are: {', '.join(PASSES)}")
        if name:
            out.append(PASSES[name])
    return out


def prepare(opts):
    """The traced (not yet optimised) graph, the passes to run, and whether this is the default."""
    if opts.model is not None:
        if opts.target is not None or opts.arg or opts.init or opts.loss:
            raise UsageError("--model replaces FILE.py:NAME, --arg, --init and --loss: give one or the other")
        passes = select_passes(opts.passes, opts.no_opt)
        return trace_preset(opts), passes, False
    if opts.latent_size is not None or opts.batch is not None or opts.config is not None:
        raise UsageError("--config, --batch and --latent-size need --model")
    default = opts.target is None
    if default:
        if opts.arg or opts.init or opts.loss:
            raise UsageError("--arg, --init and --loss need a target FILE.py:NAME")
        opts.target, opts.arg, opts.grad = DEFAULT_TARGET, DEFAULT_ARGS, True
    given = [parse_arg(a) for a in opts.arg]
    init = parse_init(opts.init)
    passes = select_passes(opts.passes, opts.no_opt)
    obj = load_target(opts.target)
    name = opts.target.rpartition(":")[2]
    fn, module, sig_source = build(obj, init, name)
    specs = match_args(positional_params(sig_source, name), given, name)
    graph = trace_target(fn, module, sig_source, specs, opts.grad, opts.loss, name)
    return graph, passes, default


def write_views(graph, sched, opts) -> None:
    """--html / --dot: the viewer's files, each announced on stderr (stdout stays the dump)."""
    from ..codegen.schedule import make_schedule
    from ..viewer import export, write_dot, write_html
    model = export(graph, sched if sched is not None else make_schedule(graph, opts.schedule or "cuda"))
    for flag, path, write in (("--html", opts.html, write_html), ("--dot", opts.dot, write_dot)):
        if path:
            try:
                write(model, path)
            except OSError as e:
                raise UsageError(f"{flag} {path}: {e.strerror}") from None
            print(f"flame-compile: wrote {path} ({model['summary']['nodes']} nodes, "
                  f"{model['summary']['kernels']} kernels)", file=sys.stderr)


def run(opts, out) -> None:
    graph, passes, default = prepare(opts)
    sched = None
    show = summarize if opts.summary else (lambda text: text)   # noqa: E731
    if opts.after_each_pass:
        out.write("# traced\n" + show(flame.dump(graph)))
        after = lambda pname, g: out.write(f"\n# after {pname}\n" + show(flame.dump(g)))  # noqa: E731
        graph = P.optimize(graph, passes, after_each=after)
    else:
        graph = P.optimize(graph, passes)
        if opts.schedule or opts.kernels:
            from ..codegen.schedule import make_schedule
            sched = make_schedule(graph, opts.schedule or "cuda")
            out.write(show(flame.dump(sched.graph, runner=sched)))
            if opts.kernels:
                out.write(f"\n# ---- helpers every {sched.target} kernel module starts with\n" + sched.prelude())
                for i, k in enumerate(sched.kernels):
                    if k.root.id in sched.descs and sched.runs(k):
                        out.write(f"\n# ---- K{i} {k.name} ({sched.target})\n" + sched.source(k, with_prelude=False))
        else:
            out.write(show(flame.dump(graph)))
    if opts.html or opts.dot:
        write_views(graph, sched, opts)
    if default:
        out.write(DEFAULT_NOTE)


def main(argv=None) -> int:
    opts = make_parser().parse_args(argv)
    try:
        run(opts, sys.stdout)
    except UsageError as e:
        print(f"flame-compile: error: {e}", file=sys.stderr)
        return 2
    except FlameError as e:   # the message names the user's file:line; a traceback adds nothing
        print(f"flame-compile: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:   # `flame-compile ... | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
