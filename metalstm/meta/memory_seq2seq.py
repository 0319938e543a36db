"""In-context sequence-to-sequence learning: an LSTM that reads a task's examples as one token stream and decodes
the answers to new inputs, with no gradient step (memory-based meta-learning, Hochreiter et al. 2001 and
Santoro et al. 2016, on token sequences; the attention reads as SNAIL's, Mishra et al. 2018).

The support pairs form one stream, each pair  x_1 .. x_L  SEP  y_1 .. y_L  EOS  with its padding kept. An LSTM
reads the stream; each query continues from the state after it: it reads x_q and SEP, then decodes y_q one
token a step, reading the previous target token (teacher forcing, meta-training) or its own previous prediction
(greedy, meta-test), BOS first. With ``attention``, each decoding step also makes two reads (a pointer to the
query's input, then a lookup in the examples: what a rule such as "decipher the input, reversed" needs):
    r_in = attend(o_t; positions of x_q)                  o_t: the decoder LSTM's output at step t
    r_ex = attend([o_t, r_in]; positions of every support pair)
and the readout sees [o_t, r_in, r_ex]. A position is its token's embedding with a bidirectional LSTM's
output over its own pair (x SEP y) or query input, so it can carry what sits elsewhere in its pair (the
y token an x token became, wherever the transform put it). The reads do not feed back into the LSTM, so
teacher forcing and greedy decoding run the same function of the tokens read. The network here is the whole
learner, as SNAIL's and Santoro's are: the base learner only declares the task's shapes (base_learner=lstm_seq2seq).
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
    attention: bool = True  # the two reads (query input, then the support pairs) at every decoding step


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
            self.encoder = nn.LSTM(cfg.embed, cfg.hidden // 2, batch_first=True, bidirectional=True)
            position = cfg.embed + 2 * (cfg.hidden // 2)  # a token's embedding and the encoder's output there
            self.read_input = Attention(cfg.hidden, position, cfg.hidden)
            self.read_examples = Attention(cfg.hidden + position, position, cfg.hidden)
            readout += 2 * position
        self.readout = nn.Linear(readout, spec["output_dim"])

    def column(self, token: int, like: Tensor) -> Tensor:
        return torch.full_like(like[..., :1], token)

    def positions(self, tokens: Tensor) -> Tensor:
        """[M, T] tokens -> [M, T, embed + hidden]: each token's embedding and the bidirectional encoder's output."""
        embedded = self.embedding(tokens)
        return torch.cat([embedded, self.encoder(embedded)[0]], -1)

    def features(self, out: Tensor, reads: tuple[Tensor, ...] | None) -> Tensor:
        """Decoder outputs [M, T, hidden] -> readout features: with the reads, [o_t, r_in, r_ex]."""
        if reads is None:
            return out
        inputs, input_mask, examples, example_mask = reads
        r_in = self.read_input(out, inputs, input_mask)
        r_ex = self.read_examples(torch.cat([out, r_in], -1), examples, example_mask)
        return torch.cat([out, r_in, r_ex], -1)

    def forward_tasks(self, batch: EpisodeBatch, teacher: bool) -> Tensor:
        """All query outputs [B, n, L, vocab]: teacher-forced on query_y, or decoded greedily."""
        sx, sy, qx, qy = batch
        b, n, length = qx.shape
        stream = torch.cat([sx, self.column(self.sep, sx), sy, self.column(self.eos, sx)], -1).flatten(1)
        _, (h, c) = self.lstm(self.embedding(stream))
        x = torch.cat([qx, self.column(self.sep, qx)], -1).flatten(0, 1)  # [B * n, L + 1]
        _, state = self.lstm(self.embedding(x), (h.repeat_interleave(n, 1), c.repeat_interleave(n, 1)))
        reads = None
        if self.cfg.attention:
            pairs = torch.cat([sx, self.column(self.sep, sx), sy], -1)  # [B, K, 2L + 1]
            examples = self.positions(pairs.flatten(0, 1))  # each pair encoded alone: [B * K, 2L + 1, position]
            examples = examples.reshape(b, -1, examples.shape[-1]).repeat_interleave(n, 0)  # per query, all pairs
            reads = (self.positions(x), x != PAD, examples, (pairs != PAD).flatten(1).repeat_interleave(n, 0))
        start = self.column(self.bos, x)
        if teacher:  # one pass over [BOS, y_1 .. y_L-1]
            previous = torch.cat([start, qy.flatten(0, 1)[:, :-1]], 1)
            logits = self.readout(self.features(self.lstm(self.embedding(previous), state)[0], reads))
        else:
            steps, token = [], start
            for _ in range(length):
                out, state = self.lstm(self.embedding(token), state)
                steps.append(self.readout(self.features(out, reads)))
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
