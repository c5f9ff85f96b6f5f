"""``python -m llmopt_lab info``: device, versions, kernel mode, the device's limits."""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--no-measure", action="store_true",
                   help="for a GPU in the limits table, skip measuring (the CPU is always measured)")


def run(args) -> int:
    from .. import kernels, measure
    from ..weights import ZOO, resolve_device

    dev = resolve_device(args.device)
    prov = measure.provenance(dev)
    print(f"device        {prov['device']} ({dev})")
    print(f"python        {prov['python']} on {prov['platform']}")
    print(f"torch         {prov['torch']} (CUDA {prov['cuda'] or 'none'})")
    print(f"triton        {prov['triton'] or 'not installed'}: kernels run {kernels.mode()}")
    print(f"transformers  {prov['transformers'] or 'not installed'}")
    print(f"git commit    {prov['git_commit']}")
    built = [name for name, path in ZOO.items() if (path / "config.json").exists()]
    print(f"zoo models    {', '.join(built) if built else 'none built (python -m llmopt_lab train-zoo)'}")
    from ..zoo.fetched import FETCHED, fetch_command, is_fetched

    for name in FETCHED:
        print(f"fetched model {name}: {'cached' if is_fetched(name) else 'not fetched (' + fetch_command(name) + ')'}")
    try:
        limits = measure.device_limits(dev, measure=not args.no_measure or None)
    except ValueError:
        print("limits        not in the table; run without --no-measure to measure them")
        return 0
    print(f"limits        {limits}")
    if limits.measured:
        m = limits.measured
        flops = ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in m["flops"].items())
        print(f"measured      copy {m['bandwidth'] / 1e9:.3g} GB/s, GEMM {flops}")
    return 0
