"""Experiment: what do the benchmark's event timings count besides the kernel? The same work
timed four ways in one process (bench/timing.py):
  launch   events around each launch as the host submits it (the benchmark until 2026-12-07)
  gated    every repetition enqueued behind a gate first: device time only
  flushed  gated, with L2 overwritten before each repetition (inputs from HBM)
  stream   one pair of events around 50 back-to-back launches, divided by 50
    PYTHONPATH=.:bench python bench/experiments/timing_probe.py"""
import torch

import flame
import flame.nn.functional as F
import gpu_bench as gb
import timing


def flame_cases(x, w):
    """(name, function, input, bytes moved): also what precompile.py compiles."""
    tiny = x.reshape(-1)[:1024].copy()
    return [("flame x*2+1 1024", lambda x: x * 2.0 + 1.0, tiny, 8 * 1024),
            ("flame x*2+1 2x320x64x64", lambda x: x * 2.0 + 1.0, x, 8 * x.size),
            ("flame group_norm fwd", lambda x: F.group_norm(x, 32), x, 8 * x.size),
            ("flame group_norm fwd+bwd",
             flame.value_and_grad(lambda x: (F.group_norm(x, 32) * flame.const(w)).sum()), x, 12 * x.size)]


def main():
    gb.bench_copy()
    x = gb.rnd(2, 320, 64, 64)
    tx = torch.from_numpy(x).cuda()
    cases = [(n, gb.flame_runner(f, inp), b) for n, f, inp, b in flame_cases(x, gb.rnd(*x.shape))]
    ts = torch.cuda.current_stream().cuda_stream
    torch_cases = [("torch clone 2x320x64x64", lambda: tx.clone(), 8 * x.size),
                   ("torch group_norm fwd", lambda: torch.nn.functional.group_norm(tx, 32), 8 * x.size)]
    print("| work | launch ms | gated ms | flushed ms | stream ms | gated % of copy |")
    for name, fr, bytes_ in [(n, (fr.replay, fr.hstream), b) for n, fr, b in cases] + \
            [(n, (fn, ts), b) for n, fn, b in torch_cases]:
        got = {}
        for mode, flush in (("launch", False), ("gated", False), ("gated", True)):
            timing.MODE, timing.FLUSH_L2 = mode, flush
            got[mode + ("+flush" if flush else "")] = timing.median_ms(*fr, reps=200)
        timing.MODE, timing.FLUSH_L2 = "gated", False
        got["stream"] = timing.stream_ms(*fr)
        print(f"| {name} | {got['launch']:.4f} | {got['gated']:.4f} | {got['gated+flush']:.4f} | "
              f"{got['stream']:.4f} | {gb.roofline(bytes_, got['gated'])} |", flush=True)


if __name__ == "__main__":
    main()
