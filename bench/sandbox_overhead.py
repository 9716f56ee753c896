"""What the decoding sandbox costs one file: `prepare_xray` in this process against the same call in a
sandbox child (pneumonia/serving/sandbox.py), interleaved on the same bytes so that a change of the
machine's load weighs on both, with the child's own decode time beside them.

    .venv/bin/python -m bench.sandbox_overhead                   # the ../shared/samples JPEG nearest 2 MP
    .venv/bin/python -m bench.sandbox_overhead --image X.jpeg --repeats 300 --display-side 512

The difference is the sandbox's cost: sending the bytes, the child's bookkeeping, the arrays back.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def measure(data: bytes, repeats: int, display_side: int | None) -> dict:
    from pneumonia.serving.preprocessing import prepare_xray
    from pneumonia.serving.sandbox import DecodingSandbox

    sandbox = DecodingSandbox(workers=1)
    try:
        for _ in range(5):  # warm: the zygote, the child, the decoders' first allocations
            sandbox.prepare(data, 224, display_side)
            prepare_xray(data, 224, display_side)
        here, there, child = [], [], []
        for _ in range(repeats):
            started = time.perf_counter()
            prepare_xray(data, 224, display_side)
            here.append(time.perf_counter() - started)
            started = time.perf_counter()
            prepared = sandbox.prepare(data, 224, display_side)
            there.append(time.perf_counter() - started)
            child.append((prepared.timing_ms["decode"] + prepared.timing_ms["preprocess"]) / 1000)
    finally:
        sandbox.close()
    p50 = {
        name: statistics.median(values) * 1000
        for name, values in (("here", here), ("sandbox", there), ("child", child))
    }
    return {
        **{f"{name}_p50_ms": round(ms, 2) for name, ms in p50.items()},
        "cost_ms": round(p50["sandbox"] - p50["here"], 2),
    }


def main(argv: list[str] | None = None) -> int:
    from bench.benchmark_upload import pick_image

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", help="the file (default: the ../shared/samples JPEG nearest 2 MP)")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--display-side", type=int, default=512, help="the display copy's long side (0: none)")
    args = parser.parse_args(argv)
    data, name = pick_image(args.image)
    result = measure(data, args.repeats, args.display_side or None)
    print(
        f"{name} ({len(data) / 1e6:.2f} MB), {args.repeats} each: in this process p50 {result['here_p50_ms']} ms, "
        f"in the sandbox {result['sandbox_p50_ms']} ms (the child's own decode {result['child_p50_ms']} ms): "
        f"the sandbox costs {result['cost_ms']} ms a file"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
