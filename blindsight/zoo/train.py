"""Train the shipped shapes model: transformers' Qwen2-VL architecture, a few million parameters, on CPU.

``python -m blindsight.zoo.train --out DIR`` trains from scratch on the ``train`` split of
:mod:`blindsight.zoo.shapes` (drawn on the fly from its fixed seed) and saves model and processor with
``save_pretrained``. Two stages, as real VLMs are built:

1. :func:`pretrain_vision`: the vision tower alone learns to classify single images (colour, shape) from every
   one of its output tokens; it is then frozen.
2. :func:`train`'s main loop: the language model on multi-image questions. The loss is the cross-entropy of
   every one-word answer after ``answer :`` (the prompt's own question and ``follow_ups`` more about the same
   images), plus training-only signals (why each: :func:`train`): auxiliary targets on the image tokens
   (:func:`image_targets`), the image labels (:func:`label_targets`) and the answer rows
   (:func:`question_targets`), a loss teaching the answer rows where to look (:func:`attention_targets`,
   :func:`guide_loss`), and a small penalty on the attention image tokens pay to other images
   (:func:`cross_image_attention`).

Batches are right-padded without an attention mask: the model is causal and reads only the last real
position, so the padding after it changes nothing that is used, and SDPA keeps its fast causal path.
Seeds are fixed (weights, data, dropout-free model) and the run is deterministic on a given machine and
thread count: three runs of ``python -m blindsight.zoo.train --out DIR`` (2 threads) gave the same weights bit
for bit, and those are the shipped weights (23.0 min alone).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from ..layout import Layout
from ..template import Template
from .processor import ShapesProcessor
from .shapes import COLORS, IMAGE_SIZE, SHAPES, TASKS, follow_up_questions, make_record, vocabulary

__all__ = ["ModelSize", "build_processor", "build_model", "collate", "questions", "image_targets", "label_targets",
           "question_targets", "attention_targets", "guide_loss", "pretrain_vision", "train"]

# training task mix (find, count, same, color, shape): the look-ups of find and count take far more steps to form
# than reading one image (colour and shape of image i are learned within ~100 steps); held-out splits stay uniform
TRAIN_TASK_WEIGHTS = (0.35, 0.25, 0.14, 0.13, 0.13)

# 96 x 96 images: a 6 x 6 grid of 16-pixel patches, no merge: 36 tokens per image. 8-pixel patches with Qwen2-VL's
# usual 2 x 2 merge give the same 36 tokens but cost the vision tower 4x more and learned shapes no faster.
PATCH_SIZE = 16
MERGE_SIZE = 1


class ModelSize:
    """The shipped model's shape (hidden 128, 4 layers of 4 query / 2 KV heads; vision tower of depth 2)."""

    text = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 6, 6]})
    vision = dict(depth=2, embed_dim=64, hidden_size=128, num_heads=2, mlp_ratio=2, patch_size=PATCH_SIZE,
                  spatial_merge_size=MERGE_SIZE, temporal_patch_size=2, in_channels=3)


def build_processor() -> ShapesProcessor:
    return ShapesProcessor.build(vocabulary(), IMAGE_SIZE, PATCH_SIZE, MERGE_SIZE)


def build_model(processor: ShapesProcessor, seed: int = 0, text: dict | None = None, vision: dict | None = None):
    """A fresh Qwen2-VL of the shipped shape (or ``text``/``vision`` overrides) with input and output word embeddings
    tied, as Qwen2-VL-2B has them: a number token's own embedding is then the direction ``lm_head`` reads as that
    number, so an answer row that attends to a label's number token can copy it."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    ids = processor.token_ids()
    vocab = 8 * math.ceil(len(processor.tokenizer) / 8)
    config = Qwen2VLConfig(
        text_config=dict(text or ModelSize.text, vocab_size=vocab, pad_token_id=ids["pad_token_id"],
                         eos_token_id=ids["eos_token_id"], bos_token_id=ids["eos_token_id"]),
        vision_config=dict(vision or ModelSize.vision),
        image_token_id=ids["image_token_id"], video_token_id=ids["video_token_id"], tie_word_embeddings=True,
        vision_start_token_id=ids["vision_start_token_id"], vision_end_token_id=ids["vision_end_token_id"])
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = ids["pad_token_id"]
    return model


def collate(processor: ShapesProcessor, records: list[dict], follow_ups: list[list[tuple[str, str]]] | None = None):
    """(model inputs without attention mask, (row, position) of every ``answer :``, answer token ids).

    Each prompt is followed by its answer and then by its ``follow_ups`` as ``question : Q answer : A``; the
    model is trained to predict every answer from the tokens before it.
    """
    follow_ups = follow_ups or [[] for _ in records]
    texts = [r["text"] + " " + r["answer"] + "".join(f" question : {q} answer : {a}" for q, a in f)
             for r, f in zip(records, follow_ups)]
    enc = processor(texts, images=[im for r in records for im in r["images"]])
    enc.pop("attention_mask")
    ids = enc["input_ids"]
    colon, answer = processor.tokenizer.convert_tokens_to_ids([":", "answer"])
    at = ((ids[:, 1:-1] == colon) & (ids[:, :-2] == answer)).nonzero()  # (row, position of ":" - 1)
    rows, pos = at[:, 0], at[:, 1] + 1
    return dict(enc), (rows, pos), ids[rows, pos + 1]


def questions(records: list[dict], follow_ups: list[list[tuple[str, str]]] | None = None) -> list[tuple[int, str]]:
    """(record index, question) of every answer :func:`collate` trains, in its order: each prompt's own question,
    then its follow-ups."""
    follow_ups = follow_ups or [[] for _ in records]
    return [(i, q) for i, (r, f) in enumerate(zip(records, follow_ups))
            for q in [r["text"].rsplit("question : ", 1)[1].removesuffix(" answer :")] + [q for q, _ in f]]


def image_targets(processor: ShapesProcessor, inputs: dict, records: list[dict]):
    """Auxiliary targets on every image token after ``<|vision_start|>``: each placeholder predicts its image's
    shape word, the closing ``<|vision_end|>`` its colour word. (row, position), token ids, and the kind of each
    target (0 shape, 1 colour: the training loss averages each kind on its own, so the one colour target per image
    weighs as much as its 36 shape targets).

    Why per token: with targets on two tokens per image only, the image rows of every layer attended across
    images (worst-prompt intra-image recall 0.25-0.65). With a target on every token, read at the last layer
    only, layers 2-3 kept 0.80-0.95 of their attention inside the image after 400 steps.
    """
    ids = processor.token_ids()
    x = inputs["input_ids"]
    end = x == ids["vision_end_token_id"]
    rows, pos = ((x == ids["image_token_id"]) | end).nonzero(as_tuple=True)  # row-major: images, tokens in order
    opens = (x == ids["vision_start_token_id"]).long()
    image = opens.cumsum(1)[rows, pos] - 1  # index of each token's image within its row
    first = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(opens.sum(1), 0)[:-1]])
    word = processor.tokenizer.convert_tokens_to_ids
    table = torch.tensor([[word(s), word(c)] for r in records for c, s in r["items"]])  # [images in batch, 2]
    kind = end[rows, pos].long()
    return (rows, pos), table[first[rows] + image, kind], kind


def label_targets(processor: ShapesProcessor, inputs: dict, records: list[dict]):
    """(row, position) of every image label's number token (the ``3`` of ``<image> image 3 :``, two tokens after the
    image's ``<|vision_end|>``) and its image's colour and shape (indices into ``COLORS`` and ``SHAPES``).

    Training reads these from the output of ``aux_layer`` with a linear head of its own (thrown away after
    training): the label must hold what its image shows, or no answer row can find it by content. Not through
    ``lm_head``: that would make the token look like a colour word and wipe out the number it has to give back.
    """
    ids = processor.token_ids()
    x = inputs["input_ids"]
    rows, ends = (x == ids["vision_end_token_id"]).nonzero(as_tuple=True)
    pos = ends + 2
    word = processor.tokenizer.convert_tokens_to_ids
    numbers = torch.tensor([word(str(i + 1)) for r in records for i in range(len(r["items"]))])
    if pos.max() >= x.shape[1] or not torch.equal(x[rows, pos], numbers):
        raise ValueError("image labels are not in the `<image> image i :` format of blindsight.zoo.shapes.prompt_text")
    items = [it for r in records for it in r["items"]]
    colors = torch.tensor([list(COLORS).index(c) for c, _ in items])
    shapes = torch.tensor([SHAPES.index(s) for _, s in items])
    return (rows, pos), colors, shapes


def _rms_normalized(h: torch.Tensor) -> torch.Tensor:
    """``h`` scaled to unit root-mean-square (no learned weight): what the training-only linear heads read."""
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)


def question_targets(asked: list[tuple[int, str]]) -> torch.Tensor:
    """What each question names, one row per :func:`questions` entry: class indices of (colour, shape, first
    image number, second image number), 0 where it names none (colours and shapes are 1 + their index in
    ``COLORS``/``SHAPES``, numbers are themselves).

    Training reads these from the answer row at ``aux_layer`` with a linear head of its own (thrown away after
    training), so that the answer row holds what is asked before the layer whose heads look it up."""
    colors, rows = list(COLORS), []
    for _, q in asked:
        words = q.split()
        numbers = [int(w) for w in words if w.isdigit()] + [0, 0]
        rows.append([next((1 + colors.index(w) for w in words if w in COLORS), 0),
                     next((1 + SHAPES.index(w) for w in words if w in SHAPES), 0), numbers[0], numbers[1]])
    return torch.tensor(rows)


def attention_targets(processor: ShapesProcessor, inputs: dict, records: list[dict], where,
                      asked: list[tuple[int, str]]):
    """Where the answer rows should look: three lists (find, count, by number) of (row, answer position, key
    positions), one per kind of look-up.

    - ``find`` ("which image shows a red circle ?"): the number token of the named image's label (look-up by
      content).
    - ``count`` ("how many images show red shapes ?"): the number tokens of every matching image's label plus
      the row's first ``question`` token, a sink: with equal weight on each, the sink's share 1 / (k + 1) tells
      the count k (0 included), which an average over the matching labels alone would not.
    - by number: ``same`` ("do image 2 and 5 match ?"): labels 2 and 5; ``color``/``shape`` ("what color is in
      image 3 ?"): label 3. Why ``same`` this way: an equal mix of two labels' colour and shape codes is one
      clean code when they match and two half ones when not, which the MLP after it can tell apart.
    ``where``: :func:`collate`'s answer positions; ``asked``: :func:`questions` (same order).
    """
    (rows, pos), _, _ = label_targets(processor, inputs, records)
    question = processor.tokenizer.convert_tokens_to_ids("question")
    labels = {}
    for r, p in zip(rows.tolist(), pos.tolist()):
        labels.setdefault(r, []).append(p)
    find, count, by_number = [], [], []
    for (i, q), r, p in zip(asked, where[0].tolist(), where[1].tolist()):
        items, words = records[i]["items"], q.split()
        if q.startswith("which image shows"):
            find.append((r, p, [labels[r][items.index((words[4], words[5]))]]))
        elif q.startswith("how many"):
            sink = int((inputs["input_ids"][r] == question).nonzero()[0])
            count.append((r, p, [labels[r][k] for k, (c, s) in enumerate(items) if c in words or s in words] + [sink]))
        else:  # "do image i and j match ?", "what color is in image i ?": the labels the question names
            by_number.append((r, p, [labels[r][int(w) - 1] for w in words if w.isdigit()]))
    return find, count, by_number


def guide_loss(probs: torch.Tensor, targets: list, head: int) -> torch.Tensor:
    """Cross-entropy between ``head``'s attention row and a uniform distribution over each target's keys
    (``probs``: one layer's ``[B, H, S, S]`` probabilities; ``targets``: (row, query position, keys)), averaged.

    One fixed head: with the best of several heads instead, each head watched one fixed image and the loss was met
    without any look-up (measured: 2 images, loss ~0 while each head gave the named image 0.5 on average)."""
    if not targets:
        return probs.new_zeros(())
    # one gather for all targets: indexing the [B, H, S, S] tensor once per target made every step's backward
    # allocate a dense gradient per target (3.5 s per 8-image step against 1.7 s without guidance). Weights are
    # (1 / targets) / keys, the factors the per-target means applied, so the gradient is the same
    rows, queries, keys, sizes = [], [], [], []  # sizes: how many keys the target of each entry has
    for r, p, k in targets:
        rows += [r] * len(k)
        queries += [p] * len(k)
        keys += k
        sizes += [len(k)] * len(k)
    w = torch.full((len(keys),), 1.0 / len(targets), dtype=probs.dtype) / torch.tensor(sizes, dtype=probs.dtype)
    return (-torch.log(probs[rows, head, queries, keys].clamp_min(1e-6)) * w).sum()


def pretrain_vision(model, processor: ShapesProcessor, steps: int, rng: np.random.Generator, batch_size: int = 64,
                    lr: float = 2e-3, progress: bool = True) -> list[float]:
    """Stage 1: train the vision tower alone to classify single images, as real VLMs start from a pretrained
    vision encoder: every output token predicts its image's colour and shape (two linear heads, thrown away
    afterwards), so each image token enters the language model knowing what its image shows.

    Measured (batch 64, lr 2e-3, seed 1): per-token shape accuracy 0.60 / 0.83 / 0.91 after 500 / 1000 / 1500
    steps, colour 1.00 from step 100; ~0.15 s a step. With the heads on the mean-pooled output instead (the
    previous recipe), shape was 0.72-0.80 pooled and ~0.35 per token after 600 steps: the language model's
    image tokens then had to gather shape across their image, and read it at 68-72% (shape at 39% on 8 images;
    both measured by the previous session on the previous shipped model).
    Returns the per-step losses.
    """
    from tqdm.auto import tqdm

    from .shapes import COLORS, SHAPES, render

    vision = model.model.visual
    heads = torch.nn.Linear(model.config.vision_config.hidden_size, len(COLORS) + len(SHAPES))
    opt = torch.optim.AdamW(list(vision.parameters()) + list(heads.parameters()), lr=lr, weight_decay=0.01)
    colors, losses = list(COLORS), []
    vision.train()
    for _ in tqdm(range(steps), desc="vision pre-training", disable=not progress):
        c, sh = rng.integers(len(COLORS), size=batch_size), rng.integers(len(SHAPES), size=batch_size)
        images = [render(colors[i], SHAPES[j], rng) for i, j in zip(c, sh)]
        enc = processor.image_processor(images=images, return_tensors="pt")
        out = vision(enc["pixel_values"], grid_thw=enc["image_grid_thw"])
        tokens = getattr(out, "pooler_output", out)  # merged tokens, images one after another
        logits = heads(tokens.reshape(batch_size, -1, tokens.shape[-1]))  # [images, tokens, colours + shapes]
        per_image = logits.shape[1]
        colour_loss = torch.nn.functional.cross_entropy(logits[..., : len(COLORS)].flatten(0, 1),
                                                        torch.as_tensor(c).repeat_interleave(per_image))
        loss = (colour_loss + torch.nn.functional.cross_entropy(logits[..., len(COLORS):].flatten(0, 1),
                                                                torch.as_tensor(sh).repeat_interleave(per_image)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def cross_image_attention(attentions, image: torch.Tensor) -> torch.Tensor:
    """Mean attention mass that image query rows put on other images' tokens, over layers, heads and image rows.

    ``attentions``: per layer ``[B, H, S, S]`` probabilities; ``image``: ``[B, S]`` image segment per token, -1
    for text (:attr:`blindsight.Layout.image`). For one prompt it is the mean over (layer, head) of
    ``1 - recall`` of the INTRA category (DESIGN §3): what calibration measures, as a differentiable loss.
    """
    image_rows = image >= 0
    other = image_rows[:, :, None] & image_rows[:, None, :] & (image[:, :, None] != image[:, None, :])
    mass = torch.stack([(p * other[:, None]).sum(-1) for p in attentions])  # [L, B, H, S]
    return mass.mean((0, 2))[image_rows].mean()


def train(out: str | None, steps: int = 1800, batch_size: int = 16, lr: float = 1e-3, seed: int = 0,
          min_images: int = 2, max_images: int = 8, follow_ups: int = 8, curriculum: float = 0.5,
          aux_weight: float = 0.5,
          vision_steps: int = 2500, aux_layer: int = 1, locality: float = 0.1, guide: float = 1.0, guide_layer: int = 2,
          task_weights=TRAIN_TASK_WEIGHTS, freeze_vision: bool = True, model=None, processor=None,
          progress: bool = True, log_every: int = 50) -> tuple[object, ShapesProcessor, list[float]]:
    """Pre-train the vision tower for ``vision_steps`` (stage 1, :func:`pretrain_vision`), then train the model
    (the language model only with ``freeze_vision``; or continue training ``model``) for ``steps`` AdamW steps;
    save to ``out`` if given.

    Each prompt carries ``follow_ups`` more questions about its images after its own (all answers are
    trained): a single answer per prompt left the model at chance-level per-task priors after 600 steps.
    Tasks are drawn with ``task_weights`` (:data:`TRAIN_TASK_WEIGHTS`; the held-out splits are uniform).
    The most images a batch may hold grows from ``min_images`` to ``max_images`` over the first ``curriculum``
    fraction of the steps: from scratch on 2-8 images at once the model stayed at chance after 300 steps,
    while on 2 images it learns to read an image's colour within 100.

    Training signals besides the answers (none changes the model or its inputs at inference):

    - ``aux_weight``: image tokens predict their image's shape, ``<|vision_end|>`` its colour, read through
      ``lm_head`` at the last layer and at the output of layer ``aux_layer`` (:func:`image_targets`); and each
      label's number token holds its image's colour and shape at ``aux_layer``, read by a linear head of its own
      (:func:`label_targets`). Without them first-question accuracy stayed at chance (0.34) for 400 steps. A fact
      formed only in the last layer is never a key any layer's attention can match, hence ``aux_layer``.
      Likewise each answer row holds, at ``aux_layer``, what its question names (colour, shape, image numbers;
      :func:`question_targets`, another linear head of its own): these are the queries of the guided look-ups
      one layer up. Measured: with head 2 guided (below) but no such target, layers 0-1 stopped copying the
      question's words into the answer row (a linear probe read the asked colour from it at layer 2's input
      0.56 of the time, 0.99 before), the ``find`` head spread its weight evenly over all labels, and ``find``
      and ``count`` fell to 10% and 18% on 8 images while ``same`` rose to 56-82%.
    - ``guide``: the answer rows are taught where to look, at layer ``guide_layer``: head 0 at the label of the
      image ``find`` names by content, head 1 at the labels ``count`` matches and a sink, head 2 at the labels
      of the images ``same``, ``color`` and ``shape`` name by number (:func:`attention_targets`,
      :func:`guide_loss`). Why: these are look-ups, and the answer loss alone gives them almost no gradient until
      they half work. Measured (2 images, ``find`` questions only, 400-1000 steps): without guidance training
      stayed at loss ln 2 (a coin toss), with the label before its image or after it, with or without tied
      embeddings; with head 0 guided, it put 0.82 of its weight on the right label after 400 steps and answered
      0.87-0.90 from step ~600 on. With heads 0 and 1 guided only, ``same`` stayed near chance on 4 and 8
      images (59% and 47% against 59% and 64% for always answering the commoner word) and ``color`` at 49%
      and 38%; with head 2 guided too (and :func:`question_targets`), ``same`` 85% and 81%, ``color`` 100%.
    - ``locality``: a penalty on the attention mass image query rows put on other images
      (:func:`cross_image_attention`, mean over layers, heads and image rows). Why: real VLMs inherit attention
      habits (sinks, local heads) from a pretrained text LLM and mostly single-image data, and BlindSight's finding
      is that their image rows then barely look across images; this model is trained from scratch in minutes and
      has no such habits: without the penalty its image rows spread 10-80% of their mass over other images'
      tokens (worst-prompt INTRA recall 0.20-0.92 per head) although nothing in the tasks needs it there (a
      question comes after its images, so image rows cannot know what will be asked; answer rows, which are
      text, always see everything). The penalty is one weight for all heads: a head whose cross-image attention
      pays for itself in the task loss keeps it, and calibration, which knows nothing of the penalty, decides
      per head. With the previous recipe, weight 0.5 made every head INTRA at 0.95 (a planted profile, not a
      finding); 0.1 left 3.7% of image-row mass across images (worst-prompt INTRA recall 0.64-0.96 per head).

    ``locality`` and ``guide`` need attention probabilities: training then runs eager attention, and the model's
    own attention implementation is restored afterwards. ``freeze_vision`` keeps the stage-1 tower fixed.
    Returns (model, processor, per-step losses). Cosine learning rate with 4% warm-up.
    """
    from tqdm.auto import tqdm

    from .shapes import SPLITS

    processor = processor or build_processor()
    model = model or build_model(processor, seed)
    layers = model.config.text_config.num_hidden_layers
    for name, layer in (("aux_layer", aux_layer), ("guide_layer", guide_layer if guide else 0)):
        if not 0 <= layer < layers:
            raise ValueError(f"{name} {layer} is not a layer of this {layers}-layer model")
    if guide and model.config.text_config.num_attention_heads < 3:
        raise ValueError("guide needs 3 attention heads (find, count and look-up by number on heads 0-2); pass guide=0")
    if locality < 0 or guide < 0:
        raise ValueError(f"locality and guide are loss weights, >= 0; got {locality}, {guide}")
    rng = np.random.default_rng(SPLITS["train"] + 1000 * seed)
    if vision_steps:
        pretrain_vision(model, processor, vision_steps, rng, progress=progress)
    model.train()
    attn_implementation = model.config._attn_implementation  # restored after training
    if freeze_vision:
        model.model.visual.requires_grad_(False)
    if locality or guide:  # attention probabilities are needed; SDPA does not return them
        model.set_attn_implementation("eager")
    template = Template.from_config(model.config)
    hidden = model.config.text_config.hidden_size
    label_head = torch.nn.Linear(hidden, len(COLORS) + len(SHAPES))  # training only, as question_head
    # question_targets' four classes (0 = none named); image numbers are the vocabulary's one-digit words
    question_sizes = (len(COLORS) + 1, len(SHAPES) + 1, 10, 10)
    question_head = torch.nn.Linear(hidden, sum(question_sizes))
    trained = ([t for t in model.parameters() if t.requires_grad] + list(label_head.parameters())
               + list(question_head.parameters()))
    opt = torch.optim.AdamW(trained, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, steps // 25)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    norm = model.model.language_model.norm
    losses, hits, logs, t0 = [], {t: [] for t in TASKS}, {"cross": [], "guide": []}, time.time()
    bar = tqdm(range(steps), desc="training", disable=not progress)
    for step in bar:
        grown = min(1.0, step / max(1, curriculum * steps))
        cap = min_images + round(grown * (max_images - min_images))
        n = int(rng.integers(min_images, cap + 1))  # one image count per batch: little padding
        records = [make_record(rng, n, task_weights=task_weights) for _ in range(batch_size)]
        extra = [follow_up_questions(r["items"], rng, follow_ups, task_weights) for r in records]
        inputs, where, answers = collate(processor, records, extra)
        asked = questions(records, extra)
        fwd = model.model(**inputs, output_hidden_states=True, output_attentions=bool(locality or guide))
        early = fwd.hidden_states[aux_layer + 1]  # output of layer aux_layer
        logits = model.lm_head(fwd.last_hidden_state[where])
        loss = torch.nn.functional.cross_entropy(logits, answers)
        if aux_weight:
            at, targets, kind = image_targets(processor, inputs, records)
            for read in (fwd.last_hidden_state[at], norm(early[at])):
                aux = torch.nn.functional.cross_entropy(model.lm_head(read), targets, reduction="none")
                loss = loss + aux_weight / 2 * torch.stack([aux[kind == k].mean() for k in range(2)]).mean()
            at, colors, shapes = label_targets(processor, inputs, records)
            read = label_head(_rms_normalized(early[at]))
            loss = loss + aux_weight * (torch.nn.functional.cross_entropy(read[:, : len(COLORS)], colors)
                                        + torch.nn.functional.cross_entropy(read[:, len(COLORS):], shapes))
            read = question_head(_rms_normalized(early[where]))
            for logits_k, target_k in zip(read.split(question_sizes, -1), question_targets(asked).T):
                loss = loss + aux_weight * torch.nn.functional.cross_entropy(logits_k, target_k)
        if locality:
            cross = cross_image_attention(fwd.attentions, Layout.from_input_ids(inputs["input_ids"], template).image)
            loss = loss + locality * cross
            logs["cross"].append(cross.item())
        if guide:
            find, count, by_number = attention_targets(processor, inputs, records, where, asked)
            probs = fwd.attentions[guide_layer]
            g = guide_loss(probs, find, 0) + guide_loss(probs, count, 1) + guide_loss(probs, by_number, 2)
            loss = loss + guide * g
            logs["guide"].append(g.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        first = torch.ones_like(where[0], dtype=torch.bool)
        first[1:] = where[0][1:] != where[0][:-1]  # each prompt's own question, as evaluated
        for r, ok in zip(records, (logits.argmax(-1) == answers)[first].tolist()):
            hits[r["task"]].append(ok)
        if (step + 1) % log_every == 0:
            recent = {t: f"{np.mean(h[-10 * log_every:]):.2f}" for t, h in hits.items() if h}
            bar.set_postfix(loss=f"{np.mean(losses[-log_every:]):.3f}", **recent,
                            **{k: f"{np.mean(v[-log_every:]):.3f}" for k, v in logs.items() if v},
                            min=f"{(time.time() - t0) / 60:.1f}")
    model.eval()
    model.model.visual.requires_grad_(True)
    model.set_attn_implementation(attn_implementation)
    if out:
        model.save_pretrained(out)
        processor.save_pretrained(out)
    return model, processor, losses


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory to save the model and processor to")
    p.add_argument("--steps", type=int, default=1800)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--follow-ups", type=int, default=8, help="extra questions per training prompt")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--vision-steps", type=int, default=2500, help="steps of vision-tower pre-training (stage 1)")
    p.add_argument("--locality", type=float, default=0.1, help="weight of the cross-image attention penalty (0: none)")
    p.add_argument("--train-vision", action="store_true",
                   help="keep training the vision tower in stage 2 (default: frozen)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    t = time.time()
    train(args.out, args.steps, args.batch_size, args.lr, args.seed, follow_ups=args.follow_ups,
          vision_steps=args.vision_steps, locality=args.locality, freeze_vision=not args.train_vision)
    print(f"trained {args.steps} steps in {(time.time() - t) / 60:.1f} min; saved to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
