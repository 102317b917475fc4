"""Loc-CondConv backends on every encoder layer and the whole encoder.

One unattended run (budgeted to fit one 10-minute device call) times, for a batch of 128 patches
grouped as 16 landmarks x 8 subjects, 128 distinct landmarks and 1 landmark, in bf16 (autocast)
and tf32, forward and forward+backward:

    triton            LocCondConv3d(backend="triton"), the fused kernels
    grouped           LocCondConv3d(backend="grouped"), grouped cuDNN convolutions
    compiled_grouped  torch.compile of the grouped backend (whole encoder; layers with --compile-layers)
    loop              LocCondConv3d(backend="loop"), one sample at a time (the reference's way)
    plain             nn.Conv3d of the same shapes (encoder: conditioning="none"), no location

Before timing triton in a setting, its output and input gradient are compared with the grouped
backend on the same parameters and inputs (relative error in the records and the table's last
column). For each it prints a table (times, ratios to triton) and the roofline view: FLOPs and the
minimum bytes a step must move, over the measured peak matmul rate and copy bandwidth of this
device (the larger of the two times is the floor). Results go to the
JSON file given on the command line, rewritten atomically after every measurement, so a run cut
short keeps what it measured. Measurements past ``--budget-s`` are recorded as skipped.

    python benchmarks/gpu_encoder_benchmark.py results.json            # GPU
    python benchmarks/gpu_encoder_benchmark.py results.json --quick    # CPU check, tiny sizes
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from drasclr.nn import LandmarkPartition, LocCondConv3d

# (name, C_in, C_out, stride, input size) of every convolution (k=3, padding 1),
# docs/method.md#encoder.
ENCODER_LAYERS = [
    ("conv1", 1, 8, 1, 32), ("conv2", 8, 8, 2, 32),
    ("downsample1.conv1", 8, 16, 1, 16), ("downsample1.conv2", 16, 16, 1, 16),
    ("downsample1.conv3", 16, 16, 2, 16),
    ("downsample2.conv1", 16, 32, 1, 8), ("downsample2.conv2", 32, 32, 1, 8),
    ("downsample2.conv3", 32, 32, 2, 8),
    ("downsample3.conv1", 32, 64, 1, 4), ("downsample3.conv2", 64, 64, 1, 4),
    ("downsample3.conv3", 64, 64, 2, 4),
    ("conv3", 64, 128, 1, 2), ("conv4", 128, 128, 2, 2),
]
NUM_EXPERTS = 8
BACKENDS = ("triton", "grouped", "compiled_grouped", "loop", "plain")


class Run:
    """Settings of this run and the records measured so far (written after each one)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.quick = args.quick
        self.device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
        if self.device.type == "cpu" and not args.quick:
            raise SystemExit("no CUDA device: run with --quick for the CPU check")
        self.scale = 8 if args.quick else 1  # --quick: layers at 1/8 of size and channels
        batch = 2 if args.quick else 128
        per_landmark = 2 if args.quick else 8
        self.groupings = {  # name -> landmark label of each sample
            f"{batch // per_landmark}x{per_landmark}": [i // per_landmark for i in range(batch)],
            f"{batch}_distinct": list(range(batch)),
            "1_landmark": [0] * batch,
        }
        if args.quick:  # interpreted kernels are slow: one grouping checks the script
            self.groupings = dict(list(self.groupings.items())[:1])
        self.dtypes = ["bf16", "fp32"] if args.quick else ["bf16", "tf32"]
        self.compile_layers = args.compile_layers
        self.deadline = time.monotonic() + args.budget_s
        self.output = Path(args.output)
        self.records: list[dict] = []
        self.meta = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": (torch.cuda.get_device_name() if self.device.type == "cuda"
                       else platform.processor() or "cpu"),
            "torch": torch.__version__,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "batch": batch, "num_experts": NUM_EXPERTS, "quick": self.quick,
        }

    def save(self) -> None:
        tmp = self.output.with_name(self.output.name + ".tmp")
        tmp.write_text(json.dumps({"meta": self.meta, "records": self.records}, indent=1))
        os.replace(tmp, self.output)

    def layer_shape(self, layer_spec, scaled: bool = True) -> tuple[int, int, int, int]:
        """(C_in, C_out, stride, input size) of a layer at this run's scale (the encoder's
        shapes are fixed: its layers are never scaled)."""
        _, c_in, c_out, stride, size = layer_spec
        shrink = self.scale if scaled else 1
        return (max(1, c_in // shrink), max(1, c_out // shrink), stride,
                max(1, size // shrink))

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline


def precision(dtype_name: str, device: torch.device):
    """Context for one dtype setting: bf16 autocast, or float32 with/without TF32."""
    tf32 = dtype_name == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if dtype_name == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def median_ms(fn, device: torch.device) -> float:
    """Median time of fn in ms: CUDA events via do_bench on GPU, a synchronised clock on CPU."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()  # warm-up: autotuning, compilation, allocator
    start = time.perf_counter()  # one run: on the CPU (--quick) the script is only checked
    fn()
    return (time.perf_counter() - start) * 1e3


def measure_peaks(run: Run) -> dict:
    """Matmul rate per dtype setting and copy bandwidth, measured here (METHOD: ceilings)."""
    n = 512 if run.quick else 8192
    peaks = {}
    for dtype_name in run.dtypes:
        dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
        a = torch.randn(n, n, device=run.device, dtype=dtype)
        b = torch.randn(n, n, device=run.device, dtype=dtype)
        with precision(dtype_name, run.device):
            ms = median_ms(lambda: a @ b, run.device)
        peaks[f"flops_{dtype_name}"] = 2 * n**3 / (ms * 1e-3)
    src = torch.randn((2**20 if run.quick else 2**29) // 4, device=run.device)  # 4 MiB / 512 MiB
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), run.device)
    peaks["bytes_per_s"] = 2 * src.numel() * 4 / (ms * 1e-3)
    return peaks


def layer_cost(c_in: int, c_out: int, stride: int, size: int, batch: int, dtype_name: str,
               backward: bool) -> tuple[float, float]:
    """(FLOPs, minimum bytes) of one layer step: each tensor read or written once.

    Forward: 2 B C_out C_in 27 V' FLOPs; x, y and the fp32 experts. Backward adds the same
    FLOPs twice (input and kernel gradients) and reads dy, x, experts, writes dx, d experts.
    """
    out_size = (size - 1) // stride + 1
    elem = 2 if dtype_name == "bf16" else 4
    x, y = batch * c_in * size**3 * elem, batch * c_out * out_size**3 * elem
    experts = NUM_EXPERTS * c_out * c_in * 27 * 4
    flops = 2 * batch * c_out * c_in * 27 * out_size**3
    if not backward:
        return flops, x + y + experts
    return 3 * flops, (x + y + experts) + (y + x + x + 2 * experts)


def loc_for(labels: list[int], device: torch.device) -> torch.Tensor:
    """Distinct normalised coordinates per label, (B, 3)."""
    label = torch.tensor(labels, dtype=torch.float32, device=device)[:, None]
    return torch.cat([label / 127 * 2 - 1, -(label / 127), (label % 7) / 7], dim=1)


def make_step(module, inputs: tuple, backward: bool):
    """A closure running forward (and backward with a fixed random output gradient)."""
    params = [p for p in module.parameters() if p.requires_grad]
    with torch.no_grad():
        grad_out = torch.randn_like(module(*inputs).float())

    def forward():
        with torch.no_grad():
            module(*inputs)

    def forward_backward():
        out = module(*inputs)
        # allow_unused: the encoder's projection head is not part of encoder(x, loc)
        torch.autograd.grad(out, [inputs[0], *params], grad_out.to(out.dtype), allow_unused=True)

    return forward_backward if backward else forward


class PlainLayer(nn.Module):
    """nn.Conv3d with the Loc-CondConv call signature; the location is ignored."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(c_in, c_out, 3, stride, 1)

    def forward(self, x: torch.Tensor, loc) -> torch.Tensor:
        return self.conv(x)


def errors_against_grouped(module: nn.Module, inputs: tuple, dtype_name: str, device) -> dict:
    """||triton - grouped|| / ||grouped|| of the output and of the input gradient, same
    parameters and inputs: a check on this device before its times are trusted (METHOD).
    Expected: ~1e-2 or less for bf16, ~1e-3 for tf32; NaN never."""
    reference = copy.deepcopy(module)
    reference.backend = "grouped"  # an Encoder sets every layer's
    results = []
    with precision(dtype_name, device):
        for candidate in (module, reference):
            x = inputs[0].detach().requires_grad_()
            y = candidate(x, *inputs[1:])
            grad_x, = torch.autograd.grad(y.float().square().sum(), [x])
            results.append((y.float(), grad_x.float()))
    (y, grad_x), (y_ref, grad_x_ref) = results
    return {"rel_err_out": ((y - y_ref).norm() / y_ref.norm()).item(),
            "rel_err_grad_x": ((grad_x - grad_x_ref).norm() / grad_x_ref.norm()).item()}


def build(backend: str, layer_spec, run: Run) -> nn.Module:
    """The module for one backend: a layer (layer_spec from ENCODER_LAYERS, at the run's
    scale) or, for None, the whole encoder."""
    conv_backend = "grouped" if backend == "compiled_grouped" else backend
    if layer_spec is None:
        from drasclr.nn import Encoder

        if backend == "plain":
            module = Encoder(num_experts=NUM_EXPERTS, conditioning="none")
        else:
            module = Encoder(num_experts=NUM_EXPERTS, backend=conv_backend)
    else:
        c_in, c_out, stride, _ = run.layer_shape(layer_spec)
        if backend == "plain":
            module = PlainLayer(c_in, c_out, stride)
        else:
            module = LocCondConv3d(c_in, c_out, 3, stride, 1, num_experts=NUM_EXPERTS,
                                   backend=conv_backend)
    module = module.to(run.device)
    return torch.compile(module) if backend == "compiled_grouped" else module


def roofline(run: Run, layer_spec, grouping: str, dtype_name: str, backward: bool) -> dict:
    """FLOPs and minimum bytes of one step of a layer, or of the encoder's convolutions."""
    batch = len(run.groupings[grouping])
    specs = ENCODER_LAYERS if layer_spec is None else [layer_spec]
    costs = [layer_cost(*run.layer_shape(spec, scaled=layer_spec is not None), batch,
                        dtype_name, backward) for spec in specs]
    return {"flops": sum(c[0] for c in costs), "bytes": sum(c[1] for c in costs)}


def measure(run: Run, layer_spec, grouping: str, dtype_name: str, backend: str, peaks: dict) -> None:
    """Time forward and forward+backward of one backend in one setting; append two records."""
    base = {"scope": "encoder" if layer_spec is None else "layer",
            "name": "encoder" if layer_spec is None else layer_spec[0],
            "grouping": grouping, "dtype": dtype_name, "backend": backend}
    skipped = "time budget" if run.out_of_time() else None
    if run.quick and layer_spec is None and backend == "triton":
        skipped = "--quick: interpreted kernels on 32^3 patches take many minutes"
    if skipped:
        for pass_name in ("fwd", "fwd+bwd"):
            run.records.append(dict(base, **{"pass": pass_name, "skipped": skipped}))
        run.save()
        return
    labels = run.groupings[grouping]
    if layer_spec is None:
        c_in, size = 1, 32  # the encoder takes 32^3 patches only
    else:
        c_in, _, _, size = run.layer_shape(layer_spec)
    torch.manual_seed(0)
    x = torch.randn(len(labels), c_in, size, size, size, device=run.device, requires_grad=True)
    loc = loc_for(labels, run.device)
    if layer_spec is not None:  # the encoder groups the batch once per forward; layers get it
        loc = LandmarkPartition.from_loc(loc, len(labels))
    try:
        module = build(backend, layer_spec, run)
    except Exception as error:  # e.g. the encoder not available: record and go on
        module, build_error = None, f"{type(error).__name__}: {error}"[:300]
    checks = {}
    if module is not None and backend == "triton":
        try:
            checks = errors_against_grouped(module, (x, loc), dtype_name, run.device)
        except Exception as error:
            checks = {"check_error": f"{type(error).__name__}: {error}"[:300]}
        print(f"{base['name']:>18} {grouping:>12} {dtype_name:>4} check vs grouped: {checks}", flush=True)
    for backward in (False, True):
        record = dict(base, **checks, **{"pass": "fwd+bwd" if backward else "fwd"})
        record.update(roofline(run, layer_spec, grouping, dtype_name, backward))
        try:
            if module is None:
                raise RuntimeError(build_error)
            with precision(dtype_name, run.device):
                record["ms"] = median_ms(make_step(module, (x, loc), backward), run.device)
            seconds = record["ms"] * 1e-3
            peak_flops = peaks[f"flops_{dtype_name}"]
            record["flops_fraction"] = record["flops"] / seconds / peak_flops
            record["bytes_fraction"] = record["bytes"] / seconds / peaks["bytes_per_s"]
            record["floor_ms"] = 1e3 * max(record["flops"] / peak_flops,
                                           record["bytes"] / peaks["bytes_per_s"])
        except Exception as error:  # one failing backend must not lose the rest of the run
            record["error"] = f"{type(error).__name__}: {error}"[:300]
        run.records.append(record)
        run.save()
        print(f"{record['name']:>18} {grouping:>12} {dtype_name:>4} {record['pass']:>7} "
              f"{backend:>16}: {record.get('ms', record.get('error'))}", flush=True)


def table(records: list[dict]) -> str:
    """One row per (layer, grouping, dtype, pass): times in ms and ratios to triton. The
    encoder's rows come last, where a truncated console tail still shows them."""
    rows: dict[tuple, dict] = {}
    for r in sorted(records, key=lambda r: r["scope"] == "encoder"):  # stable: layers first
        key = (r["scope"], r["name"], r["grouping"], r["dtype"], r["pass"])
        rows.setdefault(key, {})[r["backend"]] = r
    header = (f"{'layer':>18} {'grouping':>12} {'dtype':>5} {'pass':>7} | "
              + " ".join(f"{b[:9]:>9}" for b in BACKENDS)
              + " | tri/plain grp/tri cmp/tri loop/tri | %flops %bytes floor_ms | rel_err")
    lines = [header, "-" * len(header)]
    for (_, name, grouping, dtype_name, pass_name), by_backend in rows.items():
        ms = {b: by_backend.get(b, {}).get("ms") for b in BACKENDS}
        triton = ms["triton"]

        def ratio(num, den):
            return f"{num / den:9.2f}" if num and den else f"{'-':>9}"

        tri = by_backend.get("triton", {})
        lines.append(
            f"{name:>18} {grouping:>12} {dtype_name:>5} {pass_name:>7} | "
            + " ".join(f"{ms[b]:9.3f}" if ms[b] else f"{'-':>9}" for b in BACKENDS) + " | "
            + ratio(triton, ms["plain"]) + ratio(ms["grouped"], triton)
            + ratio(ms["compiled_grouped"], triton) + ratio(ms["loop"], triton) + " | "
            + (f"{100 * tri['flops_fraction']:6.1f} {100 * tri['bytes_fraction']:6.1f} "
               f"{tri['floor_ms']:8.3f}" if "ms" in tri else "     -      -        -")
            + (f" | {max(tri['rel_err_out'], tri['rel_err_grad_x']):7.1e}" if "rel_err_out" in tri
               else " |       -"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="JSON file for all records (rewritten atomically)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes on the CPU (checks the script)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="stop starting measurements after this many seconds (default 480)")
    parser.add_argument("--compile-layers", action="store_true",
                        help="also torch.compile every single layer (slow: one compile each)")
    args = parser.parse_args(argv)
    if args.quick:  # kernels run in Triton's interpreter without a GPU
        os.environ.setdefault("TRITON_INTERPRET", "1")
    run = Run(args)
    peaks = measure_peaks(run)
    run.meta["peaks"] = peaks
    print(f"peaks: {json.dumps({k: f'{v:.3g}' for k, v in peaks.items()})}", flush=True)

    # The encoder (the headline, compiled baseline included) first, then the layers, so
    # the time budget cuts the per-layer diagnosis, not the headline comparison.
    plan = [(None, list(BACKENDS))]
    plan += [(spec, [b for b in BACKENDS if b != "compiled_grouped"]) for spec in ENCODER_LAYERS]
    if args.compile_layers:
        plan += [(spec, ["compiled_grouped"]) for spec in ENCODER_LAYERS]
    for layer_spec, backends in plan:
        for dtype_name in run.dtypes:
            for grouping in run.groupings:
                for backend in backends:
                    measure(run, layer_spec, grouping, dtype_name, backend, peaks)
    print(table(run.records))
    print(f"records: {run.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
