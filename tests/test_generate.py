"""The generate task: tiny random decoders of three families (Llama, Qwen2, GPT-2) built
locally and loaded through the real loading code; identity at initialisation, the exact
trainable set, masked prompt positions, greedy batched == alone, save -> load identical,
resume, bad input, and the text metrics."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from mmpeft.cli import app
from mmpeft.config import TASK_SETTINGS, load_recipe
from mmpeft.data import recipe_splits
from mmpeft.data.batching import Collator, ImageStore
from mmpeft.model import build_model
from mmpeft.tasks import TASK_INPUTS, recipe_task_set
from mmpeft.tasks.generate import IGNORE
from mmpeft.tasks.text_metrics import caption_scores, normalize_text, text_metrics, token_scores
from tests import tiny
from tests.test_tasks import write_rows

FAMILIES = ["llama", "qwen2", "gpt2"]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return write_rows(tmp_path_factory.mktemp("gen_rows"))


def generate_recipe(assets, files, out, decoder="llama", epochs=2, **task):
    raw = tiny.recipe_dict(assets["bert"], assets["vit"], files, out, fusion="concat", epochs=epochs, batch_size=8,
                           lr=5e-3, head_lr=1e-2)
    raw["encoders"].pop("text")
    block = {"type": "generate", "decoder": str(assets[decoder]), "field": "caption", "prompt": "describe the image",
             "max_new_tokens": 5}
    block.update(task)
    raw["task"] = block
    return raw


def trained(assets, rows, tmp_path, decoder="llama", epochs=1, **task):
    """A bundle of the generate recipe trained through the CLI."""
    path = tmp_path / "trained.yaml"
    path.write_text(yaml.safe_dump(generate_recipe(assets, rows, tmp_path / "out", decoder, epochs, **task)))
    res = CliRunner().invoke(app, ["finetune", str(path)])
    assert res.exit_code == 0, res.output
    return tmp_path / "out" / "tiny"


def built(assets, rows, tmp_path, decoder="llama", **task):
    recipe = load_recipe(generate_recipe(assets, rows, tmp_path / "out", decoder, **task))
    splits = recipe_splits(recipe)
    tasks = recipe_task_set(recipe, splits.train)
    return recipe, splits, tasks, build_model(recipe, tasks)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapted_decoder_equals_its_base_at_init_and_only_lora_and_connector_train(family, assets, rows, tmp_path):
    from transformers import AutoModelForCausalLM

    _, splits, tasks, model = built(assets, rows, tmp_path, family)
    task, head = tasks["answer"], model.head
    trainable = {n for n, p in head.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith("connectors.") for n in trainable), trainable
    assert any(".lora_B." in n for n in trainable) and any(n.startswith("connectors.") for n in trainable)
    assert {n for n, p in model.encoders.named_parameters() if p.requires_grad} == \
        {n for n, p in model.encoders.named_parameters() if "lora_" in n}
    # identity: the adapted decoder's logits equal the plain base model's on the same embeddings
    plain = AutoModelForCausalLM.from_pretrained(str(assets[family])).eval()
    batch = task.inputs(splits.train[:4])
    embeds = plain.get_input_embeddings()(batch["text_ids"])
    want = plain(inputs_embeds=embeds, attention_mask=batch["text_mask"]).logits
    got = head.decoder.model(inputs_embeds=embeds, attention_mask=batch["text_mask"]).logits
    assert torch.equal(got, want)
    # the bundle keeps the connector and the decoder's trainable tensors, not the frozen decoder
    assert set(head.state_dict()) == {n for n, _ in head.connectors.named_parameters(prefix="connectors")} | \
        {n for n in trainable if n.startswith("decoder.")}


def test_prompt_and_padding_positions_carry_no_loss(assets, rows, tmp_path):
    _, splits, tasks, model = built(assets, rows, tmp_path)
    task = tasks["answer"]
    sample = splits.train[:3]
    batch = task.inputs(sample)
    for i, row in enumerate(sample):
        prompt, target = task.tokens(row)
        labels = batch["labels"][i]
        assert (labels[: len(prompt)] == IGNORE).all() and (labels[len(prompt) + len(target):] == IGNORE).all()
        assert labels[len(prompt): len(prompt) + len(target)].tolist() == target
        assert target[-1] == task.tokenizer.eos_token_id  # the eos is learned although it is also the pad id
    model.train()
    pixels = model.encoders["image"].batch("image", [r.image for r in sample], ImageStore())[0]
    out = model({"image": pixels, TASK_INPUTS: {"answer": batch}})["answer"]
    out.retain_grad()
    task.loss(out, batch["labels"]).backward()
    masked = batch["labels"] == IGNORE
    assert out.grad[masked].abs().sum() == 0 and out.grad[~masked].abs().sum() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_decoding_batched_equals_alone(family, assets, rows, tmp_path):
    _, splits, tasks, model = built(assets, rows, tmp_path, family, prompt="{}", prompt_field="text")
    with torch.no_grad():  # a trained-looking connector: random, so the prefix matters
        for p in model.head.connectors.parameters():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    sample = splits.test[:5]
    for i, row in enumerate(sample):  # questions of different lengths: left padding differs per row
        row.text = " ".join(["what"] * i + ["color", "?"])
    assert len({len(tasks["answer"].tokens(r)[0]) for r in sample}) > 1
    collator = Collator(sample, dict(model.encoders.items()), tasks, ImageStore())
    model.eval()
    with torch.no_grad():
        together = model(collator(list(range(5)))["inputs"])["answer"]
        alone = torch.cat([model(collator([i])["inputs"])["answer"] for i in range(5)])
    width = tasks["answer"].settings.max_new_tokens
    assert torch.equal(together[:, :width], alone[:, :width])
    assert torch.allclose(together[:, width:], alone[:, width:], rtol=1e-4, atol=1e-4)  # the NLL columns


def test_trains_saves_loads_identical_and_predicts_through_the_cli(assets, rows, tmp_path):
    path = tmp_path / "r.yaml"
    # qwen2: its lm_head is tied to the input embedding (as SmolLM2's is), so the bundle leaves out both names
    path.write_text(yaml.safe_dump(generate_recipe(assets, rows, tmp_path / "out", "qwen2", epochs=4)))
    runner = CliRunner()
    res = runner.invoke(app, ["finetune", str(path)])
    assert res.exit_code == 0, res.output
    bundle = tmp_path / "out" / "tiny"
    metrics = json.loads((bundle / "metrics.json").read_text())
    history = metrics["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert {"eval_exact_match", "eval_bleu4", "eval_cider", "eval_loss"} <= set(history[-1])
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["tasks"]["answer"]["state"]["decoder_fingerprint"].startswith("sha256:")
    assert (bundle / "head.safetensors").stat().st_size < 100_000  # connector + LoRA only, not the decoder
    res = runner.invoke(app, ["evaluate", str(bundle)])
    assert res.exit_code == 0 and "reproduced" in res.output, res.output
    # predict on a test image gives the text the test pass generated for that row
    example = metrics["tasks"]["answer"]["examples"][0]
    index = int(example["where"].rsplit(" ", 1)[-1]) - 1
    test_rows = [json.loads(line) for line in rows["test"].read_text().splitlines()]
    image = str(rows["test"].parent / test_rows[index]["image"])
    res = runner.invoke(app, ["predict", str(bundle), "--image", image, "--question", "anything"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["text"] == example["generated"]
    res = runner.invoke(app, ["export", str(bundle), "--out", str(tmp_path / "onnx")])
    assert res.exit_code == 2 and "token by token" in res.output and not (tmp_path / "onnx").exists()
    # merge folds the decoder's LoRA, verifies the generated tokens, and writes a plain transformers decoder
    res = runner.invoke(app, ["merge", str(bundle), "--out", str(tmp_path / "merged")])
    assert res.exit_code == 0 and "verified on" in res.output, res.output
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert report["folded"]["answer.decoder"] == "lora" and report["max_abs_logit_diff"] <= 1e-5
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged" / "heads" / "answer")).config.model_type == "qwen2"
    res = runner.invoke(app, ["predict", str(tmp_path / "merged"), "--image", image, "--question", "anything"])
    assert res.exit_code == 0 and json.loads(res.output.strip().splitlines()[-1])["text"] == example["generated"], res.output
    res = runner.invoke(app, ["evaluate", str(tmp_path / "merged")])
    assert res.exit_code == 0 and "reproduced" in res.output, res.output


def test_a_moved_decoder_is_refused_by_its_fingerprint(assets, rows, tmp_path):
    bundle = trained(assets, rows, tmp_path)
    runner = CliRunner()
    other = tiny.make_decoder(tmp_path / "other", "llama", chat=True, hidden=32)
    with torch.no_grad():
        from transformers import AutoModelForCausalLM

        changed = AutoModelForCausalLM.from_pretrained(str(other))
        changed.lm_head.weight.add_(0.01)
        changed.save_pretrained(other)
    res = runner.invoke(app, ["evaluate", str(bundle), f"task.decoder={other}"])
    assert res.exit_code == 2 and "fingerprint" in res.output and "Traceback" not in res.output, res.output


def test_bad_decoders_and_bad_rows_are_named(assets, rows, tmp_path):
    runner = CliRunner()
    garbage = tmp_path / "broken.gguf"
    garbage.write_bytes(b"GGUF" + b"\x00" * 64)
    cases = [({"decoder": str(assets["vit"])}, "not a causal language model"),
             ({"decoder": str(assets["bert"])}, "no end-of-sequence token"),
             ({"decoder": str(garbage)}, "broken.gguf"),
             ({"decoder": str(tmp_path / "missing.gguf")}, "GGUF file not found"),
             ({"max_prompt_tokens": 2}, "max_prompt_tokens 2"),
             ({"max_target_tokens": 1}, "max_target_tokens 1"),
             ({"decoder_peft": {"method": "prompt"}}, "does not apply to a decoder"),
             ({"decoder_peft": {"method": "lora", "rnak": 4}}, "rnak")]
    for i, (block, message) in enumerate(cases):
        raw = generate_recipe(assets, rows, tmp_path / f"out{i}")
        raw["task"].update(block)
        path = tmp_path / f"r{i}.yaml"
        path.write_text(yaml.safe_dump(raw))
        res = runner.invoke(app, ["finetune", str(path), "--dry-run"])
        assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, (block, res.output)
    empty = tmp_path / "empty"
    files = write_rows(empty)
    lines = files["train"].read_text().splitlines()
    first = json.loads(lines[0])
    first["caption"] = "   "
    files["train"].write_text("\n".join([json.dumps(first)] + lines[1:]) + "\n")
    raw = generate_recipe(assets, files, tmp_path / "oute")
    path = tmp_path / "re.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = runner.invoke(app, ["finetune", str(path), "--dry-run"])
    assert res.exit_code == 2 and "row 1" in res.output and "empty" in res.output, res.output


def test_text_metrics_follow_squad_and_coco():
    assert normalize_text("The  Red, circle!") == "red circle"
    f1, recall = token_scores("a red big circle", "the red circle")
    assert recall == 1.0 and f1 == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert token_scores("", "") == (1.0, 1.0) and token_scores("blue", "red") == (0.0, 0.0)
    perfect = caption_scores(["a red circle here", "a blue square there"], ["a red circle here", "a blue square there"])
    assert perfect["bleu4"] == pytest.approx(1.0, abs=1e-6) and perfect["rouge_l"] == pytest.approx(1.0)
    # CIDEr-D of a caption set, against the reference implementation's own computation
    from pycocoevalcap.cider.cider import Cider

    preds, refs = ["a red circle", "a green square", "blue"], ["a red circle", "a blue square", "a blue circle"]
    want, _ = Cider().compute_score({i: [r] for i, r in enumerate(refs)}, {i: [p] for i, p in enumerate(preds)})
    got = text_metrics(preds, refs, {"kind": ["circle", "square", "circle"]})
    assert got["cider"] == pytest.approx(want) and got["exact_match"] == pytest.approx(1 / 3)
    assert got["groups"]["kind"] == {"circle": {"exact_match": 0.5, "count": 2}, "square": {"exact_match": 0.0, "count": 1}}


def test_generate_settings_are_checked_with_the_recipe():
    settings = TASK_SETTINGS.get("generate")
    assert settings().metric == "exact_match"
    assert settings(prompt="{} and {}").problems("task")
    assert settings(num_beams=2, do_sample=True).problems("task")


def test_killed_and_resumed_equals_uninterrupted(assets, rows, tmp_path):
    from tests.test_resume import assert_same, finetune_here, kill_and_resume

    raw = generate_recipe(assets, rows, tmp_path / "unused", epochs=3)
    raw["encoders"]["image"]["peft"] = {"method": "bitfit"}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = finetune_here(path, tmp_path / "ref")
    assert res.exit_code == 0, res.output
    kill_and_resume(path, tmp_path / "killed", ["train.step#3", "eval#1", "train.step#4", "test"])
    assert_same(tmp_path / "ref" / "tiny", tmp_path / "killed" / "tiny")


def test_a_caption_shares_its_encoders_with_a_vqa_head(assets, rows, tmp_path):
    """CoCa-style: a generate task and another task over shared encoders, each with its loss."""
    raw = generate_recipe(assets, rows, tmp_path / "out")
    raw["encoders"]["text"] = {"model": str(assets["bert"]), "max_length": 16, "peft": {"method": "lora"}}
    caption = dict(raw.pop("task"), encoders=["image"], weight=0.5)
    raw["tasks"] = {"answer": {"type": "vqa"}, "caption": caption}
    path = tmp_path / "multi.yaml"
    path.write_text(yaml.safe_dump(raw))
    runner = CliRunner()
    res = runner.invoke(app, ["finetune", str(path)])
    assert res.exit_code == 0, res.output
    bundle = tmp_path / "out" / "tiny"
    metrics = json.loads((bundle / "metrics.json").read_text())
    assert {"eval_answer.accuracy", "eval_caption.exact_match", "train_loss.caption"} <= set(metrics["history"][-1])
    res = runner.invoke(app, ["evaluate", str(bundle)])
    assert res.exit_code == 0 and "reproduced" in res.output, res.output
    image = str(rows["test"].parent / "images/test_0.png")
    res = runner.invoke(app, ["predict", str(bundle), "--image", image, "--question", "a red square"])
    assert res.exit_code == 0 and '"text"' in res.output and "caption" in res.output, res.output


def test_a_4bit_decoder_trains_its_lora_and_reproduces(assets, rows, tmp_path):
    """QLoRA on the decoder: NF4 Linear layers (the output layer kept full precision), LoRA on top."""
    decoder = tiny.make_decoder(tmp_path / "llama64", "llama", hidden=64)  # bitsandbytes' CPU kernels need width >= 64
    raw = generate_recipe(assets, rows, tmp_path / "out", epochs=2, decoder_quantization={"bits": 4})
    raw["task"]["decoder"] = str(decoder)
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump(raw))
    runner = CliRunner()
    res = runner.invoke(app, ["finetune", str(path)])
    assert res.exit_code == 0, res.output
    assert "14 Linear layers 4-bit" in res.output  # 2 layers x (q, k, v, o, gate, up, down); lm_head stays
    bundle = tmp_path / "out" / "tiny"
    history = json.loads((bundle / "metrics.json").read_text())["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    res = runner.invoke(app, ["evaluate", str(bundle)])
    assert res.exit_code == 0 and "reproduced" in res.output, res.output
    raw["task"]["decoder_peft"] = {"method": "full"}
    path.write_text(yaml.safe_dump(raw))
    res = runner.invoke(app, ["finetune", str(path), "--dry-run"])
    assert res.exit_code == 2 and "cannot be done on a 4/8-bit quantized base" in res.output, res.output
    assert "choose bitfit, boft, ia3, ln_tuning, lora, none, oft or vera" in res.output, res.output


def test_nan_scores_and_a_failing_chat_template_are_refused(assets, rows, tmp_path):
    bundle = trained(assets, rows, tmp_path)
    runner = CliRunner()
    path = tmp_path / "r.yaml"
    from mmpeft.inference import Predictor

    predictor = Predictor(bundle)
    with torch.no_grad():
        predictor.model.head.decoder.base.lm_head.weight[3] = float("nan")  # one token's score NaN at every step
    image = str(rows["test"].parent / "images/test_0.png")
    from mmpeft.errors import MMPeftError

    with pytest.raises(MMPeftError, match="answered NaN"):
        predictor.predict([image], ["x"])
    broken = tiny.make_decoder(tmp_path / "broken_template", "llama", chat=True)
    config = json.loads((broken / "tokenizer_config.json").read_text())
    (broken / "chat_template.jinja").write_text("{{ raise_exception('no system role here') }}")
    config.pop("chat_template", None)
    (broken / "tokenizer_config.json").write_text(json.dumps(config))
    raw = generate_recipe(assets, rows, tmp_path / "out2")
    raw["task"]["decoder"] = str(broken)
    path.write_text(yaml.safe_dump(raw))
    res = runner.invoke(app, ["finetune", str(path), "--dry-run"])
    assert res.exit_code == 2 and "chat template" in res.output and "no system role here" in res.output, res.output


def _conversations(directory, rows_file, fmt):
    """The manifest's rows as two-turn conversations in LLaVA's (json) or ShareGPT's (jsonl) format."""
    out = []
    for line in rows_file.read_text().splitlines():
        r = json.loads(line)
        image = str(rows_file.parent / r["image"])
        first, second = ("<image>\nwhat color is the shape ?", r["answer"]), ("what shape is it ?", r["kind"])
        if fmt == "llava":
            out.append({"image": image, "conversations": [
                {"from": "human", "value": first[0]}, {"from": "gpt", "value": first[1]},
                {"from": "human", "value": second[0]}, {"from": "gpt", "value": second[1]}]})
        else:
            out.append({"images": [image], "messages": [
                {"role": "user", "content": first[0]}, {"role": "assistant", "content": first[1]},
                {"role": "user", "content": second[0]}, {"role": "assistant", "content": second[1]}]})
    path = directory / f"{rows_file.stem}.{'json' if fmt == 'llava' else 'jsonl'}"
    path.write_text(json.dumps(out) if fmt == "llava" else "\n".join(map(json.dumps, out)) + "\n")
    return path


@pytest.mark.parametrize("fmt", ["llava", "sharegpt"])
def test_conversation_manifests_train_one_row_per_reply_with_its_history(fmt, assets, rows, tmp_path):
    files = {split: _conversations(tmp_path, rows[split], fmt) for split in ("train", "test")}
    raw = generate_recipe(assets, rows, tmp_path / "out", prompt="{}", field="reply")
    raw["data"] = {"source": "conversations", "train": str(files["train"]), "test": str(files["test"]), "eval_fraction": 0.25}
    recipe = load_recipe(raw)
    splits = recipe_splits(recipe)
    assert len(splits.train) + len(splits.eval) == 2 * 48 and len(splits.test) == 2 * 24  # two replies a record
    tasks = recipe_task_set(recipe, splits.train)
    task = tasks["answer"]
    second = next(r for r in splits.test if r.text == "what shape is it ?")
    assert second.extra["messages"] == [{"role": "user", "content": "what color is the shape ?"},
                                        {"role": "assistant", "content": second.extra["messages"][1]["content"]}]
    history = task.tokenizer.apply_chat_template(task.messages(second), tokenize=False, add_generation_prompt=True)
    assert history.count("<|user|>") == 2 and history.count("<|assistant|>") == 2  # the earlier turns come first
    assert history.index("what color is the shape ?") < history.index("what shape is it ?")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(app, ["finetune", str(path)])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["evaluate", str(tmp_path / "out" / "tiny")])
    assert res.exit_code == 0 and "reproduced" in res.output, res.output


def test_broken_conversation_records_are_named(assets, rows, tmp_path):
    cases = [([{"image": "x.png"}], "record 1: no 'conversations'"),
             ([{"conversations": [{"from": "gpt", "value": "hi"}]}], "record 1, turn 1: an assistant turn follows"),
             ([{"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]}], "record 1, turn 2"),
             ([{"conversations": [{"from": "human", "value": "q"}]}], "no assistant turn"),
             ({"not": "a list"}, "expected a list")]
    for i, (content, message) in enumerate(cases):
        bad = tmp_path / f"bad{i}.json"
        bad.write_text(json.dumps(content))
        raw = generate_recipe(assets, rows, tmp_path / "out")
        raw["data"] = {"source": "conversations", "train": str(bad), "test": str(bad)}
        path = tmp_path / f"c{i}.yaml"
        path.write_text(yaml.safe_dump(raw))
        res = CliRunner().invoke(app, ["finetune", str(path), "--dry-run"])
        assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, (content, res.output)


def test_plain_peft_loads_the_decoders_lora_with_identical_logits(assets, rows, tmp_path):
    """The bundle's heads/<task>/adapter is peft's own format: a process that never imports mmpeft
    loads it onto the plain decoder with transformers + peft and gets the same logits."""
    import subprocess
    import sys

    bundle = trained(assets, rows, tmp_path, "gpt2")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["head_files"]["answer"] == ["heads/answer/adapter/adapter_config.json",
                                                "heads/answer/adapter/adapter_model.safetensors"]
    ids = [[3, 5, 8, 9, 2, 11]]
    script = f"""
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained({str(assets['gpt2'])!r})
model = PeftModel.from_pretrained(base, {str(bundle / 'heads/answer/adapter')!r}).eval()
with torch.no_grad():
    logits = model(input_ids=torch.tensor({ids})).logits
assert "mmpeft" not in sys.modules
print(json.dumps(logits.flatten().tolist()))
"""
    plain = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr[-2000:]
    from mmpeft.inference import Predictor

    head = Predictor(bundle).model.head
    with torch.no_grad():
        ours = head.decoder.model(input_ids=torch.tensor(ids)).logits.flatten()
    lora_b = [v for k, v in head.state_dict().items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # trained: the adapter changes the logits
    assert torch.allclose(torch.tensor(json.loads(plain.stdout.strip().splitlines()[-1])), ours, atol=1e-6)


def test_predict_streams_the_same_text_and_takes_decoding_options(assets, rows, tmp_path):
    bundle = trained(assets, rows, tmp_path, epochs=2, prompt="describe: {}")
    runner = CliRunner()
    image = str(rows["test"].parent / "images/test_0.png")
    from mmpeft.inference import Predictor

    predictor = Predictor(bundle)
    assert predictor.reads == ["image", "text"]  # the prompt is filled from the question
    pieces = []
    predictor.stream(image, "what color is the shape ?", pieces.append)
    whole = predictor.predict([image], ["what color is the shape ?"])[0]["text"]
    assert "".join(pieces) == whole and len(pieces) >= 1
    words = whole.split()
    # a stop string ends the generation and the text is cut before it (as OpenAI's API does): " <second word>"
    # first occurs right after the first word
    assert len(words) > 1, whole
    stopping = Predictor(bundle)
    stopping.decode_with(stop=[" " + words[1]])
    assert stopping.predict([image], ["what color is the shape ?"])[0]["text"] == words[0]
    pieces = []
    stopping.stream(image, "what color is the shape ?", pieces.append)
    assert "".join(pieces) == words[0]
    res = runner.invoke(app, ["predict", str(bundle), "--image", image, "--prompt", "what color is the shape ?",
                              "--max-new-tokens", "2"])
    assert res.exit_code == 0, res.output
    short = json.loads(res.output.strip().splitlines()[-1])["text"]
    assert len(short.split()) <= 2 and whole.startswith(short)  # greedy: the first two tokens of the longer answer
    res = runner.invoke(app, ["predict", str(bundle), "--image", image, "--prompt", "x", "--num-beams", "2",
                              "--temperature", "0.7"])
    assert res.exit_code == 2 and "exclude each other" in res.output, res.output
    res = runner.invoke(app, ["predict", str(bundle), "--image", image, "--prompt", "x", "--temperature", "0.7"])
    assert res.exit_code == 0 and '"text"' in res.output, res.output


def test_a_resampler_connector_with_beam_search_trains_and_reproduces(assets, rows, tmp_path):
    """The second connector (a fixed number of learned queries) and beam search decoding."""
    _, _, tasks, model = built(assets, rows, tmp_path, connector="resampler", queries=3, num_beams=2)
    prefix, mask = model.head.prefix({"image": model.encoders["image"](
        model.encoders["image"].batch("image", [r.image for r in recipe_splits(
            load_recipe(generate_recipe(assets, rows, tmp_path / "o"))).test[:2]], ImageStore())[0])})
    assert prefix.shape[:2] == (2, 3) and bool(mask.all())  # 3 prefix tokens a row, whatever the image's token count
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(generate_recipe(assets, rows, tmp_path / "out", epochs=1, connector="resampler",
                                                   queries=3, num_beams=2)))
    runner = CliRunner()
    res = runner.invoke(app, ["finetune", str(path)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["evaluate", str(tmp_path / "out" / "tiny")])
    assert res.exit_code == 0 and "reproduced" in res.output, res.output


def test_free_form_easy_vqa_answers_are_a_generate_recipe_over_the_builtin_source(assets, tmp_path):
    """Built-in data needs nothing new: easy-VQA's questions as prompts, its answers as targets."""
    raw = generate_recipe(assets, {"train": "unused", "test": "unused"}, tmp_path / "out", prompt="Question: {} Answer:")
    raw["task"].pop("field")
    raw["data"] = {"source": "easy_vqa", "max_train_samples": 64, "max_eval_samples": 16, "max_test_samples": 16}
    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(app, ["finetune", str(path), "--dry-run"])
    assert res.exit_code == 0 and "rows train/eval/test 64/16/16" in res.output, res.output
    recipe = load_recipe(raw)
    splits = recipe_splits(recipe)
    task = recipe_task_set(recipe, splits.train)["answer"]
    row = splits.test[0]
    assert task.prompt_text(row) == f"Question: {row.text} Answer:" and task.target(row) == row.answer


def _decoder_methods():
    from mmpeft.methods import METHODS

    # lora: the tests above; none / full / bitfit: no method modules of their own to check here
    return [m for m in METHODS.names() if METHODS.get(m).for_decoder and m not in ("lora", "none", "full", "bitfit")]


@pytest.mark.parametrize("method", _decoder_methods())
def test_every_decoder_method_starts_at_its_base_reloads_and_merges(method, assets, rows, tmp_path):
    """Each peft tuner a decoder takes: equal to the plain decoder at init, only its own tensors
    (and the connector) train, save -> load gives identical logits, merge verifies."""
    from transformers import AutoModelForCausalLM

    from mmpeft.bundle.io import load_bundle
    from mmpeft.bundle.merge import merge_bundle
    from mmpeft.bundle.writer import write_bundle

    recipe, splits, tasks, model = built(assets, rows, tmp_path, decoder_peft={"method": method})
    task, head = tasks["answer"], model.head
    plain = AutoModelForCausalLM.from_pretrained(str(assets["llama"])).eval()
    batch = task.inputs(splits.train[:4])
    embeds = plain.get_input_embeddings()(batch["text_ids"])
    want = plain(inputs_embeds=embeds, attention_mask=batch["text_mask"]).logits
    assert torch.allclose(head.decoder.model(inputs_embeds=embeds, attention_mask=batch["text_mask"]).logits, want, atol=1e-5)
    decoder_trainable = {n for n, p in head.decoder.named_parameters() if p.requires_grad}
    assert decoder_trainable and not any(".lora_" in n for n in decoder_trainable)
    with torch.no_grad():  # a trained-looking adapter, so equality below is not that of two identities
        for p in head.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.05)
    adapted = head.decoder.model(inputs_embeds=embeds, attention_mask=batch["text_mask"]).logits
    assert not torch.allclose(adapted, want, atol=1e-4)
    bundle = tmp_path / "bundle"
    write_bundle(bundle, model, recipe, tasks, {"test": {}})
    again = load_bundle(bundle).model.head.decoder.model(inputs_embeds=embeds, attention_mask=batch["text_mask"]).logits
    assert torch.equal(again, adapted)
    report = merge_bundle(bundle, tmp_path / "merged", tolerance=1e-4)
    assert report["max_abs_logit_diff"] <= 1e-4


def test_a_decoder_method_that_cannot_adapt_the_decoder_is_refused(assets, rows, tmp_path):
    from mmpeft.errors import RecipeError

    # GPT-2 keeps its projections in transformers' Conv1D, which peft's OFT does not wrap
    with pytest.raises(RecipeError, match=r"tasks.answer.decoder_peft: oft is not available for gpt2 models: none of the \d+ "
                                          r"target layers is one it adapts"):
        built(assets, rows, tmp_path, "gpt2", decoder_peft={"method": "oft"})
