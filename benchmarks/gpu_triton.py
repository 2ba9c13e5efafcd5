"""Time the Triton forward of segment_attention_pool on a GPU against the device's peak bandwidth and padded SDPA.

    python benchmarks/gpu_triton.py --out results/gpu_triton.json

Main case (as in the issue): B = 2048 sets with lengths uniform in 1..128, D = 128, M = 1 shared query, float16 and
float32. For each dtype it

1. checks the Triton outputs (out, lse) and gradients (x, query) against attnpool.kernels.reference on the same data,
   and padded ``F.scaled_dot_product_attention`` against the reference too; any mismatch stops the run;
2. times, with ``triton.testing.do_bench`` (L2 flushed before every run, median of the runs):
   the Triton forward (the whole public call: allocation, both kernel launches), SDPA on input padded beforehand,
   padding + SDPA, and ``x.sum()`` (the physical floor: one read of the packed input);
3. reports bandwidth as bytes of the packed ``x`` read / time, against the device's peak (from its memory clock and
   bus width, or ``--peak-gbps``), and the speed-up over padded SDPA.

Also: a skewed batch (one set of 2^20 rows beside 10,000 sets of 1..16 rows; padding it would need terabytes, so no
SDPA), with and without splitting long sets across programs, and a small sweep of (block_n, num_warps) for the main
case, to tune the defaults. Results go to stdout as a Markdown table and to ``--out`` as JSON.

Needs a CUDA device and triton; without them it exits with status 2 and says why.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Fallback peak DRAM bandwidth (GB/s, vendor figures) where the device's properties lack the memory clock.
PEAK_GBPS = {"H100 SXM": 3352, "H100 NVL": 3938, "H100 PCIe": 2039, "H100": 3352, "H200": 4800, "GH200": 4000,
             "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935, "A100-SXM4-40GB": 1555, "A100-PCIE-40GB": 1555,
             "L40S": 864, "L4": 300, "A10": 600}


def fail(msg: str) -> None:
    print(f"gpu_triton.py: {msg}", file=sys.stderr)
    raise SystemExit(2)


def peak_bandwidth(props, override: float | None) -> tuple[float | None, str]:
    if override:
        return float(override), "--peak-gbps"
    clock_khz = getattr(props, "memory_clock_rate", 0) or 0
    bus_bits = getattr(props, "memory_bus_width", 0) or 0
    if clock_khz and bus_bits:  # double data rate: two transfers a clock
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, f"2 x {clock_khz / 1e3:.0f} MHz x {bus_bits} bit"
    for key, gbps in PEAK_GBPS.items():
        if key in props.name:
            return float(gbps), f"table ({key})"
    return None, "unknown (pass --peak-gbps)"


def make_batch(lengths: torch.Tensor, d: int, m: int, dtype: torch.dtype, seed: int, device: str):
    g = torch.Generator(device=device).manual_seed(seed)
    offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(device)
    n = int(offsets[-1])
    x = torch.randn(n, d, device=device, dtype=torch.float32, generator=g).to(dtype)
    q = torch.randn(1, m, d, device=device, dtype=torch.float32, generator=g).to(dtype)
    return x, offsets, q


def padded_inputs(x, offsets, lengths):
    """The padded form SDPA needs: [B, 1, L, D] values, [B, 1, 1, L] bool mask, and a function that pads."""
    b, lmax, dev = lengths.shape[0], int(lengths.max()), x.device
    lens = lengths.to(dev)
    seg = torch.repeat_interleave(torch.arange(b, device=dev), lens)
    pos = torch.arange(x.shape[0], device=dev) - offsets[:-1][seg]
    dest = seg * lmax + pos
    mask = (torch.arange(lmax, device=dev)[None, :] < lens[:, None]).view(b, 1, 1, lmax)

    def pad(xx):
        out = xx.new_zeros(b * lmax, xx.shape[1])
        out[dest] = xx
        return out.view(b, 1, lmax, xx.shape[1])

    return pad, mask


def assert_close(name, got, ref, rtol, atol):
    err = (got.double() - ref.double()).abs()
    bound = atol + rtol * ref.double().abs()
    bad = ~(err <= bound)
    if bool(bad.any()):
        fail(f"{name}: mismatch with the reference, max abs error {err.max().item():.3e} "
             f"({int(bad.sum())} of {bad.numel()} entries beyond atol={atol:g}, rtol={rtol:g})")
    return float(err.max())


def tolerances(dtype):
    return (1e-4, 1e-4) if dtype == torch.float32 else (2 * torch.finfo(dtype).eps, 4 * torch.finfo(dtype).eps)


def check(tp, ref_fn, x, offsets, q, scale, dtype, backward: bool, **tuning) -> dict[str, float]:
    """Forward (and, on request, backward) of the Triton kernel against the reference; raises SystemExit on mismatch."""
    rtol, atol = tolerances(dtype)
    errs = {}
    with torch.no_grad():
        out, lse = tp.segment_attention_pool(x, offsets, q, scale, **tuning)
        r_out, r_lse = ref_fn(x, offsets, q, scale)
    errs["out"] = assert_close("out", out, r_out, rtol, atol * max(1.0, r_out.abs().max().item()))
    errs["lse"] = assert_close("lse", lse, r_lse, 1e-5, 1e-4)
    if backward:
        g = torch.randn_like(r_out, dtype=torch.float32)
        gl = torch.randn_like(r_lse)
        grads = []
        for fn in (tp.segment_attention_pool, ref_fn):
            xx = x.detach().clone().requires_grad_()
            qq = q.detach().clone().requires_grad_()
            o, l = fn(xx, offsets, qq, scale, **(tuning if fn is tp.segment_attention_pool else {}))
            ((o.float() * g).sum() + (l.float() * gl).sum()).backward()
            grads.append((xx.grad, qq.grad))
        (dx, dq), (r_dx, r_dq) = grads
        errs["dx"] = assert_close("dx", dx, r_dx, rtol, atol * max(1.0, r_dx.abs().max().item()))
        errs["dq"] = assert_close("dq", dq, r_dq, rtol, atol * max(1.0, r_dq.abs().max().item()))
    return errs


def gbps(nbytes: int, us: float) -> float:
    return nbytes / (us * 1e-6) / 1e9


def bench(fn, warmup, rep) -> dict[str, float]:
    import triton.testing

    p20, p50, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.2, 0.5, 0.8])
    return {"median_us": p50 * 1e3, "p20_us": p20 * 1e3, "p80_us": p80 * 1e3}


def host_inclusive_us(fn, iters=200) -> float:
    """Back-to-back calls, synchronised once: what a caller sees including launch overhead (L2 not flushed)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


class Bench:
    """Timing and checks for one run; ``smoke`` runs everything on the CPU in Triton's interpreter (tiny shapes,
    wall-clock times that mean nothing) to test this script without a GPU."""

    def __init__(self, args, tp, reference, peak):
        self.args, self.tp, self.reference, self.peak = args, tp, reference, peak
        self.dev = "cpu" if args.smoke else "cuda"

    def pct(self, v):
        return None if self.peak is None else 100.0 * v / self.peak

    def time(self, fn) -> dict[str, float]:
        if self.args.smoke:
            import time

            ts = []
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e6)
            ts.sort()
            return {"median_us": ts[1], "p20_us": ts[0], "p80_us": ts[2]}
        return bench(fn, self.args.warmup, self.args.rep)

    def host_us(self, fn):
        return None if self.args.smoke else host_inclusive_us(fn)

    def batch(self, lengths, dtype, seed):
        return make_batch(lengths, self.args.dim, self.args.queries, dtype, seed, self.dev)

    def check(self, x, offsets, q, scale, dtype, backward, **tuning):
        return check(self.tp, self.reference.segment_attention_pool, x, offsets, q, scale, dtype, backward, **tuning)

    def main_case(self, name, lengths, scale):
        args, tp = self.args, self.tp
        dtype = DTYPES[name]
        b, m, d = lengths.shape[0], args.queries, args.dim
        x, offsets, q = self.batch(lengths, dtype, args.seed)
        nbytes = x.numel() * x.element_size()
        errs = self.check(x, offsets, q, scale, dtype, backward=True)

        pad, mask = padded_inputs(x, offsets, lengths)
        xp = pad(x)
        qp = q.expand(b, m, d).reshape(b, 1, m, d)
        sdpa_out = F.scaled_dot_product_attention(qp, xp, xp, attn_mask=mask, scale=scale).view(b, m, d)
        r_out, _ = self.reference.segment_attention_pool(x, offsets, q, scale)
        rtol, atol = tolerances(dtype)
        errs["sdpa_out"] = assert_close("padded SDPA out", sdpa_out, r_out, rtol,
                                        atol * max(1.0, r_out.abs().max().item()))

        def pool(**cfg):
            return tp.segment_attention_pool(x, offsets, q, scale, **cfg)

        def sdpa():
            return F.scaled_dot_product_attention(qp, xp, xp, attn_mask=mask, scale=scale)

        def pad_sdpa():
            xq = pad(x)
            return F.scaled_dot_product_attention(qp, xq, xq, attn_mask=mask, scale=scale)

        with torch.no_grad():
            t_tri, t_sdpa, t_pad_sdpa, t_sum = (self.time(fn) for fn in (pool, sdpa, pad_sdpa, x.sum))
            t_host = self.host_us(pool)
        bw = gbps(nbytes, t_tri["median_us"])
        row = {
            "case": f"B={b}, L~U[1,{int(lengths.max())}], D={d}, M={m}", "dtype": name, "rows": x.shape[0],
            "x_mb": nbytes / 1e6, "triton": t_tri, "triton_gbps": bw, "triton_pct_peak": self.pct(bw),
            "triton_host_inclusive_us": t_host,
            "sdpa_padded": t_sdpa, "sdpa_gbps": gbps(nbytes, t_sdpa["median_us"]), "pad_plus_sdpa": t_pad_sdpa,
            "speedup_vs_sdpa": t_sdpa["median_us"] / t_tri["median_us"],
            "speedup_vs_pad_sdpa": t_pad_sdpa["median_us"] / t_tri["median_us"],
            "x_sum_floor": t_sum, "x_sum_gbps": gbps(nbytes, t_sum["median_us"]), "max_abs_err": errs,
            "padded_rows": b * int(lengths.max()),
        }
        sweep = []
        if not args.no_sweep:
            for block_n in (16, 32, 64):
                for num_warps in (2, 4, 8):
                    cfg = {"block_n": block_n, "num_warps": num_warps}
                    self.check(x, offsets, q, scale, dtype, backward=False, **cfg)
                    with torch.no_grad():
                        t = self.time(lambda cfg=cfg: pool(**cfg))
                    sweep.append({"dtype": name, **cfg, **t, "gbps": gbps(nbytes, t["median_us"])})
        return row, sweep

    def skewed_case(self, name, gen, scale):
        """One long set beside many tiny ones, split across programs (default) and not (chunk = N)."""
        args, tp = self.args, self.tp
        dtype = DTYPES[name]
        long_len, n_small = (1 << 12, 100) if args.smoke else (1 << 20, 10_000)
        lengths = torch.cat([torch.tensor([long_len]), torch.randint(1, 17, (n_small,), generator=gen)])
        lengths = lengths[torch.randperm(lengths.numel(), generator=gen)]
        x, offsets, q = self.batch(lengths, dtype, args.seed + 1)
        n = x.shape[0]
        nbytes = x.numel() * x.element_size()
        errs = self.check(x, offsets, q, scale, dtype, backward=False)
        self.check(x, offsets, q, scale, dtype, backward=False, chunk=n)

        def split():
            return tp.segment_attention_pool(x, offsets, q, scale)

        def whole():
            return tp.segment_attention_pool(x, offsets, q, scale, chunk=n)

        with torch.no_grad():
            t_split, t_whole, t_sum = (self.time(fn) for fn in (split, whole, x.sum))
        rows = []
        for label, t in (("split (default)", t_split), ("no split (chunk=N)", t_whole)):
            bw = gbps(nbytes, t["median_us"])
            rows.append({
                "case": f"skewed: 1 x {long_len} + {n_small} x U[1,16], D={args.dim}, M={args.queries}, {label}",
                "dtype": name, "rows": n, "x_mb": nbytes / 1e6, "triton": t, "triton_gbps": bw,
                "triton_pct_peak": self.pct(bw), "x_sum_floor": t_sum, "x_sum_gbps": gbps(nbytes, t_sum["median_us"]),
                "sdpa_padded": None, "padded_rows": int(lengths.numel()) * long_len, "max_abs_err": errs,
            })
        return rows


def fmt(v, spec="{:.1f}"):
    return "n/a" if v is None else spec.format(v)


def print_tables(rows, sweep_rows):
    print("| case | dtype | x MB | Triton µs (p20-p80) | Triton GB/s | % peak | x.sum() µs (GB/s) | "
          "padded SDPA µs | pad+SDPA µs | vs SDPA | vs pad+SDPA | host-incl. µs/call |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        t, s, ps = r["triton"], r.get("sdpa_padded"), r.get("pad_plus_sdpa")
        print(f"| {r['case']} | {r['dtype']} | {r['x_mb']:.1f} | {t['median_us']:.1f} ({t['p20_us']:.1f}-"
              f"{t['p80_us']:.1f}) | {r['triton_gbps']:.0f} | {fmt(r['triton_pct_peak'])} | "
              f"{r['x_sum_floor']['median_us']:.1f} ({r['x_sum_gbps']:.0f}) | "
              f"{fmt(s and s['median_us'])} | {fmt(ps and ps['median_us'])} | "
              f"{fmt(r.get('speedup_vs_sdpa'), '{:.2f}x')} | {fmt(r.get('speedup_vs_pad_sdpa'), '{:.2f}x')} | "
              f"{fmt(r.get('triton_host_inclusive_us'))} |")
    if sweep_rows:
        print("\n| dtype | block_n | num_warps | Triton µs | GB/s |")
        print("|---|---:|---:|---:|---:|")
        for r in sweep_rows:
            print(f"| {r['dtype']} | {r['block_n']} | {r['num_warps']} | {r['median_us']:.1f} | {r['gbps']:.0f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="where to write the JSON results")
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--max-len", type=int, default=128, help="set lengths are uniform in 1..max-len")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=1)
    ap.add_argument("--dtypes", default="fp16,fp32", help=f"comma-separated, of {sorted(DTYPES)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=50, help="do_bench warm-up, ms")
    ap.add_argument("--rep", type=int, default=300, help="do_bench repetition time, ms")
    ap.add_argument("--peak-gbps", type=float, default=None, help="override the device's peak bandwidth, GB/s")
    ap.add_argument("--no-sweep", action="store_true", help="skip the (block_n, num_warps) sweep")
    ap.add_argument("--no-skewed", action="store_true", help="skip the skewed batch")
    ap.add_argument("--smoke", action="store_true",
                    help="test this script without a GPU: CPU tensors in Triton's interpreter (needs TRITON_INTERPRET=1"
                         "), tiny shapes; the times mean nothing")
    args = ap.parse_args(argv)

    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if args.smoke:
        if not interpret:
            fail("--smoke runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
        args.batch, args.max_len, args.dim = min(args.batch, 16), min(args.max_len, 12), min(args.dim, 16)
    else:
        if not torch.cuda.is_available():
            fail("no CUDA device: this benchmark times GPU kernels and cannot run here (the kernels' correctness "
                 "tests run on the CPU: pytest tests/kernels/test_triton.py; --smoke tests this script)")
        if interpret:
            fail("TRITON_INTERPRET=1 is set: unset it to time the compiled kernels")
    try:
        import triton
    except ImportError:
        fail("triton is not installed: pip install triton")
    from attnpool.kernels import reference
    from attnpool.kernels import triton_pool as tp

    dtypes = [s.strip() for s in args.dtypes.split(",") if s.strip()]
    for name in dtypes:
        if name not in DTYPES:
            fail(f"--dtypes: unknown dtype {name!r}, expected some of {sorted(DTYPES)}")

    if args.smoke:
        device, sms, (peak, peak_src) = f"CPU (interpreter smoke test: {platform.processor()})", 0, (None, "n/a")
    else:
        props = torch.cuda.get_device_properties(0)
        device, sms = props.name, props.multi_processor_count
        peak, peak_src = peak_bandwidth(props, args.peak_gbps)
    scale = 1.0 / math.sqrt(args.dim)
    gen = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(1, args.max_len + 1, (args.batch,), generator=gen)
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device, "sms": sms, "peak_gbps": peak, "peak_source": peak_src,
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "args": {k: str(v) for k, v in vars(args).items()},
        "timing": "triton.testing.do_bench, L2 flushed before each run; median (p20, p80) over the runs",
        "bandwidth": "bytes of the packed x read / time (SDPA: the same bytes, though it reads the padded copy)",
    }
    print(f"# segment_attention_pool forward, {device} ({sms} SMs), peak {fmt(peak, '{:.0f}')} GB/s [{peak_src}]; "
          f"torch {torch.__version__}, triton {triton.__version__}; {meta['date']}\n")

    runner = Bench(args, tp, reference, peak)
    rows, sweep_rows = [], []
    for name in dtypes:
        row, sweep = runner.main_case(name, lengths, scale)
        rows.append(row)
        sweep_rows += sweep
        if not args.no_skewed:
            rows += runner.skewed_case(name, gen, scale)

    print_tables(rows, sweep_rows)
    print("\nAll outputs were checked against attnpool.kernels.reference before timing (max abs errors in the JSON).")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": rows, "sweep": sweep_rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
