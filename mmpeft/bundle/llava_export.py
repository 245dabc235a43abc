"""Export a generative bundle as a plain transformers ``LlavaForConditionalGeneration`` folder.

LLaVA (Liu et al., "Visual Instruction Tuning", NeurIPS 2023; transformers' ``llava`` model)
is one vision tower, a two-layer MLP projector and a causal LM, with the image's tokens
written where the prompt holds ``<image>``. A bundle fits that format when its generate task
reads one transformers CLIP vision encoder through the ``mlp`` connector (LLaVA-1.5's
projector, the same Linear -> GELU -> Linear) and every method folds into the weights: our
encoder's tokens are the tower's last hidden state with its class token, which LLaVA reads
as ``vision_feature_layer: -1`` and ``vision_feature_select_strategy: full``. SigLIP does not
fit: LLaVA reads a tower's hidden states before SigLIP's final LayerNorm, while our tokens
(and the connector trained on them) come after it.

Our prefix comes before the whole prompt, so the exported processor's chat template writes
``<image>`` first, then the decoder's own template over the messages' text. The decoder
gains one ``<image>`` token (a zero embedding row, never read: LLaVA overwrites its
positions) which ``generation_config.json`` suppresses, so greedy decoding picks among the
decoder's own tokens exactly as ours does.

The export verifies itself: the written folder is loaded back with plain transformers and
must generate the same tokens as the bundle on probe images and prompts (greedy), with the
first step's logits within the tolerance; otherwise nothing is written.
"""

from __future__ import annotations

import copy
import math
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data import Sample, recipe_splits
from ..data.batching import Collator, ImageStore
from ..errors import MMPeftError, UsageError
from ..files import sealed_directory
from ..tasks import TASK_INPUTS
from .merge import merge_in_memory

IMAGE_TOKEN = "<image>"
VISION_TOWERS = ("clip_vision_model",)  # transformers model types LLaVA's vision tower takes as we read them

# messages whose content is a list of parts (the transformers / OpenAI convention) become text
# messages: an image part anywhere puts <image> before everything, as the bundle's prefix is
FLATTEN = (
    "{%- set ns = namespace(msgs=[], image=false) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string -%}"
    "{%- set ns.msgs = ns.msgs + [{'role': m['role'], 'content': m['content']}] -%}"
    "{%- else -%}{%- set t = namespace(parts=[]) -%}"
    "{%- for p in m['content'] -%}"
    "{%- if p['type'] == 'image' -%}{%- set ns.image = true -%}"
    "{%- elif p['type'] == 'text' -%}{%- set t.parts = t.parts + [p['text']] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set ns.msgs = ns.msgs + [{'role': m['role'], 'content': t.parts | join('\\n')}] -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if ns.image -%}" + IMAGE_TOKEN + "{%- endif -%}"
    "{%- set messages = ns.msgs -%}"
)


def llava_parts(merged, report: dict) -> tuple:
    """``(task, head, encoder name, encoder)`` of a merged bundle that fits LLaVA, or a
    :class:`UsageError` naming the part that does not."""
    where = str(merged.path)
    tasks = merged.tasks
    fitting = [name for name, task in tasks.items() if task.exports_llava]
    if len(tasks) != 1 or not fitting:
        kinds = ", ".join(f"{n} ({t.settings.registry_name})" for n, t in tasks.items())
        raise UsageError(f"{where}: a LLaVA checkpoint holds one task that generates text; this bundle has {kinds}")
    name = fitting[0]
    task = tasks[name]
    head = merged.model.task_head(name)
    s = task.settings
    if s.connector != "mlp":
        raise UsageError(f"{where}: task {name!r} connects the encoders through the {s.connector!r} connector; LLaVA's "
                         "projector is the mlp connector (task.connector: mlp)")
    if s.decoder_quantization is not None or not head.method.mergeable:
        raise UsageError(f"{where}: task {name!r}'s decoder keeps its {report['kept'].get(name + '.decoder', 'method')} "
                         "beside the weights (a 4/8-bit decoder is not folded); LLaVA needs one plain decoder: "
                         "train without decoder_quantization to export")
    if len(head.connectors) != 1:
        raise UsageError(f"{where}: task {name!r} reads encoders {', '.join(head.connectors)}; LLaVA has one vision tower")
    enc_name = next(iter(head.connectors))
    enc = merged.model.encoders[enc_name]
    arch = enc.arch
    if enc.modality != "image":
        raise UsageError(f"{where}: encoder {enc_name!r} reads {enc.modality}; LLaVA's vision tower reads one image")
    if arch not in VISION_TOWERS:
        why = (" (LLaVA reads a SigLIP tower's hidden states before its final LayerNorm; this bundle's connector was "
               "trained on the normalised tokens)") if arch.startswith("siglip") else ""
        raise UsageError(f"{where}: encoder {enc_name!r} is a {arch} model; a LLaVA export takes a transformers CLIP "
                         f"vision tower{why}")
    method = merged.model.methods[enc_name]
    if not method.mergeable or enc.num_prompt_tokens or enc.input_prompt is not None:
        raise UsageError(f"{where}: encoder {enc_name!r} keeps its {method.name} method beside the base (it adds "
                         "modules); LLaVA's vision tower is a plain CLIP: use a method that merges (lora, bitfit, ...)")
    config = enc.model.config
    if enc.image_size != config.image_size:
        raise UsageError(f"{where}: encoder {enc_name!r} reads {enc.image_size} px images, its CLIP tower was built for "
                         f"{config.image_size}; LLaVA's tower reads its own size")
    if isinstance(task.tokenizer.chat_template, dict):
        raise UsageError(f"{where}: decoder {s.decoder!r} has several named chat templates; LLaVA's processor takes one")
    return task, head, enc_name, enc


def _tokenizer(task):
    """The decoder's tokenizer with ``<image>``, adding no special tokens by itself (the
    template writes them where the bundle had them), and the text of those it used to add."""
    from tokenizers import AddedToken

    tok = copy.deepcopy(task.tokenizer)
    probe = "a b"
    auto, bare = tok(probe)["input_ids"], tok(probe, add_special_tokens=False)["input_ids"]
    start = next((i for i in range(len(auto) - len(bare) + 1) if auto[i:i + len(bare)] == bare), None)
    if start is None:
        raise UsageError(f"decoder {task.settings.decoder!r}: its tokenizer changes a text's tokens when it adds special "
                         "tokens; the LLaVA processor could not reproduce the bundle's prompts")
    added = (tok.convert_ids_to_tokens(auto[:start]), tok.convert_ids_to_tokens(auto[start + len(bare):]))
    for flag in ("add_bos_token", "add_eos_token"):
        if getattr(tok, flag, False):
            setattr(tok, flag, False)
    if tok(probe)["input_ids"] != bare:
        raise UsageError(f"decoder {task.settings.decoder!r}: its tokenizer adds special tokens that cannot be switched "
                         "off (add_bos_token / add_eos_token); the LLaVA processor would put them before <image>")
    tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    return tok, added


def chat_template(task, added) -> str:
    """The processor's template: ``<image>``, then the prompt as the bundle builds it (the
    decoder's chat template, or the plain ``role: content`` lines and its special tokens)."""
    tok = task.tokenizer
    if task.settings.chat_template and tok.chat_template:
        return FLATTEN + tok.chat_template
    before, after = ("".join(t) for t in added)
    return (FLATTEN + before + "{%- for m in messages[:-1] -%}{{ m['role'] }}: {{ m['content'] }}{{ '\\n' }}"
            "{%- endfor -%}{{ messages[-1]['content'] }}" + after)


def build_llava(task, head, enc):
    """``(LlavaForConditionalGeneration, LlavaProcessor)`` holding the merged bundle's weights."""
    from transformers import (CLIPImageProcessorPil, GenerationConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)

    decoder = head.decoder.base
    tok, added = _tokenizer(task)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    text = decoder.config.to_dict()
    vocab = max(int(decoder.get_input_embeddings().weight.shape[0]), image_id + 1)
    text.update(vocab_size=vocab, tie_word_embeddings=False)
    vision = enc.model.config
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1  # the patches and the class token
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=text, image_token_id=image_id,
                         projector_hidden_act="gelu", vision_feature_layer=-1, vision_feature_select_strategy="full",
                         image_seq_length=tokens, multimodal_projector_bias=True, tie_word_embeddings=False)
    model = LlavaForConditionalGeneration(config).eval()
    # CLIPVisionModel and the vision tower of a whole CLIP checkpoint name the same tensors with
    # and without a "vision_model." prefix (as do transformers versions): take the target's names
    tower = {k.removeprefix("vision_model."): v for k, v in enc.model.state_dict().items()}
    if all(k.startswith("vision_model.") for k in model.model.vision_tower.state_dict()):
        tower = {"vision_model." + k: v for k, v in tower.items()}
    language = dict(decoder.base_model.state_dict())
    embed = decoder.get_input_embeddings().weight
    embed_key = next(k for k, v in decoder.base_model.named_parameters() if v is embed)
    language[embed_key] = _pad_rows(embed, vocab)
    lm_head = decoder.get_output_embeddings()
    if lm_head.bias is not None:
        raise UsageError(f"decoder {task.settings.decoder!r}: its output layer has a bias, which LLaVA's lm_head has not")
    net = head.connectors[next(iter(head.connectors))].net
    with torch.no_grad():
        model.model.vision_tower.load_state_dict(tower, strict=True)
        model.model.multi_modal_projector.linear_1.load_state_dict(net[0].state_dict())
        model.model.multi_modal_projector.linear_2.load_state_dict(net[2].state_dict())
        model.model.language_model.load_state_dict(language, strict=True)
        model.lm_head.weight.copy_(_pad_rows(lm_head.weight, vocab))
    eos = tok.eos_token_id
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=eos, pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos,
        suppress_tokens=[image_id], max_new_tokens=task.settings.max_new_tokens, do_sample=False)
    size = {"height": enc.image_size, "width": enc.image_size}
    images = CLIPImageProcessorPil(do_resize=True, size=size, resample=Image.BICUBIC, do_center_crop=False,
                                   crop_size=size, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                                   image_mean=list(enc.mean), image_std=list(enc.std), do_convert_rgb=True)
    processor = LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=vision.patch_size,
                               vision_feature_select_strategy="full", chat_template=chat_template(task, added),
                               image_token=IMAGE_TOKEN, num_additional_image_tokens=1)
    return model, processor


def _pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    extra = rows - weight.shape[0]
    return weight.detach().clone() if extra <= 0 else torch.cat([weight.detach(), weight.new_zeros(extra, weight.shape[1])])


def probe_rows(merged, size: int, seed: int = 0) -> tuple[list, ImageStore, str]:
    """Test rows of the bundle's data when reachable (its images and prompts), else random
    images with prompts of the task's words."""
    store = ImageStore.for_encoders(merged.model.encoders.values())
    try:
        test = recipe_splits(merged.recipe).test
        rows = random.Random(seed).sample(test, min(size, len(test)))
        store.check({"probe": rows}, "error")
        return rows, store, "bundle test data"
    except Exception:  # noqa: BLE001 - data not reachable here: synthetic probes
        gen = np.random.default_rng(seed)
        words = ["what", "is", "in", "the", "image", "describe", "?"]
        rows = []
        for i in range(size):
            path = f"<probe {i}>"
            store.put(path, Image.fromarray(gen.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
            rows.append(Sample(path, " ".join(gen.choice(words, size=5)), "", {}, path))
        return rows, store, "synthetic"


def user_messages(task, row) -> list[dict]:
    """The row's chat as a transformers user writes it for LLaVA: the image as a content part."""
    messages = task.messages(row)
    last = messages[-1]
    return messages[:-1] + [{"role": last.get("role", "user"),
                             "content": [{"type": "image"}, {"type": "text", "text": last["content"]}]}]


@torch.no_grad()
def compare(merged, name, model, processor, rows, store) -> dict:
    """Greedy tokens of the bundle and of the LLaVA model, row by row, and the largest
    difference of the first step's logits (over the decoder's own tokens)."""
    task = merged.tasks[name]
    task.decode_with(num_beams=1, do_sample=False, stop=[])
    head = merged.model.task_head(name)
    collator = Collator(rows, dict(merged.model.encoders.items()), merged.tasks, store)
    vocab = head.decoder.base.get_input_embeddings().weight.shape[0]
    equal, diff, lengths = 0, 0.0, []
    for i, row in enumerate(rows):
        inputs = collator([i])["inputs"]
        ours = merged.model(inputs)[name][0, : task.settings.max_new_tokens].long()
        ours = [t for t in ours.tolist() if t >= 0]
        outputs = merged.model.encode(inputs)
        prefix, mask = head.prefix(outputs)
        fed = inputs[TASK_INPUTS][name]
        embeds = torch.cat([prefix, head.decoder.embed(fed["prompt_ids"])], 1)
        first = head.decoder.model(inputs_embeds=embeds).logits[0, -1].float()
        prompt = processor.apply_chat_template([user_messages(task, row)], add_generation_prompt=True, tokenize=False)
        if isinstance(prompt, list):
            prompt = prompt[0]
        got = processor(images=store.get(row.image), text=prompt, return_tensors="pt")
        want_ids = [model.config.image_token_id] * model.config.image_seq_length + fed["prompt_ids"][0].tolist()
        if got["input_ids"][0].tolist() != want_ids:
            raise MMPeftError(f"LLaVA export check failed: the processor's prompt for {row.where} is not the bundle's "
                              "(its chat template or tokenizer differs); nothing was written")
        theirs_first = model(**got).logits[0, -1, :vocab].float()
        diff = max(diff, float((theirs_first - first).abs().max()))
        new = model.generate(**got, max_new_tokens=task.settings.max_new_tokens, do_sample=False, num_beams=1)
        theirs = new[0, got["input_ids"].shape[1]:].tolist()
        equal += theirs == ours
        lengths.append(len(ours))
    return {"rows": len(rows), "tokens_equal": equal, "max_abs_first_logit_diff": diff, "mean_new_tokens": float(np.mean(lengths))}


def export_llava(bundle, out: Path, *, overwrite: bool = False, tolerance: float = 1e-4, probe_size: int = 4,
                 allow_base_mismatch: bool = False) -> dict:
    """Merge the bundle, write ``out`` as a LLaVA checkpoint with its processor, load it back
    with plain transformers and compare its greedy output with the bundle's.

    Returns:
        The check (``rows``, ``tokens_equal``, ``max_abs_first_logit_diff``), the merge report
        and the probe's source. Raises :class:`MMPeftError` (nothing written) when they differ.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    out = Path(out)
    if out.exists() and not overwrite:
        raise UsageError(f"--out {out} already exists; pass --overwrite or choose another --out")
    # a decoder's logits run to tens: folding LoRA moves them by rounding more than a classifier's
    merged, report, _ = merge_in_memory(bundle, tolerance=tolerance, allow_base_mismatch=allow_base_mismatch)
    task, head, enc_name, enc = llava_parts(merged, report)
    model, processor = build_llava(task, head, enc)
    rows, store, source = probe_rows(merged, probe_size)
    with sealed_directory(out, "export.json", overwrite=overwrite) as sealing:
        model.save_pretrained(sealing.path, safe_serialization=True)
        processor.save_pretrained(sealing.path)
        loaded = LlavaForConditionalGeneration.from_pretrained(sealing.path).eval()
        check = compare(merged, task.name, loaded, AutoProcessor.from_pretrained(sealing.path), rows, store)
        check.update(probe=source, tolerance=tolerance)
        diff = check["max_abs_first_logit_diff"]
        if check["tokens_equal"] != check["rows"] or not math.isfinite(diff) or diff > tolerance:
            raise MMPeftError(f"LLaVA export check failed: {check['tokens_equal']} of {check['rows']} probe rows generated "
                              f"the same tokens, max |first-step logit diff| {diff:.3e} (tolerance {tolerance:.0e}); "
                              "nothing was written")
        (sealing.path / "README.md").write_text(model_card(task, enc_name, check), encoding="utf-8")
        sealing.manifest.update({"format": "mmpeft-llava-export", "check": check, "merge": report, "task": task.name,
                                 "vision_encoder": enc_name, "image_token_id": model.config.image_token_id})
    return {"check": check, "merge": report, "task": task.name, "vision_encoder": enc_name}


def model_card(task, enc_name: str, check: dict) -> str:
    return f"""# LLaVA export of an mmpeft bundle

Task `{task.name}` (decoder `{task.settings.decoder}`), vision tower from encoder `{enc_name}`, merged.
Checked when written: {check['tokens_equal']} of {check['rows']} probe rows ({check['probe']}) generated the same
greedy tokens as the bundle; max |first-step logit difference| {check['max_abs_first_logit_diff']:.2e}.

```python
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

model = LlavaForConditionalGeneration.from_pretrained("THIS_FOLDER")
processor = AutoProcessor.from_pretrained("THIS_FOLDER")
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "your prompt"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=Image.open("image.png"), text=prompt, return_tensors="pt")
print(processor.decode(model.generate(**inputs)[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

The image is resized to the tower's size with PIL's bicubic filter, as the bundle does (a torchvision
image processor resizes images of another size slightly differently). The `<image>` token was added for the
export; `generation_config.json` suppresses it, so it is never generated.
"""
