"""The lm-evaluation-harness backend: `loglikelihood`, `loglikelihood_rolling` and
`generate_until` on k2jax weights (a k2jax checkpoint or a Hugging Face directory) on any mesh.

Requests are batched as lm-eval's own `hf` backend batches them (its Collator: longest first,
generation grouped by generation settings), and encoded, windowed, cut and post-processed with
lm-eval's own helpers, so a score differs from the hf backend's only by the forward pass.

model_args: checkpoint=DIR | hf=DIR, tokenizer=PATH (default: the hf directory), dtype=fp32|bf16,
batch_size=N, max_length=N (default: the model's context), max_gen_toks=N, data/fsdp/tensor
(mesh axis sizes, default fsdp over all devices), attention=auto|xla|pallas|splash|cudnn,
logits_dtype=float32|bfloat16 (default: the weights' model.logits_dtype; a Hugging Face
directory's is float32). Weights open through k2jax/weights/ (checkpoint= may be a run
directory: its latest complete checkpoint).
"""

from __future__ import annotations

from typing import Optional

from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (Collator, handle_stop_sequences, normalize_gen_kwargs,
                                  postprocess_generated_text)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from k2jax.errors import UserError


class K2JaxLM(TemplateLM):
    def __init__(self, checkpoint: Optional[str] = None, hf: Optional[str] = None,
                 tokenizer: Optional[str] = None, dtype: str = "fp32", batch_size=8,
                 max_length: Optional[int] = None, max_gen_toks: int = 256, data: int = 1,
                 fsdp: int = -1, tensor: int = 1, attention: str = "auto",
                 logits_dtype: Optional[str] = None, **lm_eval_args):
        super().__init__()
        from k2jax.lm_eval import LM_EVAL_ARGS, MODEL_ARGS

        unknown = sorted(set(lm_eval_args) - set(LM_EVAL_ARGS))
        if unknown:  # a typo (tensr=8) would otherwise run on a mesh nobody asked for
            raise UserError(f"model_args: unknown key(s) {', '.join(unknown)} (k2jax's: "
                            f"{', '.join(MODEL_ARGS)})")
        from k2jax import distributed
        from k2jax.config import MeshConfig
        from k2jax.generate import Generator
        from k2jax.generate.scoring import Scorer
        from k2jax.generate.text_tokenizer import TextTokenizer
        from k2jax.weights import open_weights

        if not (hf or checkpoint):
            raise UserError("model_args: give hf=DIR or checkpoint=DIR")
        tokenizer = tokenizer or hf
        if tokenizer is None:
            raise UserError("model_args: tokenizer=PATH is required with checkpoint=")
        self.tokenizer = TextTokenizer(str(tokenizer))
        weights = open_weights(hf, checkpoint)  # bad input fails before any device
        config = weights.for_inference(dtype, attention, logits_dtype=logits_dtype)
        self.tokenizer.check_fits(config.vocab_size)
        if self.tokenizer.eos_id is None:
            raise UserError(f"tokenizer {tokenizer}: has no EOS token")
        distributed.initialize()  # a pod: every host runs lm-eval, the devices work as one
        loaded = weights.load(config, MeshConfig(data=int(data), fsdp=int(fsdp),
                                                 tensor=int(tensor)))
        self._batch_size = int(str(batch_size).split(":")[0]) if str(batch_size) != "auto" else 8
        self._max_length = int(max_length) if max_length else config.max_position_embeddings
        self._max_gen_toks = int(max_gen_toks)
        self.scorer = Scorer(loaded.params, loaded.config, loaded.mesh, loaded.rules,
                             self._max_length)
        self.generator = Generator(loaded.params, loaded.config, loaded.mesh, loaded.rules)

    # -- what TemplateLM asks -----------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_id
        return bos if bos is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        if isinstance(tokens, int):
            tokens = [tokens]
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        def longest_first(request):
            tokens = request[1] + request[2]
            return -len(tokens), tuple(tokens)

        ordered = Collator(requests, sort_fn=longest_first)
        results = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="k2jax loglikelihood")
        for chunk in ordered.get_batched(n=self.batch_size):
            results.extend(self.scorer.score([(ctx, cont) for _, ctx, cont in chunk]))
            for (request_str, _, _), answer in zip(chunk, results[-len(chunk):]):
                if request_str is not None:
                    self.cache_hook.add_partial("loglikelihood", request_str, answer)
            bar.update(len(chunk))
        bar.close()
        return ordered.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The whole text's log-likelihood, over lm-eval's disjoint rolling windows of
        max_length tokens (the first predicted from the prefix token)."""
        windows, owners = [], []
        for index, (string,) in enumerate(r.args for r in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(
                windows, disable_tqdm=disable_tqdm)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from k2jax.generate import SamplingParams

        def longest_first(request):
            return -len(self.tok_encode(request[0])), request[0]

        ordered = Collator([r.args for r in requests], sort_fn=longest_first,
                           group_by="gen_kwargs", group_fn=lambda r: r[1])
        eos_text = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        results = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="k2jax generate_until")
        for chunk in ordered.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new = kwargs.pop("max_gen_toks")
            if max_new >= self.max_length:
                raise UserError(f"max_gen_toks {max_new} leaves no room for a context in "
                                f"max_length {self.max_length}")
            sampling = SamplingParams(
                temperature=float(kwargs.get("temperature", 0.0) or 0.0)
                if kwargs.get("do_sample", False) else 0.0,
                top_k=int(kwargs.get("top_k") or 0), top_p=float(kwargs.get("top_p") or 1.0),
                seed=int(kwargs.get("seed") or 0))
            prompts = [self.tok_encode(c)[-(self.max_length - max_new):] or [self.prefix_token_id]
                       for c in contexts]
            stops = [s for s in until if s]
            generations = self.generator.generate(
                prompts, max_new, sampling, eos_ids=[self.eot_token_id],
                stop=lambda i, tokens: any(s in self.tok_decode(tokens) for s in stops))
            for context, generation in zip(contexts, generations):
                text = postprocess_generated_text(self.tok_decode(generation.tokens), until,
                                                  None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
            bar.update(len(chunk))
        bar.close()
        return ordered.get_original(results)
