"""Fuzz of the profile loader (issue "Long-running servers"): a profile that loads must be usable, and one that is
not must be refused with a ProfileFormatError that names the field (DESIGN §4).

A deterministic, exhaustive walk: in valid profiles of every kind (hand-made, calibrated with every record
calibrate and tune write, per-layer thresholds, a template of each delimiter scheme), every node of the JSON
tree (each leaf and each container, the root included) is replaced by each wrong type and extreme value of
``VALUES``, or removed. Each variant is either refused by ``Profile.from_dict`` with a ProfileFormatError
whose message names the field (its key, or for a list entry the key of its list), or it loads and then works:
``summary``, ``counts``, ``layer_categories`` of every layer, ``decide`` and ``recall`` when it has
statistics, ``save`` + ``load`` to the same JSON, ``blindsight inspect`` on the file (its command function),
and its template finds the segments of prompts made of its own ids, with and without a video grid (a
LayoutError there is a verdict on the prompt, not a failure) and is checked against a model config.
"""

import argparse
import contextlib
import io
import json
import math

import pytest
import torch
from transformers import Qwen2VLConfig

from blindsight import Layout, LayoutError, ModelInfo, Profile, ProfileFormatError, ProfileMismatchError
from blindsight.layout import input_ids_from_spec
from blindsight.profile import check_template
from blindsight.tools.cli import cmd_inspect

MISSING = object()  # the field removed
VALUES = [MISSING, None, True, False, -1, 0, 1, 2 ** 31, 10 ** 30, 1.5, math.nan, math.inf, -math.inf, "x", "", [],
          {}]

QWEN2_VL = {"image_open_ids": [252], "image_close_ids": [253], "image_token_ids": [250, 251],
            "video_token_ids": [251], "sinks_per_image": 2, "video_segments": "frame"}
SMOLVLM = {"image_open_ids": [300], "image_close_ids": [300], "image_token_ids": [301], "final_part_ids": [302],
           "sinks_per_image": 1}
PIXTRAL = {"image_open_ids": [], "image_close_ids": [12], "image_token_ids": [10, 11], "sinks_per_image": 1}
LLAVA_OV = {"image_open_ids": [], "image_close_ids": [], "image_token_ids": [151646, 151647]}


def recall(layers, heads, r=(0.99, 0.9, 0.5)):
    return [[list(r)] * heads for _ in range(layers)]


def tune_record():
    return {"budget": 1.0, "holdout": {"source": "held.jsonl", "prompts": 10}, "accuracy_dense": 0.9,
            "accuracy_chosen": 0.9, "attention_flop_reduction": 0.4, "chosen_stage": "per layer",
            "given": {"thresholds": {"intra_sink": 0.95, "intra": 0.95, "sink": 0.95}, "accuracy": 0.8,
                      "accuracy_at_most": None, "attention_flop_reduction": 0.3},
            "evaluations": 5, "stopped": False,
            "search": {"method": "bisect", "order": "...", "per_layer": True, "max_evals": 64, "early_stop": True,
                       "path": "eager", "quantile": 0.0},
            "test": {"source": "test.jsonl", "prompts": 4, "accuracy_dense": 1.0, "accuracy_given": 0.75,
                     "accuracy_chosen": 1.0},
            "seconds": 12.5}


def base_profiles() -> dict[str, dict]:
    """Valid profile files, small (2 layers x 2 heads) so the walk stays fast, together holding every field."""
    def info(template):
        return ModelInfo("qwen2_vl", num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, template=template)

    means = {"intra_sink": 0.98, "intra": 0.97, "sink": 0.5}
    scores = {"statistic": "recall", "categories": ["intra_sink", "intra", "sink"],
              "prompts": [{"sample": 0, "row": 0, "image_rows": 10, "recall": recall(2, 2),
                           "video_segments": {"video": recall(2, 2, (0.98, 0.97, 0.5))}},
                          {"sample": 1, "row": 0, "image_rows": 7, "recall": recall(2, 2, (0.9, 0.8, 0.96))}]}
    calibration = {"samples": 2, "source": "synthetic (model m)", "video_segments": {"prompts": 1, "video": means,
                                                                                     "frame": means}}
    calibrated = Profile(info(QWEN2_VL), (("dense",) * 2,) * 2, calibration, scores).decide(
        thresholds={"sink": 0.95, "intra": 0.9}, quantile=0.5, dense_layers=[1])
    one_prompt = dict(scores, prompts=[{"recall": recall(2, 2)}])  # the records calibrated has are optional
    tuned = Profile(info(QWEN2_VL), calibrated.categories, {"tune": tune_record()}, one_prompt).decide(
        thresholds=[0.9, {"intra_sink": 0.95, "intra": 0.85, "sink": 0.95}])
    out = {"calibrated": calibrated.to_dict(), "tuned (version 2)": tuned.to_dict()}
    for name, template in (("smolvlm", SMOLVLM), ("pixtral", PIXTRAL), ("llava_onevision", LLAVA_OV),
                           ("no template", None)):
        out[f"hand-made, {name}"] = Profile.from_categories([["sink", "intra"], ["dense", "intra_sink"]],
                                                            info(template)).to_dict()
    return out


def nodes(tree, path=()):
    """Every path of the JSON tree, containers before their entries (the root is ``()``)."""
    yield path
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from nodes(value, path + (key,))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from nodes(value, path + (i,))


def variant(text: str, path: tuple, value):
    d = json.loads(text)
    if not path:
        return None if value is MISSING else json.loads(json.dumps(value))
    parent = d
    for key in path[:-1]:
        parent = parent[key]
    if value is MISSING:
        del parent[path[-1]]
    else:
        parent[path[-1]] = json.loads(json.dumps(value))  # a fresh [] or {} each time
    return d


def field_name(path: tuple) -> str:
    """What the message must name: the innermost key (for a list entry, its list's key)."""
    keys = [k for k in path if isinstance(k, str)]
    return keys[-1] if keys else "format"


CONFIG = Qwen2VLConfig(text_config=dict(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                        hidden_size=16, vocab_size=2 ** 20))


def check_template_usable(p: Profile, checked: set) -> None:
    t = p.template
    if t is None or t in checked:  # most variants change something else: each template once
        return
    checked.add(t)
    ids = t.image_open_ids + t.image_close_ids + t.image_token_ids + t.final_part_ids
    free = max(ids) + 1  # a text id: none of the template's
    prompts = [input_ids_from_spec("text:2,image:6,text:1,image:5,image:7,text:2", t, text_token_id=free)]
    if t.video_token_ids and t.image_open_ids:
        v = t.video_token_ids[0]
        prompts.append(torch.tensor([[free, t.image_open_ids[0], v, v, v, v, t.image_close_ids[0], free]]))
    for prompt in prompts:
        for grid in (None, torch.tensor([[2, 1, 1]]), [[2.0, 1, 1]]):
            try:
                layout = Layout.from_input_ids(prompt, t, video_grid_thw=grid)
            except LayoutError:
                continue
            assert layout.sink[0].sum() >= 1 and layout.image.shape == prompt.shape
    try:
        check_template(t, CONFIG, explicit=False)
    except ProfileMismatchError:
        pass


def check_usable(p: Profile, path, checked: set) -> None:
    p.summary()
    assert sum(p.counts().values()) == p.model.num_layers * p.model.num_heads
    for layer in range(p.model.num_layers):
        assert len(p.layer_categories(layer)) == p.model.num_heads
    if p.scores:
        redecided = p.decide()
        assert p.decide(thresholds=0.5).categories and redecided.recall("sink").shape == (p.model.num_layers,
                                                                                           p.model.num_heads)
    p.save(path)
    again = Profile.load(path)
    assert json.dumps(again.to_dict(), sort_keys=True) == json.dumps(p.to_dict(), sort_keys=True)
    with contextlib.redirect_stdout(io.StringIO()):  # blindsight inspect, less its argument parsing
        assert cmd_inspect(argparse.Namespace(profile=str(path), layout=None, threshold=None, png=None)) == 0
    check_template_usable(p, checked)


BASES = base_profiles()


def test_the_bases_are_valid_and_cover_every_field(tmp_path):
    for d in BASES.values():
        check_usable(Profile.from_dict(d), tmp_path / "p.json", set())
    keys = {k for d in BASES.values() for path in nodes(d) for k in path if isinstance(k, str)}
    for field in ("tune", "video_segments", "thresholds", "quantile", "dense_layers", "samples", "source",
                  "tool_version", "final_part_ids", "video_token_ids", "sinks_per_image", "sample", "row",
                  "image_rows", "statistic", "accuracy_at_most"):
        assert field in keys, field
    assert {d["version"] for d in BASES.values()} == {1, 2}


@pytest.mark.parametrize("name", list(BASES))
def test_every_field_replaced_is_refused_by_name_or_usable(name, tmp_path):
    text = json.dumps(BASES[name])
    failures, refused, accepted, checked = [], 0, 0, set()
    for path in nodes(BASES[name]):
        for value in VALUES:
            d = variant(text, path, value)
            where = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path) or "(root)"
            what = f"{where} = {'<missing>' if value is MISSING else repr(value)}"
            try:
                p = Profile.from_dict(d)
            except ProfileFormatError as e:
                refused += 1
                if field_name(path) not in str(e):
                    failures.append(f"{what}: refused without naming {field_name(path)!r}: {e}")
                continue
            except Exception as e:  # noqa: BLE001 - any other exception is the finding
                failures.append(f"{what}: {type(e).__name__}: {e}")
                continue
            accepted += 1
            try:
                check_usable(p, tmp_path / "p.json", checked)
            except Exception as e:  # noqa: BLE001
                failures.append(f"{what}: loads, then {type(e).__name__}: {e}")
    assert not failures, f"{len(failures)} of {refused + accepted} variants:\n" + "\n".join(failures[:30])
    assert refused and accepted
