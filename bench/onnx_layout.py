"""What ONNX Runtime's NCHWc layout transform costs in memory and buys in speed, on the model's two graphs:
sessions with and without it made once each in this process, then their passes alternated round by round
(so a change of the machine's load weighs on both), with the anonymous memory each pair of sessions took.

    .venv/bin/python -m bench.onnx_layout                  # the shipped model, 40 rounds
    .venv/bin/python -m bench.onnx_layout --model DIR --rounds 10 --batch 8

docs/benchmarks.md ("ONNX Runtime's memory") has the figures and why the transform stays.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np


def anonymous_mib() -> float:
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("RssAnon:"))
    return kib / 1024


def sessions(model_dir, disabled: list[str] | None) -> tuple[dict, float]:
    """(name -> InferenceSession of both graphs, the anonymous MiB they took once each has run)."""
    import onnxruntime

    from pneumonia.serving.classifier import XrayClassifier

    export = XrayClassifier(model_dir, "onnx").runtime
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = export.threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    before = anonymous_mib()
    made = {
        name: onnxruntime.InferenceSession(
            str(export.folder / export.section.files[name].file),
            options,
            providers=["CPUExecutionProvider"],
            disabled_optimizers=disabled,
        )
        for name in ("explain", "forward")
    }
    side = export.image_size
    made["explain"].run(None, {"xray": np.zeros((1, side, side, 3), np.float32)})
    made["forward"].run(None, {"xray": np.zeros((2, side, side, 3), np.float32)})
    return made, anonymous_mib() - before


def measure(model_dir, rounds: int, batch: int) -> dict:
    layouts = {"nchwc": sessions(model_dir, None), "plain": sessions(model_dir, ["NchwcTransformer"])}
    side = int(layouts["nchwc"][0]["explain"].get_inputs()[0].shape[1])
    rng = np.random.default_rng(0)
    one, many = rng.random((1, side, side, 3), np.float32), rng.random((batch, side, side, 3), np.float32)
    times = {name: {"explain": [], "forward": []} for name in layouts}
    for turn in range(rounds):
        for name in sorted(layouts, reverse=bool(turn % 2)):
            made = layouts[name][0]
            for graph, inputs in (("explain", one), ("forward", many)):
                started = time.perf_counter()
                made[graph].run(None, {"xray": inputs})
                times[name][graph].append(time.perf_counter() - started)
    return {
        name: {"anonymous_mib": round(layouts[name][1], 1)}
        | {f"{graph}_p50_ms": round(statistics.median(values) * 1000, 1) for graph, values in times[name].items()}
        for name in layouts
    }


def main(argv: list[str] | None = None) -> int:
    from pneumonia.serving.classifier import SHIPPED_MODEL_DIR

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(SHIPPED_MODEL_DIR), help="model folder (default: the shipped one)")
    parser.add_argument("--rounds", type=int, default=40, help="passes of each graph and layout, alternated")
    parser.add_argument("--batch", type=int, default=8, help="images in a forward pass")
    args = parser.parse_args(argv)
    figures = measure(args.model, args.rounds, args.batch)
    for name, row in figures.items():
        print(f"{name:>6}: {row}")
    plain, nchwc = figures["plain"], figures["nchwc"]
    print(
        f"without the transform: {plain['anonymous_mib'] - nchwc['anonymous_mib']:+.1f} MiB, explain "
        f"{plain['explain_p50_ms'] / nchwc['explain_p50_ms']:.2f}x, forward x{args.batch} "
        f"{plain['forward_p50_ms'] / nchwc['forward_p50_ms']:.2f}x the time"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
