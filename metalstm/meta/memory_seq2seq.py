"""In-context sequence-to-sequence learning: an LSTM that reads a task's examples as one token stream and decodes
the answers to new inputs, with no gradient step (memory-based meta-learning, Hochreiter et al. 2001 and
Santoro et al. 2016, on token sequences; the attention read as SNAIL's, Mishra et al. 2018).

The support pairs form one stream, each pair  x_1 .. x_L  SEP  y_1 .. y_L  EOS  with its padding kept, so a pair
takes 2L + 2 steps and y_j sits L + 1 steps after x_j. An LSTM reads the stream. Each query continues from the
state after it: it reads x_q and SEP, then decodes y_q one token a step, reading the previous target token
(teacher forcing, meta-training) or its own previous prediction (greedy, meta-test), BOS first. With
``attention``, each decoding step also reads, by soft attention, the stream's positions and the query's input
positions (keys and values: the token's embedding and the LSTM's output there), and the readout sees
[LSTM output, both reads]. The reads do not feed back into the LSTM, so teacher forcing and greedy decoding
run the same function of the tokens read. The network here is the whole learner, as SNAIL's and Santoro's are:
the base learner only declares the task's shapes (use base_learner=lstm_seq2seq).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from metalstm.config import count
from metalstm.core import PAD, EpisodeBatch
from metalstm.meta.base import MetaConfig, MetaLearner, MetaOutput


@dataclass
class MemorySeq2SeqConfig(MetaConfig):
    hidden: int = count(128)
    embed: int = count(32)  # token embedding size
    attention: bool = True  # read the stream and the query's input by soft attention at every decoding step


class Attention(nn.Module):
    """Soft attention of queries [M, T, dq] over positions [M, S, dv] (keys computed from the values), padding
    positions (mask [M, S] False) excluded -> reads [M, T, dv]."""

    def __init__(self, query_dim: int, value_dim: int, size: int):
        super().__init__()
        self.query, self.key, self.size = nn.Linear(query_dim, size), nn.Linear(value_dim, size), size

    def forward(self, queries: Tensor, values: Tensor, mask: Tensor) -> Tensor:
        scores = self.query(queries) @ self.key(values).transpose(1, 2) / self.size**0.5
        return scores.masked_fill(~mask[:, None, :], -1e9).softmax(-1) @ values


class MemorySeq2Seq(MetaLearner):
    task_types = ("seq2seq",)

    def __init__(self, learner, loss_fn, spec, cfg: MemorySeq2SeqConfig):
        super().__init__(learner, loss_fn)
        self.cfg = cfg
        vocab = spec["vocab"]
        self.sep, self.eos, self.bos = vocab, vocab + 1, vocab + 2
        self.embedding = nn.Embedding(vocab + 3, cfg.embed)
        self.lstm = nn.LSTM(cfg.embed, cfg.hidden, batch_first=True)
        readout = cfg.hidden
        if cfg.attention:
            position = cfg.embed + cfg.hidden  # a position's token embedding and LSTM output
            self.read_stream = Attention(position, position, cfg.hidden)
            self.read_input = Attention(position, position, cfg.hidden)
            readout += 2 * position
        self.readout = nn.Linear(readout, spec["output_dim"])

    def column(self, token: int, like: Tensor) -> Tensor:
        return torch.full_like(like[..., :1], token)

    def read_support(self, sx: Tensor, sy: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        """sx, sy [B, K, L] -> the stream's positions [B, S, embed + hidden], its mask [B, S] and final state."""
        stream = torch.cat([sx, self.column(self.sep, sx), sy, self.column(self.eos, sx)], -1).flatten(1)
        embedded = self.embedding(stream)
        out, state = self.lstm(embedded)
        return torch.cat([embedded, out], -1), stream != PAD, state

    def decode_features(self, out: Tensor, embedded: Tensor, stream: tuple[Tensor, Tensor],
                        query_input: tuple[Tensor, Tensor]) -> Tensor:
        """Decoder outputs [M, T, hidden] and the tokens they read [M, T, embed] -> readout features."""
        if not self.cfg.attention:
            return out
        position = torch.cat([embedded, out], -1)
        return torch.cat([out, self.read_stream(position, *stream), self.read_input(position, *query_input)], -1)

    def forward_tasks(self, batch: EpisodeBatch, teacher: bool) -> Tensor:
        """All query outputs [B, n, L, vocab]: teacher-forced on query_y, or decoded greedily."""
        sx, sy, qx, qy = batch
        b, n, length = qx.shape
        positions, mask, (h, c) = self.read_support(sx, sy)
        stream = (positions.repeat_interleave(n, 0), mask.repeat_interleave(n, 0))  # per query [B * n, S, ...]
        state = (h.repeat_interleave(n, 1), c.repeat_interleave(n, 1))
        x = torch.cat([qx, self.column(self.sep, qx)], -1).flatten(0, 1)  # [B * n, L + 1]
        embedded = self.embedding(x)
        out, state = self.lstm(embedded, state)
        query_input = (torch.cat([embedded, out], -1), x != PAD)
        start = self.column(self.bos, x)
        if teacher:  # one pass over [BOS, y_1 .. y_L-1]
            previous = torch.cat([start, qy.flatten(0, 1)[:, :-1]], 1)
            embedded = self.embedding(previous)
            out, _ = self.lstm(embedded, state)
            logits = self.readout(self.decode_features(out, embedded, stream, query_input))
        else:
            steps, token = [], start
            for _ in range(length):
                embedded = self.embedding(token)
                out, state = self.lstm(embedded, state)
                steps.append(self.readout(self.decode_features(out, embedded, stream, query_input)))
                token = steps[-1].argmax(-1)
            logits = torch.cat(steps, 1)
        return logits.view(b, n, length, -1)

    def meta_loss(self, batch: EpisodeBatch) -> MetaOutput:
        outputs = self.forward_tasks(batch, teacher=True)
        loss = torch.stack([self.loss_fn(o, y) for o, y in zip(outputs, batch.query_y)]).mean()
        return MetaOutput(loss, outputs.detach())

    def predict(self, batch: EpisodeBatch) -> Tensor:
        with torch.no_grad():
            return self.forward_tasks(batch, teacher=False)
