"""Can the tiny UMT5's outputs tell the training captions apart by motion, object, colour and pan?

    PYTHONPATH=$PWD python experiments/tiny_proxy_text.py [--weights DIR] [--threads 1]

The experts read the caption only through cross-attention over the text encoder's per-token outputs,
and cross-attention has no positions: to know which way *the red square* moves, the " red" token's own
output must carry its object's motion, and a " left" token must say whether an object or the camera
goes left (layer 0, the token embedding table, cannot: " left" is the same vector in both). So beside
probes of the mean-pooled caption (what a bag of the tokens holds) this measures the binding a
position-free reader needs, per layer (0 = the embedding table, then each block, the last normalised
as the pipeline passes it on). All probes are least-squares (ridge) linear classifiers fitted on the
captions of 3000 random scenes and scored on 600 others; chance is the held-out majority class.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from wanexp.models import procedural, tiny

ATTRIBUTES = ("motion", "colour", "kind", "pan", "texture")


def scenes(seed: int, count: int) -> list[procedural.Scene]:
    rng = np.random.default_rng(seed)
    return [procedural.random_scene(rng) for _ in range(count)]


@torch.no_grad()
def layer_outputs(pipe, captions: list[str], length: int = 32):
    """Per layer [captions, tokens, 64] (padding zeroed, as the pipeline zeroes it), the mask, the offsets."""
    t = pipe.tokenizer(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt",
                       return_offsets_mapping=True)
    out = pipe.text_encoder(t.input_ids, attention_mask=t.attention_mask, output_hidden_states=True)
    mask = t.attention_mask.unsqueeze(-1).float()
    return [h.float() * mask for h in out.hidden_states], mask, t.offset_mapping


def ridge_accuracy(x_train: np.ndarray, y_train: list, x_test: np.ndarray, y_test: list, lam: float = 1.0) -> float:
    """Held-out accuracy of a one-hot least-squares linear classifier."""
    classes = sorted(set(y_train))
    y = np.eye(len(classes))[[classes.index(v) for v in y_train]]
    mu = x_train.mean(0)
    a = x_train - mu
    w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ (y - y.mean(0)))
    pred = np.array(classes)[((x_test - mu) @ w).argmax(1)]
    return float((pred == np.array(y_test)).mean())


def majority(y: list) -> float:
    return max(y.count(c) for c in set(y)) / len(y)


def scene_attributes(s: procedural.Scene) -> dict:
    t = s.things[0]
    return {"motion": t.motion, "colour": t.colour, "kind": t.kind, "pan": s.pan, "texture": s.texture}


def token_rows(s: procedural.Scene, offsets) -> list[tuple[int, str, str]]:
    """(token position, probe, label) for the tokens a position-free reader must bind: each object's first
    colour token and first kind token (label: the object's motion), and each " left"/" right" token
    (label: "camera" or "object", and for an object's, the object's colour)."""
    cap, rows, start = s.caption, [], 0
    spans = []
    for th in s.things:
        j = cap.index(th.phrase(), start)
        start = j + len(th.phrase())
        spans.append((j, th))
    pan_start = cap.rindex(", ")
    for pos, (a, b) in enumerate(offsets.tolist()):
        if b <= a:
            continue
        a += cap[a] == " "  # byte-level tokens carry their leading space
        word = cap[a:b]
        if a > pan_start and word in ("left", "right"):
            rows.append((pos, "direction: camera or object", "camera"))
        for j, th in spans:
            ph = th.phrase()
            colour_at, kind_at = j + ph.index(f" {th.colour} ") + 1, j + ph.index(f" {th.kind} ") + 1
            motion_at = j + ph.index(th.motion)
            if a == colour_at:
                rows.append((pos, "object's motion from its colour token", th.motion))
            if a == kind_at:
                rows.append((pos, "object's motion from its kind token", th.motion))
            if motion_at <= a < motion_at + len(th.motion) and word in ("left", "right"):
                rows.append((pos, "direction: camera or object", "object"))
                rows.append((pos, "object direction token: its object's colour", th.colour))
    return rows


def pooled_section(pipe, train: list, test: list) -> list[str]:
    lines = ["### The mean-pooled caption (what a bag of its tokens holds)", "",
             "Held-out accuracy of object 1's motion / colour / kind, the pan and the texture, per layer; "
             "chance (majority) in brackets.", "",
             "| captions | layer | " + " | ".join(ATTRIBUTES) + " |", "|---|---|" + "---|" * len(ATTRIBUTES)]
    for label, keep in (("one object", lambda s: len(s.things) == 1), ("all", lambda s: True)):
        a, b = [s for s in train if keep(s)], [s for s in test if keep(s)]
        (ha, ma, _), (hb, mb, _) = (layer_outputs(pipe, [s.caption for s in x]) for x in (a, b))
        for layer in range(len(ha)):
            pa, pb = (h[layer].sum(1) / m.sum(1) for h, m in ((ha, ma), (hb, mb)))
            cells = []
            for k in ATTRIBUTES:
                ya, yb = [scene_attributes(s)[k] for s in a], [scene_attributes(s)[k] for s in b]
                cells.append(f"{ridge_accuracy(pa.numpy(), ya, pb.numpy(), yb):.2f} ({majority(yb):.2f})")
            lines.append(f"| {label} ({len(b)}) | {_layer_name(layer, len(ha))} | " + " | ".join(cells) + " |")
    return lines + [""]


def binding_section(pipe, train: list, test: list) -> list[str]:
    per_layer = {}
    for key, ss in (("train", train), ("test", test)):
        h, _, offsets = layer_outputs(pipe, [s.caption for s in ss])
        for i, s in enumerate(ss):
            for pos, probe, label in token_rows(s, offsets[i]):
                per_layer.setdefault(probe, {"train": [], "test": []})[key].append(([x[i, pos].numpy() for x in h], label))
    n_layers = len(h)
    lines = ["### Binding: what one token's output says about the rest of its caption", "",
             "| probe (token -> label) | held-out tokens | chance | " + " | ".join(_layer_name(k, n_layers) for k in range(n_layers))
             + " |", "|---|---|---|" + "---|" * n_layers]
    for probe, rows in per_layer.items():
        ytr, yte = [r[1] for r in rows["train"]], [r[1] for r in rows["test"]]
        accs = [ridge_accuracy(np.stack([r[0][k] for r in rows["train"]]), ytr, np.stack([r[0][k] for r in rows["test"]]), yte)
                for k in range(n_layers)]
        lines.append(f"| {probe} | {len(yte)} | {majority(yte):.2f} | " + " | ".join(f"{v:.2f}" for v in accs) + " |")
    return lines + [""]


def swap_section(pipe, test: list) -> list[str]:
    """Cosine similarity of two captions' outputs, whole sequence (flattened) and mean-pooled, when they differ
    in one word, against two unrelated captions."""
    one = [s for s in test if len(s.things) == 1 and s.things[0].motion in ("moves left", "moves right")
           and s.pan in ("the camera pans left", "the camera pans right")]
    flip = {"moves left": "moves right", "moves right": "moves left", "the camera pans left": "the camera pans right",
            "the camera pans right": "the camera pans left"}
    pairs = {
        "motion word (left <-> right)": [(s.caption, s.caption.replace(s.things[0].motion, flip[s.things[0].motion])) for s in one],
        "colour word": [(s.caption, s.caption.replace(f" {s.things[0].colour} ", f" {_other_colour(s.things[0].colour)} "))
                        for s in one if s.things[0].colour in SINGLE_TOKEN_COLOURS],
        "object and camera directions exchanged (the same tokens)": [
            (s.caption, s.caption.replace(s.things[0].motion, flip[s.things[0].motion]).replace(s.pan, flip[s.pan]))
            for s in one if s.things[0].motion.split()[-1] != s.pan.split()[-1]],
        "unrelated captions": [(a.caption, b.caption) for a, b in zip(one, one[1:] + one[:1])],
    }
    lines = ["### How far apart two captions' outputs are", "",
             f"Cosine similarity over {len(one)} one-object held-out captions whose object moves left/right while the camera "
             "pans (those with the two directions opposite, for the exchange); sequence = the flattened per-token outputs (the same length here), mean = mean-pooled.", "",
             "| the two captions differ in | sequence: layer 0 | sequence: output | mean: layer 0 | mean: output |",
             "|---|---|---|---|---|"]
    for label, pp in pairs.items():
        (ha, ma, _), (hb, mb, _) = (layer_outputs(pipe, [p[k] for p in pp]) for k in (0, 1))
        cells = []
        for kind in ("sequence", "mean"):
            for layer in (0, len(ha) - 1):
                a, b = ha[layer], hb[layer]
                if kind == "mean":
                    a, b = a.sum(1) / ma.sum(1), b.sum(1) / mb.sum(1)
                cells.append(float(torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).mean()))
        lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in cells) + " |")
    return lines + [""]


SINGLE_TOKEN_COLOURS = ("red", "green", "yellow", "white", "cyan")  # the tiny tokenizer's one-token colour words


def _other_colour(c: str) -> str:
    return SINGLE_TOKEN_COLOURS[(SINGLE_TOKEN_COLOURS.index(c) + 1) % len(SINGLE_TOKEN_COLOURS)]


def _layer_name(k: int, n: int) -> str:
    return "0 (embedding)" if k == 0 else ("output" if k == n - 1 else f"block {k}")


def report(pipe, label: str) -> str:
    train, test = scenes(1, 3000), scenes(2, 600)
    lines = [f"## Tiny UMT5 outputs of the training captions ({label})", ""]
    lines += pooled_section(pipe, train, test) + binding_section(pipe, train, test) + swap_section(pipe, test)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", type=Path, default=tiny.TRAINED_WEIGHTS, help="a train_tiny --out directory")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tiny.TRAINED_WEIGHTS = args.weights  # build_tiny_pipeline("trained") reads the module's path
    pipe = tiny.build_tiny_pipeline("trained")
    print(report(pipe, str(args.weights)))


if __name__ == "__main__":
    main()
