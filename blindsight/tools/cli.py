"""The ``blindsight`` command line.

A user error (a bad argument, an unreadable or malformed file, a missing model) ends the command with exit
status 2 and one line on stderr, ``blindsight: error: <what and where>``; ``--debug`` (or
``BLINDSIGHT_DEBUG=1``) shows its traceback instead. Arguments are checked before any model loads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from .. import hf
from ..categories import Category, layer_thresholds, parse_mix, thresholds_setting
from ..layout import Layout, parse_layout_spec
from ..lowering import LOWERINGS
from ..profile import MAX_SHAPE, ModelInfo, Profile, ProfileFormatError, ProfileMismatchError
from ..template import LayoutError, Template
from .data import DataError
from .presets import DEMO_LAYOUT, DEMO_MIX, QWEN2_VL_2B_TEXT

EXIT_USER_ERROR = 2  # as argparse's own usage errors
# Bounds (DESIGN §4): a layout spec on the command line describes at most MAX_LAYOUT_TOKENS tokens (the FLOP
# accounting of a 2**20-token prompt holds per-tile counts of some GB; 2**24 would need hundreds), a mask picture at
# most MAX_PICTURE_TOKENS (it draws every (query, key) pair). Checked on the spec's text, before anything is built.
MAX_LAYOUT_TOKENS = 2 ** 20
MAX_PICTURE_TOKENS = 2 ** 12
EPILOG = (f"Exit status {EXIT_USER_ERROR} means a user error (a bad argument, an unreadable or malformed file, a "
          "missing model), reported as one line on stderr; --debug or BLINDSIGHT_DEBUG=1 shows its traceback "
          "instead. 0 means success; any other status, with a traceback, is a bug (130: interrupted).")


class UserError(Exception):
    """A mistake in the command's arguments or inputs: reported as one line, without a traceback."""


# what main() reports as one line; any other exception is a bug and keeps its traceback
USER_ERRORS = (UserError, DataError, ProfileFormatError, ProfileMismatchError, LayoutError, FileNotFoundError,
               IsADirectoryError, NotADirectoryError, PermissionError)



# ---- argument types: argparse reports their ArgumentTypeError as "argument --x: message" before any work ----------

def _int_at_least(minimum: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


positive_int = _int_at_least(1, "a positive integer")
non_negative_int = _int_at_least(0, "an integer >= 0")


def _int_between(minimum: int, maximum: int, what: str):
    at_least = _int_at_least(minimum, what)

    def parse(text: str) -> int:
        value = at_least(text)
        if value > maximum:
            raise argparse.ArgumentTypeError(f"expected {what} <= {maximum}, got {text!r}")
        return value
    return parse


shape_int = _int_between(1, MAX_SHAPE, "a positive integer")  # layers, heads, head dim, width of a bench model


def unit_float(text: str) -> float:
    """A recall threshold or a quantile: a number in [0, 1] (NaN is not one)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def budget_points(text: str) -> float:
    """An accuracy budget: points (percent of the held-out prompts) in [0, 100]."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 100.0:
        raise argparse.ArgumentTypeError(f"expected accuracy points in [0, 100] (1.0 = one percent of the held-out "
                                         f"prompts), got {text!r}")
    return value


def unit_floats(text: str) -> list[float]:
    """Comma-separated numbers in [0, 1] ('' for none)."""
    try:
        return [unit_float(t) for t in text.split(",")] if text.strip() else []
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1], got {text!r}") from None


def layer_list(text: str) -> tuple[int, ...]:
    """Comma-separated layer numbers ('' for none); their range is checked once the model's depth is known."""
    try:
        return tuple(non_negative_int(t) for t in text.split(",")) if text.strip() else ()
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers such as 0,27, got {text!r}") from None


def device_arg(text: str) -> str:
    """A torch device that exists here: asking for CUDA without it would fail only after the model loads."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r} (expected cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only"
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine (torch build: {build})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    return text


def token_lengths(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 256 or max(values) > MAX_LAYOUT_TOKENS:
        raise argparse.ArgumentTypeError(f"expected comma-separated prompt lengths from 256 to {MAX_LAYOUT_TOKENS}, "
                                         f"got {text!r}")
    return values


def _layout_spec(limit: int):
    def parse(text: str) -> str:
        try:
            items = parse_layout_spec(text, max_tokens=limit)  # refused before it is expanded
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if not items:
            raise argparse.ArgumentTypeError(f"layout spec {text!r} has no tokens")
        return text
    return parse


layout_spec = _layout_spec(MAX_LAYOUT_TOKENS)
picture_layout_spec = _layout_spec(MAX_PICTURE_TOKENS)


def output_file(text: str) -> str:
    """A file to write ('' for none): its directory must exist now, not only when the result is ready."""
    if text and os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; give a file name")
    parent = os.path.dirname(os.path.abspath(text)) if text else "."
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: directory {parent} does not exist")
    return text


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (the usage itself is one --help away), exit status 2."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---- commands ------------------------------------------------------------------------------------------------------

def _mix(mix: str, num_heads: int) -> list[Category]:
    try:
        return parse_mix(mix, num_heads)
    except ValueError as e:
        raise UserError(f"--mix: {e}") from e


def _layout(spec: str, template: Template) -> Layout:
    """The layout of a spec that parsed: what is left to fail depends on the template (image:N too short)."""
    try:
        return Layout.from_spec(spec, template)
    except ValueError as e:
        raise UserError(f"--layout: {e}") from e


def _check_prompts(path: str, limit: int | None, need_answers: bool = False, need_images: bool = False) -> None:
    """Read and check the whole prompt file before any model loads, so a bad line fails in seconds."""
    from .data import jsonl_records

    used = with_images = 0
    for _, rec in jsonl_records(path, require_answer=need_answers):
        if limit is None or used < limit:
            used += 1
            with_images += bool(rec["images"])
    if not used:
        raise UserError(f"{path}: no prompts (the file has no JSON lines)")
    if need_images and not with_images:
        raise UserError(f"{path}: none of the {used} prompts used has an image; BlindSight calibrates and tunes "
                        "attention between images")


def _check_model_dir(path: str) -> None:
    """The model must be a directory with config.json, or a Hub id in the local cache: transformers would report
    a missing directory as a malformed Hub repo id, or try the network."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UserError(f"model directory {path} has no config.json (not a directory saved by save_pretrained)")
        return
    if os.path.exists(path):
        raise UserError(f"model {path} is a file; expected a directory saved by save_pretrained")
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(path, "config.json")
    except ValueError:  # not even a valid Hub id
        cached = None
    if not isinstance(cached, str):
        raise UserError(f"model directory {path} does not exist (nor is it a Hub model in the local cache)")


def _redecide_check(profile: Profile, path: str, option: str) -> None:
    if not (profile.scores and profile.scores.get("prompts")):
        raise UserError(f"{path}: the profile has no calibration statistics (hand-made?), so {option} cannot "
                        "re-decide it; use a profile written by blindsight calibrate")


def cmd_flops(args) -> int:
    from transformers import Qwen2VLConfig

    from ..flops import prefill_flops
    from ..masks import build_block_mask

    config = Qwen2VLConfig(text_config=QWEN2_VL_2B_TEXT)
    template = Template.from_config(config)
    layout = _layout(args.layout, template)
    heads = _mix(args.mix, QWEN2_VL_2B_TEXT["num_attention_heads"])
    profile = Profile.from_categories([heads] * QWEN2_VL_2B_TEXT["num_hidden_layers"], config)
    flops = prefill_flops(layout, profile, config)
    tiles = {}
    for c in Category:
        bm = build_block_mask(layout, [c])
        tiles[c.json_name] = 1 - bm.sparsity() / 100
    result = {
        "model": "Qwen2-VL-2B language model shape (no weights needed for FLOP accounting)",
        "layout": args.layout,
        "tokens": layout.seq_len,
        "images": int(layout.num_images[0]),
        "attention_flop_reduction": flops.attention.reduction,
        "attention_ideal_speedup": flops.attention.ideal_speedup,
        "prefill_flop_reduction": flops.reduction,
        "tile_density": tiles,
    }
    if args.png:
        from .viz import plot_category_masks

        plot_category_masks(_layout(args.picture_layout, template), args.png)
        result["png"] = args.png
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"BlindSight FLOP accounting: {result['model']}")
    print(f"layout {args.layout}: {layout.seq_len} tokens, {result['images']} images; heads per layer: {args.mix}")
    print(f"{'category':<12}{'heads':>6}{'kept pairs':>12}{'tile density':>14}")
    for c in Category:
        v = flops.attention.by_category[c]
        kept = v["blindsight"] / v["dense"] if v["dense"] else 1.0
        print(f"{c.json_name:<12}{v['heads']:>6}{100 * (kept if v['heads'] else 0):>11.1f}%"
              f"{100 * tiles[c.json_name]:>13.1f}%")
    print(f"attention FLOPs: -{100 * flops.attention.reduction:.1f}% (ideal attention speedup "
          f"{flops.attention.ideal_speedup:.2f}x); whole LM prefill FLOPs: -{100 * flops.reduction:.1f}%")
    if args.png:
        print(f"masks of {args.picture_layout} drawn to {args.png}")
    return 0


def cmd_demo(args) -> int:
    from .demo import DemoConfig, format_report, run_demo

    cfg = DemoConfig(calibration_samples=args.calibration_samples, holdout_samples=args.holdout_samples,
                     benchmark_samples=args.samples, threshold=args.threshold, budget=args.budget, repeat=args.repeat,
                     png=args.png or None, frontier_png=args.frontier_png or None, progress=not args.json)
    result = run_demo(cfg)
    if args.json:
        result.pop("profile_summary")
        print(json.dumps(result, indent=1))
    else:
        print(format_report(result))
    return 0


def cmd_eval(args) -> int:
    from .data import load_processor
    from .evaluate import evaluate, jsonl_examples

    _check_prompts(args.data, args.samples, need_answers=True)
    profile = Profile.load(args.profile)
    if profile.model.template is None:
        raise UserError(f"{args.profile}: the profile has no image template; calibrate the model to get one")
    if args.thresholds:
        _redecide_check(profile, args.profile, "--thresholds")
    _check_model_dir(args.model)
    processor = load_processor(args.model)  # seconds, where the model takes minutes: first
    model = load_model(args.model, args.dtype, args.device)
    profile.check_model(model)
    pad_id = model.generation_config.pad_token_id or 0
    examples = jsonl_examples(args.data, processor, model.config.model_type, args.samples, args.pad_to, pad_id)
    thresholds = args.thresholds or [None]
    dense, results = evaluate(model, examples, profile, thresholds, progress=not args.json)
    if args.json:
        print(json.dumps({"samples": len(examples), "accuracy_dense": dense,
                          "results": [vars(r) for r in results]}, indent=1))
        return 0
    print(f"{len(examples)} prompts from {args.data}; dense accuracy {100 * dense:.1f}%")
    print(f"{'threshold':>10}{'accuracy':>10}{'delta':>8}{'attn FLOPs':>12}{'prefill FLOPs':>15}  heads d/x/i/s")
    for r in results:
        th = "profile" if r.threshold is None else f"{r.threshold:g}"
        heads = "/".join(str(v) for v in r.categories.values())
        print(f"{th:>10}{100 * r.accuracy:>9.1f}%{100 * (r.accuracy - dense):>+7.1f}"
              f"{-100 * r.attention_flop_reduction:>11.1f}%{-100 * r.prefill_flop_reduction:>14.1f}%  {heads}")
    return 0


def load_model(path: str, dtype: str = "float32", device: str = "cpu"):
    """A transformers VLM from a local directory (or a Hub id already cached), with SDPA attention."""
    import torch
    from transformers import AutoModelForImageTextToText

    try:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype),
                                                            attn_implementation="sdpa")
    except (OSError, ValueError) as e:  # missing files, not a VLM config: transformers' messages run many lines
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load the model {path}: {first}") from e
    return model.to(device).eval()


def _init_distributed(device: str) -> tuple[int, int]:
    """Under torchrun (WORLD_SIZE > 1): join the process group (gloo on CPU, nccl on GPU)."""
    import os

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _check_calibratable(model, processor, args) -> Template:
    """What only the loaded model can tell, checked before the long run: its depth and its image template (from
    its config, else from its processor)."""
    layers = ModelInfo.from_config(model).num_layers
    bad = [layer for layer in args.dense_layers if layer >= layers]
    if bad:
        raise UserError(f"--dense-layers: layer {bad[0]} is out of range; {args.model} has {layers} layers "
                        f"(0 to {layers - 1})")
    try:
        if processor is None or hf.config_names_template(model.config):
            return Template.from_config(model.config)
        return Template.from_processor(processor)
    except ValueError as e:
        raise UserError(f"{args.model}: {e}") from e


def cmd_calibrate(args) -> int:
    from ..calibrate import calibrate
    from .data import jsonl_samples, load_processor, synthetic_samples

    if args.data != "synthetic":
        _check_prompts(args.data, args.samples, need_images=True)
    _check_model_dir(args.model)
    processor = None if args.data == "synthetic" else load_processor(args.model)  # seconds: before the model
    rank, world = _init_distributed(args.device)
    model = load_model(args.model, args.dtype, args.device)
    template = _check_calibratable(model, processor, args)
    if processor is None:
        samples = synthetic_samples(model.config, args.samples or 8, seed=args.seed)
    else:
        samples = jsonl_samples(args.data, processor, model.config.model_type, limit=args.samples)
    profile = calibrate(model, samples, template=template, thresholds=args.threshold, quantile=args.quantile,
                        dense_layers=args.dense_layers, source=f"{args.data} (model {args.model})")
    if rank == 0:
        profile.save(args.out)
        print(profile.summary())
        print(f"profile written to {args.out}")
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def _tune_examples(path: str, processor, model_type: str, limit: int | None, pad_to: int):
    from .evaluate import jsonl_examples

    return jsonl_examples(path, processor, model_type, limit, pad_to)


def _same_file(a: str, b: str) -> bool:
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def cmd_tune(args) -> int:
    from ..calibrate import calibrate
    from ..tune import HoldoutError, TuneConfig, tune
    from .data import jsonl_samples, load_processor

    try:  # the search's settings are argument errors: checked before anything loads
        config = TuneConfig(budget=args.budget, per_layer=not args.no_per_layer, search=args.search,
                            max_evals=args.max_evals, early_stop=not args.no_early_stop, path=args.path)
    except ValueError as e:
        raise UserError(str(e)) from e
    if args.test and _same_file(args.test, args.holdout):
        raise UserError(f"--test {args.test} is the held-out file: the test split must be a third one, apart from "
                        "the prompts the search chose on")
    if args.data:
        _check_prompts(args.data, args.samples, need_images=True)
    _check_prompts(args.holdout, args.holdout_samples, need_answers=True, need_images=True)
    if args.test:
        _check_prompts(args.test, args.test_samples, need_answers=True)
    given = None
    if args.profile:
        given = Profile.load(args.profile)
        _redecide_check(given, args.profile, "tune")
        if given.model.template is None:
            raise UserError(f"{args.profile}: the profile has no image template; calibrate the model to get one")
    _check_model_dir(args.model)
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(args.model).model_type
    processor = load_processor(args.model)  # seconds, where the model takes minutes: first
    pad_to = args.pad_to or (64 if args.path == "compiled" else 1)
    holdout = _tune_examples(args.holdout, processor, model_type, args.holdout_samples, pad_to)
    test = _tune_examples(args.test, processor, model_type, args.test_samples, pad_to) if args.test else None
    model = load_model(args.model, args.dtype, args.device)
    if given is None:
        template = _check_calibratable(model, processor, args)
        samples = jsonl_samples(args.data, processor, model.config.model_type, limit=args.samples)
        given = calibrate(model, samples, template=template, thresholds=args.threshold,
                          quantile=args.quantile or 0.0,
                          dense_layers=args.dense_layers, progress=not args.json,
                          source=f"{args.data} (model {args.model})")
    else:
        given.check_model(model)
        if args.threshold is not None or args.quantile is not None or args.dense_layers:
            _check_calibratable(model, processor, args)
            given = given.decide(thresholds=args.threshold, quantile=args.quantile,
                                 dense_layers=args.dense_layers or None)
    try:
        result = tune(model, given, holdout, config, test=test, progress=not args.json, holdout_source=args.holdout,
                      test_source=args.test or "test examples")
    except HoldoutError as e:  # e.g. the file's answers are not this model's (dense accuracy 0)
        raise UserError(f"{args.holdout}: {e}") from e
    result.profile.save(args.out)
    if args.png:
        from .viz import plot_frontier

        plot_frontier(result, args.png)
    if args.json:
        print(json.dumps(dict(result.to_dict(), out=args.out, png=args.png or None), indent=1))
        return 0
    print(format_tune(result, args.holdout))
    print(result.profile.summary())
    if args.png:
        print(f"frontier drawn to {args.png}")
    print(f"profile written to {args.out}")
    return 0


def format_tune(result, source: str) -> str:
    """The candidates tried, the chosen one and the test split, as ``blindsight tune`` prints them."""
    n, cfg = result.holdout_size, result.config
    allowed = math.floor(cfg.budget * n / 100 + 1e-9)
    from ..tune import points

    lines = [f"{n} held-out prompts from {source}: dense accuracy {100 * result.dense_accuracy:.1f}%; budget "
             f"{points(cfg.budget)} (at most {allowed} prompt{'s' if allowed != 1 else ''} lost, net)",
             f"{'#':>3}  {'stage':<18}{'heads d/x/i/s':>14}{'attn FLOPs':>12}{'accuracy':>11}  within budget"]
    for t in result.trials:
        heads = "/".join(str(v) for v in t.counts().values())
        acc = f"{100 * t.accuracy:.1f}%" if t.complete else f"<={100 * t.accuracy_bound:.1f}%"
        note = "yes" if t.feasible else ("no" if t.complete else f"no (stopped after {t.scored})")
        lines.append(f"{t.number:>3}  {t.stage:<18}{heads:>14}{-100 * t.attention_flop_reduction:>11.1f}%"
                     f"{acc:>11}  {note}")
    c = result.chosen
    if c is None:
        lines.append("no candidate kept the accuracy within the budget: the profile is all dense")
    else:
        lines.append(f"chosen: #{c.number} ({c.stage}), attention FLOPs -{100 * c.attention_flop_reduction:.1f}%, "
                     f"held-out accuracy {100 * c.accuracy:.1f}% (dense {100 * result.dense_accuracy:.1f}%); "
                     f"thresholds {_thresholds_text(c.threshold_setting())}")
    lines.append(f"{result.evaluations} candidate evaluations{' (--max-evals reached)' if result.stopped else ''}; "
                 f"{result.seconds:.0f} s in all (the dense reference and the test split included)")
    t = result.test
    if t:
        lines.append(f"test split ({t['source']}, {t['prompts']} prompts): dense {100 * t['accuracy_dense']:.1f}%, "
                     f"given {100 * t['accuracy_given']:.1f}%, chosen {100 * t['accuracy_chosen']:.1f}%")
    else:
        lines.append("no test split (--test): the chosen profile's held-out accuracy is optimistic, being the best "
                     "of the candidates tried")
    return "\n".join(lines)


def _thresholds_text(setting) -> str:
    def one(m):
        return ", ".join(f"{k} {v:.4g}" for k, v in m.items())

    if isinstance(setting, dict):
        return one(setting)
    return "; ".join(f"layer {i}: {one(m)}" for i, m in enumerate(setting))


def cmd_inspect(args) -> int:
    from ..flops import attention_flops

    profile = Profile.load(args.profile)
    if args.layout and profile.model.template is None:
        raise UserError(f"{args.profile}: the profile has no image template; cannot build layout {args.layout!r}")
    if args.threshold is not None:
        _redecide_check(profile, args.profile, "--threshold")
        profile = profile.decide(thresholds=args.threshold)
    layout = _layout(args.layout, Template.from_dict(profile.model.template)) if args.layout else None
    print(profile.summary())
    cal = profile.calibration
    if "thresholds" in cal:  # any documented form (a number, a mapping, null, per layer), as decide() reads it
        setting = thresholds_setting(layer_thresholds(cal["thresholds"], profile.model.num_layers))
        print(f"  thresholds: {_thresholds_text(setting)}; quantile {cal.get('quantile', 0.0)}; "
              f"dense layers {cal.get('dense_layers', [])}")
    if isinstance(cal.get("tune"), dict) and args.threshold is None:
        from ..tune import format_tune_record

        print("\n".join(format_tune_record(cal["tune"])))
    if layout is not None:
        f = attention_flops(layout, profile)
        print(f"layout {args.layout} ({layout.seq_len} tokens, {int(layout.num_images[0])} images): attention FLOPs "
              f"-{100 * f.reduction:.1f}% (ideal attention speedup {f.ideal_speedup:.2f}x)")
    if args.png:
        from .viz import plot_profile

        plot_profile(profile, args.png)
        print(f"heatmap written to {args.png}")
    return 0


def cmd_bench(args) -> int:
    from .bench import BenchConfig, format_table, run

    profile = Profile.load(args.profile) if args.profile else None
    shape = {}
    if profile is not None:
        m = profile.model
        shape = dict(heads=m.num_heads, kv_heads=m.num_kv_heads, head_dim=m.head_dim, layers=m.num_layers)
    try:  # the configuration's own checks (heads a multiple of kv_heads, ...) are argument errors here
        cfg = BenchConfig(**{**dict(layout=args.layout, heads=args.heads, kv_heads=args.kv_heads,
                                    head_dim=args.head_dim, dtype=args.dtype, mix=args.mix, layers=args.layers,
                                    hidden=args.hidden, repeat=args.repeat, prefill=not args.no_prefill,
                                    lowering=args.lowering, recompile_prompts=args.recompile_prompts,
                                    recompile_len=args.recompile_len), **shape})
    except ValueError as e:
        raise UserError(str(e)) from e
    if profile is None:
        _mix(cfg.mix, cfg.heads)
    if args.sweep is None:  # what the run would find only after its first measurements
        from .bench import BENCH_TEMPLATE, arrangements

        _layout(cfg.layout, BENCH_TEMPLATE)
        if cfg.prefill and cfg.recompile_prompts:
            try:
                arrangements(cfg.recompile_len, cfg.recompile_prompts + 1)
            except ValueError as e:
                raise UserError(f"--recompile-len: {e}") from e
    if args.chunk is not None:
        from .bench import format_chunked, run_chunked

        if args.sweep is not None:
            raise UserError("--chunk measures one prompt (--layout); it does not combine with --sweep")

        result = run_chunked(cfg, args.chunk, profile, progress=not args.json)
        print(json.dumps(result, indent=1) if args.json else format_chunked(result))
        return 0
    if args.sweep is not None:
        from .bench import crossover, format_sweep, sweep

        points = sweep(cfg, args.sweep, profile, progress=not args.json)
        print(json.dumps(points, indent=1) if args.json else format_sweep(points))
        if args.png:
            from .viz import plot_sweep

            plot_sweep(points, args.png, crossover(points))
            if not args.json:
                print(f"plot written to {args.png}")
        return 0
    result = run(cfg, profile, progress=not args.json)
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="blindsight", description=__doc__.split("\n\n")[0], epilog=EPILOG)
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of a user error (as does the environment variable BLINDSIGHT_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="the shipped model: calibrate, tune, accuracy dense vs BlindSight (fixed and "
                       "tuned), FLOPs, prefill time",
                       epilog=EPILOG)
    d.add_argument("--samples", type=positive_int, default=200, help="benchmark prompts (8 images each)")
    d.add_argument("--calibration-samples", type=positive_int, default=32)
    d.add_argument("--holdout-samples", type=positive_int, default=100,
                   help="held-out prompts the tuning scores on (8 images each)")
    d.add_argument("--threshold", type=unit_float, default=0.95,
                   help="the fixed profile's recall threshold (the tuned one is searched)")
    d.add_argument("--budget", type=budget_points, default=1.0,
                   help="accuracy points the tuned profile may lose against dense on the held-out prompts")
    d.add_argument("--repeat", type=positive_int, default=5, help="timed prefill runs (median)")
    d.add_argument("--png", type=output_file, default="blindsight-profile.png",
                   help="where to draw the profile heatmap ('' for none)")
    d.add_argument("--frontier-png", type=output_file, default="blindsight-frontier.png",
                   help="where to draw the tuning frontier ('' for none)")
    d.add_argument("--json", action="store_true", help="print machine-readable numbers")
    d.set_defaults(func=cmd_demo)

    f = sub.add_parser("flops", help="FLOP accounting of a layout and head mix (Qwen2-VL-2B shape), mask pictures",
                       epilog=EPILOG)
    f.add_argument("--layout", type=layout_spec, default=DEMO_LAYOUT,
                   help="layout spec, e.g. 'text:64,(image:496,text:16)x16,text:80'")
    f.add_argument("--mix", default=DEMO_MIX, help="categories of the 12 heads of every layer")
    f.add_argument("--png", type=output_file, default="blindsight-masks.png",
                   help="where to draw the category masks ('' for none)")
    f.add_argument("--picture-layout", type=picture_layout_spec, default="text:6,(image:14,text:3)x4,text:6",
                   help=f"layout of the mask picture (at most {MAX_PICTURE_TOKENS} tokens)")
    f.add_argument("--json", action="store_true", help="print machine-readable numbers")
    f.set_defaults(func=cmd_flops)

    c = sub.add_parser("calibrate", help="measure each head's recall on multi-image prompts and write a profile",
                       epilog=EPILOG)
    c.add_argument("model", help="a directory saved by save_pretrained (or a Hub id already in the local cache)")
    c.add_argument("--data", required=True, help="a JSONL prompt file, or 'synthetic' for random prompts")
    c.add_argument("--out", type=output_file, required=True, help="where to write the profile JSON")
    c.add_argument("--samples", type=positive_int, default=None, help="number of prompts (default: all; synthetic: 8)")
    c.add_argument("--threshold", type=unit_float, default=0.95, help="recall a sparse category must keep, in [0, 1]")
    c.add_argument("--quantile", type=unit_float, default=0.0, help="quantile over prompts (0 = the worst prompt)")
    c.add_argument("--dense-layers", type=layer_list, default="", help="comma-separated layers forced dense")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    c.add_argument("--device", type=device_arg, default="cpu")
    c.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompts")
    c.set_defaults(func=cmd_calibrate)

    t = sub.add_parser("tune", help="search the thresholds for the fewest attention FLOPs within an accuracy budget "
                       "of dense, on held-out prompts", epilog=EPILOG)
    t.add_argument("model", help="a directory saved by save_pretrained (with its processor)")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="calibration prompts (JSONL): calibrate first")
    src.add_argument("--profile", help="a calibrated profile (its statistics) instead of --data")
    t.add_argument("--holdout", required=True, help="held-out QA prompts (JSONL with answers) the search scores on")
    t.add_argument("--out", type=output_file, required=True, help="where to write the tuned profile JSON")
    t.add_argument("--budget", type=budget_points, default=1.0,
                   help="accuracy points the tuned profile may lose against dense on the held-out prompts")
    t.add_argument("--test", default=None, help="a third split (JSONL with answers): dense, given and tuned "
                   "accuracy on it, the guard against overfitting the held-out prompts")
    t.add_argument("--samples", type=positive_int, default=None, help="calibration prompts (default: all)")
    t.add_argument("--holdout-samples", type=positive_int, default=None, help="first N held-out prompts")
    t.add_argument("--test-samples", type=positive_int, default=None, help="first N test prompts")
    t.add_argument("--threshold", type=unit_float, default=None,
                   help="the given profile's threshold (default: 0.95, or --profile's own)")
    t.add_argument("--quantile", type=unit_float, default=None, help="quantile over prompts (default 0, the worst)")
    t.add_argument("--dense-layers", type=layer_list, default="", help="comma-separated layers kept dense")
    t.add_argument("--search", default="bisect", choices=["bisect", "full"],
                   help="bisect: the cheapest point of each ladder, then bisection; full: every point, every "
                   "prompt (the whole frontier, more evaluations)")
    t.add_argument("--max-evals", type=positive_int, default=64, help="candidate evaluations at most")
    t.add_argument("--no-per-layer", action="store_true", help="one threshold per category for all layers")
    t.add_argument("--no-early-stop", action="store_true",
                   help="score every candidate on every prompt (exact accuracy of the rejected ones too)")
    t.add_argument("--path", default="eager", choices=["eager", "compiled"],
                   help="eager: blindsight.attach; compiled: torch.compile per candidate")
    t.add_argument("--pad-to", type=positive_int, default=None,
                   help="right-pad prompts to a multiple of this (default: 1 eager, 64 compiled)")
    t.add_argument("--png", type=output_file, default=None, help="draw accuracy against attention FLOPs of every "
                   "candidate tried, the chosen one marked")
    t.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    t.add_argument("--device", type=device_arg, default="cpu")
    t.add_argument("--json", action="store_true", help="print machine-readable results")
    t.set_defaults(func=cmd_tune)

    i = sub.add_parser("inspect", help="print a profile, its FLOP reduction on a layout, draw its heatmap",
                       epilog=EPILOG)
    i.add_argument("profile")
    i.add_argument("--layout", type=layout_spec, default=None,
                   help="layout spec, e.g. 'text:64,(image:496,text:16)x16,text:80'")
    i.add_argument("--threshold", type=unit_float, default=None, help="re-decide with this threshold first")
    i.add_argument("--png", type=output_file, default=None, help="draw a layers x heads heatmap")
    i.set_defaults(func=cmd_inspect)

    e = sub.add_parser("eval", help="accuracy dense vs BlindSight on a multi-image QA JSONL, with a threshold sweep",
                       epilog=EPILOG)
    e.add_argument("model", help="a directory saved by save_pretrained (with its processor)")
    e.add_argument("--profile", required=True, help="the model's profile JSON (from blindsight calibrate)")
    e.add_argument("--data", required=True, help='JSONL: {"images": [...], "text": "... <image> ...", "answer": "..."}')
    e.add_argument("--samples", type=positive_int, default=None, help="first N prompts (default: all)")
    e.add_argument("--thresholds", type=unit_floats, default="",
                   help="comma-separated recall thresholds to re-decide the profile with")
    e.add_argument("--pad-to", type=positive_int, default=64,
                   help="right-pad prompts to a multiple of this (fewer compiles)")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    e.add_argument("--device", type=device_arg, default="cpu")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="compiled dense SDPA vs BlindSight: one layer's attention and a whole prefill",
                       epilog=EPILOG)
    b.add_argument("--layout", type=layout_spec, default=DEMO_LAYOUT)
    b.add_argument("--heads", type=shape_int, default=12)
    b.add_argument("--kv-heads", type=shape_int, default=2)
    b.add_argument("--head-dim", type=shape_int, default=128)
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g = b.add_mutually_exclusive_group()
    g.add_argument("--mix", default=DEMO_MIX, help="categories of the heads of every layer")
    g.add_argument("--profile", default=None, help="use a profile's categories and shape instead of --mix")
    b.add_argument("--layers", type=shape_int, default=2, help="layers of the prefill model")
    b.add_argument("--hidden", type=shape_int, default=1536, help="hidden size of the prefill model")
    b.add_argument("--repeat", type=positive_int, default=5, help="timed runs (median)")
    b.add_argument("--no-prefill", action="store_true", help="skip the whole-prefill measurement")
    b.add_argument("--lowering", default="auto", choices=["auto", *sorted(LOWERINGS)])
    b.add_argument("--recompile-prompts", type=_int_between(0, MAX_SHAPE, "an integer >= 0"), default=10,
                   help="prefill prompts of one length with images moved, counting compilations (0: skip)")
    b.add_argument("--recompile-len", type=_int_between(1, MAX_LAYOUT_TOKENS, "a positive integer"), default=1024,
                   help="their length in tokens")
    b.add_argument("--sweep", type=token_lengths, nargs="?", const="256,512,1024,2048,4096,8192,16384,32768,65536",
                   default=None, help="one layer's attention at each of these prompt lengths (default 256 to 64K "
                   "tokens, 2 to 128 images) instead of --layout: a table, and with --png a plot")
    b.add_argument("--png", type=output_file, default=None, help="with --sweep: where to draw speedup vs length")
    b.add_argument("--chunk", type=_int_between(2, MAX_LAYOUT_TOKENS, "an integer >= 2"), default=None,
                   help="prefill --layout this many tokens at a time (chunked prefill, queries at an offset)")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)
    return p


def _one_line(e: BaseException) -> str:
    """The error's message on one line; an OSError as 'file: reason' rather than '[Errno 2] ...'."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.filename}: {e.strerror}"
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("BLINDSIGHT_DEBUG", "") not in ("", "0")
    try:
        return args.func(args)
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"blindsight: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        if debug:
            raise
        print("blindsight: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
