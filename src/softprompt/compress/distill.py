"""Distillation losses between the teacher's cached distributions and the student's logits.

All losses are summed over tokens (the caller divides by the token count):

- ``forward_kl``: KL(teacher || student), the default; mass-covering.
- ``reverse_kl``: KL(student || teacher); mode-seeking.
- ``loglik``: negative log-likelihood of the teacher's continuation tokens under the student.

``mode_weight`` adds that weight times the cross-entropy of the teacher's most likely token at every
distilled position (its greedy choice): a pull on the student's argmax, which top-1 agreement scores
and which a small KL leaves free where the teacher is unsure.

With a temperature ``T`` both distributions are softened by ``T`` and the KL is scaled by ``T**2``
(Hinton et al.), so gradients keep their scale. With top-k teacher distributions the KL is taken
between the two distributions coarsened to k + 1 outcomes (the teacher's top-k tokens and "everything
else"); by the data-processing inequality that is a lower bound on the full KL, and it is exact when
the teacher's remainder mass is zero.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from softprompt.compress.teacher import TeacherDists
from softprompt.encoding import IGNORE, Encoded, collate

OBJECTIVES = ("forward_kl", "reverse_kl", "loglik")
_TINY = 1e-12


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, clamped away from log(0)."""
    return torch.log((-torch.expm1(x.clamp(max=0))).clamp(min=_TINY))


def kl_loss(student_logits: torch.Tensor, teacher: TeacherDists, temperature: float = 1.0,
            reverse: bool = False) -> torch.Tensor:
    """Summed KL over tokens between teacher distributions and ``[n, vocab]`` student logits."""
    s = torch.log_softmax(student_logits.float() / temperature, -1)
    if teacher.full is not None:
        t = teacher.full.float()
        kl = (s.exp() * (s - t)).sum(-1) if reverse else (t.exp() * (t - s)).sum(-1)
    else:
        sk = s.gather(-1, teacher.idx.long())
        s_rest = _log1mexp(torch.logsumexp(sk, -1))
        t, t_rest = teacher.logp.float(), teacher.rest.float().clamp(min=torch.log(torch.tensor(_TINY)).item())
        if reverse:
            kl = (sk.exp() * (sk - t)).sum(-1) + s_rest.exp() * (s_rest - t_rest)
        else:
            kl = (t.exp() * (t - sk)).sum(-1) + t_rest.exp() * (t_rest - s_rest)
    return kl.sum() * temperature ** 2


def teacher_top1(teacher: TeacherDists) -> torch.Tensor:
    """The teacher's most likely token at each position ``[n]``."""
    return teacher.full.argmax(-1) if teacher.full is not None else teacher.idx[:, 0].long()


def distill_loss(objective: str, student_logits: torch.Tensor, teacher: TeacherDists | None,
                 targets: torch.Tensor, temperature: float = 1.0, mode_weight: float = 0.0) -> torch.Tensor:
    if objective == "forward_kl":
        loss = kl_loss(student_logits, teacher, temperature)
    elif objective == "reverse_kl":
        loss = kl_loss(student_logits, teacher, temperature, reverse=True)
    elif objective == "loglik":
        loss = F.cross_entropy(student_logits.float(), targets, reduction="sum")
    else:
        raise ValueError(f"unknown objective {objective!r}")
    if mode_weight:
        if teacher is None:
            raise ValueError("mode_weight needs the teacher's distributions (not the loglik objective)")
        loss = loss + mode_weight * F.cross_entropy(student_logits.float(), teacher_top1(teacher), reduction="sum")
    return loss


def rows_batch(rows: list[tuple[list[int], list[int]]], pad_id: int, device,
               label_from: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Right-padded batch of (prompt ids, continuation ids) rows, the continuation as labels; with
    ``label_from``, each row's labels start at that index of its prompt instead (query tokens too)."""
    label_from = label_from or [len(p) for p, _ in rows]
    items = [Encoded(p + c, [IGNORE] * f + (p + c)[f:], len(p)) for (p, c), f in zip(rows, label_from)]
    return {k: v.to(device) for k, v in collate(items, pad_id).items()}

