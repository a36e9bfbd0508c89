"""Benchmark: a seed ensemble served as a cascade (`evaluate.cascade`), against the whole ensemble on every slice.

The first member screens each slice; the other members run only on the slices where its probability map reaches
the gate somewhere and on their neighbours in the patient's volume (stages.inference.cascade_parts). For the whole
ensemble and each gate this prints, in the same run:
- the validation patients' per-volume Dice with every post-processing of postprocess_compare, as the evaluate
  stage scores them, and the one validation chooses; how far each patient's Dice moved from the whole ensemble's;
- the share of slices every member ran on, and inference slices/s through stages.inference.predict_probs (what
  evaluation, the CLI and the app use: preprocessing, the network, resizing back) over the validation and test
  patients' original slices, patient by patient, best of --repeats, the settings alternated, against the 150
  slices/s target of issue 6.
Test patients are only timed here, never scored: a gate is chosen on validation, and the evaluate stage scores
test with it.

    python -m benchmarks.cascade [--model models/model.keras] [--data data] [--gates 0.001 0.01 0.1 0.5]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def volumes(data: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(slices, patient ids) of each validation and test patient, original slices only."""
    from stages import prepared

    out = []
    for split in ("val", "test"):
        images, _, table = prepared.originals(data, split)
        for patient, rows in table.groupby("patient", sort=False).groups.items():
            out.append((np.asarray(images[np.asarray(rows)]), np.full(len(rows), patient)))
    return out


def rate(model, patients: list, gate: float | None, engine: str) -> float:
    """Slices/s of predict_probs over every patient's volume, one call a patient, as evaluation predicts."""
    from stages import inference

    start = time.perf_counter()
    for x, ids in patients:
        inference.predict_probs(model, x, engine=engine, patients=ids, cascade=gate)
    return sum(len(x) for x, _ in patients) / (time.perf_counter() - start)


def score(model, data: Path, settings: dict) -> dict:
    """The validation patients as the evaluate stage scores them, with the post-processing they choose."""
    from stages import evaluate, prepared

    validation = evaluate.evaluate_model(model, *prepared.originals(data, "val"), settings, progress=False)
    chosen, _ = evaluate.choose_postprocess(validation, settings)
    compare = validation.metrics["postprocess_compare"]
    return {"compare": {name: v["dice_volume_mean"] for name, v in compare.items()}, "chosen": chosen,
            "per_patient": validation.per_patient_compare.set_index("patient"),
            "share": validation.metrics["model"].get("cascade", {}).get("share", 1.0)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/model.keras"))
    parser.add_argument("--data", type=Path, default=Path("data"), help="folder of prepared/ and slices/")
    parser.add_argument("--gates", type=float, nargs="+", default=[0.001, 0.01, 0.1, 0.5])
    parser.add_argument("--repeats", type=int, default=2, help="timed passes over the slices per setting")
    args = parser.parse_args(argv)

    import os

    from stages import engines, inference, preprocess
    from stages.common import BrainsegError, load_params

    model = inference.load_model(args.model)
    parts = inference.cascade_parts(model)
    if parts is None:
        raise BrainsegError(f"{args.model}: not a seed ensemble of segmenters (train.members); a cascade needs one")
    settings = {**load_params()["evaluate"], "choose_on_validation": True}
    engine = settings.get("engine", "auto")
    gates = [None, *args.gates]

    patients = volumes(args.data)
    for gate in gates:  # conversions and first calls before any timing
        inference.predict_probs(model, patients[0][0][:2], engine=engine, cascade=None if gate is None else 0.0)
    rates = {gate: [] for gate in gates}
    for _ in range(args.repeats):
        for gate in gates:
            rates[gate].append(rate(model, patients, gate, engine))
    scores = {gate: score(model, args.data, {**settings, "cascade": gate}) for gate in gates}

    whole = scores[None]
    names = list(whole["compare"])
    print(f"\nmodel {args.model} ({model.name}, {parts[2]} members, {preprocess.input_size(model)} px, "
          f"{engines.engine_in_use(parts[0], engine)}); {os.cpu_count()} cores; timed on "
          f"{sum(len(x) for x, _ in patients)} validation and test slices ({len(patients)} patients), "
          f"best of {args.repeats}; scored on the {len(whole['per_patient'])} validation patients")
    print(f"{'gate':>5s} {'slices/s':>8s} {'all ran':>7s}  " + " ".join(f"{n:>12s}" for n in names)
          + f"  {'chosen':12s} {'moved':>6s} {'max move':>8s}")
    for gate in gates:
        s = scores[gate]
        moved = (s["per_patient"][names] - whole["per_patient"][names]).abs()
        print(f"{'none' if gate is None else gate:>5} {max(rates[gate]):8.1f} {s['share']:7.1%}  "
              + " ".join(f"{s['compare'][n]:12.4f}" for n in names)
              + f"  {s['chosen']:12s} {int((moved > 1e-9).any(axis=1).sum()):6d} {moved.to_numpy().max():8.4f}")
    base = max(rates[None])
    for gate in args.gates:
        s = scores[gate]
        print(f"gate {gate}: {max(rates[gate]) / base:.2f}x the whole ensemble ({max(rates[gate]):.1f} against "
              f"{base:.1f} slices/s; target >= 150); validation chosen {s['compare'][s['chosen']]:.4f} ({s['chosen']})"
              f" against {whole['compare'][whole['chosen']]:.4f} ({whole['chosen']})")


if __name__ == "__main__":
    main()
