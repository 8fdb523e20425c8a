"""MoE dispatch measured against the active-dense limit and the Hugging Face peer.

The limit ("active-dense"): one dense feed-forward block of hidden width k * d_hidden, i.e. the
same active FLOPs per token as a k-of-E MoE, with no routing at all. Every variant is checked
numerically against the dense oracle (and the peer against our layer with the same weights)
before anything is timed. Timing: forward + backward, variants interleaved round by round in one
process, median of ``--repeats`` rounds after warm-up; ratios are taken from those medians.

Allocator: glibc's stock malloc returns big blocks to the OS after each call, so the large
single intermediates of the dense block page-fault on every call, which flatters any MoE. The
main numbers therefore use MALLOC_MMAP_THRESHOLD_/TRIM_THRESHOLD_/TOP_PAD_ (this script
re-executes itself with them); the stock-malloc numbers are measured in a child process and
reported beside them.

Usage:
    python benchmarks/bench_dispatch.py                  # full run (minutes), CPU, 2 threads, fp32
    python benchmarks/bench_dispatch.py --quick          # seconds; the CI smoke test
    python benchmarks/bench_dispatch.py --device cuda --dtype bf16
Outputs ``benchmarks/results/dispatch_<device>_<dtype>[_quick].{json,csv}``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

TUNED_MALLOC = {
    "MALLOC_MMAP_THRESHOLD_": "33554432",
    "MALLOC_TRIM_THRESHOLD_": "17179869184",
    "MALLOC_TOP_PAD_": "1073741824",
}
SHAPES = [
    {"name": "E8", "E": 8, "d_model": 256, "d_hidden": 1024, "k": 2, "T": 8192},
    {"name": "E64", "E": 64, "d_model": 128, "d_hidden": 256, "k": 2, "T": 8192},
]
QUICK_SHAPES = [
    {"name": "E4-quick", "E": 4, "d_model": 16, "d_hidden": 32, "k": 2, "T": 128},
    {"name": "E16-quick", "E": 16, "d_model": 16, "d_hidden": 16, "k": 2, "T": 128},
]
GOALS = {"E8": 1.08, "E64": 1.30}
INFERENCE_GOAL = 0.60


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (CI smoke test)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 20, quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 3, quick 1)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--forms", default="mlp,swiglu", help="expert forms to run (mlp, swiglu)")
    p.add_argument("--shapes", default=None, help="comma list of shape names to run (default all)")
    p.add_argument("--no-peer", action="store_true", help="skip the transformers peer")
    p.add_argument("--dense-repeats", type=int, default=3, help="rounds for the dense-all oracle (0 skips its timing)")
    p.add_argument("--no-stock", action="store_true", help="skip the stock-malloc child run")
    p.add_argument("--stock", action="store_true", help=argparse.SUPPRESS)  # internal: this is the child run
    p.add_argument("--json-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="output folder")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 20
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        p.error(f"--repeats must be >= 1, --warmup >= 0, --threads >= 1; got {args.repeats}, {args.warmup}, {args.threads}")
    return args


def ensure_allocator(args):
    """Re-execute with the tuned allocator settings unless this is the stock child run or they are set."""
    if args.stock or args.device != "cpu":
        return
    if all(os.environ.get(k) == v for k, v in TUNED_MALLOC.items()):
        return
    env = {**os.environ, **TUNED_MALLOC}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


# ----------------------------------------------------------------------------------------------
import torch  # noqa: E402  (after the re-exec decision, so the allocator settings apply from the start)
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tutorial_moe as tm  # noqa: E402
from tutorial_moe.dispatch import choose_dispatch, grouped_mm_available  # noqa: E402


class ActiveDenseMLP(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class ActiveDenseSwiGLU(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.gate, self.up, self.down = (nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False),
                                         nn.Linear(h, d, bias=False))

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def build_peer(layer: tm.MoELayer, implementation: str | None):
    """MixtralSparseMoeBlock with our layer's weights; None if transformers is not installed."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralModel, MixtralSparseMoeBlock
    except ImportError:
        return None
    bank = layer.experts
    kwargs = dict(hidden_size=bank.d_model, intermediate_size=bank.d_hidden, num_local_experts=bank.num_experts,
                  num_experts_per_tok=layer.router.k, router_jitter_noise=0.0, hidden_act="silu",
                  num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, vocab_size=8)
    if implementation == "model-default":
        # What MixtralModel picks for its experts in this transformers version.
        block = MixtralModel(MixtralConfig(**kwargs)).layers[0].mlp
    else:
        block = MixtralSparseMoeBlock(MixtralConfig(**kwargs, experts_implementation=implementation))
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.gate.weight)
        block.experts.gate_up_proj.copy_(torch.cat([bank.w_gate, bank.w_up], dim=2).transpose(1, 2))
        block.experts.down_proj.copy_(bank.w_down.transpose(1, 2))
    block.implementation = getattr(block.experts.config, "_experts_implementation", None) or "eager"
    return block


def make_variants(shape, form, args, device, dtype, notes):
    torch.manual_seed(0)
    d, h, E, k = shape["d_model"], shape["d_hidden"], shape["E"], shape["k"]
    layer = tm.MoELayer(d, h, E, k, expert=form, dispatch="dense", losses={}).to(device, dtype)
    active = (ActiveDenseMLP if form == "mlp" else ActiveDenseSwiGLU)(d, k * h).to(device, dtype)
    variants = {"active-dense": active}
    modes = ["dense", "loop", "sorted"]
    if grouped_mm_available(device.type, dtype):
        modes.append("grouped")
    else:
        notes.append(f"grouped: torch._grouped_mm unavailable for {device.type}/{dtype}")
    for mode in modes:
        variants[f"ours-{mode}" if mode != "dense" else "dense-all"] = (layer, mode)
    if form == "swiglu" and not args.no_peer:
        for impl in ("eager", "model-default"):
            peer = build_peer(layer, impl)
            if peer is None:
                notes.append("peer: transformers not installed (pip install -e '.[bench]')")
                break
            peer = peer.to(device, dtype)
            variants[f"peer-{impl}({peer.implementation})"] = peer
    return layer, variants


def call(variant, x):
    if isinstance(variant, tuple):
        layer, mode = variant
        layer.dispatch = mode
        return layer(x)
    if variant.__class__.__name__ == "MixtralSparseMoeBlock":
        return variant(x.unsqueeze(0)).squeeze(0)
    return variant(x)


def check_agreement(layer, variants, x, tol):
    """Max |difference| of every MoE variant's output vs the dense oracle (the peer vs ours)."""
    with torch.no_grad():
        ref = call((layer, "dense"), x).float()
        diffs = {}
        for name, v in variants.items():
            if name in ("active-dense", "dense-all"):
                continue
            diffs[name] = float((call(v, x).float() - ref).abs().max())
    bad = {n: dv for n, dv in diffs.items() if not dv <= tol}
    if bad:
        raise SystemExit(f"bench_dispatch: variants disagree with the dense oracle beyond {tol}: {bad}")
    return diffs


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_variants(variants, x, gy, args, device):
    """Median ms per variant. The dense oracle ("dense-all", E/k times the useful work) is timed
    in ``--dense-repeats`` rounds of its own; every other variant in interleaved rounds."""
    def once(v):
        x.grad = None
        y = call(v, x)
        y.backward(gy)

    def timed(v):
        sync(device)
        t = time.perf_counter()
        once(v)
        sync(device)
        return time.perf_counter() - t

    main = {n: v for n, v in variants.items() if n != "dense-all"}
    for _ in range(args.warmup):
        for v in main.values():
            once(v)
    times = {n: [] for n in main}
    for _ in range(args.repeats):
        for n, v in main.items():  # interleaved rounds: machine drift hits every variant alike
            times[n].append(timed(v))
    if "dense-all" in variants and args.dense_repeats > 0:
        once(variants["dense-all"])
        times["dense-all"] = [timed(variants["dense-all"]) for _ in range(args.dense_repeats)]
    return {n: statistics.median(ts) * 1e3 for n, ts in times.items()}


def inference_seed000(args, device, dtype):
    """Seed 000's setting: 6 whole-image MLP experts, gate picks top-3 vs running all 6, batch 256."""
    torch.manual_seed(0)
    hidden = 64 if args.quick else 256
    experts = [tm.MLPExpert(784, hidden, 10) for _ in range(6)]
    router = tm.TopKRouter(784, 6, 3)
    model = tm.MoE(experts, router, dispatch="auto").to(device, dtype).eval()
    x = torch.rand(256, 784, device=device, dtype=dtype)

    def run(k, mode):
        router.k, model.dispatch = k, mode
        with torch.no_grad():
            return model(x)

    ts = {"top3": [], "all6": [], "top3_loop": []}
    for _ in range(args.warmup + 2):
        run(3, "auto"); run(6, "dense")
    for _ in range(max(args.repeats, 5) * 2):
        for name, (k, mode) in (("top3", (3, "auto")), ("all6", (6, "dense")), ("top3_loop", (3, "loop"))):
            sync(device); t = time.perf_counter(); run(k, mode); sync(device)
            ts[name].append(time.perf_counter() - t)
    top3, all6 = statistics.median(ts["top3"]) * 1e3, statistics.median(ts["all6"]) * 1e3
    loop = statistics.median(ts["top3_loop"]) * 1e3
    return {"expert": f"MLPExpert(784, {hidden}, 10) x 6", "batch": 256, "top3_ms": top3, "all6_ms": all6,
            "ratio": top3 / all6, "goal": INFERENCE_GOAL, "top3_module_loop_ms": loop, "module_loop_ratio": loop / all6}


def run_benchmark(args, on_progress=None) -> dict:
    device = torch.device(args.device)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shapes:
        wanted = set(args.shapes.split(","))
        shapes = [s for s in shapes if s["name"] in wanted]
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    rows, notes = [], []
    for shape in shapes:
        for form in [f for f in args.forms.split(",") if f]:
            layer, variants = make_variants(shape, form, args, device, dtype, notes)
            x = torch.randn(shape["T"], shape["d_model"], device=device, dtype=dtype, requires_grad=True)
            gy = torch.randn(shape["T"], shape["d_model"], device=device, dtype=dtype)
            auto = f"ours-{choose_dispatch(layer.experts, x)}"  # what MoELayer's default dispatch runs here
            diffs = check_agreement(layer, variants, x, tol)
            ms = time_variants(variants, x, gy, args, device)
            base = ms["active-dense"]
            peer_ms = {n: t for n, t in ms.items() if n.startswith("peer")}
            best_peer = min(peer_ms.values()) if peer_ms else None
            for name, t in ms.items():
                rows.append({
                    "shape": shape["name"], "form": form, "variant": name, "ms": round(t, 3),
                    "x_active_dense": round(t / base, 3),
                    "x_best_peer": round(t / best_peer, 3) if best_peer else None,
                    "max_abs_diff_vs_oracle": diffs.get(name), "auto": name == auto,
                    **{k: shape[k] for k in ("E", "d_model", "d_hidden", "k", "T")},
                })
            print(f"[{shape['name']}/{form}] " + ", ".join(f"{n}={t:.1f}ms ({t / base:.2f}x)" for n, t in ms.items()),
                  flush=True)
            if on_progress is not None:  # partial tables survive an interrupted run
                on_progress({"rows": rows, "inference": None, "notes": sorted(set(notes)), "complete": False})
    return {"rows": rows, "inference": inference_seed000(args, device, dtype), "notes": sorted(set(notes)),
            "complete": True}


def machine_info(args):
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip(); break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" and torch.cuda.is_available() else None
    return {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "python": platform.python_version(),
            "cpu": cpu, "gpu": gpu, "threads": args.threads if args.device == "cpu" else None,
            "device": args.device, "dtype": args.dtype, "repeats": args.repeats, "warmup": args.warmup,
            "quick": args.quick}


def stock_child(args) -> dict | None:
    """The same benchmark under glibc's stock malloc, in a child process (reported beside the main one)."""
    env = {k: v for k, v in os.environ.items() if k not in TUNED_MALLOC}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    out = Path(args.out) / ".stock_tmp.json"
    # The stock run only needs the ratios beside the tuned ones: fewer rounds, no dense oracle timing.
    cmd = [sys.executable, __file__, "--stock", "--no-stock", "--json-out", str(out), "--threads", str(args.threads),
           "--repeats", str(max(5, args.repeats // 4)), "--warmup", "1", "--forms", args.forms, "--dense-repeats", "0"]
    if args.quick:
        cmd.append("--quick")
    if args.no_peer:
        cmd.append("--no-peer")
    if args.shapes:
        cmd += ["--shapes", args.shapes]
    subprocess.run(cmd, env=env, check=True)
    data = json.loads(out.read_text())
    out.unlink()
    return data


def write_outputs(result, args):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"dispatch_{args.device}_{args.dtype}" + ("_quick" if args.quick else "")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    with open(out / f"{stem}.csv", "w", newline="") as f:
        rows = result["rows"]
        w = csv.DictWriter(f, fieldnames=list(rows[0]) + ["allocator"])
        w.writeheader()
        for r in rows:
            w.writerow({**r, "allocator": "tuned"})
        for r in (result.get("stock") or {}).get("rows", []):
            w.writerow({**r, "allocator": "stock"})
    return out / f"{stem}.json"


def summary(result):
    lines = ["", "shape  form    variant (* = what dispatch='auto' runs)    ms    x active-dense   x best peer"]
    for r in result["rows"]:
        peer = "" if r["x_best_peer"] is None else f"{r['x_best_peer']:.2f}"
        name = r["variant"] + (" *" if r.get("auto") else "")
        lines.append(f"{r['shape']:<6} {r['form']:<7} {name:<30} {r['ms']:>8.1f} {r['x_active_dense']:>10.2f} {peer:>13}")
    inf = result["inference"]
    if inf is None:
        return "\n".join(lines)
    lines.append(f"inference (seed 000, batch 256): top-3 {inf['top3_ms']:.2f} ms, all 6 {inf['all6_ms']:.2f} ms, "
                 f"ratio {inf['ratio']:.2f} (goal <= {inf['goal']}); top-3 through the per-expert module loop "
                 f"{inf['top3_module_loop_ms']:.2f} ms ({inf['module_loop_ratio']:.2f})")
    if result.get("stock"):
        lines.append("stock malloc: " + ", ".join(
            f"{r['shape']}/{r['form']}/{r['variant']}={r['x_active_dense']:.2f}x"
            for r in result["stock"]["rows"] if r.get("auto") or r["variant"].startswith("peer")))
    for n in result.get("notes", []):
        lines.append("note: " + n)
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    ensure_allocator(args)
    head = {"machine": machine_info(args), "allocator": "stock" if args.stock else "tuned"}
    partial = None if args.json_out else (lambda r: write_outputs({**head, **r}, args))
    result = {**head, **run_benchmark(args, on_progress=partial)}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result))
        return 0
    if not args.no_stock and not args.quick and args.device == "cpu":
        result["stock"] = stock_child(args)
    path = write_outputs(result, args)
    print(summary(result))
    print(f"wrote {path} and its .csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
