"""The generate task's head: connectors that turn encoder tokens into a prefix of the
decoder's input embeddings, and the decoder that reads [prefix | prompt | target].

- ``mlp``: LLaVA-1.5's projector, Linear -> GELU -> Linear on every encoder token (Liu et al.,
  "Improved Baselines with Visual Instruction Tuning", CVPR 2024).
- ``resampler``: a fixed number of learned queries cross-attending to the encoder's tokens,
  then a feed-forward block (the Perceiver Resampler of Flamingo, Alayrac et al. 2022; one
  layer, as BLIP-2's Q-Former reduces tokens to a fixed set, Li et al. 2023).

Training reads the logits of the positions that predict the text (teacher forcing); in
evaluation the head generates with transformers' own ``generate`` (greedy, beams or
sampling, KV cache, batched with left padding) and also returns each row's teacher-forced
negative log-likelihood, so validation reports a loss beside the generated text.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList


class MLPProjector(nn.Module):
    def __init__(self, width: int, out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, out), nn.GELU(), nn.Linear(out, out))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor):
        return self.net(tokens), mask


class Resampler(nn.Module):
    def __init__(self, width: int, out: int, queries: int):
        super().__init__()
        heads = next(h for h in (8, 4, 2, 1) if out % h == 0)
        self.inp = nn.Linear(width, out)
        self.queries = nn.Parameter(torch.randn(queries, out) * 0.02)
        self.norm_kv, self.norm_q = nn.LayerNorm(out), nn.LayerNorm(out)
        self.attn = nn.MultiheadAttention(out, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.LayerNorm(out), nn.Linear(out, 4 * out), nn.GELU(), nn.Linear(4 * out, out))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor):
        kv = self.norm_kv(self.inp(tokens))
        q = self.norm_q(self.queries).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        x = q + self.attn(q, kv, kv, key_padding_mask=~mask, need_weights=False)[0]
        x = x + self.ffn(x)
        return x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)


class NonFinite:
    """A logits processor that notes, per row, whether any step's scores held a NaN or inf
    (generation itself would go on and pick some token); it changes no score."""

    def __init__(self, rows: int):
        self.rows = torch.zeros(rows, dtype=torch.bool)

    def __call__(self, input_ids, scores):
        bad = ~torch.isfinite(scores).all(-1)
        self.rows |= bad.view(len(self.rows), -1).any(-1).cpu()  # beams: a row's beams side by side
        return scores


class StopStrings(StoppingCriteria):
    """A row is done once its decoded new text holds one of ``stops`` (the text is cut before it
    when decoded: :func:`cut_at_stop`, as OpenAI's API returns it)."""

    def __init__(self, tokenizer, stops):
        self.tokenizer, self.stops = tokenizer, list(stops)

    def __call__(self, input_ids, scores, **kwargs):
        texts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        return torch.tensor([any(stop in t for stop in self.stops) for t in texts], device=input_ids.device)


def cut_at_stop(text: str, stops) -> str:
    """``text`` up to the first stop string in it."""
    cuts = [text.find(stop) for stop in stops if stop in text]
    return text[: min(cuts)] if cuts else text


CONNECTORS = {"mlp": lambda width, out, s: MLPProjector(width, out),
              "resampler": lambda width, out, s: Resampler(width, out, s.queries)}


class GenerativeHead(nn.Module):
    """Connectors per encoder, then the (PEFT-adapted) decoder. The bundle stores the
    connectors and the decoder's trainable tensors only: the frozen decoder is rebuilt from
    its source (:meth:`state_dict` leaves it out, and loading does not miss it)."""

    def __init__(self, connectors: dict[str, nn.Module], decoder, method, settings):
        super().__init__()
        self.connectors = nn.ModuleDict(connectors)
        self.decoder = decoder
        self.method = method
        self.settings = settings
        self.register_load_state_dict_post_hook(_frozen_are_not_missing)

    # --- what the bundle keeps -------------------------------------------------------
    def stored_names(self) -> set[str]:
        names = {"connectors." + n for n in self.connectors.state_dict()}
        return names | {"decoder." + n for n, p in self.decoder.named_parameters() if p.requires_grad}

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        full = super().state_dict(prefix=prefix, keep_vars=keep_vars)
        out = destination if destination is not None else OrderedDict()
        keep = {prefix + n for n in self.stored_names()}
        out.update((k, v) for k, v in full.items() if k in keep)
        return out

    def train(self, mode: bool = True):
        super().train(mode)
        self.decoder.eval()  # frozen: dropout off; only the method's own modules follow mode
        if mode:
            for module in self.method.train_modules(self.decoder):
                module.train()
        return self

    # --- forward ---------------------------------------------------------------------
    def prefix(self, outputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.decoder.base.get_input_embeddings().weight.dtype
        parts, masks = [], []
        for name, connector in self.connectors.items():
            tokens, mask = connector(outputs[name].tokens.to(dtype), outputs[name].mask)
            parts.append(tokens)
            masks.append(mask)
        return torch.cat(parts, 1), torch.cat(masks, 1)

    def forward(self, outputs: dict, batch: dict) -> torch.Tensor:
        prefix, mask = self.prefix(outputs)
        if self.training:
            return self.teacher_logits(prefix, mask, batch["text_ids"], batch["text_mask"])
        generated, nonfinite = self.generate(prefix, mask, batch["prompt_ids"], batch["prompt_mask"])
        labels = batch["labels"]
        nll = torch.zeros(labels.shape[0], device=labels.device)
        nll[nonfinite.to(nll.device)] = float("nan")  # a NaN score: the row's output is marked, not trusted
        count = (labels != -100).sum(-1).float()
        if bool(count.any()):
            logits = self.teacher_logits(prefix, mask, batch["text_ids"], batch["text_mask"]).float()
            token = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
            nll = nll + token.sum(-1)
        return torch.cat([generated.float(), nll[:, None], count[:, None]], 1)

    def teacher_logits(self, prefix, mask, ids, text_mask) -> torch.Tensor:
        """Logits ``[B, L, V]`` of the positions that predict each of the ``L`` text tokens."""
        embeds = torch.cat([prefix, self.decoder.embed(ids)], 1)
        attention = torch.cat([mask, text_mask.bool()], 1).long()
        logits = self.decoder.model(inputs_embeds=embeds, attention_mask=attention).logits
        start = prefix.shape[1] - 1
        return logits[:, start: start + ids.shape[1]]

    @torch.no_grad()
    def generate(self, prefix, mask, prompt_ids, prompt_mask, streamer=None) -> tuple[torch.Tensor, torch.Tensor]:
        """New token ids ``[B, max_new_tokens]``, -1 after each row's end (its eos kept), and
        which rows had a NaN or inf among their scores at some step."""
        s, tokenizer = self.settings, self.decoder.tokenizer
        embeds = torch.cat([prefix, self.decoder.embed(prompt_ids)], 1)
        attention = torch.cat([mask, prompt_mask.bool()], 1)
        # left padding: every row's real positions moved to the right end, in their order
        order = attention.long().argsort(dim=1, stable=True)
        embeds = embeds.gather(1, order[..., None].expand_as(embeds))
        attention = attention.gather(1, order)
        eos = tokenizer.eos_token_id
        options = dict(max_new_tokens=s.max_new_tokens, num_beams=s.num_beams, do_sample=s.do_sample,
                       pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
                       eos_token_id=eos)
        if s.do_sample:
            options.update(temperature=s.temperature, top_p=s.top_p)
        if s.stop:  # our own criterion: transformers' stop_strings cannot map some tokenizers' vocabularies
            options["stopping_criteria"] = StoppingCriteriaList([StopStrings(tokenizer, s.stop)])
        watch = NonFinite(embeds.shape[0])
        new = self.decoder.base.generate(inputs_embeds=embeds, attention_mask=attention.long(),
                                         logits_processor=LogitsProcessorList([watch]), streamer=streamer, **options)
        out = torch.full((new.shape[0], s.max_new_tokens), -1, dtype=torch.long, device=new.device)
        ended = torch.zeros(new.shape[0], dtype=torch.bool, device=new.device)
        for i in range(new.shape[1]):  # at most max_new_tokens steps
            out[:, i] = torch.where(ended, -1, new[:, i])
            ended |= new[:, i] == eos
        return out, watch.rows


def _frozen_are_not_missing(module: GenerativeHead, incompatible) -> None:
    """The frozen decoder's tensors are not in a bundle (they come from the decoder's source)."""
    stored = module.stored_names()
    # tied weights (an lm_head that is the input embedding) under each of their names
    every = {"decoder." + n for n, _ in module.decoder.named_parameters(remove_duplicate=False)} | \
            {"decoder." + n for n, _ in module.decoder.named_buffers(remove_duplicate=False)}
    frozen = every - stored

    def is_frozen(key: str) -> bool:
        parts = key.split(".")
        return any(".".join(parts[i:]) in frozen for i in range(len(parts)))

    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not is_frozen(k)]
