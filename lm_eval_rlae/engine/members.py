"""Ensemble members: loading, devices, and the KV-cached forward pass.

A member is loaded through lm-eval's own `HFLM`, so hub ids, local paths, GGUF files, peft
adapters, dtypes and `trust_remote_code` behave exactly as with `--model hf`, and the member's
tokenization of a request is the one `--model hf` would use. On top of it, `MemberStream` keeps a
batch of KV caches for incremental decoding.
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass, field

import torch

from lm_eval_rlae.engine.cpu_linear import use_narrow_linears
from lm_eval_rlae.engine.vocab import MemberVocab

logger = logging.getLogger(__name__)


@dataclass
class MemberSpec:
    """How to load one member. Extra keys go to lm-eval's HFLM (e.g. peft, revision, max_length)."""

    pretrained: str
    device: str | None = None
    dtype: str = "auto"
    gguf_file: str | None = None
    trust_remote_code: bool = False
    extra: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, entry, defaults: dict) -> MemberSpec:
        """entry: a model name / path / path to a .gguf file, or a dict with `pretrained` and per-member options."""
        options = dict(defaults)
        if isinstance(entry, dict):
            options |= entry
        else:
            options["pretrained"] = str(entry).strip().strip("'\"")
        pretrained = options.get("pretrained")
        if pretrained and pretrained.endswith(".gguf") and os.path.isfile(pretrained) and not options.get("gguf_file"):
            options["pretrained"], options["gguf_file"] = os.path.split(os.path.abspath(pretrained))  # a path to a GGUF file
        if not options.get("pretrained"):
            raise ValueError(f"member {entry!r} has no model: give a hub id, a local path, a preset name or a dict with 'pretrained'")
        known = {k: options.pop(k) for k in ("pretrained", "device", "dtype", "gguf_file", "trust_remote_code") if k in options}
        return cls(**known, extra=options)


def resolve_device(device: str | None) -> str:
    """No device: the GPU if there is one. The harness passes `cuda`/`cuda:0` by default; fall back
    to CPU where there is no GPU."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("device %r requested but CUDA is not available; using cpu", device)
        return "cpu"
    return device


class Member:
    """One causal LM of the ensemble, loaded through lm-eval's HFLM."""

    def __init__(self, spec: MemberSpec):
        from lm_eval.models.huggingface import HFLM

        from lm_eval_rlae.offline.presets import damaged_weights, rebuild_command, resolve_preset, specialist_adapter

        self.name = spec.pretrained
        cached = resolve_preset(spec.pretrained)  # a preset's directory; raises, saying how to rebuild it, if damaged
        pretrained = cached or spec.pretrained
        adapter = specialist_adapter(spec.pretrained)  # a specialist preset: base + its LoRA
        extra = spec.extra if adapter is None else {"peft": adapter} | spec.extra
        if cached:
            fix = f"Rebuild the preset's cache: {rebuild_command(self.name)}"
        else:
            fix = "Download it again, or convert it again, into that directory."
            if os.path.isdir(pretrained) and (damage := damaged_weights(pretrained)):
                raise ValueError(f"could not load member {self.name!r}: {damage}. {fix}")
        try:
            self.lm = HFLM(
                pretrained=pretrained,
                device=resolve_device(spec.device),
                dtype=spec.dtype,
                gguf_file=spec.gguf_file,
                trust_remote_code=spec.trust_remote_code,
                batch_size=1,
                **extra,
            )
        except (OSError, ValueError, EnvironmentError) as error:
            from lm_eval_rlae.offline.presets import preset_names

            if os.path.isdir(pretrained):  # it exists: the files in it are at fault
                raise ValueError(f"could not load member {self.name!r} from {pretrained}: {str(error).rstrip('.')}. {fix}") from error
            raise ValueError(
                f"could not load member {spec.pretrained!r}: it is not a preset ({', '.join(sorted(preset_names()))}), "
                f"not a local model directory, and could not be fetched as a Hugging Face hub id "
                f"(offline, or no such model). Fix the name or path in `members=[...]`. Cause: {error}"
            ) from error
        if self.lm.backend != "causal":
            raise ValueError(f"member {self.name!r} is a {self.lm.backend} model; rlae ensembles causal (decoder-only) LMs only")
        if hasattr(self.lm.model, "merge_and_unload"):
            # A peft adapter is only evaluated here: merged once into the base weights, it is the same
            # function without LoRA's extra matmuls in every layer (about 40% of a CPU decode step).
            self.lm._model = self.lm.model.merge_and_unload()
        self.model = self.lm.model
        self.tokenizer = self.lm.tokenizer
        self.device = self.lm.device
        if torch.device(self.device).type == "cpu":
            use_narrow_linears(self.model)  # a decoding forward at full memory bandwidth (engine/cpu_linear.py)
        generation_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        generation_eos = generation_eos if isinstance(generation_eos, list) else [generation_eos]
        self.vocab = MemberVocab.from_tokenizer(
            self.tokenizer, vocab_size=self.model.get_output_embeddings().weight.shape[0], eos_ids=generation_eos
        )
        # transformers 5.24 renamed forward's `past_key_values` to `cache` (the old name warns, and goes in 5.40)
        self._cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    @property
    def max_length(self) -> int:
        return self.lm.max_length

    @property
    def sliding_window(self) -> int | None:
        """The window of the model's sliding-window attention layers, where it has them beside full ones
        (Gemma 2 / 3); None otherwise."""
        config = self.model.config.get_text_config()
        types = set(getattr(config, "layer_types", None) or [])
        window = getattr(config, "sliding_window", None)
        return window if window and "sliding_attention" in types and types <= {"sliding_attention", "full_attention"} else None

    @torch.no_grad()
    def forward(self, input_ids, attention_mask, position_ids, keep, cache=None, hidden=False, targets=None, slot_positions=None):
        """One forward pass; logits only at `keep` positions ([B, K] indices into the chunk).

        targets [B, T]: the id each input position predicts (-1 where none); with them, also each
        row's summed negative log-likelihood of its targets (a prompt's perplexity, from the same pass).
        slot_positions [B, S]: the position of every cache slot, past and new (S = the mask's width);
        with them, sliding-window layers attend to each row's last `sliding_window` tokens whatever
        masked slots lie between them (the cache must then keep every slot: a `DynamicCache()`).
        Returns (logits [B, K, V] float32, hidden [B, K, H] or None, cache, nll [B] or None).
        """
        # Inputs go to the device before the forward is launched: a host-to-device copy after it would
        # wait for it, and members on separate devices would no longer overlap (see MemberStream.feed).
        keep = keep.to(self.device)
        input_ids, attention_mask, position_ids = (t.to(self.device) for t in (input_ids, attention_mask, position_ids))
        if slot_positions is not None:
            attention_mask = self._window_masks(input_ids, attention_mask, position_ids, slot_positions.to(self.device), cache)
        # The final hidden states, when asked for, are the decoder's own output, caught on the way
        # to the head: output_hidden_states would keep every layer's [B, T, H] to return the last.
        caught = {}
        hook = None
        if hidden or targets is not None:
            hook = self.model.get_decoder().register_forward_hook(lambda _, __, output: caught.update(last=output.last_hidden_state))
        try:
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=cache is not None,
                logits_to_keep=keep,
                **{self._cache_arg: cache},
            )
        finally:
            if hook is not None:
                hook.remove()
        states = nll = None
        if caught:
            last = caught["last"]  # [B, T, H] after the final norm
            kept = torch.gather(last, 1, keep[..., None].expand(-1, -1, last.shape[-1]))  # [B, K, H]
            states = kept.float() if hidden else None
            if targets is not None:
                nll = self._nll(last, targets.to(last.device), kept, out.logits)
        return out.logits.float(), states, cache, nll  # the cache is updated in place

    def _window_masks(self, input_ids, attention_mask, position_ids, slot_positions, cache) -> dict:
        """The model's attention masks per layer type, its sliding window counted in each row's own
        tokens (positions) rather than in cache slots. The full-attention mask is transformers' own;
        the sliding one, for sdpa and eager attention, is the same boolean mask built here in a few
        tensor ops: transformers builds a mask with an extra condition through vmap, element by element
        (16 ms of a 110 ms plain-pair step on 2 cores). Other attention implementations take that route."""
        from transformers.masking_utils import create_causal_mask

        config = self.model.config.get_text_config()
        window = config.sliding_window
        shape = torch.empty(*input_ids.shape, 0, dtype=self.model.dtype, device=self.device)  # [B, W, 0]: sizes and dtype only
        common = dict(config=config, inputs_embeds=shape, attention_mask=attention_mask, cache=cache, position_ids=position_ids)
        implementation = config._attn_implementation
        if implementation not in ("sdpa", "eager"):

            def in_window(batch_idx, head_idx, q_idx, kv_idx):
                return slot_positions[batch_idx, kv_idx] > slot_positions[batch_idx, q_idx] - window

            return {"full_attention": create_causal_mask(**common), "sliding_attention": create_causal_mask(**common, and_mask_function=in_window)}
        slots, new = attention_mask.shape[1], input_ids.shape[1]  # S cache slots, past and new; W new
        kv = torch.arange(slots, device=self.device)
        causal = kv[None, :] <= kv[slots - new :, None]  # [W, S]: a query's slot and the slots before it
        in_window = slot_positions[:, None, :] > slot_positions[:, slots - new :, None] - window  # [B, W, S]
        sliding = (attention_mask.bool()[:, None, :] & causal & in_window)[:, None]  # [B, 1, W, S]
        if implementation == "eager":  # as transformers' eager_mask: 0 where attended, the dtype's minimum elsewhere
            sliding = torch.where(sliding, torch.zeros((), dtype=self.model.dtype, device=self.device), torch.finfo(self.model.dtype).min)
        return {"full_attention": create_causal_mask(**common), "sliding_attention": sliding}

    def _nll(self, last, targets, kept, logits) -> torch.Tensor:
        """[B] summed -log p(target) from the final hidden states [B, T, H], through the output head a
        few positions at a time: every position's logits at once would be [B, T, V]."""
        head = self.model.get_output_embeddings()
        cap = getattr(self.model.config, "final_logit_softcapping", None)  # Gemma 2 / 3

        def project(hidden):
            z = head(hidden).float()
            return z if cap is None else torch.tanh(z / cap) * cap

        if not torch.allclose(project(kept), logits.float(), rtol=1e-3, atol=1e-3):
            raise ValueError(
                f"member {self.name!r} computes its logits beyond its output head (a logit scale of its architecture): "
                "prompt perplexities cannot be read off its forward pass; use weights=uniform, fixed weights or an agent"
            )
        batch, length, _ = last.shape
        chunk = max(1, 2**26 // (batch * head.weight.shape[0]))  # positions per chunk: at most 256 MiB of logits
        nll = torch.zeros(batch, device=last.device)
        for start in range(0, length, chunk):
            part = targets[:, start : start + chunk]  # [B, c]
            logprobs = project(last[:, start : start + chunk]).log_softmax(-1).gather(-1, part.clamp(min=0)[..., None])[..., 0]
            nll -= (logprobs * (part >= 0)).sum(-1)
        return nll


class MemberStream:
    """A member's batch of KV caches, fed only new ids at each step.

    Rows may be fed different numbers of ids per step (left-padded, masked), and may take back
    their last ids (masked out rather than cropped, so other rows keep their caches; slots masked in
    every row at the end are cropped). Positions are tracked per row, so a masked slot never shifts
    a row's positions.

    Sliding-window layers (Gemma 2/3) of transformers' cache count slots, not a row's tokens, and
    keep only the last `window` slots. Every feed is right-justified, so after the prompts every row
    ends in the same slot, as in hf's left-padded batches: a member fed only its own tokens, one per
    step, is exact at any batch size. Where masked slots can arise inside rows (several members: a
    re-encoded word taken back for its canonical tokens, rows fed different numbers of ids in one
    step, a draft taken back), `exact_windows` keeps every slot and counts the window in each row's
    own tokens instead (`Member.forward`'s slot positions), so it holds exactly its last `window`
    tokens whatever the slots between them.
    """

    def __init__(self, member: Member, batch: int, hidden: bool = False, prompt_perplexity: bool = False, exact_windows: bool = False):
        self.member = member
        self.hidden = hidden
        self.prompt_perplexity = prompt_perplexity
        self.exact_windows = exact_windows and member.sliding_window is not None
        self.cache = None
        self.mask = torch.zeros(batch, 0, dtype=torch.long)  # [B, T] over cache slots
        self.positions = torch.zeros(batch, 0, dtype=torch.long)  # [B, T] position of each slot (exact windows)
        self.next_pos = torch.zeros(batch, dtype=torch.long)  # [B] position of the next real token
        self.slots: list[list[int]] = [[] for _ in range(batch)]  # cache slot of every live token
        self.ids: list[list[int]] = [[] for _ in range(batch)]  # the live tokens themselves
        self.logprobs: torch.Tensor | None = None  # [B, V] next-token log-probs of each row
        self.states: torch.Tensor | None = None  # [B, H] final hidden state at each row's last token
        self.prompt_logppl: torch.Tensor | None = None  # [B] log-perplexity of the first ids fed (the prompt)

    def take_back(self, row: int, n: int) -> None:
        """Forget the last n ids fed to `row` (its next-token distribution is the caller's to restore)."""
        if n:
            gone = self.slots[row][-n:]
            del self.slots[row][-n:]
            del self.ids[row][-n:]
            self.mask[row, gone] = 0
            self.next_pos[row] -= n

    def feed(self, ids_per_row: list[list[int]], read: list[list[int]] | None = None):
        """Append ids to each row's cache and refresh the next-token distribution of fed rows.

        read: per row, offsets into its new ids after which to return the next-token log-probs (and
        final hidden states) too, -1 for the distribution before them: ([B, K, V], [B, K, H] or None),
        K the longest list, shorter lists repeating their last offset. One forward gives a draft's
        distributions at every drafted position.

        Past the prompt, nothing here waits for the forward it launches (no host read, no copy to
        the device after it), so members on separate devices, fed one after the other, run at once.
        """
        lengths = torch.tensor([len(ids) for ids in ids_per_row])
        width = int(lengths.max())
        before, before_states = self.logprobs, self.states
        if width == 0:
            return None if read is None else self._read_before(read)
        self._crop_masked_end()
        batch, start = len(ids_per_row), self.mask.shape[1]
        # right-justified: a sliding window counts slots back from the last one (see the class doc)
        input_ids = torch.zeros(batch, width, dtype=torch.long)
        for row, ids in enumerate(ids_per_row):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            self.slots[row].extend(range(start + width - len(ids), start + width))
            self.ids[row].extend(ids)
        pad = width - lengths[:, None]  # [B, 1] masked slots before each row's ids
        new_mask = (torch.arange(width)[None, :] >= pad).long()  # [B, W]
        self.mask = torch.cat([self.mask, new_mask], dim=1)
        position_ids = (self.next_pos[:, None] + torch.arange(width)[None, :] - pad).clamp(min=0)
        if self.exact_windows:
            self.positions = torch.cat([self.positions, position_ids], dim=1)
        keep = torch.full((batch, 1), width - 1)  # [B, 1] the last slot: each fed row's last new token
        if read is not None:
            offsets = _offsets(read)  # [B, K]
            keep = torch.cat([(pad + offsets.clamp(min=0)).clamp(max=width - 1), keep], dim=1)  # [B, K + 1]
        every_row_fed = self.logprobs is None or bool((lengths > 0).all())
        fed = None if every_row_fed else (lengths > 0)[:, None].to(self.member.device)  # [B, 1], before the forward
        targets = None
        if self.cache is None:
            from transformers import DynamicCache

            # exact windows keep every slot (full-attention layers); their masks apply the window
            self.cache = DynamicCache() if self.exact_windows else DynamicCache(config=self.member.model.config)
            if self.prompt_perplexity:
                targets = next_token_targets(input_ids, lengths)
        logits, states, self.cache, nll = self.member.forward(
            input_ids, self.mask, position_ids, keep, cache=self.cache, hidden=self.hidden, targets=targets,
            slot_positions=self.positions if self.exact_windows else None,
        )
        if nll is not None:
            self.prompt_logppl = nll.cpu() / (lengths - 1).clamp(min=1)
        logprobs = torch.log_softmax(logits, dim=-1)  # [B, K (+ 1), V]
        last, last_states = logprobs[:, -1], None if states is None else states[:, -1]
        if every_row_fed:
            self.logprobs, self.states = last, last_states
        else:  # rows fed nothing keep their distribution
            self.logprobs = torch.where(fed, last, self.logprobs)
            if states is not None:
                self.states = torch.where(fed, last_states, self.states)
        self.next_pos += lengths
        if read is None:
            return None
        earlier = (offsets < 0)[..., None].to(logprobs.device)  # [B, K, 1] distributions from before this feed
        read_logprobs = logprobs[:, :-1] if before is None else torch.where(earlier, before[:, None], logprobs[:, :-1])
        read_states = None
        if states is not None:
            read_states = states[:, :-1] if before_states is None else torch.where(earlier, before_states[:, None], states[:, :-1])
        return read_logprobs, read_states

    def _read_before(self, read: list[list[int]]):
        """`feed`'s read when nothing is fed: every row's current distribution, K times."""
        k = _offsets(read).shape[1]
        states = None if self.states is None else self.states[:, None].expand(-1, k, -1)
        return self.logprobs[:, None].expand(-1, k, -1), states

    def _crop_masked_end(self) -> None:
        """Drop the last cache slots where every row's slot is masked (ids taken back everywhere), so
        taken-back drafts do not lengthen the cache. Transformers' sliding-window layers cannot be
        cropped once full, so only caches without them are."""
        if self.cache is None or any(self.cache.is_sliding):
            return
        used = self.mask.any(0).nonzero()
        end = int(used[-1]) + 1 if len(used) else 0
        if end < self.mask.shape[1]:
            self.cache.crop(end - self.mask.shape[1])
            self.mask, self.positions = self.mask[:, :end], self.positions[:, :end]


def _offsets(read: list[list[int]]) -> torch.Tensor:
    """[B, K] read offsets, each row's list padded with its last offset (-1 for an empty list)."""
    k = max(1, max(map(len, read)))
    return torch.tensor([offsets + [offsets[-1] if offsets else -1] * (k - len(offsets)) for offsets in read])


def next_token_targets(ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[B, W] the id each position of right-justified rows ([B, W], row r's last lengths[r] slots)
    predicts: the next id of the row, -1 at its last id and in its padding."""
    width = ids.shape[1]
    targets = torch.full_like(ids, -1)
    targets[:, :-1] = ids[:, 1:]
    first = width - lengths[:, None]  # [B, 1] first slot of each row
    return targets.masked_fill(torch.arange(width)[None, :] < first, -1)
