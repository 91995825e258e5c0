"""Per-term step sizes: AdamW with one set of moments and one learning-rate factor per loss term.

A loss made of terms with different natural step sizes (AIHF's demonstration terms behave like
SFT, its preference terms like DPO, which wants a step ~10x smaller) cannot be served by one
learning rate, and a loss weight does not change Adam's step. ``TermAdamW`` takes one update per
term, each from that term's gradient alone:

    theta' = AdamW_D(theta; grad L_D(theta), lr * scale_D)         moments m_D, v_D, step t_D
    theta''= AdamW_P(theta'; grad L_P(theta'), lr * scale_P)       moments m_P, v_P, step t_P

(``opt.term = "D"; backward(L_D); step()``, then the same for "P"). Each update is exactly
``torch.optim.AdamW``'s, run on that term's moments; weight decay is applied at each update.
The state of a parameter is ``{"terms": {term: AdamW state}}``, so ``state_dict`` /
``load_state_dict`` (and DeepSpeed's checkpoints of a client optimizer) keep every term's moments.
"""
from __future__ import annotations

import torch

_KEYS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


class TermAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` with moments per term; ``term_lr_scale``: {term name: factor on the
    group's lr}; set ``opt.term`` before each ``step()``."""

    def __init__(self, params, term_lr_scale: dict, **kw):
        if not term_lr_scale or any(not (isinstance(v, (int, float)) and v > 0) for v in term_lr_scale.values()):
            raise ValueError(f"term_lr_scale must map term names to factors > 0, got {term_lr_scale!r}")
        super().__init__(params, **kw)
        self.term_lr_scale = {str(k): float(v) for k, v in term_lr_scale.items()}
        self.term = next(iter(self.term_lr_scale))

    def __getstate__(self):  # copy / pickle keep the terms
        return {**super().__getstate__(), "term_lr_scale": self.term_lr_scale, "term": self.term}

    def __setstate__(self, state):  # load_state_dict and unpickling: AdamW's own fix-ups, on each term's state
        nested = {p: st.pop("terms") for p, st in state.get("state", {}).items() if "terms" in st}
        super().__setstate__(state)
        for p, terms in nested.items():
            for st in terms.values():
                if "step" in st and not torch.is_tensor(st["step"]):
                    st["step"] = torch.tensor(float(st["step"]), dtype=torch.float32)
            self.state[p]["terms"] = terms

    @torch.no_grad()
    def step(self, closure=None):
        term = self.term
        if term not in self.term_lr_scale:
            raise ValueError(f"TermAdamW.term must be one of {sorted(self.term_lr_scale)}, got {term!r}")
        params = [p for g in self.param_groups for p in g["params"]]
        others = {}
        for p in params:  # this term's moments become the only state AdamW sees (none yet: it starts them)
            st = self.state[p]
            others[p] = st.pop("terms", {})
            st.update(others[p].pop(term, {}))
        lrs = [g["lr"] for g in self.param_groups]
        for g in self.param_groups:
            g["lr"] = g["lr"] * self.term_lr_scale[term]
        try:
            loss = super().step(closure)
        finally:
            for g, lr in zip(self.param_groups, lrs):
                g["lr"] = lr
            for p in params:
                st = self.state[p]
                mine = {k: st.pop(k) for k in _KEYS if k in st}
                if mine:
                    others[p][term] = mine
                if others[p]:
                    st["terms"] = others[p]
        return loss
