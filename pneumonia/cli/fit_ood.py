"""`fit-ood`: fit the gate that refuses what is not a chest X-ray, for an existing model."""

from __future__ import annotations

from pneumonia.cli import fail


def run(args) -> int:
    from pneumonia.errors import ModelLoadError, TrainingError
    from pneumonia.training.gate_fitting import fit_ood, format_gate, write_monitor_reference

    if args.monitor_only:
        try:
            reference = write_monitor_reference(args.model, args.data_dir, args.cache_dir)
        except (ModelLoadError, TrainingError) as err:
            return fail(err)
        print(f"wrote the drift monitor's reference ({reference.computed_on}) in the card of {args.model}")
        return 0
    try:
        gate = fit_ood(args.model, args.data_dir, args.cache_dir)
    except (ModelLoadError, TrainingError) as err:
        return fail(err)
    print(format_gate(gate))
    return 0


def add(commands, shipped: str) -> None:
    fit_ood = commands.add_parser(
        "fit-ood", help="fit the gate that refuses images that are not chest X-rays, for an existing model"
    )
    fit_ood.add_argument("model", help="model folder or .keras file; ood.npz is written beside it")
    fit_ood.add_argument("data_dir", help="the Kaggle-layout folder the model was trained on (its train/ split)")
    fit_ood.add_argument("--cache-dir", default="cache", help="decoded, resized pixels, shared with train")
    fit_ood.add_argument(
        "--monitor-only",
        action="store_true",
        help="keep the gate; only write the drift monitor's reference (`pneumonia monitor`, /api/monitor) in the "
        "card, computed on the validation part the card records",
    )
    fit_ood.set_defaults(run=run)
