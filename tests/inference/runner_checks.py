"""The check every engine runner must pass: its logits equal the model's own forward, through
prefill, decode steps and a row leaving the batch."""

from __future__ import annotations

import torch


def assert_runner_matches_forward(r, model, atol: float = 1e-4) -> None:
    seqs = [[5, 9, 17, 3, 44], [33, 2], [12, 80, 7]]
    logits = r.prefill(seqs, 0)

    def ref():
        with torch.no_grad():
            return torch.stack([model(torch.tensor([s])).logits[0, -1] for s in seqs])

    assert torch.allclose(logits, ref(), atol=atol)
    pos = [len(s) for s in seqs]
    for step in range(6):
        nxt = logits.argmax(-1).tolist()
        for s, t in zip(seqs, nxt):
            s.append(t)
        logits = r.decode(torch.tensor(nxt), torch.tensor(pos))
        pos = [p + 1 for p in pos]
        assert torch.allclose(logits, ref(), atol=atol), step
        if step == 2:  # the middle row leaves: the last row moves into its slot
            r.copy_slot(2, 1, pos[2])
            seqs, pos = [seqs[0], seqs[2]], [pos[0], pos[2]]
            logits = logits[[0, 2]]
