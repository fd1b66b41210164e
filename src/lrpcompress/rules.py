"""LRP rules built from parts, and composites that assign rules to layers.

A rule is a small frozen object made of *terms*. Each term has a coefficient and one or more
*parts*; a part pairs an input modifier with a parameter modifier. For a layer with input ``a``,
weight ``w`` and bias ``b`` a term computes ``z_k = sum_parts layer(in_mod(a), w_mod(w)) + b_mod(b)``
and distributes the relevance ``R_j`` of output ``j`` as ``c_k * contribution_ij / stab(z_kj) * R_j``.
Examples (Montavon et al. 2019; zennit's names):

- ε:      one term, one part (identity, identity), stabiliser ``z + ε·sign(z)``
- z⁺:     one term, parts (a⁺, w⁺) and (a⁻, w⁻): only positive contributions
- αβ:     ``α`` · positive contributions − ``β`` · negative contributions
- γ:      one part (identity, ``w + γ·w⁺``)
- flat:   (1, 1): relevance spread evenly over the receptive field (input layer)
- w²:     (1, w²): relevance in proportion to squared weights (input layer)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
import torch.nn as nn

from .errors import LrpcError

Modifier = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Mod:
    """A named tensor modifier (input, weight or bias)."""

    name: str
    fn: Modifier = field(compare=False, repr=False)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return self.fn(t)


IDENTITY = Mod("identity", lambda t: t)
POSITIVE = Mod("positive", lambda t: t.clamp(min=0))
NEGATIVE = Mod("negative", lambda t: t.clamp(max=0))
ONES = Mod("ones", torch.ones_like)
ZERO = Mod("zero", torch.zeros_like)
SQUARE = Mod("square", lambda t: t * t)


def gamma_mod(gamma: float) -> Mod:
    return Mod(f"gamma({gamma})", lambda t: t + gamma * t.clamp(min=0))


@dataclass(frozen=True)
class Part:
    inp: Mod
    weight: Mod


@dataclass(frozen=True)
class Term:
    """``sign``: the known sign of this term's ``z_k`` (+1 for positive contributions, -1 for negative ones,
    0 when either can occur); a known sign makes the stabiliser a single addition."""

    coefficient: float
    parts: tuple[Part, ...]
    bias: Mod
    sign: int = 0


@dataclass(frozen=True)
class Rule:
    """An LRP rule for layers with weights: terms plus a stabiliser ε (``z + ε·sign(z)``, sign(0)=1)."""

    name: str
    terms: tuple[Term, ...]
    epsilon: float = 1e-9

    def __post_init__(self) -> None:
        if not self.terms:
            raise LrpcError(f"rule {self.name!r} needs at least one term")
        if not (self.epsilon >= 0):
            raise LrpcError(f"rule {self.name!r}: epsilon must be >= 0, got {self.epsilon}")

    def stabilize(self, z: torch.Tensor, sign: int = 0) -> torch.Tensor:
        """``z + ε·sign(z)`` with sign(0) = +1; ``sign`` = ±1 when every entry's sign is known."""
        if sign > 0:
            return z + self.epsilon
        if sign < 0:
            return z - self.epsilon
        return torch.where(z >= 0, z + self.epsilon, z - self.epsilon)


def epsilon(eps: float = 1e-6) -> Rule:
    return Rule(f"epsilon({eps})", (Term(1.0, (Part(IDENTITY, IDENTITY),), IDENTITY),), eps)


def alpha_beta(alpha: float = 2.0, beta: float = 1.0, eps: float = 1e-9) -> Rule:
    if alpha - beta != 1.0 or beta < 0:
        raise LrpcError(f"alpha_beta needs alpha - beta = 1 and beta >= 0, got alpha={alpha}, beta={beta}")
    pos = Term(alpha, (Part(POSITIVE, POSITIVE), Part(NEGATIVE, NEGATIVE)), POSITIVE, +1)
    neg = Term(-beta, (Part(POSITIVE, NEGATIVE), Part(NEGATIVE, POSITIVE)), NEGATIVE, -1)
    terms = (pos,) if beta == 0 else (pos, neg)
    return Rule(f"alpha{alpha:g}_beta{beta:g}", terms, eps)


def zplus(eps: float = 1e-9) -> Rule:
    return Rule("zplus", alpha_beta(1.0, 0.0).terms, eps)


def gamma(g: float = 0.25, eps: float = 1e-6) -> Rule:
    return Rule(f"gamma({g})", (Term(1.0, (Part(IDENTITY, gamma_mod(g)),), gamma_mod(g)),), eps)


def flat(eps: float = 1e-9) -> Rule:
    return Rule("flat", (Term(1.0, (Part(ONES, ONES),), ZERO, +1),), eps)


def wsquare(eps: float = 1e-9) -> Rule:
    return Rule("wsquare", (Term(1.0, (Part(ONES, SQUARE),), ZERO),), eps)


RULES: Mapping[str, Callable[[], Rule]] = {
    "epsilon": epsilon,
    "zplus": zplus,
    "alpha2_beta1": lambda: alpha_beta(2.0, 1.0),
    "alpha1_beta0": lambda: alpha_beta(1.0, 0.0),
    "gamma": gamma,
    "flat": flat,
    "wsquare": wsquare,
}

WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class Composite:
    """Assigns a rule to every layer with weights: by type, with an optional rule for the first layer."""

    name: str
    conv: Rule
    linear: Rule
    first: Rule | None = None

    def rule_for(self, module: nn.Module, is_first: bool) -> Rule:
        if is_first and self.first is not None:
            return self.first
        return self.linear if isinstance(module, nn.Linear) else self.conv


COMPOSITES: Mapping[str, Callable[[float], Composite]] = {
    "epsilon": lambda eps: Composite("epsilon", epsilon(eps), epsilon(eps)),
    "epsilon_plus": lambda eps: Composite("epsilon_plus", zplus(), epsilon(eps)),
    "epsilon_plus_flat": lambda eps: Composite("epsilon_plus_flat", zplus(), epsilon(eps), flat()),
    "epsilon_alpha2_beta1": lambda eps: Composite("epsilon_alpha2_beta1", alpha_beta(2.0, 1.0), epsilon(eps)),
    "epsilon_gamma": lambda eps: Composite("epsilon_gamma", gamma(), epsilon(eps)),
    "epsilon_gamma_wsquare": lambda eps: Composite("epsilon_gamma_wsquare", gamma(), epsilon(eps), wsquare()),
}


def get_composite(name: str, eps: float = 1e-6) -> Composite:
    """Look up a composite by name; an unknown name is an error that lists the known ones."""
    try:
        return COMPOSITES[name](eps)
    except KeyError:
        raise LrpcError(f"unknown LRP composite {name!r}; choose one of {', '.join(COMPOSITES)}") from None
