"""Synthetic chest-X-ray report data, so the whole report pipeline (data -> model -> metrics) runs anywhere.

    python -m vision.synthetic OUT_DIR --studies 300 --views 2 --size 224 --seed 0

writes OUT_DIR/images/<id>/0.png (frontal PA view) [, 1.png (lateral view)] and OUT_DIR/annotation.json in the
R2GenGPT format (70% train / 10% val / 20% test), each entry also listing its "findings". Grayscale PNGs of a
thorax-like scene: body outline, two lung fields with ribs and vessel markings, mediastinum and spine, heart,
diaphragm domes, gastric bubble. Findings are drawn visibly:
  cardiomegaly            enlarged heart silhouette (both views)
  effusion (side, size)   opaque lung base with a meniscus that blunts the costophrenic angle (lateral view:
                          posterior base)
  pneumothorax (side, size)  lucent rim without vessel markings at the apex and lateral wall, visceral pleural
                          line (frontal view only, as it is usually invisible on a lateral film)
  nodule / mass (side, zone) small round / large lobulated opacity in the upper, middle or lower lung zone
Every study gets its own anatomy jitter (shift, scale, sizes), exposure and noise, so no two images are alike,
and a report that names exactly what is drawn (normal studies get varied normal phrasings). Sides are the
patient's: the frontal view follows the radiological convention (patient's right on the image's left).
Deterministic given the seed; numpy + PIL only.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from stablelm.cli import HelpFormatter

SIDES = ("right", "left")
ZONES = ("upper", "middle", "lower")
SPLIT_FRACTIONS = (("train", 0.7), ("val", 0.1), ("test", 0.2))


# ---------------------------------------------------------------------------- anatomy and findings
@dataclass
class Anatomy:
    """Per-study geometry and exposure, in image-width units (0..1); drawn independently of the findings."""
    shift_u: float
    shift_v: float
    scale: float
    lung_w: tuple[float, float]       # (right, left) lung half-widths
    lung_h: tuple[float, float]
    dome_v: tuple[float, float]       # (right, left) hemidiaphragm heights (the right one is higher)
    heart_w: float                    # normal heart half-width
    heart_h: float
    contrast: float
    brightness: float
    noise: float
    vessels: tuple[tuple[float, float], ...]   # (angle, length) of vessel markings from each hilum
    rib_phase: float

    @staticmethod
    def sample(rng: np.random.Generator) -> "Anatomy":
        u = rng.uniform
        right_dome = u(0.70, 0.74)
        return Anatomy(
            shift_u=u(-0.03, 0.03), shift_v=u(-0.03, 0.03), scale=u(0.94, 1.04),
            lung_w=(u(0.155, 0.175), u(0.145, 0.165)), lung_h=(u(0.30, 0.33), u(0.30, 0.33)),
            dome_v=(right_dome, right_dome + u(0.015, 0.04)), heart_w=u(0.12, 0.135), heart_h=u(0.1, 0.115),
            contrast=u(0.85, 1.15), brightness=u(-0.05, 0.05), noise=u(0.012, 0.03),
            vessels=tuple((u(-2.6, 0.5), u(0.08, 0.16)) for _ in range(7)), rib_phase=u(0.0, 0.04))


def sample_findings(rng: np.random.Generator) -> list[dict]:
    """0-3 findings with their geometry jitter: cardiomegaly, effusion, pneumothorax, one nodule or mass."""
    count = int(rng.choice(4, p=[0.3, 0.4, 0.22, 0.08]))
    kinds = list(rng.choice(["cardiomegaly", "effusion", "pneumothorax", "lesion"], size=count, replace=False))
    findings = []
    effusion_side = None
    if "cardiomegaly" in kinds:
        findings.append({"kind": "cardiomegaly"})
    if "effusion" in kinds:
        effusion_side = str(rng.choice(["right", "left", "both"], p=[0.4, 0.4, 0.2]))
        findings.append({"kind": "effusion", "side": effusion_side, "size": str(rng.choice(["small", "moderate"]))})
    if "pneumothorax" in kinds and effusion_side != "both":
        sides = [s for s in SIDES if s != effusion_side]
        findings.append({"kind": "pneumothorax", "side": str(rng.choice(sides)),
                         "size": str(rng.choice(["small", "large"]))})
    if "lesion" in kinds:
        findings.append({"kind": str(rng.choice(["nodule", "mass"])), "side": str(rng.choice(SIDES)),
                         "zone": str(rng.choice(ZONES)), "du": float(rng.uniform(-0.02, 0.02)),
                         "dv": float(rng.uniform(-0.02, 0.02)), "lobes": [float(x) for x in rng.uniform(0, 6.3, 2)]})
    return findings


# ---------------------------------------------------------------------------- drawing helpers
def _soft(distance, width=0.006):
    """Soft membership from a signed distance (positive inside), edge about `width` wide."""
    return np.clip(0.5 + distance / width, 0.0, 1.0)


def _ellipse(u, v, cu, cv, au, av, width=0.006):
    r = np.sqrt(((u - cu) / au) ** 2 + ((v - cv) / av) ** 2)
    return _soft((1.0 - r) * min(au, av), width)


def _blend(img, mask, value):
    return img * (1.0 - mask) + value * mask


def _segment(u, v, u0, v0, u1, v1, width):
    """Soft line segment from (u0, v0) to (u1, v1)."""
    du, dv = u1 - u0, v1 - v0
    t = np.clip(((u - u0) * du + (v - v0) * dv) / (du * du + dv * dv), 0.0, 1.0)
    dist = np.hypot(u - (u0 + t * du), v - (v0 + t * dv))
    return _soft(width - dist, width)


def _finish(img, anat: Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Exposure, a smooth intensity drift and quantum-like noise, then 8 bits."""
    size = img.shape[0]
    grid = np.linspace(0.0, 1.0, size)
    fu, fv, pu, pv = rng.uniform(0.5, 2.0, 4) * np.array([1, 1, 6.3, 6.3])
    drift = 0.03 * np.cos(fu * 3.1 * grid[None, :] + pu) * np.cos(fv * 3.1 * grid[:, None] + pv)
    img = anat.contrast * (img - 0.4) + 0.4 + anat.brightness + drift
    img = img + rng.normal(0.0, anat.noise, img.shape)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _grid(size: int, anat: Anatomy):
    """Pixel centres in anatomy coordinates (the study's shift and scale undone)."""
    c = (np.arange(size) + 0.5) / size
    u = (c[None, :] - 0.5 - anat.shift_u) / anat.scale + 0.5
    v = (c[:, None] - 0.5 - anat.shift_v) / anat.scale + 0.5
    return np.broadcast_to(u, (size, size)), np.broadcast_to(v, (size, size))


def _lesion_mask(u, v, finding, cu, cv):
    if finding["kind"] == "nodule":
        return _ellipse(u, v, cu, cv, 0.022, 0.022, 0.004)
    theta = np.arctan2(v - cv, u - cu)
    a, b = finding["lobes"]
    radius = 0.052 * (1.0 + 0.14 * np.sin(3 * theta + a) + 0.08 * np.sin(5 * theta + b))
    return _soft(radius - np.hypot(u - cu, v - cv), 0.008)


# ---------------------------------------------------------------------------- frontal view
class _Lung(NamedTuple):
    side: str
    sign: float          # -1 on the image's left (patient's right), +1 on its right
    cu: float            # centre and half-axes of the ellipse the lung is cut from
    cv: float
    w: float
    h: float
    dome: np.ndarray     # hemidiaphragm height per pixel column
    outline: np.ndarray  # ellipse minus mediastinum, before the dome cuts it
    mask: np.ndarray     # the aerated lung field


def _frontal_lungs(u, v, anat: Anatomy) -> list[_Lung]:
    lungs = []
    for i, side in enumerate(SIDES):
        sign = -1.0 if side == "right" else 1.0
        cu, w, h = 0.5 + sign * 0.2, anat.lung_w[i], anat.lung_h[i]
        cv = anat.dome_v[i] - 0.85 * h
        # the dome cuts the bottom of a taller ellipse, leaving a sharp lateral costophrenic angle
        dome = anat.dome_v[i] - 0.05 * (1.0 - np.clip(((u - cu) / w) ** 2, 0.0, 1.0))
        outline = np.minimum(_ellipse(u, v, cu, cv, w, h, 0.008), _soft(sign * (u - 0.5) - 0.055, 0.01))
        lungs.append(_Lung(side, sign, cu, cv, w, h, dome, outline, np.minimum(outline, _soft(dome - v, 0.006))))
    return lungs


def render_frontal(anat: Anatomy, findings: list[dict], size: int, rng: np.random.Generator):
    """Frontal (PA) view -> (uint8 [size, size], {finding name: bool mask of the pixels it changed})."""
    u, v = _grid(size, anat)
    kinds = {f["kind"]: f for f in findings}
    masks = {}
    img = np.full((size, size), 0.04)
    body = np.maximum(_ellipse(u, v, 0.5, 0.64, 0.45, 0.6, 0.02), _ellipse(u, v, 0.5, 0.2, 0.5, 0.1, 0.02))
    body = np.maximum(body, _soft(np.minimum(0.075 - np.abs(u - 0.5), 0.2 - v), 0.01))  # neck
    img = _blend(img, body, 0.42)
    lungs = _frontal_lungs(u, v, anat)

    # pneumothorax: the lung collapses towards the hilum, leaving a rim of air without markings
    rim = collapsed_line = np.zeros((size, size))
    if "pneumothorax" in kinds:
        f = kinds["pneumothorax"]
        lung = lungs[SIDES.index(f["side"])]
        shrink = 0.2 if f["size"] == "small" else 0.4
        ccu, ccv = lung.cu - lung.sign * lung.w * shrink * 0.6, lung.cv + lung.h * shrink * 0.5
        cw, ch = lung.w * (1 - shrink), lung.h * (1 - shrink * 0.8)
        rim = np.clip(lung.mask - _ellipse(u, v, ccu, ccv, cw, ch, 0.004), 0.0, 1.0)
        r = np.sqrt(((u - ccu) / cw) ** 2 + ((v - ccv) / ch) ** 2)
        collapsed_line = _soft(0.004 - np.abs(r - 1.0) * lung.w, 0.003) * lung.mask
        masks["pneumothorax_" + f["side"]] = rim > 0.5

    aerated = np.maximum(lungs[0].mask, lungs[1].mask)
    img = img - 0.27 * aerated
    rib_v = np.arange(0.16, 0.8, 0.075) + anat.rib_phase
    ribs = sum(_soft(0.007 - np.abs(v - rv - 0.07 * ((u - 0.5) / 0.3) ** 2), 0.004) for rv in rib_v)
    img = img + 0.06 * np.clip(ribs, 0, 1) * aerated
    markings = np.zeros((size, size))
    for lung in lungs:
        hu, hv = 0.5 + lung.sign * 0.085, 0.47   # hilum
        for angle, length in anat.vessels:
            a = angle if lung.sign > 0 else np.pi - angle
            end_u, end_v = hu + length * np.cos(a), hv + length * np.sin(a)
            markings = np.maximum(markings, _segment(u, v, hu, hv, end_u, end_v, 0.0035))
    img = img + 0.06 * markings * aerated * (1.0 - rim)
    img = img - 0.08 * rim + 0.12 * collapsed_line

    # mediastinum and spine, trachea, abdomen below the domes, gastric bubble under the left dome
    img = _blend(img, _soft(0.05 - np.abs(u - 0.5), 0.012) * _soft(v - 0.1, 0.02), 0.56)
    img = _blend(img, _soft(0.011 - np.abs(u - 0.5), 0.004) * _soft(np.minimum(v - 0.04, 0.4 - v), 0.02), 0.22)
    below = np.where(u < 0.5, _soft(v - lungs[0].dome, 0.006), _soft(v - lungs[1].dome, 0.006))
    img = _blend(img, below * body, 0.52)
    img = _blend(img, _ellipse(u, v, 0.66, anat.dome_v[1] + 0.045, 0.04, 0.025, 0.008) * body, 0.2)
    # the heart sits on the domes, its apex towards the patient's left; drawn over any effusion so that an
    # enlarged heart stays visible
    heart_w, heart_h, heart_u, heart_v = anat.heart_w, anat.heart_h, 0.535, anat.dome_v[1] - 0.1
    if "cardiomegaly" in kinds:
        normal = _ellipse(u, v, heart_u, heart_v, heart_w, heart_h)
        heart_w, heart_h, heart_u = heart_w * 1.45, heart_h * 1.15, heart_u + 0.02
    heart = _ellipse(u, v, heart_u, heart_v, heart_w, heart_h, 0.008) * _soft(anat.dome_v[1] + 0.02 - v, 0.01)
    if "cardiomegaly" in kinds:
        masks["cardiomegaly"] = (heart > 0.5) & (normal < 0.5)
    if "effusion" in kinds:
        f = kinds["effusion"]
        height = 0.07 if f["size"] == "small" else 0.14
        for side in (SIDES if f["side"] == "both" else (f["side"],)):
            lung = lungs[SIDES.index(side)]
            lateral = np.clip(lung.sign * (u - lung.cu) / lung.w, 0.0, 1.0)   # 1 at the lateral wall
            level = lung.dome - height - 0.06 * lateral ** 2                   # the meniscus climbs laterally
            fluid = np.minimum(lung.outline, _soft(v - level, 0.01)) * _soft(lung.dome + 0.01 - v, 0.01)
            img = _blend(img, fluid, 0.5)
            masks["effusion_" + side] = (fluid > 0.5) & (heart < 0.5)
    img = _blend(img, heart, 0.6)

    for f in findings:
        if f["kind"] in ("nodule", "mass"):
            lung = lungs[SIDES.index(f["side"])]
            top, bottom = lung.cv - lung.h, anat.dome_v[SIDES.index(f["side"])] - 0.06
            zone_v = top + (0.25, 0.5, 0.75)[ZONES.index(f["zone"])] * (bottom - top)
            lesion = _lesion_mask(u, v, f, lung.cu + lung.sign * 0.3 * lung.w + f["du"], zone_v + f["dv"])
            img = img + 0.24 * lesion
            masks[f"{f['kind']}_{f['side']}_{f['zone']}"] = lesion > 0.5
    return _finish(img, anat, rng), masks


# ---------------------------------------------------------------------------- lateral view
def render_lateral(anat: Anatomy, findings: list[dict], size: int, rng: np.random.Generator):
    """Lateral view (anterior to the image's left) -> (uint8 [size, size], {finding name: bool mask})."""
    u, v = _grid(size, anat)
    kinds = {f["kind"]: f for f in findings}
    masks = {}
    img = np.full((size, size), 0.04)
    shoulders = _soft(np.minimum(0.12 - np.abs(u - 0.55), 0.3 - v), 0.01)
    body = np.maximum(_ellipse(u, v, 0.5, 0.62, 0.36, 0.6, 0.02), shoulders)
    img = _blend(img, body, 0.42)
    dome_base = 0.5 * (anat.dome_v[0] + anat.dome_v[1])
    dome = dome_base - 0.04 + 0.08 * np.clip((u - 0.2) / 0.6, 0.0, 1.0)   # posterior sulcus lowest
    lung_w, lung_h = 0.5 * (anat.lung_w[0] + anat.lung_w[1]) + 0.12, 0.5 * (anat.lung_h[0] + anat.lung_h[1])
    lung = np.minimum(_ellipse(u, v, 0.5, dome_base - 0.8 * lung_h, lung_w, lung_h, 0.01), _soft(dome - v, 0.006))
    img = img - 0.24 * lung
    img = _blend(img, _soft(0.008 - np.abs(u - 0.2 - 0.05 * v), 0.004) * _soft(v - 0.2, 0.02) * body, 0.55)  # sternum
    for k in range(12):  # vertebral bodies with disc spaces
        vc = 0.1 + k * 0.075 + anat.rib_phase
        img = _blend(img, _soft(np.minimum(0.045 - np.abs(u - 0.79), 0.03 - np.abs(v - vc)), 0.006), 0.62)
    heart_w, heart_h = anat.heart_w + 0.03, anat.heart_h + 0.025
    heart_u, heart_v = 0.37, dome_base - 0.1
    if "cardiomegaly" in kinds:
        normal = _ellipse(u, v, heart_u, heart_v, heart_w, heart_h)
        heart_w, heart_h, heart_u = heart_w * 1.35, heart_h * 1.12, heart_u + 0.03
    heart = _ellipse(u, v, heart_u, heart_v, heart_w, heart_h, 0.008) * _soft(dome + 0.01 - v, 0.01)
    if "cardiomegaly" in kinds:
        masks["cardiomegaly"] = (heart > 0.5) & (normal < 0.5)
    img = _blend(img, heart, 0.56)
    img = _blend(img, _soft(v - dome, 0.006) * body, 0.52)

    if "effusion" in kinds:
        f = kinds["effusion"]
        height = (0.06 if f["size"] == "small" else 0.12) * (1.3 if f["side"] == "both" else 1.0)
        posterior = np.clip((u - 0.45) / 0.3, 0.0, 1.0)
        level = dome - height * posterior - 0.05 * posterior ** 2
        fluid = lung * _soft(v - level, 0.01) * _soft(u - 0.45, 0.02)
        img = _blend(img, fluid, 0.5)
        masks["effusion"] = fluid > 0.5
    for f in findings:
        if f["kind"] in ("nodule", "mass"):
            top, bottom = dome_base - 1.8 * lung_h, dome_base - 0.08
            zone_v = top + (0.25, 0.5, 0.75)[ZONES.index(f["zone"])] * (bottom - top)
            lesion = _lesion_mask(u, v, f, 0.55 + f["du"], zone_v + f["dv"])
            img = img + 0.18 * lesion
            masks[f"{f['kind']}_{f['side']}_{f['zone']}"] = lesion > 0.5
    return _finish(img, anat, rng), masks


# ---------------------------------------------------------------------------- reports
# Phrasings per statement; {side}, {zone}, {size}, {Size} are filled from the finding.
PHRASES = {
    "cardiomegaly": ["The heart is enlarged.", "There is cardiomegaly.", "The cardiac silhouette is enlarged.",
                     "Cardiomegaly is present."],
    "normal_heart": ["The heart is normal in size.", "Heart size is normal.",
                     "The cardiomediastinal silhouette is within normal limits.",
                     "The cardiac silhouette is normal in size."],
    "mediastinum": ["The mediastinum is unremarkable.", "Mediastinal contours are normal."],
    "nodule": ["There is a nodule in the {side} {zone} lung zone.", "A {side} {zone} lung nodule is seen.",
               "A small nodular opacity projects over the {side} {zone} lung."],
    "mass": ["There is a mass in the {side} {zone} lung zone.", "A {side} {zone} lung mass is present.",
             "A large opacity consistent with a mass is seen in the {side} {zone} lung."],
    "clear_lungs": ["The lungs are clear.", "No focal consolidation.", "There is no focal airspace disease."],
    "no_lesion": ["No focal consolidation.", "No pulmonary nodules or masses."],
    "effusion": ["There is a {size} {side} pleural effusion.", "A {size} {side} pleural effusion is present.",
                 "{Size} {side} pleural effusion blunting the {side} costophrenic angle."],
    "bilateral_effusion": ["There are {size} bilateral pleural effusions.",
                           "{Size} bilateral pleural effusions are present."],
    "pneumothorax": ["There is a {size} {side} pneumothorax.", "A {size} {side} pneumothorax is seen.",
                     "{Size} {side} apical pneumothorax."],
    "no_pleural": ["No pleural effusion or pneumothorax.", "There is no pleural effusion or pneumothorax.",
                   "No pneumothorax or pleural effusion."],
    "no_effusion": ["No pleural effusion.", "There is no pleural effusion."],
    "no_pneumothorax": ["No pneumothorax.", "There is no pneumothorax."],
    "bones": ["No acute osseous abnormality.", "The osseous structures are intact."],
}


def write_report(findings: list[dict], rng: np.random.Generator) -> str:
    """A report naming exactly the drawn findings, plus normal statements for what is absent."""
    kinds = {f["kind"]: f for f in findings}
    sentences = []

    def say(key, finding=None):
        fields = dict(finding or {})
        if "size" in fields:
            fields["Size"] = fields["size"].capitalize()
        options = PHRASES[key]
        sentences.append(options[int(rng.integers(len(options)))].format(**fields))

    say("cardiomegaly" if "cardiomegaly" in kinds else "normal_heart")
    if rng.random() < 0.4:
        say("mediastinum")
    lesion = kinds.get("nodule") or kinds.get("mass")
    if lesion:
        say(lesion["kind"], lesion)
    elif not findings:
        say("clear_lungs")
    elif rng.random() < 0.5:
        say("no_lesion")
    effusion, ptx = kinds.get("effusion"), kinds.get("pneumothorax")
    if effusion:
        say("bilateral_effusion" if effusion["side"] == "both" else "effusion", effusion)
    if ptx:
        say("pneumothorax", ptx)
    if not effusion or not ptx:
        say("no_pleural" if not (effusion or ptx) else "no_pneumothorax" if effusion else "no_effusion")
    if rng.random() < 0.5:
        say("bones")
    return " ".join(sentences)


# ---------------------------------------------------------------------------- studies and the dataset
def make_study(seed: int, index: int, size: int = 224, views: int = 2, findings: list[dict] | None = None) -> dict:
    """Study `index` of the dataset with `seed`: {"findings", "report", "images": [uint8 [size, size]] per view,
    "masks": [{finding: bool mask}] per view}. Anatomy, findings, noise and wording come from separate streams,
    so passing `findings` redraws the same patient and noise with other findings."""
    if views not in (1, 2):
        raise ValueError(f"views={views}: 1 (frontal) or 2 (frontal + lateral)")
    if size < 32:
        raise ValueError(f"size={size} is too small to draw a thorax (>= 32)")
    anat_rng, find_rng, noise_rng, text_rng = (np.random.default_rng([seed, index, s]) for s in range(4))
    anat = Anatomy.sample(anat_rng)
    if findings is None:
        findings = sample_findings(find_rng)
    renders = [render_frontal(anat, findings, size, noise_rng)]
    if views == 2:
        renders.append(render_lateral(anat, findings, size, noise_rng))
    return {"findings": findings, "report": write_report(findings, text_rng),
            "images": [img for img, _ in renders], "masks": [m for _, m in renders]}


def generate(out_dir, studies: int = 300, views: int = 2, size: int = 224, seed: int = 0,
             progress: bool = True) -> Path:
    """Write the dataset (images + annotation.json) under out_dir; returns the annotation path."""
    if studies < 3:
        raise ValueError(f"studies={studies}: need at least 3 (one per split)")
    out_dir = Path(out_dir)
    n_val, n_test = (max(1, round(frac * studies)) for _, frac in SPLIT_FRACTIONS[1:])
    bounds = [studies - n_val - n_test, studies - n_test]
    annotation = {name: [] for name, _ in SPLIT_FRACTIONS}
    for i in tqdm(range(studies), desc="synthetic studies", disable=not progress):
        study = make_study(seed, i, size, views)
        sid = f"synth_{i:05d}"
        paths = []
        for view, img in enumerate(study["images"]):
            rel = f"{sid}/{view}.png"
            (out_dir / "images" / sid).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img, mode="L").save(out_dir / "images" / rel)
            paths.append(rel)
        split = "train" if i < bounds[0] else "val" if i < bounds[1] else "test"
        annotation[split].append({"id": sid, "report": study["report"], "image_path": paths, "split": split,
                                  "findings": study["findings"]})
    path = out_dir / "annotation.json"
    path.write_text(json.dumps(annotation, indent=1))
    return path


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m vision.synthetic", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("out_dir", help="where annotation.json and images/ are written")
    ap.add_argument("--studies", type=int, default=300, help="studies, split 70/10/20 into train/val/test")
    ap.add_argument("--views", type=int, default=2, choices=[1, 2], help="images per study (frontal, lateral)")
    ap.add_argument("--size", type=int, default=224, help="image side in pixels")
    ap.add_argument("--seed", type=int, default=0, help="random seed (same seed, same data set)")
    args = ap.parse_args(argv)
    path = generate(args.out_dir, args.studies, args.views, args.size, args.seed)
    print(f"wrote {path} and {Path(args.out_dir) / 'images'}")
    return path


if __name__ == "__main__":
    main()
