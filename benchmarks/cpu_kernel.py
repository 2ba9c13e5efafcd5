"""Benchmark of the fused CPU kernel against its alternatives and the memory floor (see benchmarks/cpu_kernel_notes.md).

    python benchmarks/cpu_kernel.py [--threads 2] [--reps 11] [--no-compile] [--cpu-time]

Variants, each checked against the reference before it is timed:
  reference  attnpool.kernels.reference (torch ops; N x M x D temporaries)
  two-pass   x @ q, segment softmax with torch.segment_reduce, then the weighted sum as a CSR sparse-dense matmul
  compiled   torch.compile of the reference (dynamic=False; compile time reported separately)
  fused      attnpool.kernels.cpu (this kernel)
Floors on the same x: forward x.sum(); forward+backward x.sum().backward() with x requiring grad.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from attnpool.kernels import cpu, reference

warnings.filterwarnings("ignore", message=".*Sparse.*")

CASES = [  # (name, B, max length, D, M): lengths uniform in 1..max; a skewed batch adds one set of 1M rows
    ("B=2048 L~U(1,128) D=128 M=1", 2048, 128, 128, 1),
    ("B=256 L~U(1,1024) D=256 M=4", 256, 1024, 256, 4),
    ("B=16384 L~U(1,16) D=64 M=1", 16384, 16, 64, 1),
    ("skewed: 1 set of 1M + 10k sets L~U(1,16), D=64 M=1", 10_000, 16, 64, 1),
]


def two_pass(x, offsets, query, scale):
    n, _ = x.shape
    b = offsets.shape[0] - 1
    lengths = offsets[1:] - offsets[:-1]
    seg = torch.repeat_interleave(torch.arange(b), lengths, output_size=n)
    q = query.to(x.dtype)
    logits = (x @ q[0].T) * scale if q.shape[0] == 1 else torch.einsum("nd,nmd->nm", x, q[seg]) * scale
    mx = torch.segment_reduce(logits.detach(), "max", offsets=offsets, axis=0, unsafe=True)
    shift = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    e = torch.exp(logits - shift[seg])
    total = torch.segment_reduce(e, "sum", offsets=offsets, axis=0, unsafe=True)
    w = e / torch.where(total > 0, total, torch.ones_like(total))[seg]
    cols = torch.arange(n)
    outs = [torch.sparse_csr_tensor(offsets, cols, w[:, m].contiguous(), size=(b, n)) @ x for m in range(w.shape[1])]
    return torch.stack(outs, 1), torch.log(total) + shift


def timed(fn, reps, cpu_time):
    clock = time.thread_time if cpu_time else time.perf_counter
    fn()
    ts = []
    for _ in range(reps):
        t = clock()
        fn()
        ts.append(clock() - t)
    return statistics.median(ts) * 1e3


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--reps", type=int, default=11)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--cpu-time", action="store_true", help="thread CPU time (only meaningful with --threads 1)")
    p.add_argument("--cases", default="0,1,2,3", help="which cases to run (indices into CASES)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    cpu.build()
    print(f"kernel ready in {time.perf_counter() - t:.1f} s (isa {cpu._isa()}); threads {torch.get_num_threads()}; "
          f"{'thread CPU' if args.cpu_time else 'wall'} time, median of {args.reps}, ms")
    g = torch.Generator().manual_seed(0)
    for name, b, lmax, d, m in [CASES[int(i)] for i in args.cases.split(",")]:
        lengths = torch.randint(1, lmax + 1, (b,), generator=g)
        if name.startswith("skewed"):
            lengths = torch.cat([lengths[: b // 2], torch.tensor([1_000_000]), lengths[b // 2 :]])
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        x = torch.randn(int(offsets[-1]), d, generator=g)
        q = torch.randn(1, m, d, generator=g)
        run_case(name, x, offsets, q, d**-0.5, args)


def run_case(name, x, offsets, q, scale, args):
    variants = {"reference": reference.segment_attention_pool, "two-pass": two_pass,
                "fused": cpu.segment_attention_pool}
    if x.shape[0] > 500_000:  # the CSR matmul's backward densifies the [B, N] weights: 40 GB here
        del variants["two-pass"]
    if not args.no_compile:
        compiled = torch.compile(reference.segment_attention_pool, dynamic=False)
        t = time.perf_counter()
        xr = x.clone().requires_grad_()
        compiled(xr, offsets, q, scale)[0].sum().backward()
        variants["compiled"] = compiled
        print(f"  torch.compile of the reference: first call (compile) {time.perf_counter() - t:.1f} s")
    want = reference.segment_attention_pool(x, offsets, q, scale)
    for k, fn in variants.items():
        got = fn(x, offsets, q, scale)
        torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4, msg=f"{k} out")
        torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4, msg=f"{k} lse")
    xg = x.clone().requires_grad_()

    def floor_fb():
        xg.grad = None
        xg.sum().backward()

    def fb(fn):
        def run():
            xg.grad = None
            fn(xg, offsets, q, scale)[0].sum().backward()
        return run

    def reps(k):
        return max(3, args.reps // 3) if k == "reference" else args.reps

    floor_f = timed(lambda: x.sum(), args.reps, args.cpu_time)
    floor_b = timed(floor_fb, args.reps, args.cpu_time)
    print(f"{name}: N={x.shape[0]}, x {x.numel() * 4 / 1e6:.0f} MB; floor x.sum() {floor_f:.2f}, "
          f"x.sum().backward() {floor_b:.2f}")
    for k, fn in variants.items():
        f = timed(lambda fn=fn: fn(x, offsets, q, scale), reps(k), args.cpu_time)
        f_b = timed(fb(fn), reps(k), args.cpu_time)
        print(f"  {k:10s} fwd {f:8.2f} ({f / floor_f:5.2f}x floor)   "
              f"fwd+bwd {f_b:8.2f} ({f_b / floor_b:5.2f}x floor)")

if __name__ == "__main__":
    main()
