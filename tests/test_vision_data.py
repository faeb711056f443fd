"""Report data: annotation validation, R2Gen/R2GenGPT report cleaning, image transforms, dataset + collate, and
the synthetic chest-X-ray generator (determinism, and that drawn findings are visible and reported)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vision import synthetic
from vision.data import (IMAGENET_MEAN, IMAGENET_STD, ReportDataset, XrayTransform, clean_report_iu_xray,
                         clean_report_mimic_cxr, collate_reports, load_annotation, load_image, validate_annotation)


def _entry(i, n_img=2, split="train"):
    return {"id": f"s{i}", "report": f"Report {i}. No effusion.", "image_path": [f"s{i}/{k}.png" for k in range(n_img)],
            "split": split}


# ---------------------------------------------------------------------------- annotation
def test_valid_annotation_fills_missing_splits_and_keeps_extra_keys():
    data = {"train": [dict(_entry(0), findings=[])], "test": [_entry(1, 1, "test")]}
    out = validate_annotation(data)
    assert set(out) == {"train", "val", "test"} and out["val"] == []
    assert out["train"][0]["findings"] == []


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["train"][1].pop("report"), r"train\[1\] \(id 's1'\): 'report'"),
    (lambda d: d["train"][1].update(report="  "), r"train\[1\] \(id 's1'\): 'report' must be a non-empty"),
    (lambda d: d["train"][0].pop("id"), r"train\[0\]: 'id' must be a non-empty string"),
    (lambda d: d["train"][0].update(id=7), r"train\[0\]: 'id' must be a non-empty string, got 7"),
    (lambda d: d["train"][1].update(image_path="s1/0.png"),
     r"train\[1\] \(id 's1'\): 'image_path' must be a non-empty list"),
    (lambda d: d["train"][1].update(image_path=[]), r"train\[1\] \(id 's1'\): 'image_path'"),
    (lambda d: d["train"][1].update(image_path=["a.png", 3]), r"train\[1\] \(id 's1'\): 'image_path'"),
    (lambda d: d["train"][1].update(split="test"), r"train\[1\] \(id 's1'\): 'split' is 'test'"),
    (lambda d: d["train"][1].update(id="s0"), r"train\[1\] \(id 's0'\): duplicate id, first used by train\[0\]"),
    (lambda d: d["train"].append("oops"), r"train\[2\]: entry must be an object"),
    (lambda d: d.update(valid=[]), r"unknown split name\(s\) \['valid'\]"),
    (lambda d: d.update(val={}), r"split 'val' must be a list"),
])
def test_annotation_errors_name_entry_and_field(tmp_path, mutate, message):
    data = {"train": [_entry(0), _entry(1)], "val": [], "test": []}
    mutate(data)
    path = tmp_path / "annotation.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        load_annotation(path)


def test_annotation_not_an_object_or_not_json(tmp_path):
    with pytest.raises(ValueError, match="top level must be an object"):
        validate_annotation([_entry(0)])
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        load_annotation(path)


# ---------------------------------------------------------------------------- report cleaning
# Expected outputs derived by hand from the rules documented in vision/data.py.
IU_CASES = [
    ("The heart is normal in size. The mediastinum is unremarkable.. 1. No pneumothorax, or effusion. "
     '2. Left-sided "opacity" (x/y) noted; 3 mm!',
     "the heart is normal in size . the mediastinum is unremarkable . no pneumothorax or effusion . "
     "left-sided opacity xy noted 3 mm ."),
    ("Heart size normal.... Lungs clear", "heart size normal . lungs clear ."),  # 4 dots -> 1 in 2 passes
    ("Size 2.5 cm. Stable", "size 25 cm . stable ."),     # dots inside a sentence are deleted
    ("Findings 11. Seen 6. here", "findings 1seen 6 . here ."),   # "1. " goes inside "11. "; 6 is no list number
    ("x<y = z@w: [a]{b} 50% & c^2 + d_e * f? it's c\\d", "xy  zw ab 50  c2  de  f its cd ."),
    ("Clear. . Done.", "clear .  . done ."),   # empty sentence kept, as the reference does
    ("Stable\nfinding. Next", "stable\nfinding . next ."),   # IU leaves newlines alone
]
MIMIC_CASES = [  # (text, R2GenGPT cleaning, R2Gen cleaning)
    ("FINDINGS:  1. Lungs   clear.\n2. No effusion___ seen... IMPRESSION: Normal-ish.",
     "findings : lungs clear . no effusion seen . impression : normal-ish .",
     "findings lungs clear . no effusion seen . impression normal-ish ."),
    # numbering is removed before ':' gets its space, so the "1. " that the space creates stays
    ("Item 1.: x <2 cm>, @a", "item 1 . : x <2 cm> @a .", "item 1 x 2 cm a ."),
]


@pytest.mark.parametrize("text, expected", IU_CASES)
def test_clean_iu_xray(text, expected):
    assert clean_report_iu_xray(text) == expected


@pytest.mark.parametrize("text, gpt, r2gen", MIMIC_CASES)
def test_clean_mimic_cxr(text, gpt, r2gen):
    assert clean_report_mimic_cxr(text) == gpt
    assert clean_report_mimic_cxr(text, variant="r2gen") == r2gen
    with pytest.raises(ValueError, match="variant"):
        clean_report_mimic_cxr(text, variant="other")


def test_cleaning_character_sets():
    """Which ASCII symbols inside a word survive: the IU class is a range ':'..'[' (keeps '-'); R2GenGPT's MIMIC
    class keeps ':' (split off as a token), '-', '<', '=', '>', '@'."""
    symbols = "!#$%&()*+,-/:;<=>?@[\\]^_`{|}~\"'"
    kept_iu = {c for c in symbols if clean_report_iu_xray(f"a{c}b") != "ab ."}
    kept_mimic = {c for c in symbols if clean_report_mimic_cxr(f"a{c}b") not in ("ab .",)}
    assert kept_iu == set("#$-`|~")
    assert kept_mimic == set("#$-`|~<=>@:")
    assert clean_report_mimic_cxr("a:b") == "a :b ."


# ---------------------------------------------------------------------------- images
def _normalised(rgb):
    x = torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1) / 255.0
    return (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def test_eval_transform_resizes_and_normalises():
    img = Image.new("RGB", (300, 180), (10, 128, 250))
    out = XrayTransform(train=False)(img)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    torch.testing.assert_close(out, _normalised((10, 128, 250)).expand(3, 224, 224), rtol=0, atol=1e-6)


def test_eval_transform_equals_r2gengpt_image_processor():
    """R2GenGPT preprocesses every split with the Hugging Face image processor of
    microsoft/swin-base-patch4-window7-224 (ViT processor: 224x224 bicubic, 1/255, ImageNet statistics)."""
    transformers = pytest.importorskip("transformers")
    processor = transformers.ViTImageProcessorPil(
        do_resize=True, size={"height": 224, "width": 224}, resample=Image.BICUBIC, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))
    rng = np.random.default_rng(0)
    for shape in [(300, 260), (224, 224), (97, 150)]:
        img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).convert("RGB")
        expected = processor(np.array(img), return_tensors="pt").pixel_values[0]
        torch.testing.assert_close(XrayTransform(train=False)(img), expected, rtol=0, atol=1e-6)


def _gradient(w, h):
    yy, xx = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8))


def test_train_transform_is_a_crop_of_the_resized_image():
    img = _gradient(300, 400)                      # shorter side 300 -> 256, long 400 -> int(256 * 400 / 300) = 341
    resized = np.asarray(img.resize((256, 341), Image.BICUBIC), dtype=np.float32)
    t = XrayTransform(train=True)
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    tops = set()
    for seed in range(4):
        torch.manual_seed(seed)
        out = t(img).permute(1, 2, 0).numpy()
        assert out.shape == (224, 224, 3)
        pixels = np.rint((out * std + mean) * 255.0)
        found = [(top, left) for top in range(341 - 224 + 1) for left in range(256 - 224 + 1)
                 if np.array_equal(pixels[0, :8], resized[top, left:left + 8])
                 and np.array_equal(pixels, resized[top:top + 224, left:left + 224])]
        assert len(found) == 1, f"seed {seed}: output is not a unique 224 crop of the resized image"
        tops.add(found[0])
    assert len(tops) > 1, "crops do not vary with the random state"


def test_hflip_is_off_by_default_and_mirrors_when_asked():
    img = _gradient(260, 260)
    torch.manual_seed(0)
    plain = XrayTransform(train=True)(img)
    torch.manual_seed(0)
    flipped = XrayTransform(train=True, hflip=1.0)(img)
    torch.testing.assert_close(flipped, plain.flip(-1))
    with pytest.raises(ValueError, match="hflip"):
        XrayTransform(train=True, hflip=2.0)
    with pytest.raises(ValueError, match="size <= resize"):
        XrayTransform(train=True, size=224, resize=200)
    with pytest.raises(ValueError, match="expected an RGB image"):
        XrayTransform(train=False)(Image.new("L", (10, 10)))


def test_load_image_grayscale_and_16_bit(tmp_path):
    Image.fromarray(np.full((5, 7), 77, np.uint8)).save(tmp_path / "g.png")
    img = load_image(tmp_path / "g.png")
    assert img.mode == "RGB" and np.all(np.asarray(img) == 77)
    Image.fromarray(np.full((5, 7), 257 * 200, np.uint16)).save(tmp_path / "g16.png")
    assert np.all(np.asarray(load_image(tmp_path / "g16.png")) == 200)


# ---------------------------------------------------------------------------- dataset and collate
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(out, studies=5, views=2, size=64, seed=3, progress=False)
    return out


def test_dataset_items_and_collate(tiny_data):
    ann = load_annotation(tiny_data / "annotation.json")
    ann["train"][1]["image_path"] = ann["train"][1]["image_path"][:1]   # a single-image study in the batch
    ds = ReportDataset(ann, tiny_data / "images", "train", dataset="iu_xray", train=False)
    item = ds[0]
    assert item["id"] == ann["train"][0]["id"]
    assert item["images"].shape == (2, 3, 224, 224)
    assert item["report"] == clean_report_iu_xray(ann["train"][0]["report"]) and item["report"].endswith(" .")
    expected = XrayTransform(train=False)(load_image(tiny_data / "images" / ann["train"][0]["image_path"][1]))
    torch.testing.assert_close(item["images"][1], expected)

    batch = next(iter(DataLoader(ds, batch_size=3, collate_fn=collate_reports)))
    assert batch["images"].shape == (3, 2, 3, 224, 224)
    assert batch["image_mask"].dtype == torch.bool
    assert batch["image_mask"].tolist() == [[True, True], [True, False], [True, True]]
    assert torch.count_nonzero(batch["images"][1, 1]) == 0
    assert batch["ids"] == [e["id"] for e in ann["train"][:3]]
    assert batch["reports"] == ds.reports[:3]


def test_dataset_options_and_errors(tiny_data):
    ann = load_annotation(tiny_data / "annotation.json")
    one = ReportDataset(tiny_data / "annotation.json", tiny_data / "images", "test", dataset="mimic_cxr",
                        max_images=1, train=True, clean=False)
    assert one[0]["images"].shape == (1, 3, 224, 224) and one[0]["report"] == ann["test"][0]["report"]
    ann["train"][2]["image_path"] = ["missing/0.png"]
    ds = ReportDataset(ann, tiny_data / "images", "train")
    with pytest.raises(FileNotFoundError, match=r"study 'synth_00002' \(train\[2\]\).*missing/0.png"):
        ds[2]
    empty = {"train": ann["train"], "val": [], "test": []}
    with pytest.raises(ValueError, match="split 'val' of the annotation has no entries"):
        ReportDataset(empty, tiny_data / "images", "val")
    with pytest.raises(ValueError, match="dataset='chexpert'"):
        ReportDataset(ann, tiny_data / "images", "train", dataset="chexpert")
    with pytest.raises(FileNotFoundError, match="image directory not found"):
        ReportDataset(ann, tiny_data / "nope", "train")


def test_collate_errors():
    with pytest.raises(ValueError, match="empty batch"):
        collate_reports([])
    a = {"id": "a", "images": torch.randn(1, 3, 8, 8), "report": "x ."}
    b = {"id": "b", "images": torch.randn(1, 3, 8, 9), "report": "y ."}
    with pytest.raises(ValueError, match="one shape"):
        collate_reports([a, b])


# ---------------------------------------------------------------------------- synthetic data
def test_synthetic_generation_is_deterministic(tmp_path, tiny_data):
    synthetic.main([str(tmp_path / "again"), "--studies", "5", "--size", "64", "--seed", "3"])
    synthetic.generate(tmp_path / "other", studies=5, size=64, seed=4, progress=False)
    files = sorted(p.relative_to(tiny_data) for p in tiny_data.rglob("*") if p.is_file())
    assert len(files) == 5 * 2 + 1
    for rel in files:
        assert (tmp_path / "again" / rel).read_bytes() == (tiny_data / rel).read_bytes(), rel
    assert (tmp_path / "other" / "annotation.json").read_bytes() != (tiny_data / "annotation.json").read_bytes()
    ann = load_annotation(tiny_data / "annotation.json")
    assert [len(ann[s]) for s in ("train", "val", "test")] == [3, 1, 1]
    images = [np.asarray(Image.open(p)) for p in sorted((tiny_data / "images").rglob("*.png"))]
    assert all(img.shape == (64, 64) and img.dtype == np.uint8 for img in images)
    assert len({img.tobytes() for img in images}) == len(images), "two synthetic images are identical"


FINDINGS = [
    ({"kind": "cardiomegaly"}, "cardiomegaly", +1),
    ({"kind": "effusion", "side": "right", "size": "moderate"}, "effusion_right", +1),
    ({"kind": "effusion", "side": "left", "size": "small"}, "effusion_left", +1),
    ({"kind": "pneumothorax", "side": "left", "size": "large"}, "pneumothorax_left", -1),
    ({"kind": "nodule", "side": "right", "zone": "upper", "du": 0.0, "dv": 0.0, "lobes": [0.0, 0.0]},
     "nodule_right_upper", +1),
    ({"kind": "mass", "side": "left", "zone": "middle", "du": 0.01, "dv": 0.0, "lobes": [1.0, 2.0]},
     "mass_left_middle", +1),
]


@pytest.mark.parametrize("finding, mask_name, sign", FINDINGS, ids=[f[1] for f in FINDINGS])
def test_synthetic_findings_are_visible(finding, mask_name, sign):
    """Same patient and noise with and without the finding: the finding's region changes clearly (brighter for
    fluid / heart / lesions, darker for a pneumothorax), on the patient's side, and little else changes."""
    size = 128
    with_f = synthetic.make_study(7, 11, size, 2, [finding])
    without = synthetic.make_study(7, 11, size, 2, [])
    frontal_mask = with_f["masks"][0][mask_name]
    assert frontal_mask.sum() > 10
    a, b = with_f["images"][0].astype(float), without["images"][0].astype(float)
    assert sign * (a[frontal_mask].mean() - b[frontal_mask].mean()) > 12
    assert np.mean(a[~frontal_mask] != b[~frontal_mask]) < 0.03
    if "side" in finding:   # patient's right is the image's left
        centre = np.nonzero(frontal_mask)[1].mean() / size
        assert (centre < 0.5) == (finding["side"] == "right")
    if finding["kind"] != "pneumothorax":   # drawn on the lateral view too
        lateral_mask = next(m for k, m in with_f["masks"][1].items() if k.split("_")[0] == finding["kind"])
        la, lb = with_f["images"][1].astype(float), without["images"][1].astype(float)
        assert la[lateral_mask].mean() - lb[lateral_mask].mean() > 8


def test_synthetic_reports_name_exactly_the_findings():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(400):
        findings = synthetic.sample_findings(rng)
        report = synthetic.write_report(findings, rng).lower()
        kinds = {f["kind"]: f for f in findings}
        seen.update(kinds)
        assert ("enlarged" in report or "cardiomegaly" in report) == ("cardiomegaly" in kinds)
        eff, ptx = kinds.get("effusion"), kinds.get("pneumothorax")
        if eff:
            side = "bilateral" if eff["side"] == "both" else eff["side"]
            assert f"{eff['size']} {side} pleural effusion" in report
        else:
            assert "no pleural effusion" in report or "or pleural effusion" in report
        if ptx:
            assert f"{ptx['size']} {ptx['side']}" in report and "pneumothorax" in report
        else:
            assert "no pneumothorax" in report or "effusion or pneumothorax" in report
        lesion = kinds.get("nodule") or kinds.get("mass")
        if lesion:
            assert f"{lesion['side']} {lesion['zone']} lung" in report
            assert ("nodul" in report) == (lesion["kind"] == "nodule")
            assert ("mass" in report) == (lesion["kind"] == "mass")
        else:
            assert "nodule in" not in report and " mass " not in report
        sides = {f["side"] for f in findings if "side" in f}
        for side in ("left", "right"):
            assert (side in report) == (side in sides), (findings, report)
        if not findings:
            assert any(p in report for p in ("lungs are clear", "no focal"))
    assert seen == {"cardiomegaly", "effusion", "pneumothorax", "nodule", "mass"}


def test_synthetic_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="views=3"):
        synthetic.make_study(0, 0, 64, 3)
    with pytest.raises(ValueError, match="studies=2"):
        synthetic.generate(tmp_path, studies=2)
