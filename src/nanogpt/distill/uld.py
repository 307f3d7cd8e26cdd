"""Token-level distillation across vocabularies: the student's windows scored as text by a local teacher with
its own tokenizer, positions aligned by byte offsets, and the Universal Logit Distillation loss.

Alignment (better than the paper's "first min(len) positions" rule, which pairs tokens that predict
different things as soon as the two tokenizations drift apart): a window of our tokens is decoded to
text and re-tokenized by the teacher with character offsets. Student position t predicts the token after
the bytes [0, e_t); teacher position j predicts the token after its tokens 0..j, which end at character
c_j when the next token starts exactly there. The pair (t, j) is kept when c_j is the character that
starts at byte e_t: both models then predict what follows the same text. Other student positions (a
boundary the teacher does not have, e.g. inside one of its longer tokens) get the hard loss only; the
share kept is logged as `aligned` in distill_log.jsonl (0.96-0.98 between GPT-2 and SmolLM2 on the builtin
corpus, windows of 16-512 tokens).

    loss_fn = UldLossFn(load_text_teacher("teacher.gguf"), alpha=0.5, T=1.0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from nanogpt.data.tokenizer import get_tokenizer
from nanogpt.distill.crossvocab import TextTeacher
from nanogpt.distill.losses import uld_parts
from nanogpt.train.losses import LossLog


def text_with_byte_offsets(data: bytes) -> tuple[str, np.ndarray]:
    """The text of UTF-8 `data` and the byte where each of its characters starts, plus len(data) last.

    A byte that starts no valid character (a window cut inside one) becomes one U+FFFD of its own, so
    every character still maps to the bytes it came from.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:  # every byte but a continuation byte starts a character
        starts = np.flatnonzero((np.frombuffer(data, dtype=np.uint8) & 0xC0) != 0x80)
        return text, np.append(starts, len(data))
    chars: list[str] = []
    starts_: list[int] = []
    i = 0
    while i < len(data):
        for n in (1, 2, 3, 4):  # the shortest prefix that decodes is exactly one character
            try:
                ch = data[i : i + n].decode("utf-8")
                break
            except UnicodeDecodeError:
                continue
        else:
            ch, n = "\ufffd", 1
        chars.append(ch)
        starts_.append(i)
        i += n
    return "".join(chars), np.array([*starts_, len(data)], dtype=np.int64)


@dataclass(frozen=True)
class Alignment:
    """One window: the teacher's token ids and the aligned (student position, teacher position) pairs."""

    teacher_ids: list[int]
    student_pos: list[int]
    teacher_pos: list[int]


def align_window(
    ids: list[int], byte_lens: np.ndarray, teacher_ids: list[int], offsets: Any, char_bytes: np.ndarray
) -> Alignment:
    """Pair student positions of window `ids` with teacher positions that predict from the same text prefix.

    `byte_lens[i]` is the byte length of our token i; `teacher_ids`/`offsets` the teacher's tokenization of
    the window's text (character spans); `char_bytes` the byte where each character starts (plus the end).
    """
    ends = np.cumsum(byte_lens[np.asarray(ids, dtype=np.int64)])  # ends[t]: bytes before the token t + 1
    student_at = {int(e): t for t, e in enumerate(ends[:-1].tolist())}
    s_pos, t_pos = [], []
    for j in range(len(teacher_ids) - 1):
        (_, e0), (s1, _) = offsets[j], offsets[j + 1]
        if e0 != s1 or e0 == 0:  # the next teacher token does not start where this one ends
            continue
        t = student_at.get(int(char_bytes[e0]))
        if t is not None:
            s_pos.append(t)
            t_pos.append(j)
    return Alignment(list(teacher_ids), s_pos, t_pos)


class UldLossFn:
    """The trainer's `loss_fn` for method "uld": alpha * CE + (1 - alpha) * ULD at aligned positions.

    Per step: one teacher forward over the batch's windows re-tokenized as text, then a sort of every
    aligned position's two distributions (see `losses.uld_distance`).
    """

    def __init__(
        self, teacher: TextTeacher, alpha: float = 0.5, T: float = 1.0, log: LossLog | None = None
    ) -> None:
        self.teacher, self.alpha, self.T = teacher, alpha, T
        self.log = log if log is not None else LossLog()
        tok = get_tokenizer()
        self.tok = tok
        self.byte_lens = np.array([len(tok.decode_bytes([i])) for i in range(tok.vocab_size)], dtype=np.int64)

    def align(self, windows: list[list[int]]) -> list[Alignment]:
        decoded = [text_with_byte_offsets(self.tok.decode_bytes(w)) for w in windows]
        enc = self.teacher.tokenizer([text for text, _ in decoded], return_offsets_mapping=True)
        return [
            align_window(w, self.byte_lens, enc["input_ids"][b], enc["offset_mapping"][b], decoded[b][1])
            for b, w in enumerate(windows)
        ]

    def teacher_rows(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The aligned student positions (N,) (flat indices into the batch's B * T) and the teacher's logits
        there (N, V_t), on the teacher's device: one teacher forward over the windows re-tokenized as text."""
        T = x.size(1)
        alignments = self.align(torch.cat([x, y[:, -1:]], dim=1).tolist())
        positions = torch.tensor(
            [b * T + t for b, a in enumerate(alignments) for t in a.student_pos], dtype=torch.long
        )
        if not positions.numel():
            return positions, torch.zeros(0, self.teacher.vocab_size)
        rows = self.teacher.score([a.teacher_ids for a in alignments], [a.teacher_pos for a in alignments])
        return positions, rows

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(x).float()  # (B, T, V)
        positions, rows = self.teacher_rows(x, y)
        dev = logits.device
        parts = uld_parts(logits, y, rows.to(dev), positions.to(dev), self.alpha, self.T)
        self.log.record(parts.hard, parts.soft, aligned=round(positions.numel() / x.numel(), 4))
        return parts.total
