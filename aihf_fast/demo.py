"""A self-contained AIHF run on a toy task with a known reward (no downloads, ~1 minute on CPU).

Task: the prompt is 4 digits, the answer should be them sorted; true reward r*(x, y) = the
fraction of answer positions that are right. Data: demonstrations from an imperfect expert
(each answer digit wrong with probability ``demo_noise``) and preference pairs between two
noisy answers labelled by a Bradley-Terry draw on r*. The policy is a tiny GRU language model.
Every step builds one batch in ``method_config``'s layout

    [chosen_0..P-1, rejected_0..P-1, demo_0..D-1, own_sample_0..D-1]

and takes one optimiser step on ``aihf_loss`` (fused LM-head path): w_P on the preference
pairs, w_D on (demonstration > current-policy sample), plus lambda * demonstration NLL, with the
initial model as the fixed reference. It prints the true reward of greedy answers on held-out
prompts before and after. The full LLM trainer (transformers + DeepSpeed) is aihf_fast.train.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from .ops import aihf_loss, method_config

DIGITS, SEP, BOS = 10, 10, 11
VOCAB, L = 12, 4


class TinyLM(torch.nn.Module):
    def __init__(self, hidden: int = 64):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, hidden)
        self.rnn = torch.nn.GRU(hidden, hidden, batch_first=True)
        self.lm_head = torch.nn.Linear(hidden, VOCAB, bias=False)

    def hidden_states(self, tokens):  # (B, T) -> (B, T, hidden)
        return self.rnn(self.embed(tokens))[0]

    @torch.no_grad()
    def generate(self, prompts, greedy: bool, gen: torch.Generator):
        seq = prompts
        for _ in range(L):
            logits = self.lm_head(self.hidden_states(seq)[:, -1])
            nxt = logits.argmax(-1) if greedy else torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0]
            seq = torch.cat([seq, nxt[:, None]], 1)
        return seq[:, -L:]


def make_prompts(n, gen):
    digits = torch.randint(0, DIGITS, (n, L), generator=gen)
    return torch.cat([torch.full((n, 1), BOS), digits, torch.full((n, 1), SEP)], 1)


def true_reward(prompts, answers):
    return (answers == prompts[:, 1:1 + L].sort(-1).values).float().mean(-1)


def noisy_answers(prompts, noise, gen):
    ans = prompts[:, 1:1 + L].sort(-1).values
    flip = torch.rand(ans.shape, generator=gen) < noise
    return torch.where(flip, torch.randint(0, DIGITS, ans.shape, generator=gen), ans)


def sequences(prompts, answers):
    """Input tokens and aligned labels (prompt masked with -100): (B, 2 + 2L - 1) each."""
    full = torch.cat([prompts, answers], 1)
    labels = full[:, 1:].clone()
    labels[:, : prompts.shape[1] - 1] = -100
    return full[:, :-1], labels


def run(steps=300, pairs=16, demos=16, w_P=1.0, w_D=1.0, nll=0.5, beta=0.1, lr=3e-3,
        demo_noise=0.3, seed=0, backend=None, log_every=50):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    policy = TinyLM()
    ref = copy.deepcopy(policy).requires_grad_(False)
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    eval_prompts = make_prompts(512, torch.Generator().manual_seed(seed + 1))
    layout = method_config("aihf", pairs, demos, w_P=w_P, w_D=w_D, nll_weight=nll)

    def evaluate():
        return true_reward(eval_prompts, policy.generate(eval_prompts, True, gen)).mean().item()

    before = evaluate()
    print(f"[demo] AIHF on sort-4-digits: P={pairs} pairs + D={demos} demos per step, beta={beta}, "
          f"w_P={w_P}, w_D={w_D}, nll={nll}")
    print(f"[demo] step 0: true reward of greedy answers {before:.3f}")
    t0 = time.time()
    for step in range(1, steps + 1):
        pp, dp = make_prompts(pairs, gen), make_prompts(demos, gen)
        a, b = noisy_answers(pp, 0.5, gen), noisy_answers(pp, 0.5, gen)
        p_a = torch.sigmoid(5.0 * (true_reward(pp, a) - true_reward(pp, b)))  # Bradley-Terry label
        a_wins = (torch.rand(pairs, generator=gen) < p_a)[:, None]
        chosen, rejected = torch.where(a_wins, a, b), torch.where(a_wins, b, a)
        demo, own = noisy_answers(dp, demo_noise, gen), policy.generate(dp, False, gen)
        inputs, labels = sequences(torch.cat([pp, pp, dp, dp]), torch.cat([chosen, rejected, demo, own]))
        with torch.no_grad():
            ref_h = ref.hidden_states(inputs)
        out = aihf_loss(labels, hidden=policy.hidden_states(inputs), weight=policy.lm_head.weight,
                        ref_hidden=ref_h, ref_weight=ref.lm_head.weight, beta=beta, backend=backend, layout=layout)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        if step % log_every == 0 or step == steps:
            m = {k: round(v.item(), 3) for k, v in out.metrics.items() if k in
                 ("loss", "rewards/margins", "rewards/accuracies", "demo/logp_per_token")}
            print(f"[demo] step {step}/{steps} ({time.time() - t0:.0f}s) {m} "
                  f"true reward {evaluate():.3f}", flush=True)
    after = evaluate()
    print(f"[demo] true reward of greedy answers: before {before:.3f} -> after {after:.3f} "
          f"(demonstrator's expected reward {1 - demo_noise * 0.9:.3f})")
    return before, after


def main(argv=None):
    p = argparse.ArgumentParser(prog="aihf-fast demo", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--demos", type=int, default=16)
    p.add_argument("--w-p", type=float, default=1.0)
    p.add_argument("--w-d", type=float, default=1.0)
    p.add_argument("--nll", type=float, default=0.5)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=["auto", "triton", "torch"], default=None)
    a = p.parse_args(argv)
    run(a.steps, a.pairs, a.demos, a.w_p, a.w_d, a.nll, a.beta, seed=a.seed, backend=a.backend)


if __name__ == "__main__":
    main()
