"""The command line end to end on a tiny Qwen2-VL saved to a temporary directory."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import blindsight
from blindsight import ModelInfo, Profile
from blindsight.tools.cli import main
from blindsight.tools.data import DataError, jsonl_records, synthetic_samples

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


def test_bad_jsonl_names_the_line(tmp_path, model_dir, capsys):
    """Test 6: a missing image file, or more <image> markers than images, is reported with its line."""
    from PIL import Image

    Image.new("RGB", (28, 28)).save(tmp_path / "a.png")
    good = {"images": ["a.png"], "text": "look <image> here", "answer": "x"}
    path = _write(tmp_path, [good, {"images": ["a.png"], "text": "<image> and <image>"}])
    with pytest.raises(DataError, match=r"data.jsonl, line 2: the text has 2 <image> markers but 1 images"):
        list(jsonl_records(path))
    path = _write(tmp_path, [good, {"images": []}])
    with pytest.raises(DataError, match=r"data.jsonl, line 2: expected an object with a \"text\" string"):
        list(jsonl_records(path))
    path = _write(tmp_path, [good, good, {"images": ["a.png", "missing.png"], "text": "<image><image>"}])
    assert main(["calibrate", model_dir, "--data", str(path), "--out", str(tmp_path / "p.json")]) == 2
    assert re.fullmatch(r"blindsight: error: .*data.jsonl, line 3: image file not found: .*missing.png\n",
                        capsys.readouterr().err)
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


# ---- user errors: exit status 2 and one line on stderr, no traceback ("Zero silent wrong answers", item 7) ---------

def run_cli(*args, env=None, memory=None, timeout=300):
    """``python -m blindsight ARGS`` in a subprocess, importing this very checkout of blindsight. ``memory``: a
    cap on its address space in bytes, so a command that would allocate without end fails fast instead."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(blindsight.__file__)))
    inherited = {k: v for k, v in os.environ.items() if k != "BLINDSIGHT_DEBUG"}  # debugging only where asked
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = dict(inherited, OMP_NUM_THREADS="1", PYTHONPATH=path, **(env or {}))

    def cap():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    return subprocess.run([sys.executable, "-m", "blindsight", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, preexec_fn=cap if memory else None)


def assert_user_error(r, *words):
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), r.stderr[-3000:]
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture
def files(tmp_path):
    """A valid one-prompt JSONL file, a model directory that does not exist, an output path."""
    from PIL import Image

    Image.new("RGB", (28, 28)).save(tmp_path / "a.png")
    data = _write(tmp_path, [{"images": ["a.png"], "text": "look <image> here", "answer": "x"}])
    return {"data": str(data), "model": str(tmp_path / "no-such-model"), "out": str(tmp_path / "p.json"),
            "profile": str(tmp_path / "no-such-profile.json")}


CALIBRATE = ["calibrate", "{model}", "--data", "{data}", "--out", "{out}"]
EVAL = ["eval", "{model}", "--profile", "{profile}", "--data", "{data}"]
TUNE = ["tune", "{model}", "--data", "{data}", "--holdout", "{data}", "--out", "{out}"]


@pytest.mark.parametrize("args, words", [
    (CALIBRATE + ["--samples", "0"], ["argument --samples", "positive integer", "'0'"]),
    (CALIBRATE + ["--samples", "-3"], ["argument --samples", "positive integer", "'-3'"]),
    (CALIBRATE + ["--threshold", "2"], ["argument --threshold", "in [0, 1]", "'2'"]),
    (CALIBRATE + ["--quantile", "1.5"], ["argument --quantile", "in [0, 1]", "'1.5'"]),
    (CALIBRATE + ["--dense-layers", "a"], ["argument --dense-layers", "'a'"]),
    (EVAL + ["--samples", "0"], ["argument --samples", "positive integer"]),
    (TUNE + ["--budget", "-1"], ["argument --budget", "[0, 100]", "'-1'"]),
    (TUNE + ["--budget", "nan"], ["argument --budget", "'nan'"]),
    (TUNE + ["--max-evals", "0"], ["argument --max-evals", "positive integer"]),
    (TUNE + ["--search", "greedy"], ["argument --search", "'greedy'"]),
    pytest.param(CALIBRATE + ["--device", "cuda"], ["argument --device", "CUDA is not available"],
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
])
def test_bad_arguments_are_refused_before_any_model_loads(files, args, words):
    """The model path does not exist: an argument error must come first, with no model needed."""
    assert_user_error(run_cli(*(a.format(**files) for a in args)), *words)


def test_bad_data_files_are_named(tmp_path, files):
    """Non-UTF-8 text, a directory, an empty file, invalid JSON: each named with its file (and line)."""
    cases = {"latin1.jsonl": (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', ["latin1.jsonl, line 2", "UTF-8"]),
             "empty.jsonl": (b"\n", ["empty.jsonl", "no prompts"]),
             "broken.jsonl": (b'{"text": "ok"}\n{"text": \n', ["broken.jsonl, line 2", "not valid JSON"])}
    for name, (content, words) in cases.items():
        (tmp_path / name).write_bytes(content)
        assert_user_error(run_cli("calibrate", files["model"], "--data", tmp_path / name, "--out", files["out"]),
                          *words)
    assert_user_error(run_cli("calibrate", files["model"], "--data", tmp_path, "--out", files["out"]),
                      str(tmp_path), "is a directory")


def test_missing_model_is_named(tmp_path, files):
    assert_user_error(run_cli(*(a.format(**files) for a in CALIBRATE)), files["model"], "does not exist")
    (tmp_path / "not-a-model").mkdir()
    assert_user_error(run_cli("calibrate", tmp_path / "not-a-model", "--data", files["data"], "--out", files["out"]),
                      "not-a-model", "no config.json")


def test_inspect_malformed_profile(tmp_path):
    d = Profile.uniform("sink", ModelInfo("qwen2_vl", 2, 4, 2, 16)).to_dict()
    d["model"]["template"] = "qwen2_vl"
    (tmp_path / "p.json").write_text(json.dumps(d))
    assert_user_error(run_cli("inspect", tmp_path / "p.json"), "p.json", "model.template must be an object")


@pytest.mark.parametrize("how", ["--debug", "BLINDSIGHT_DEBUG=1"])
def test_debug_shows_the_traceback(tmp_path, how):
    args, env = (["--debug"], None) if how == "--debug" else ([], {"BLINDSIGHT_DEBUG": "1"})
    r = run_cli(*args, "inspect", tmp_path / "missing.json", env=env)
    assert r.returncode != 0 and "Traceback" in r.stderr and "missing.json" in r.stderr, r.stderr[-3000:]


def test_help_documents_exit_status():
    from blindsight.tools.cli import build_parser

    text = " ".join(build_parser().format_help().split()).lower()
    assert "exit status 2" in text and "--debug" in text and "blindsight_debug=1" in text


def test_tune_refuses_bad_held_out_files(tmp_path, files):
    """An empty held-out file, one without answers, the test split equal to the held-out one: named, before any
    model loads (the model path does not exist)."""
    (tmp_path / "empty.jsonl").write_bytes(b"\n")
    no_answer = _write(tmp_path, [{"images": ["a.png"], "text": "look <image> here", "answer": "x"},
                                  {"images": ["a.png"], "text": "and <image> there"}])
    args = ["tune", files["model"], "--data", files["data"], "--out", files["out"]]
    assert_user_error(run_cli(*args, "--holdout", tmp_path / "empty.jsonl"), "empty.jsonl", "no prompts")
    assert_user_error(run_cli(*args, "--holdout", no_answer), "data.jsonl, line 2", 'non-empty "answer"')
    assert_user_error(run_cli(*args, "--holdout", files["data"], "--test", files["data"]), "--test", "held-out file")
    assert_user_error(run_cli("tune", files["model"], "--holdout", files["data"], "--out", files["out"]),
                      "one of the arguments --data --profile is required")


def test_tune_refuses_a_held_out_file_for_another_model(tmp_path):
    """Words the shipped model's processor does not know, an answer outside its vocabulary: the file and line."""
    from PIL import Image

    from blindsight.zoo import MODEL_DIR

    Image.new("RGB", (96, 96)).save(tmp_path / "a.png")
    good = {"images": ["a.png"], "text": "<image> image 1 : question : what color is in image 1 ? answer :",
            "answer": "red"}
    cal = _write(tmp_path, [good])
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps(good) + "\n" + json.dumps({"images": ["a.png"], "text": "w1 <image> w2 w3",
                                                            "answer": "w4"}) + "\n")
    args = ["tune", MODEL_DIR, "--data", cal, "--out", tmp_path / "p.json", "--holdout"]
    assert_user_error(run_cli(*args, other), "other.jsonl, line 2", "another model")
    unknown_answer = tmp_path / "answer.jsonl"
    unknown_answer.write_text(json.dumps(dict(good, answer="zebra")) + "\n")
    assert_user_error(run_cli(*args, unknown_answer), "answer.jsonl, line 1", "'zebra'", "vocabulary")
    # words it knows, answers it never gives: nothing of dense accuracy to keep (found once the model ran, after
    # its loading and progress bars: the error is the last line)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps(dict(good, answer="question")) + "\n")
    r = run_cli(*args, wrong, "--json")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("blindsight: error: ") and "wrong.jsonl: the dense model answers none of the 1" in last


# ---- "Long-running servers": documented forms read, sizes that cannot fit refused up front, one line each ------------

def _profile_with_thresholds(tmp_path, thresholds):
    recall = [[[0.99, 0.9, 0.5]] * 4] * 2
    scores = {"statistic": "recall", "categories": ["intra_sink", "intra", "sink"], "prompts": [{"recall": recall}]}
    template = {"image_open_ids": [252], "image_close_ids": [253], "image_token_ids": [250], "sinks_per_image": 1}
    d = Profile(ModelInfo("qwen2_vl", 2, 4, 2, 16, template), (("dense",) * 4,) * 2, {}, scores).to_dict()
    d["calibration"]["thresholds"] = thresholds
    d["version"] = 2 if isinstance(thresholds, list) else 1
    path = tmp_path / "p.json"
    path.write_text(json.dumps(d))
    return path


@pytest.mark.parametrize("thresholds, shown", [
    (0.9, "thresholds: intra_sink 0.9, intra 0.9, sink 0.9;"),
    (None, "thresholds: intra_sink 0.95, intra 0.95, sink 0.95;"),
    ({"sink": 0.5}, "thresholds: intra_sink 0.95, intra 0.95, sink 0.5;"),
    ([0.9, {"sink": 0.5}], "thresholds: layer 0: intra_sink 0.9, intra 0.9, sink 0.9; layer 1: intra_sink 0.95, "
                           "intra 0.95, sink 0.5;"),
])
def test_inspect_reads_every_documented_thresholds_form(tmp_path, capsys, thresholds, shown):
    """calibration.thresholds as one number, null (the default), a partial mapping, a per-layer list of numbers
    and mappings: inspect prints them as decide() reads them (a number or null used to be a TypeError)."""
    path = _profile_with_thresholds(tmp_path, thresholds)
    assert main(["inspect", str(path), "--layout", "text:8,(image:20,text:4)x3"]) == 0
    out = capsys.readouterr().out
    assert shown in out and "attention FLOPs" in out


def test_layout_specs_over_the_bound_are_refused_before_they_are_expanded():
    import time

    from blindsight import parse_layout_spec

    for spec in ("text:64,(image:496,text:16)x16,text:80", " ( text : 3 , (image:4)x2) x 3,text:1",
                 "((text:2,image:3)x2)x5"):
        assert len(parse_layout_spec(spec, max_tokens=10_000)) == len(parse_layout_spec(spec)), spec
    start = time.perf_counter()
    for spec in ("(image:496,text:16)x100000000", "((text:0)x1000000)x1000000", "text:" + "9" * 5000,
                 "(" * 5000 + "text:1" + ")x1" * 5000):
        with pytest.raises(ValueError, match="longer than|too large|nested too deeply"):
            parse_layout_spec(spec)
    assert time.perf_counter() - start < 1  # refused up front, not after building 10^8 items
    with pytest.raises(ValueError, match="longer than 100 tokens"):
        parse_layout_spec("(text:10)x11", max_tokens=100)


SMALL_BENCH = ["--repeat", "1", "--layers", "1", "--hidden", "32", "--heads", "2", "--kv-heads", "1", "--head-dim", "8",
               "--mix", "dense,sink"]


@pytest.mark.parametrize("args, words", [
    (["bench", "--layout", "text:4,image:1"], ["--layout", "image:1 needs >= 3 tokens"]),
    (["bench", *SMALL_BENCH, "--layout", "text:30,image:10", "--recompile-len", "10"],
     ["--recompile-len", "too short"]),
    (["bench", "--heads", "100000"], ["--heads", "<= 65536", "'100000'"]),
    (["bench", "--sweep", "256,100000000"], ["--sweep", "from 256 to 1048576"]),
    (["flops", "--layout", "(image:496,text:16)x100000000"], ["--layout", "longer than 1048576 tokens"]),
    (["flops", "--layout", "text:99999999999999"], ["--layout", "longer than 1048576 tokens"]),
    (["flops", "--layout", "(text:1)x0"], ["--layout", "has no tokens"]),
    (["flops", "--layout", "(" * 3000 + "text:1" + ")x1" * 3000], ["--layout", "nested too deeply"]),
    (["flops", "--picture-layout", "text:5000"], ["--picture-layout", "longer than 4096 tokens"]),
    (["flops", "--mix", "dense:99999999999"], ["--mix", "gives 99999999999 heads, the model has 12"]),
    (["flops", "--mix", "dense:\u00b2"], ["--mix", "positive count"]),
])
def test_sizes_that_cannot_fit_are_refused_up_front(args, words):
    """A layout, a mix or a bench shape that cannot be built is a user error before anything is materialized (the
    x100000000 layout used to hang, then fail in the allocator): one line, exit status 2, within a 4 GiB address
    space and a minute."""
    assert_user_error(run_cli(*args, memory=4 << 30, timeout=120), *words)


def test_inspect_of_an_unreadably_long_number_is_one_line(tmp_path):
    path = _profile_with_thresholds(tmp_path, 0.9)
    path.write_text(path.read_text().replace('"thresholds": 0.9', '"thresholds": ' + "9" * 5000))
    assert_user_error(run_cli("inspect", path), "p.json", "corrupt profile")


def test_bench_chunk_measures_a_chunked_prefill_exactly(capsys):
    """``bench --chunk``: the prompt in chunks (boundaries inside images), exact against the definition, with its
    speedup, ideal and the unchunked run; with --sweep it is one line and exit 2."""
    assert main(["bench", *SMALL_BENCH, "--layout", "text:9,(image:40,text:5)x4,text:7", "--chunk", "50",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["chunks"] == 4 and r["tokens"] == 196 and r["max_abs_error"] < 1e-5
    for key in ("chunked_speedup", "ideal", "unchunked_speedup", "chunked_prefill_speedup"):
        assert r[key] > 0, key
    assert main(["bench", "--chunk", "50", "--sweep", "256"]) == 2
    err = capsys.readouterr().err
    assert "--chunk" in err and len(err.strip().splitlines()) == 1
