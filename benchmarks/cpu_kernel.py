"""Benchmark of the fused CPU kernel against its alternatives and the memory floor (see benchmarks/cpu_kernel_notes.md).

    python benchmarks/cpu_kernel.py [--threads 2] [--reps 11] [--no-compile] [--cpu-time]
    python benchmarks/cpu_kernel.py --sweep [--threads 1,2] [--reps 21] [--cpu-time] [--baseline GIT_REV] [--backward]

The default mode compares the variants below on four cases. ``--sweep`` times only the fused forward against the
floor, for M = 1, 2, 4, 8 queries at D = 128 and 256 (by default B = 256 sets of 1..1024 rows: 67 / 134 MB, beyond
the L3; --sets and --max-len change that), at each thread count given, in one process: paired rounds (floor, then
every M) so that a burst of outside load hits all alike; it prints the medians, the median per-round ratio to the
floor, the multiply-adds per second the kernel reached (2 M D per row), and for scale the rate of an in-cache float32
matmul (torch.mm, 256 x 256 x 256) on the same threads, a practical ceiling for the FMA units. With --cpu-time the
1-thread rows are timed in thread CPU time (robust to other jobs taking the core; the 2-thread rows stay wall time).
--baseline REV builds the kernel sources of a git revision beside the current ones and alternates their calls, for
before/after figures from one process. --backward times the backward instead (dx and dq for a fixed output gradient;
5 M D multiply-adds per row: the 2 M products x.g_m and x.q_m, dx as a combination of those 2 M vectors, dq), against
a floor of one read of x and one write of dx.

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
    # a string here: --sweep takes a comma-separated list of thread counts
    p.add_argument("--threads", default=str(torch.get_num_threads()))
    p.add_argument("--reps", type=int, default=11)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--cpu-time", action="store_true", help="thread CPU time (only meaningful with --threads 1)")
    p.add_argument("--cases", default="0,1,2,3", help="which cases to run (indices into CASES)")
    p.add_argument("--sweep", action="store_true", help="forward only: M = 1, 2, 4, 8 at D = 128, 256 vs x.sum()")
    args, rest = p.parse_known_args()
    if args.sweep:
        sweep([*rest, "--threads", args.threads], args.reps, args.cpu_time)
        return
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if not args.threads.isdigit():
        p.error(f"--threads: expected one thread count without --sweep, got {args.threads!r}")
    torch.set_num_threads(int(args.threads))
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

def baseline_library(rev):
    """The kernel library built from the sources of git revision ``rev``, with the flags cpu.py uses (for A/B
    timings of a kernel change in one process: calls alternate, so outside load hits both alike)."""
    import ctypes
    import subprocess
    import tempfile
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    tmp = Path(tempfile.mkdtemp(prefix="attnpool-baseline-"))
    for name in cpu._SOURCES:
        text = subprocess.run(["git", "show", f"{rev}:src/attnpool/kernels/csrc/{name}"], cwd=root, check=True,
                              capture_output=True, text=True).stdout
        (tmp / name).write_text(text)
    cxx = cpu._compiler()
    objects = [str(tmp / f"part{i}.o") for i in (0, 1)]
    for i, obj in enumerate(objects):
        subprocess.run([*cxx, *cpu._CFLAGS, f"-DAP_PART={i}", "-c", str(tmp / cpu._SOURCES[0]), "-o", obj],
                       check=True)
    subprocess.run([*cxx, *cpu._LDFLAGS, *objects, "-o", str(tmp / "lib.so")], check=True)
    lib = ctypes.CDLL(str(tmp / "lib.so"))
    for name in ("ap_forward", "ap_backward"):
        getattr(lib, name).argtypes = getattr(cpu.build(), name).argtypes
        getattr(lib, name).restype = ctypes.c_int
    return lib


def forward_call(lib, x, offsets, q, scale, threads):
    """One forward of ``lib`` (float32, shared query) straight through its C entry point."""
    b, m, d = offsets.shape[0] - 1, q.shape[1], x.shape[1]
    out, lse = torch.empty(b, m, d), torch.empty(b, m)

    def run():
        status = lib.ap_forward(0, x.data_ptr(), d, x.shape[0], d, offsets.data_ptr(), b, q.data_ptr(), 1, m, scale,
                                out.data_ptr(), lse.data_ptr(), threads)
        assert status == 0, status
        return out, lse
    return run


def backward_call(lib, x, offsets, q, scale, threads):
    """One backward of ``lib`` (float32, shared query; dx and dq) through its C entry point, for a fixed output
    gradient and the forward's out and lse."""
    b, m, d = offsets.shape[0] - 1, q.shape[1], x.shape[1]
    out, lse = forward_call(lib, x, offsets, q, scale, threads)()
    out, lse = out.clone(), lse.clone()
    gout = torch.randn(b, m, d, generator=torch.Generator().manual_seed(1))
    dx, dq = torch.empty_like(x), torch.empty(1, m, d)

    def run():
        dq.zero_()
        status = lib.ap_backward(0, x.data_ptr(), d, x.shape[0], d, offsets.data_ptr(), b, q.data_ptr(), 1, m, scale,
                                 out.data_ptr(), lse.data_ptr(), gout.data_ptr(), None, dx.data_ptr(),
                                 dq.data_ptr(), threads)
        assert status == 0, status
        return dx, dq
    return run


def sweep(argv, reps, cpu_time):
    p = argparse.ArgumentParser(prog="cpu_kernel.py --sweep")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    p.add_argument("--ms", default="1,2,4,8")
    p.add_argument("--dims", default="128,256")
    p.add_argument("--sets", type=int, default=256, help="number of sets B")
    p.add_argument("--max-len", type=int, default=1024, help="set lengths uniform in 1..MAX_LEN")
    p.add_argument("--baseline", metavar="REV", help="also time the kernel of this git revision, calls alternating")
    p.add_argument("--backward", action="store_true",
                   help="time the backward (dx and dq, through its C entry point) instead of the forward; the floor "
                        "is then x.sum() plus a write of dx (torch.mul(x, 1, out=dx)): one read and one write")
    args = p.parse_args(argv)
    reps = max(reps, 5)
    libs = {"kernel": cpu.build()}
    if args.baseline:
        libs[args.baseline] = baseline_library(args.baseline)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, args.max_len + 1, (args.sets,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    n = int(offsets[-1])
    ms = [int(v) for v in args.ms.split(",")]
    print(f"isa {cpu._isa()}; B={args.sets} sets, lengths uniform in 1..{args.max_len}, N={n}; "
          f"median of {reps} paired rounds, ms, "
          f"{'thread CPU time with 1 thread, ' if cpu_time else ''}wall time otherwise; x/floor is the median of "
          f"the per-round ratios; GFMA/s = {'5' if args.backward else '2'} M D N / time; the kernel is called "
          f"through its C entry point")
    for d in [int(v) for v in args.dims.split(",")]:
        x = torch.randn(n, d, generator=g)
        qs = {m: torch.randn(1, m, d, generator=g) for m in ms}
        for threads in [int(v) for v in args.threads.split(",")]:
            torch.set_num_threads(threads)
            a, b = torch.randn(256, 256), torch.randn(256, 256)
            mm = timed(lambda a=a, b=b: torch.mm(a, b), 50, False)
            if args.backward:
                sink = torch.empty_like(x)
                fns = {"floor": lambda x=x, sink=sink: (x.sum(), torch.mul(x, 1, out=sink))}
            else:
                fns = {"floor": lambda x=x: x.sum()}
            for m in ms:
                want = reference.segment_attention_pool(x, offsets, qs[m], d**-0.5)
                if args.backward:
                    xr, qr = x.clone().requires_grad_(), qs[m].clone().requires_grad_()
                    o, _ = reference.segment_attention_pool(xr, offsets, qr, d**-0.5)
                    o.backward(torch.randn(o.shape, generator=torch.Generator().manual_seed(1)))
                for name, lib in libs.items():
                    if args.backward:
                        fn = backward_call(lib, x, offsets, qs[m], d**-0.5, threads)
                        dx, dq = fn()  # correctness first
                        torch.testing.assert_close(dx, xr.grad, rtol=1e-4, atol=1e-5)
                        torch.testing.assert_close(dq, qr.grad, rtol=1e-4, atol=1e-4)
                    else:
                        fn = forward_call(lib, x, offsets, qs[m], d**-0.5, threads)
                        got = fn()  # correctness first
                        torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
                        torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-5)
                    fns[f"M={m} {name}"] = fn
            ts: dict[str, list[float]] = {k: [] for k in fns}
            clock = time.thread_time if cpu_time and threads == 1 else time.perf_counter
            for _ in range(reps):
                for k, fn in fns.items():
                    t = clock()
                    fn()
                    ts[k].append(clock() - t)
            floor = statistics.median(ts["floor"])
            what = "backward; floor x.sum() + write of dx" if args.backward else "floor x.sum()"
            moved = (2 if args.backward else 1) * x.numel() * 4
            print(f"D={d} ({x.numel() * 4 / 1e6:.0f} MB), {threads} thread(s): {what} {floor * 1e3:.2f} ms "
                  f"({moved / floor / 1e9:.1f} GB/s); in-cache torch.mm {256**3 / mm / 1e6:.0f} GFMA/s")
            for m in ms:
                line = f"  M={m}:"
                for name in libs:
                    k = f"M={m} {name}"
                    med = statistics.median(ts[k])
                    ratio = statistics.median(t / f for t, f in zip(ts[k], ts["floor"]))
                    fma = (5 if args.backward else 2) * m * d * n
                    line += f"  {name} {med * 1e3:7.2f} ms {ratio:5.2f}x floor {fma / med / 1e9:5.1f} GFMA/s"
                if args.baseline:
                    k0, k1 = f"M={m} kernel", f"M={m} {args.baseline}"
                    line += f"  | kernel / {args.baseline}: " \
                            f"{statistics.median(t / u for t, u in zip(ts[k0], ts[k1])):.2f}"
                print(line)


if __name__ == "__main__":
    main()
