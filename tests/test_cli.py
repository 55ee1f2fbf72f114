"""The command line end to end on a tiny Qwen2-VL saved to a temporary directory."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from blindsight import Profile
from blindsight.cli import main
from blindsight.data import DataError, jsonl_records, synthetic_samples
from tiny_models import build


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_qwen2_vl")
    build("qwen2_vl").save_pretrained(d)
    return str(d)


def test_calibrate_and_inspect_end_to_end(model_dir, tmp_path, capsys):
    out, png = tmp_path / "profile.json", tmp_path / "heatmap.png"
    assert main(["calibrate", model_dir, "--data", "synthetic", "--samples", "3", "--out", str(out),
                 "--threshold", "0.6", "--dense-layers", "1"]) == 0
    p = Profile.load(out)
    assert p.model.model_type == "qwen2_vl" and len(p.scores["prompts"]) == 3
    assert all(c.name == "DENSE" for c in p.categories[1])
    assert main(["inspect", str(out), "--layout", "text:8,(image:20,text:4)x3", "--png", str(png),
                 "--threshold", "0.99"]) == 0
    printed = capsys.readouterr().out
    assert "attention FLOPs" in printed and "layer   1:" in printed
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_synthetic_samples_are_well_formed_prompts():
    cfg = build("gemma3").config
    for s in synthetic_samples(cfg, 3, seed=1):
        n = int((s["input_ids"] == cfg.boi_token_index).sum())
        assert s["pixel_values"].shape[0] == n >= 2
        assert int((s["input_ids"] == cfg.image_token_index).sum()) == n * cfg.mm_tokens_per_image
    q = build("qwen2_vl").config
    for s in synthetic_samples(q, 3, seed=2):
        grids = s["image_grid_thw"]
        assert int((s["input_ids"] == q.image_token_id).sum()) == int((grids.prod(-1) // 4).sum())
        assert s["pixel_values"].shape[0] == int(grids.prod(-1).sum())


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torchrun not installed")
def test_two_processes_give_the_one_process_profile(model_dir, tmp_path):
    """Test 5: torchrun --nproc-per-node 2 (gloo, CPU) writes the same profile as one process."""
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    args = ["calibrate", model_dir, "--data", "synthetic", "--samples", "5", "--threshold", "0.7"]
    assert main(args + ["--out", str(one)]) == 0
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", "29533", "-m", "blindsight", *args,
                        "--out", str(two)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["scores"] == b["scores"] and a["categories"] == b["categories"] and len(a["scores"]["prompts"]) == 5


def _write(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def test_bad_jsonl_names_the_line(tmp_path, model_dir):
    """Test 6: a missing image file, or more <image> markers than images, is reported with its line."""
    from PIL import Image

    Image.new("RGB", (28, 28)).save(tmp_path / "a.png")
    good = {"images": ["a.png"], "text": "look <image> here", "answer": "x"}
    path = _write(tmp_path, [good, {"images": ["a.png"], "text": "<image> and <image>"}])
    with pytest.raises(DataError, match=r"data.jsonl, line 2: the text has 2 <image> markers but 1 images"):
        list(jsonl_records(path))
    path = _write(tmp_path, [good, good, {"images": ["a.png", "missing.png"], "text": "<image><image>"}])
    with pytest.raises(DataError, match=r"line 3: image file not found: .*missing.png"):
        main(["calibrate", model_dir, "--data", str(path), "--out", str(tmp_path / "p.json")])
    assert [n for n, _ in jsonl_records(_write(tmp_path, [good, good]))] == [1, 2]


def test_flops_json_is_well_formed(capsys, tmp_path):
    assert main(["flops", "--json", "--png", str(tmp_path / "m.png")]) == 0
    d = json.loads(capsys.readouterr().out)
    assert 0 < d["prefill_flop_reduction"] < d["attention_flop_reduction"] < 1
    assert d["tokens"] == 8336 and d["images"] == 16


def test_calibrate_from_jsonl_with_the_models_processor(tmp_path):
    """A JSONL file of real images run through the model's own processor (tiny Gemma-3, saved offline)."""
    from PIL import Image

    from tiny_models import save_tiny_gemma3_processor

    model_dir = tmp_path / "gemma3"
    build("gemma3").save_pretrained(model_dir)
    save_tiny_gemma3_processor(model_dir)
    rng = torch.Generator().manual_seed(0)
    lines = []
    for i in range(3):
        names = []
        for j in range(i + 2):
            px = (torch.rand(40 + 8 * j, 48, 3, generator=rng) * 255).to(torch.uint8).numpy()
            Image.fromarray(px).save(tmp_path / f"img{i}_{j}.png")
            names.append(f"img{i}_{j}.png")
        text = " ".join(f"w{k} <image>" for k in range(len(names))) + " w9 w10"
        lines.append({"images": names, "text": text, "answer": "w1"})
    data = _write(tmp_path, lines)
    out = tmp_path / "profile.json"
    assert main(["calibrate", str(model_dir), "--data", str(data), "--out", str(out), "--threshold", "0.6"]) == 0
    p = Profile.load(out)
    assert [r["image_rows"] for r in p.scores["prompts"]] == [6 * (i + 2) for i in range(3)]
    assert p.model.model_type == "gemma3"
