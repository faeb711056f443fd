"""R2GenGPT-style report data: annotation.json loading and validation, report cleaning, X-ray image transforms,
the study dataset (with `check_images`, a header read of every image before training) and its collate function.
Paths may start with `~`.

annotation.json (the format of R2Gen / R2GenGPT): {"train": [...], "val": [...], "test": [...]}, each entry
{"id": str, "report": str, "image_path": [paths relative to the image dir], "split": str (optional, must name
the split it is in)}; IU-Xray studies list two images (frontal, lateral), MIMIC-CXR studies one. Extra keys are
kept and ignored.

Image transforms (no torchvision: it does not import with this torch build; PIL + torch do the same steps):
  eval   resize to 224x224 (bicubic), to [0, 1], ImageNet mean/std normalisation. This is what R2GenGPT does
         for every split: its Hugging Face image processor for microsoft/swin-base-patch4-window7-224 resizes to
         224x224 bicubic, rescales by 1/255 and normalises with the ImageNet statistics.
  train  R2Gen's augmentation: resize the shorter side to 256, random 224x224 crop, then as eval. R2GenGPT
         itself trains without augmentation: build the training set with train=False to reproduce it exactly.
         Both resizes are bicubic (R2Gen's torchvision default is bilinear) so train and eval see the same
         resampling. R2Gen also flips horizontally with p=0.5; here hflip defaults to 0 because a chest X-ray
         is not mirror-symmetric: the heart lies on the patient's left and reports name sides ("left pleural
         effusion"), so a flipped image contradicts its report. Set hflip > 0 to reproduce R2Gen.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

SPLITS = ("train", "val", "test")
DATASETS = ("iu_xray", "mimic_cxr")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------- annotation
def validate_annotation(data, source: str = "annotation") -> dict[str, list[dict]]:
    """Check an R2GenGPT annotation dict and return {split: entries} with all three splits (missing ones empty).

    Raises ValueError naming the split, the entry index and id, and the field that is missing or malformed."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: top level must be an object {{split: [entries]}}, got {type(data).__name__}")
    unknown = sorted(set(data) - set(SPLITS))
    if unknown:
        raise ValueError(f"{source}: unknown split name(s) {unknown}; expected a subset of {list(SPLITS)}")
    out = {}
    for split in SPLITS:
        entries = data.get(split, [])
        if not isinstance(entries, list):
            raise ValueError(f"{source}: split {split!r} must be a list of entries, got {type(entries).__name__}")
        seen: dict[str, int] = {}
        for i, entry in enumerate(entries):
            where = f"{source}: {split}[{i}]"
            if not isinstance(entry, Mapping):
                raise ValueError(f"{where}: entry must be an object, got {type(entry).__name__}")
            sid = entry.get("id")
            if not isinstance(sid, str) or not sid:
                raise ValueError(f"{where}: 'id' must be a non-empty string, got {sid!r}")
            where = f"{where} (id {sid!r})"
            if sid in seen:
                raise ValueError(f"{where}: duplicate id, first used by {split}[{seen[sid]}]")
            seen[sid] = i
            report = entry.get("report")
            if not isinstance(report, str) or not report.strip():
                raise ValueError(f"{where}: 'report' must be a non-empty string, got {report!r:.60}")
            paths = entry.get("image_path")
            if (not isinstance(paths, list) or not paths
                    or not all(isinstance(p, str) and p for p in paths)):
                raise ValueError(f"{where}: 'image_path' must be a non-empty list of path strings, got {paths!r:.80}")
            if "split" in entry and entry["split"] != split:
                raise ValueError(f"{where}: 'split' is {entry['split']!r} but the entry is listed under {split!r}")
        out[split] = list(entries)
    return out


def load_annotation(path) -> dict[str, list[dict]]:
    """Read and validate an R2GenGPT annotation.json: {"train"|"val"|"test": [entries]}."""
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested too deep
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return validate_annotation(data, source=str(path))


# ---------------------------------------------------------------------------- report cleaning
# R2Gen's rules (modules/tokenizers.py), copied by R2GenGPT (dataset/data_helper.py), reproduced quirks included
# so cleaned references, and hence scores, match the published pipelines:
#   1. fixed numbers of replace passes: ".." -> "." (3 passes for IU, 8 for MIMIC, so runs of more than 8 resp.
#      256 dots are not fully collapsed); MIMIC first turns newlines into spaces and collapses "__" (7 passes)
#      and double spaces (6 passes);
#   2. list numbering: "1. " is deleted anywhere (also the tail of "11. "), ". k. " and " k. " become ". " for
#      k = 2..5 (higher numbers stay);
#   3. R2GenGPT's MIMIC cleaner only: ":" becomes " :" (a separate token that is kept);
#   4. strip, lower-case, split into sentences on ". ";
#   5. per sentence: delete the characters " / \ ' , strip, lower-case, then delete punctuation:
#        IU (both) and R2Gen's MIMIC: . , ? ; * ! % ^ & _ + ( ) : < = > @ [ ] { }  -- the reference's class reads
#          "():-\[" which is the RANGE ':'..'[' (so '<=>@' go, A-Z too but the text is lower-case already) and
#          NOT a hyphen: '-' is kept ("left-sided");
#        R2GenGPT's MIMIC: . , ? ; * ! % ^ & _ + ( ) [ ] { }  (':' '-' '<=>@' kept);
#   6. join the sentences with " . " and end with " .". Empty sentences are kept (the reference's filter
#      compares a string with [] and never fires), so "a. . b." gives "a .  . b .".
_IU_PUNCT = re.compile(r"[.,?;*!%^&_+()\[\]{}:<=>@]")
_R2GENGPT_MIMIC_PUNCT = re.compile(r"[.,?;*!%^&_+()\[\]{}]")
_NUMBERING = ([("1. ", "")] + [(f". {k}. ", ". ") for k in range(2, 6)]
              + [(f" {k}. ", ". ") for k in range(2, 6)])


def _replace_passes(text: str, old: str, new: str, passes: int) -> str:
    for _ in range(passes):
        text = text.replace(old, new)
    return text


def _remove_numbering(text: str) -> str:
    for old, new in _NUMBERING:
        text = text.replace(old, new)
    return text


def _split_clean_join(text: str, punct: re.Pattern) -> str:
    cleaned = []
    for sent in text.strip().lower().split(". "):
        for ch in "\"/\\'":
            sent = sent.replace(ch, "")
        cleaned.append(punct.sub("", sent.strip().lower()))
    return " . ".join(cleaned) + " ."


def clean_report_iu_xray(text: str) -> str:
    """IU-Xray report cleaning of R2Gen / R2GenGPT (rules above)."""
    return _split_clean_join(_remove_numbering(_replace_passes(text, "..", ".", 3)), _IU_PUNCT)


def clean_report_mimic_cxr(text: str, variant: str = "r2gengpt") -> str:
    """MIMIC-CXR report cleaning (rules above). variant="r2gengpt" (default) keeps ':' as a token and '-';
    variant="r2gen" is the original R2Gen cleaner (IU punctuation set, no ':' splitting)."""
    if variant not in ("r2gengpt", "r2gen"):
        raise ValueError(f"variant={variant!r}: choose 'r2gengpt' or 'r2gen'")
    text = _replace_passes(text.replace("\n", " "), "__", "_", 7)
    text = _replace_passes(text, "  ", " ", 6)
    text = _remove_numbering(_replace_passes(text, "..", ".", 8))
    if variant == "r2gen":
        return _split_clean_join(text, _IU_PUNCT)
    # after the numbering on purpose: "1.:" -> "1. :" must not lose its "1. " (the reference's order)
    return _split_clean_join(text.replace(":", " :"), _R2GENGPT_MIMIC_PUNCT)


def clean_report(text: str, dataset: str) -> str:
    if dataset == "iu_xray":
        return clean_report_iu_xray(text)
    if dataset == "mimic_cxr":
        return clean_report_mimic_cxr(text)
    raise ValueError(f"dataset={dataset!r}: choose one of {DATASETS}")


# ---------------------------------------------------------------------------- images
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I")
_EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr")


def load_image(path) -> Image.Image:
    """Open an image file as 8-bit RGB (grayscale replicated to three channels, 16-bit scaled down)."""
    with Image.open(path) as img:
        if img.mode in _SIXTEEN_BIT_MODES:
            arr = np.asarray(img, dtype=np.float32) / 257.0
            return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
        if img.mode not in _EIGHT_BIT_MODES:
            raise ValueError(f"{path}: unsupported image mode {img.mode!r}")
        return img.convert("RGB")


class XrayTransform:
    """PIL RGB image -> normalised float tensor [3, size, size] (train: resize shorter side + random crop [+ flip];
    eval: resize to size x size). Randomness comes from torch's global generator, which DataLoader seeds per
    worker."""

    def __init__(self, train: bool, size: int = 224, resize: int = 256, hflip: float = 0.0):
        if size < 1 or (train and resize < size):
            raise ValueError(f"need 1 <= size <= resize for training crops, got size={size} resize={resize}")
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"hflip={hflip} must be a probability in [0, 1]")
        self.train, self.size, self.resize, self.hflip = train, size, resize, hflip
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if img.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {img.mode!r} (use load_image)")
        if self.train:
            w, h = img.size
            short, long = min(w, h), max(w, h)
            new_long = int(self.resize * long / short)  # torchvision's Resize(int) truncates the long side too
            img = img.resize((self.resize, new_long) if w <= h else (new_long, self.resize), Image.BICUBIC)
            w, h = img.size
            top = int(torch.randint(0, h - self.size + 1, ()))
            left = int(torch.randint(0, w - self.size + 1, ()))
            img = img.crop((left, top, left + self.size, top + self.size))
            if self.hflip > 0 and float(torch.rand(())) < self.hflip:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            img = img.resize((self.size, self.size), Image.BICUBIC)
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
        return (x - self.mean) / self.std


# ---------------------------------------------------------------------------- dataset
class ReportDataset(Dataset):
    """Studies of one split: item = {"id": str, "images": [n_img, 3, size, size] float, "report": str}.

    annotation: a dict from load_annotation (or a path to annotation.json); image_dir: the base the entries'
    image paths are relative to; max_images: the first max_images images of each study are used (IU-Xray: 2,
    frontal + lateral; MIMIC-CXR: 1); clean: apply the dataset's report cleaning."""

    def __init__(self, annotation, image_dir, split: str, dataset: str = "iu_xray", max_images: int = 2,
                 train: bool = False, clean: bool = True, size: int = 224, resize: int = 256, hflip: float = 0.0):
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: choose one of {SPLITS}")
        if dataset not in DATASETS:
            raise ValueError(f"dataset={dataset!r}: choose one of {DATASETS}")
        if max_images < 1:
            raise ValueError(f"max_images={max_images} must be >= 1")
        if not isinstance(annotation, Mapping):
            annotation = load_annotation(annotation)
        entries = validate_annotation(annotation)[split]
        if not entries:
            raise ValueError(f"split {split!r} of the annotation has no entries")
        self.image_dir = Path(image_dir).expanduser()
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image directory not found: {self.image_dir}")
        self.entries = entries
        self.split, self.dataset, self.max_images = split, dataset, max_images
        self.reports = [clean_report(e["report"], dataset) if clean else e["report"] for e in entries]
        self.transform = XrayTransform(train, size, resize, hflip)

    def __len__(self) -> int:
        return len(self.entries)

    def check_images(self, show: int = 10) -> None:
        """Read the header of every image the split uses (PIL's open decodes no pixels), so a missing, unreadable
        or unsupported file is found before training rather than when a batch reaches it. Raises
        FileNotFoundError / ValueError naming the first `show` bad files and how many there are."""
        problems, missing = [], 0
        for index, entry in enumerate(self.entries):
            for rel in entry["image_path"][: self.max_images]:
                path = self.image_dir / rel
                where = f"study {entry['id']!r} ({self.split}[{index}]): {path}"
                if not path.is_file():
                    problems.append(f"{where}: not found")
                    missing += 1
                    continue
                try:
                    with Image.open(path) as img:
                        mode = img.mode
                except (OSError, ValueError, Image.DecompressionBombError) as e:
                    problems.append(f"{where}: not a readable image ({e})")
                    continue
                if mode not in _EIGHT_BIT_MODES + _SIXTEEN_BIT_MODES:
                    problems.append(f"{where}: unsupported image mode {mode!r}")
        if problems:
            more = f"; ... and {len(problems) - show} more" if len(problems) > show else ""
            error = FileNotFoundError if missing == len(problems) else ValueError
            raise error(f"{len(problems)} bad image(s) in split {self.split!r}: " + "; ".join(problems[:show]) + more)

    def __getitem__(self, index: int) -> dict:
        entry = self.entries[index]
        images = []
        for rel in entry["image_path"][: self.max_images]:
            path = self.image_dir / rel
            if not path.is_file():
                raise FileNotFoundError(f"study {entry['id']!r} ({self.split}[{index}]): image file not found: {path}")
            images.append(self.transform(load_image(path)))
        return {"id": entry["id"], "images": torch.stack(images), "report": self.reports[index]}


def collate_reports(batch: list[dict]) -> dict:
    """Stack studies: {"ids": [B], "images": [B, n_img, 3, H, W], "image_mask": [B, n_img] bool, "reports": [B]}.

    Studies with fewer images than the batch maximum are zero-padded; image_mask marks the real images, so the
    model averages per-image features over those only."""
    if not batch:
        raise ValueError("collate_reports got an empty batch")
    shapes = {tuple(item["images"].shape[1:]) for item in batch}
    if len(shapes) != 1:
        raise ValueError(f"all images in a batch must have one shape [3, H, W], got {sorted(shapes)}")
    n_max = max(item["images"].shape[0] for item in batch)
    first = batch[0]["images"]
    images = first.new_zeros((len(batch), n_max, *first.shape[1:]))
    mask = torch.zeros(len(batch), n_max, dtype=torch.bool)
    for i, item in enumerate(batch):
        n = item["images"].shape[0]
        images[i, :n] = item["images"]
        mask[i, :n] = True
    return {"ids": [item["id"] for item in batch], "images": images, "image_mask": mask,
            "reports": [item["report"] for item in batch]}
