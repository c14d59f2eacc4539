"""The ``cratelm`` model of lm-evaluation-harness, and ``cratelm eval --tasks``.

    cratelm eval --checkpoint runs/base --tasks lambada_openai,wikitext          # online
    cratelm eval --checkpoint runs/base --tasks my_task --include-path tasks/    # local YAMLs
    python -m cratelm.hf.lm_eval_model run --model cratelm \\
        --model_args checkpoint=runs/base --tasks hellaswag                     # lm-eval's own CLI

`CrateLMEval` is an ``lm_eval.api.model.LM`` (through ``TemplateLM``) registered as
``cratelm``: any checkpoint cratelm loads (exported directory, run or checkpoint directory,
authors' .pt, Hugging Face directory) with its tokenizer (sentencepiece or tokenizer.json).
``loglikelihood`` and ``loglikelihood_rolling`` run in batches (right padding; causal
attention makes the padding invisible); ``generate_until`` runs prompts of equal length
together. Probabilities are over the tokenizer's vocabulary (the rows cratelm pads its
embedding with are excluded), as in the Hugging Face export, so ``--model cratelm`` on a
checkpoint and ``--model hf`` on its export score the same.

Window rule of ``loglikelihood_rolling`` (lm-eval's, as its ``hf`` model): the text's
tokens t are scored after one EOS, in windows of C = model.context tokens that predict C
new tokens each, every window but the last starting where the previous one ended. That is
``cratelm eval``'s rule (stride C) on the stream [EOS] + t, except for the last window:
lm-eval right-aligns it (a full window of C inputs ending at the last token) where
``cratelm eval`` starts it at the next multiple of C. When len(t) <= C or is a multiple of
C the two give the same total NLL (tested in tests/hf/test_lm_eval.py, with the difference
of the other case computed window by window).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import lm_eval.models  # noqa: F401 - lm-eval's own models first: its registry fills itself only while empty
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model


@register_model("cratelm")
class CrateLMEval(TemplateLM):
    """lm-eval's view of a cratelm model: ``--model cratelm --model_args checkpoint=PATH[,tokenizer=...]``."""

    def __init__(self, checkpoint: str, tokenizer: str | None = None, batch_size: int | str = 8,
                 device: str | None = None, dtype: str = "fp32", max_batch_size: int | None = None,
                 **kwargs) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"--model cratelm: unknown model_args {sorted(kwargs)}; it takes checkpoint, "
                             "tokenizer, batch_size, device, dtype")
        from cratelm.checkpoints import load_model
        from cratelm.evaluate import checked_tokenizer

        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, meta = load_model(checkpoint, self._device)
        self.tok, _ = checked_tokenizer(tokenizer, meta, str(checkpoint))
        if self.tok is None:
            raise ValueError(f"{checkpoint} records no tokenizer; pass tokenizer=PATH in --model_args")
        self.dtype = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                      "bfloat16": torch.bfloat16}[str(dtype)]
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.vocab = self.model.cfg.vocab_size
        self.max_length = self.model.cfg.context

    # ---------------------------------------------------------------- tokens
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    def tok_encode(self, string: str, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.tok.decode(tokens)

    @property
    def device(self) -> torch.device:
        return self._device

    # ---------------------------------------------------------------- scoring
    @torch.no_grad()
    def _log_probs(self, rows: list[list[int]]) -> torch.Tensor:
        """log p over the real vocabulary at every position of right-padded rows: (B, T, V) fp32."""
        width = max(map(len, rows))
        x = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            x[i, :len(r)] = torch.tensor(r)
        x = x.to(self._device)
        with torch.autocast(self._device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            h = self.model.hidden(x)
            logits = F.linear(h, self.model.head_weight[: self.vocab])
        return F.log_softmax(logits.float(), dim=-1)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        """(sum of log p of the continuation, is it the greedy continuation) per
        (request, context ids, continuation ids); the longest first, in batches."""
        from tqdm import tqdm

        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        bs = override_bs or self.batch_size
        for b in tqdm(range(0, len(order), bs), disable=disable_tqdm, desc="cratelm loglikelihood"):
            idx = order[b:b + bs]
            rows, conts = [], []
            for i in idx:
                _, ctx, cont = requests[i]
                if not cont or len(cont) > self.max_length:
                    raise ValueError(f"continuation of {len(cont)} tokens; 1 .. {self.max_length} allowed")
                rows.append((ctx + cont)[-(self.max_length + 1):][:-1])   # inputs; the last token is a target
                conts.append(cont)
            logp = self._log_probs(rows)
            for j, (i, row, cont) in enumerate(zip(idx, rows, conts)):
                lp = logp[j, len(row) - len(cont):len(row)]             # (len(cont), V)
                target = torch.tensor(cont, device=lp.device)
                total = float(lp.gather(1, target[:, None]).double().sum())
                out[i] = (total, bool((lp.argmax(-1) == target).all()))
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log p of each text, lm-eval's window rule (module docstring)."""
        windows, owner = [], []
        for n, req in enumerate(requests):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    self.tok_encode(req.args[0]), self.prefix_token_id, self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(n)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for n, (lp, _) in zip(owner, scores):
            totals[n] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---------------------------------------------------------------- generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled: do_sample/temperature) continuations, cut at the first ``until``
        string or EOS, at most ``max_gen_toks`` tokens; prompts of equal length run together."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        encoded = []
        for i, req in enumerate(requests):
            context, kw = req.args
            kw = dict(kw or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.pop("max_gen_toks", 256))
            temperature = float(kw.pop("temperature", 0.0)) if kw.pop("do_sample", False) else 0.0
            ids = (self.tok_encode(context) or [self.eot_token_id])[-self.max_length:]
            encoded.append((ids, until))
            groups.setdefault((len(ids), max_new, temperature), []).append(i)
        gen = torch.Generator(device=self._device).manual_seed(1234)
        for (_, max_new, temperature), members in groups.items():
            for b in range(0, len(members), self.batch_size):
                idx = members[b:b + self.batch_size]
                x = torch.tensor([encoded[i][0] for i in idx], device=self._device)
                new: list[list[int]] = [[] for _ in idx]
                done = [False] * len(idx)
                for step in self.model.stream(x, max_new, temperature, generator=gen):
                    for j, t in enumerate(step[:, 0].tolist()):
                        if not done[j]:
                            new[j].append(t)
                            done[j] = t == self.eot_token_id or any(
                                s in self.tok_decode(new[j]) for s in encoded[idx[j]][1])
                    if all(done):
                        break
                for j, i in enumerate(idx):
                    text = self.tok_decode(new[j])
                    for s in encoded[i][1]:
                        text = text.split(s)[0] if s else text
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out  # type: ignore[return-value]


# ------------------------------------------------------------------ cratelm eval --tasks
def task_manager(tasks: list[str], include_path: str | None):
    """lm-eval's TaskManager; lm-eval's ~15k built-in task configs are indexed (~10-40 s) only
    when ``include_path`` does not define every task asked for."""
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return TaskManager(include_path=include_path)


def run_tasks(args: argparse.Namespace) -> int:
    """``cratelm eval --checkpoint C --tasks a,b [--include-path DIR]``: lm-eval's evaluator on
    the ``cratelm`` model; prints lm-eval's table, writes its results with ``--json``."""
    import lm_eval

    tasks = [t for t in args.tasks.split(",") if t]
    try:
        lm = CrateLMEval(args.checkpoint, tokenizer=args.tokenizer, batch_size=args.batch_size,
                         device=args.device, dtype=args.dtype or "fp32")
        manager = task_manager(tasks, args.include_path)
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                                          task_manager=manager, log_samples=False, bootstrap_iters=0)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"cratelm eval: error: {e}", file=sys.stderr)
        return 2
    print(lm_utils.make_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint": str(args.checkpoint), "tasks": tasks,
                                               "results": results["results"]}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":       # lm-eval's own command line, with the cratelm model registered
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
