"""How much per-volume intensity normalisation could add over the model's per-slice standardisation.

    python -m benchmarks.normalisation [--data ../shared/data/lgg-mri-segmentation-dev.zip]

A model sees many patients, so it needs tumour to look alike across them. This measures that directly, with no
training: the ROC AUC of each channel's normalised intensity for telling tumour from other head pixels, pooled over
every patient with tumour (one threshold for all patients), and the mean of the same AUC within each patient.
Normalisations: none (raw 0-1), slice (each slice's head pixels z-scored per channel: `train.input_norm: slice`,
layers.BrainStandardise), volume (the same over the patient's whole volume) and Buda et al. 2019's per-volume
clip to the 10th-99th percentile then z-score. Slices are taken to 128 px by decimation (the CPU recipe's size).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

HEAD = 10 / 255  # layers.BrainStandardise's threshold: a pixel is head when any channel is above it
CHANNELS = ("pre-contrast", "FLAIR", "post-contrast")


def z_slice(x: np.ndarray, head: np.ndarray) -> np.ndarray:
    out = np.zeros_like(x)
    for i in range(len(x)):
        v = x[i][head[i]]
        if len(v):
            out[i][head[i]] = (v - v.mean(0)) / (v.std(0) + 1e-3)
    return out


def z_volume(x: np.ndarray, head: np.ndarray) -> np.ndarray:
    v = x[head]
    out = np.zeros_like(x)
    out[head] = (v - v.mean(0)) / (v.std(0) + 1e-3)
    return out


def buda(x: np.ndarray, head: np.ndarray) -> np.ndarray:
    v = x[head]
    low, high = np.percentile(v, 10, axis=0), np.percentile(v, 99, axis=0)
    return z_volume(np.clip((x - low) / (high - low + 1e-6), 0, 1), head)


NORMALISATIONS = {"none": lambda x, head: x, "slice": z_slice, "volume": z_volume, "buda": buda}


def auc(tumour: np.ndarray, other: np.ndarray) -> float:
    return float(roc_auc_score(np.r_[np.ones(len(tumour)), np.zeros(len(other))], np.r_[tumour, other]))


def separability(volumes, rng: np.random.Generator, per_patient: int = 2000) -> dict[str, dict]:
    """volumes: (images float (N,H,W,3) in 0-1, masks bool (N,H,W)) per patient with tumour.

    Per normalisation: the pooled AUC of each channel and the mean within-patient FLAIR AUC. Each patient gives
    up to `per_patient` tumour and twice as many other head pixels, so large tumours do not dominate the pool."""
    drawn = {name: ([], [], []) for name in NORMALISATIONS}
    for x, mask in volumes:
        head = x.max(-1) > HEAD
        tumour, other = mask & head, ~mask & head
        ti = rng.choice(int(tumour.sum()), min(per_patient, int(tumour.sum())), replace=False)
        oi = rng.choice(int(other.sum()), min(2 * per_patient, int(other.sum())), replace=False)
        for name, normalise in NORMALISATIONS.items():
            y = normalise(x, head)
            t, o = y[tumour][ti], y[other][oi]
            drawn[name][0].append(t)
            drawn[name][1].append(o)
            drawn[name][2].append(auc(t[:, 1], o[:, 1]))
    result = {}
    for name, (t, o, within) in drawn.items():
        t, o = np.concatenate(t), np.concatenate(o)
        result[name] = {"pooled": [auc(t[:, c], o[:, c]) for c in range(3)], "within_flair": float(np.mean(within))}
    return result


def patient_volumes(data: Path):
    from stages import index

    table, images, masks, _, _ = index.build_index(data, progress=False)
    table = table.reset_index(drop=True)
    for _, rows in sorted(table.groupby("patient").indices.items()):
        mask = np.asarray(masks[rows, ::2, ::2]) > 0
        if mask.any():
            yield np.asarray(images[rows, ::2, ::2], dtype=np.float32) / 255, mask


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.normalisation", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/lgg-mri-segmentation-dev.zip"))
    args = parser.parse_args(argv)
    volumes = list(patient_volumes(args.data))
    result = separability(volumes, np.random.default_rng(0))
    print(f"{len(volumes)} patients with tumour; ROC AUC of tumour against other head pixels by intensity")
    print("| normalisation | pooled AUC " + " / ".join(CHANNELS) + " | FLAIR AUC within a patient, mean |")
    print("|---|---|---|")
    for name, r in result.items():
        print(f"| {name} | " + " / ".join(f"{a:.3f}" for a in r["pooled"]) + f" | {r['within_flair']:.3f} |")


if __name__ == "__main__":
    main()
