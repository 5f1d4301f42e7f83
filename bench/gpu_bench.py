"""GPU benchmarks: flame's CUDA backend beside PyTorch on the same GPU in the same run.

    PYTHONPATH=. python bench/gpu_bench.py [--out results.json] [--quick]

Times are medians of CUDA-event-timed repetitions after warm-up, all enqueued behind a gate so
the events bracket device work only (bench/timing.py; --timing launch: the older timing, one
launch at a time, which counts the host's launch call); flame runs its captured CUDA graph
(device-resident inputs, no host copies), torch runs eager on the same inputs."""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

import flame
import flame.nn as nn
import flame.nn.functional as F
import timing

ROWS = []


def median_ms_flame(runner, reps=50):
    """Device time of one graph replay (bench/timing.py: gated unless --timing launch)."""
    return timing.median_ms(runner.replay, runner.hstream, reps)


def median_ms_torch(fn, reps=50):
    return timing.median_ms(fn, torch.cuda.current_stream().cuda_stream, reps)


def flame_runner(fn, *inputs, **opts):
    c = flame.compile(fn, *inputs, backend="cuda", options=opts or None)
    c.runner.upload(c.feeds(inputs))
    return c.runner


def row(name, flame_ms, torch_ms, bytes_=None, flops=None, note=""):
    has_torch = torch_ms == torch_ms   # NaN: not timed in torch
    r = {"bench": name, "flame_ms": round(flame_ms, 4), "torch_ms": round(torch_ms, 4) if has_torch else None,
         "speedup": round(torch_ms / flame_ms, 3) if flame_ms and has_torch else None, "note": note}
    if bytes_:
        r["flame_GBps"] = round(bytes_ / flame_ms / 1e6, 1)
        r["torch_GBps"] = round(bytes_ / torch_ms / 1e6, 1) if has_torch else None
    if flops:
        r["flame_TFLOPs"] = round(flops / flame_ms / 1e9, 1)
        r["torch_TFLOPs"] = round(flops / torch_ms / 1e9, 1) if has_torch else None
    ROWS.append(r)
    print(json.dumps(r), flush=True)


def rnd(*shape):
    return np.random.default_rng().standard_normal(shape).astype(np.float32)


COPY_GBPS = {}


def bench_copy():
    """The bandwidth roofline: a device-to-device copy of 256 MiB (bytes read + written)."""
    n = 1 << 26
    tx = torch.empty(n, device="cuda").normal_()
    ty = torch.empty_like(tx)
    ms = median_ms_torch(lambda: ty.copy_(tx))
    COPY_GBPS["hbm"] = 8 * n / ms / 1e6
    ROWS.append({"bench": "device-to-device copy 256 MiB (torch)", "torch_ms": round(ms, 4),
                 "torch_GBps": round(COPY_GBPS["hbm"], 1), "note": "the roofline below"})
    print(ROWS[-1], flush=True)


def roofline(bytes_, ms):
    return f"{100 * bytes_ / ms / 1e6 / COPY_GBPS['hbm']:.0f}% of copy bandwidth" if COPY_GBPS else ""


# the fused elementwise chain the benchmark times (flame.Tensor or torch.Tensor alike)
CHAIN = lambda x: ((x * 1.5 + 1.0).tanh() * 0.5 + x).sigmoid() * x - 0.25


def bench_elementwise():
    n = 1 << 24
    x = rnd(n)
    fr = flame_runner(CHAIN, x)
    ms = median_ms_flame(fr)
    tx = torch.from_numpy(x).cuda()
    copy_ms = median_ms_torch(lambda: tx.clone())
    t_ms = median_ms_torch(lambda: CHAIN(tx))
    row("elementwise chain 16M f32 (vs torch eager)", ms, t_ms, bytes_=8 * n)
    row("elementwise chain 16M f32 (vs torch D2D copy)", ms, copy_ms, bytes_=8 * n,
        note=f"flame at {100 * copy_ms / ms:.0f}% of copy bandwidth")
    n = 1 << 26   # the roofline copy's size
    fr = flame_runner(CHAIN, rnd(n))
    ms = median_ms_flame(fr)
    row("elementwise chain 64M f32 (256 MiB in, 256 MiB out)", ms, float("nan"), bytes_=8 * n, note=roofline(8 * n, ms))


ROW_CASES = [
    ("softmax 4096x4096", lambda x: F.softmax(x, dim=-1), lambda t: torch.softmax(t, -1), (4096, 4096)),
    ("layer_norm 8192x768", lambda x: F.layer_norm(x, (768,)), lambda t: torch.nn.functional.layer_norm(t, (768,)), (8192, 768)),
    ("group_norm 2x320x64x64", lambda x: F.group_norm(x, 32), lambda t: torch.nn.functional.group_norm(t, 32), (2, 320, 64, 64)),
    # SD 1.5 at 64x64 latents: the first transformer's layer_norm, cross-attention softmax
    ("layer_norm 8192x320", lambda x: F.layer_norm(x, (320,)), lambda t: torch.nn.functional.layer_norm(t, (320,)), (8192, 320)),
    ("softmax 65536x77", lambda x: F.softmax(x, dim=-1), lambda t: torch.softmax(t, -1), (65536, 77)),
]


def bench_rows(opts=None, tag="", cases=ROW_CASES, torch_too=True):
    """fwd: f(x); fwd+bwd: the value and x-gradient of sum(f(x) * w). Rates count the fewest
    bytes each must move: x in and y out (fwd); x and w in, the gradient out (fwd+bwd)."""
    for name, ff, tf, shape in cases:
        x = rnd(*shape)
        n = x.size
        fr = flame_runner(ff, x, **(opts or {}))
        tx = torch.from_numpy(x).cuda()
        f_ms = median_ms_flame(fr)
        t_ms = median_ms_torch(lambda: tf(tx)) if torch_too else float("nan")
        row(f"{name} fwd{tag}", f_ms, t_ms, bytes_=8 * n, note=f"{fr.launches} launch(es); {roofline(8 * n, f_ms)}")
        w = rnd(*shape)
        vg = flame.value_and_grad(lambda x: (ff(x) * flame.const(w)).sum())
        fr = flame_runner(vg, x, **(opts or {}))
        tw = torch.from_numpy(w).cuda()
        txg = tx.clone().requires_grad_(True)

        def torch_fb():
            y = tf(txg)
            (g,) = torch.autograd.grad((y * tw).sum(), txg)
            return g
        f_ms = median_ms_flame(fr)
        t_ms = median_ms_torch(torch_fb) if torch_too else float("nan")
        row(f"{name} fwd+bwd{tag}", f_ms, t_ms, bytes_=12 * n, note=f"{fr.launches} launches; {roofline(12 * n, f_ms)}")


def bench_sweep():
    """The renderer's tunables, each against the default (rows: `block` threads per block
    and ROW_ELEMENTS elements per thread; elementwise: elements per thread)."""
    from flame.codegen import cuda as cr, kernel as kd
    for per in (1, 2, 8):
        cr.ELEMENTWISE_PER_THREAD, keep = per, cr.ELEMENTWISE_PER_THREAD
        n = 1 << 24
        x = rnd(n)
        fr = flame_runner(CHAIN, x)
        ms = median_ms_flame(fr)
        row(f"sweep: elementwise chain 16M, {per} per thread", ms, float("nan"), bytes_=8 * n, note=roofline(8 * n, ms))
        cr.ELEMENTWISE_PER_THREAD = keep
    for block, elems in ((128, 8), (512, 8), (1024, 8), (256, 4), (256, 16)):
        kd.ROW_ELEMENTS, keep = elems, kd.ROW_ELEMENTS
        bench_rows({"block": block}, f" [block {block}, {elems}/thread]", ROW_CASES[:2] + ROW_CASES[3:], torch_too=False)
        kd.ROW_ELEMENTS = keep
    # long rows (group_norm groups): blocks a row, at batch 2 (64 groups) and 1 (32 groups)
    gn = [c for c in ROW_CASES if c[0].startswith("group_norm")]
    gn1 = [(n.replace("2x", "1x", 1), f, t, (1,) + s[1:]) for n, f, t, s in gn]
    keep = kd.LONG_ROW_PARTS, kd.LONG_ROW_BLOCKS
    for rnd_ in range(2):
        for parts, blocks in ((1, 132), (2, 132), (4, 264), (4, 132)):
            kd.LONG_ROW_PARTS, kd.LONG_ROW_BLOCKS = parts, blocks
            bench_rows({}, f" [at most {parts} blocks a row, {blocks} blocks, round {rnd_}]", gn + gn1, torch_too=False)
    kd.LONG_ROW_PARTS, kd.LONG_ROW_BLOCKS = keep


def bench_long_rows():
    """SD 1.5's group_norm at batch 2 (64 groups of 40960) under the long-row settings: threads
    a block, blocks a group (a thread block cluster), at most this many blocks; and with the
    mean's and the variance's exchanges apart (cuda.ONE_PASS_MOMENTS off).
    Beside it, in the same [64, 40960] rows: a copy (x * 2 + 1, elementwise) and one
    reduction stage (x - mean), which tell what the passes over the row cost."""
    from flame.codegen import cuda as cr, kernel as kd
    shape = (2, 320, 64, 64)
    n = int(np.prod(shape))
    x = rnd(*shape)
    tx = torch.from_numpy(x).cuda()
    ms = median_ms_torch(lambda: tx.clone())
    row("long rows: torch clone 2x320x64x64", ms, float("nan"), bytes_=8 * n, note=roofline(8 * n, ms))
    fr = flame_runner(lambda x: x * 2.0 + 1.0, x)
    ms = median_ms_flame(fr)
    row("long rows: x * 2 + 1", ms, float("nan"), bytes_=8 * n, note=roofline(8 * n, ms))
    w = rnd(*shape)
    cases = [("x - group mean", lambda x: (x.reshape(64, 40960) - x.reshape(64, 40960).mean(-1, keepdim=True)), 8),
             ("group_norm fwd", lambda x: F.group_norm(x, 32), 8),
             ("group_norm fwd+bwd", flame.value_and_grad(lambda x: (F.group_norm(x, 32) * flame.const(w)).sum()), 12),
             # the gradient alone: no loss, so no second kernel summing the groups' partial losses
             ("group_norm grad only", flame.grad(lambda x: (F.group_norm(x, 32) * flame.const(w)).sum()), 12)]
    keep = kd.LONG_ROW_THREADS, kd.LONG_ROW_PARTS, kd.LONG_ROW_BLOCKS, cr.ONE_PASS_MOMENTS
    for threads, parts, blocks, one_pass in ((1024, 2, 132, True), (1024, 2, 132, False), (1024, 1, 132, True)):
        kd.LONG_ROW_THREADS, kd.LONG_ROW_PARTS, kd.LONG_ROW_BLOCKS = threads, parts, blocks
        cr.ONE_PASS_MOMENTS = one_pass   # off: the mean's exchange, then the deviations'
        for name, fn, per in cases:
            fr = flame_runner(fn, x)
            ms = median_ms_flame(fr)
            tag = f"{threads} threads, {parts} blocks a group" + ("" if one_pass else ", mean and variance apart")
            row(f"long rows: {name} [{tag}]", ms, float("nan"),
                bytes_=per * n, note=f"{fr.launches} launch(es); {roofline(per * n, ms)}")
    kd.LONG_ROW_THREADS, kd.LONG_ROW_PARTS, kd.LONG_ROW_BLOCKS, cr.ONE_PASS_MOMENTS = keep


def bench_gemm():
    shapes = [(4096, 320, 320), (4096, 320, 1280), (4096, 1280, 320), (1024, 640, 640), (256, 1280, 1280), (4096, 4096, 4096)]
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        for m, k, n in shapes:
            a, b = rnd(m, k), rnd(k, n)
            fr = flame_runner(lambda a, b: a @ b, a, b, tf32=tf32)
            ta, tb = torch.from_numpy(a).cuda(), torch.from_numpy(b).cuda()
            row(f"gemm {'tf32' if tf32 else 'fp32'} {m}x{k}x{n}", median_ms_flame(fr),
                median_ms_torch(lambda: ta @ tb), flops=2 * m * n * k)
    torch.backends.cuda.matmul.allow_tf32 = False
    import ml_dtypes
    for m, k, n in shapes:
        a, b = rnd(m, k).astype(ml_dtypes.bfloat16), rnd(k, n).astype(ml_dtypes.bfloat16)
        fr = flame_runner(lambda a, b: a @ b, a, b)
        ta = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).cuda()
        tb = torch.from_numpy(b.view(np.int16)).view(torch.bfloat16).cuda()
        row(f"gemm bf16 {m}x{k}x{n}", median_ms_flame(fr), median_ms_torch(lambda: ta @ tb), flops=2 * m * n * k)


def bench_conv():
    torch.backends.cudnn.allow_tf32 = False
    for n, c, hw in ((2, 320, 64), (2, 640, 32), (2, 1280, 16)):
        x, w = rnd(n, c, hw, hw), rnd(c, c, 3, 3) * 0.05
        flops = 2 * n * c * c * 9 * hw * hw
        fr = flame_runner(lambda x, w: F.conv2d(x, w, None, 1, 1), x, w)
        tx, tw = torch.from_numpy(x).cuda(), torch.from_numpy(w).cuda()
        row(f"conv3x3 fp32 {n}x{c}x{hw}x{hw} fwd", median_ms_flame(fr),
            median_ms_torch(lambda: torch.nn.functional.conv2d(tx, tw, padding=1)), flops=flops, note="torch: cuDNN")
        g = rnd(n, c, hw, hw)
        vg = flame.value_and_grad(lambda x, w: (F.conv2d(x, w, None, 1, 1) * flame.const(g)).sum(), argnums=(0, 1))
        fr = flame_runner(vg, x, w)
        txg, twg, tg = tx.clone().requires_grad_(True), tw.clone().requires_grad_(True), torch.from_numpy(g).cuda()

        def tfb():
            y = torch.nn.functional.conv2d(txg, twg, padding=1)
            return torch.autograd.grad((y * tg).sum(), (txg, twg))
        row(f"conv3x3 fp32 {n}x{c}x{hw}x{hw} fwd+bwd", median_ms_flame(fr), median_ms_torch(tfb), flops=3 * flops)


class Block(nn.Module):
    def __init__(self, c=64, groups=8, heads=2):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.norm = nn.GroupNorm(groups, c)
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)
        self.heads = heads

    def forward(self, x):
        n, c, h, w = x.shape
        y = F.silu(self.norm(self.conv(x)))
        t = y.reshape(n, c, h * w).transpose(1, 2)
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        sh = lambda z: z.reshape(n, h * w, self.heads, c // self.heads).transpose(1, 2)
        a = F.scaled_dot_product_attention(sh(q), sh(k), sh(v))
        a = self.proj(a.transpose(1, 2).reshape(n, h * w, c))
        return x + a.transpose(1, 2).reshape(n, c, h, w)


class TorchBlock(torch.nn.Module):
    def __init__(self, c=64, groups=8, heads=2):
        super().__init__()
        self.conv = torch.nn.Conv2d(c, c, 3, padding=1)
        self.norm = torch.nn.GroupNorm(groups, c)
        self.qkv = torch.nn.Linear(c, 3 * c)
        self.proj = torch.nn.Linear(c, c)
        self.heads = heads

    def forward(self, x):
        n, c, h, w = x.shape
        y = torch.nn.functional.silu(self.norm(self.conv(x)))
        t = y.reshape(n, c, h * w).transpose(1, 2)
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        sh = lambda z: z.reshape(n, h * w, self.heads, c // self.heads).transpose(1, 2)
        a = torch.nn.functional.scaled_dot_product_attention(sh(q), sh(k), sh(v))
        a = self.proj(a.transpose(1, 2).reshape(n, h * w, c))
        return x + a.transpose(1, 2).reshape(n, c, h, w)


def bench_block(with_compile=True, compile_only=None):
    flame.manual_seed(0)
    model = Block()
    x, t = rnd(2, 64, 16, 16), rnd(2, 64, 16, 16)
    lr = 1e-3

    def step(x, t):
        loss, grads = flame.value_and_grad(lambda x, t: F.mse_loss(model(x), t), params=model)(x, t)
        return loss, {k: p - lr * grads[k] for k, p in model.named_parameters()}
    c = flame.compile(step, x, t, backend="cuda", options={"compile_only": compile_only} if compile_only else None)
    if compile_only:   # bench/experiments/precompile.py
        return
    fr = c.runner
    fr.upload(c.feeds((x, t)))
    # a training step is timed as a loop runs it: steps back to back, host included
    ms = timing.stream_ms(fr.replay, fr.hstream)
    torch_ms = lambda fn: timing.stream_ms(fn, torch.cuda.current_stream().cuda_stream)
    # host cost of a replay: wall time of launching the graph, per captured launch
    fr.replay(); fr.sync()
    t0 = time.perf_counter()
    reps = 200
    for _ in range(reps):
        fr.replay()
    host = (time.perf_counter() - t0) / reps
    fr.sync()
    tm = TorchBlock().cuda()
    with torch.no_grad():
        for (k, p) in model.named_parameters():
            dict(tm.named_parameters())[k].copy_(torch.from_numpy(p.data))
    opt = torch.optim.SGD(tm.parameters(), lr=lr)
    tx, tt = torch.from_numpy(x).cuda(), torch.from_numpy(t).cuda()

    def tstep(m=tm):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(m(tx), tt)
        loss.backward()
        opt.step()
    eager = torch_ms(tstep)
    row("block train step 2x64x16x16 (vs torch eager)", ms, eager,
        note=f"{fr.launches} launches in 1 CUDA graph; host {1e6 * host / max(fr.launches, 1):.2f} us/launch at replay; "
             "mean of 50 steps back to back")
    if with_compile:
        try:
            cm = torch.compile(tm)
            t0 = time.time()
            tstep(cm)
            torch.cuda.synchronize()
            row("block train step 2x64x16x16 (vs torch.compile)", ms, torch_ms(lambda: tstep(cm)),
                note=f"torch.compile warm-up {time.time() - t0:.0f}s")
        except Exception as e:
            print(f"torch.compile failed: {type(e).__name__}: {e}", file=sys.stderr)
    ROWS.append({"bench": "launches per block training step", "value": fr.launches,
                 "host_us_per_launch": round(1e6 * host / max(fr.launches, 1), 3)})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--only", default="")
    ap.add_argument("--sweep", action="store_true", help="also time the renderer's tunables")
    ap.add_argument("--timing", choices=("gated", "launch"), default="gated",
                    help="gated: device time only (default); launch: events around each launch as submitted")
    args = ap.parse_args()
    timing.MODE = args.timing
    benches = {"elementwise": bench_elementwise, "rows": bench_rows, "gemm": bench_gemm, "conv": bench_conv,
               "block": bench_block, "long_rows": bench_long_rows, "sweep": bench_sweep}
    # --only's order is the run's (the figures that matter most first, in case a time limit cuts it)
    names = args.only.split(",") if args.only else [n for n in benches if args.sweep or n not in ("sweep", "long_rows")]
    if set(names) - set(benches):
        ap.error(f"--only: no benchmark {', '.join(sorted(set(names) - set(benches)))} (there are {', '.join(benches)})")
    print("device:", torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    bench_copy()
    for name in names:
        fn = benches[name]
        try:
            fn()
        except Exception as e:
            import traceback
            traceback.print_exc()
            ROWS.append({"bench": name, "error": f"{type(e).__name__}: {e}"})
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                       "timing": args.timing, "rows": ROWS}, f, indent=1)
    print("\n| bench | flame ms | torch ms | speedup (torch ms / flame ms) | note |")
    for r in ROWS:
        print(f"| {r['bench']} | {r.get('flame_ms', r.get('value', ''))} | {r.get('torch_ms', '')} | "
              f"{r.get('speedup', '')} | {r.get('note', r.get('error', ''))} "
              f"{('GB/s ' + str(r['flame_GBps']) + ' vs ' + str(r['torch_GBps'])) if 'flame_GBps' in r else ''}"
              f"{('TFLOP/s ' + str(r['flame_TFLOPs']) + ' vs ' + str(r['torch_TFLOPs'])) if 'flame_TFLOPs' in r else ''}|")


if __name__ == "__main__":
    main()
