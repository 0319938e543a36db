"""In-context sequence-to-sequence learning: an LSTM that reads a task's examples as one token stream and decodes
the answers to new inputs, with no gradient step (memory-based meta-learning, Hochreiter et al. 2001 and
Santoro et al. 2016, on token sequences; the reads as in SNAIL, Mishra et al. 2018, and pointer networks).

The support pairs form one stream, each pair  x_1 .. x_L  SEP  y_1 .. y_L  EOS  with its padding kept. An LSTM
reads the stream; every sequence then continues from the state after it: it reads its input x and SEP, then
decodes y one token a step, reading the previous target token (teacher forcing) or its own previous prediction
(greedy, queries at meta-test), BOS first. With ``attention``, decoding step t of a sequence with input x
also reads, in each of H heads h:
    p_t^h = attend_h(o_t; positions of x)         a pointer into its own input (o_t: the decoder LSTM's output)
    m_t^h = sum_(s, j) softmax_(s, j)(K p_t^h . K p_(s, j)^h) onehot(y_(s, j))    a lookup in the support pairs
where p_(s, j)^h is head h's pointer read of support pair s at its step j (the support pairs are decoded the
same way, teacher-forced): the memory holds (what step j pointed at, the token y_j it produced), so a query
recalls the tokens that the same pointed-at input produced in the examples (a substitution cipher's table)
wherever a positional rule (reverse, rotate) moves them, if the head points as the rule does. Which head
does is judged in context: each head predicts every support pair's tokens from the other pairs' memory,
and the heads are mixed by w = softmax(beta * mean log-likelihood of those predictions) per task.
A position is its step's embedding, a bidirectional LSTM's output over the input and its place counted from
both ends (one-hot). With ``pointer=cyclic`` the heads do not attend: head d reads place (t + d) mod L and
head max_length + d place (L - 1 - t - d) mod L, every cyclic shift and reflection (a built-in prior, which
the learned heads do not find for rotations: Results). The reads do not feed back into the LSTM, so teacher
forcing and greedy decoding run the same function of the steps read. The readout sees
[o_t, sum_h w_h p_t^h, sum_h w_h m_t^h]. Forecast tasks (real-valued steps: sinusoid windows, stroke completion)
run the same network: steps are embedded by a linear map, SEP/EOS/BOS are learned vectors, the memory stores
the target values, a head's fit is minus its squared error, and greedy decoding feeds back its own outputs.
The network here is the whole learner, as SNAIL's and Santoro's are: the base learner only declares the
task's shapes (base_learner=lstm_seq2seq).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from metalstm.config import choice, count
from metalstm.core import PAD, EpisodeBatch
from metalstm.meta.base import MetaConfig, MetaLearner, MetaOutput


@dataclass
class MemorySeq2SeqConfig(MetaConfig):
    hidden: int = count(128)
    embed: int = count(32)  # step (token or value) embedding size
    attention: bool = True  # the two reads (query input, then the support pairs) at every decoding step
    # attention: how decoding step t points into its input. learned: `heads` attention heads; cyclic: one head per
    # cyclic shift and reflection, i = (t + d) mod L and (L - 1 - t - d) mod L for d < max length (a built-in prior)
    pointer: str = choice("learned", ("learned", "cyclic"))
    heads: int = count(12)  # learned pointer heads, weighed per task by how well each predicts the support pairs
    head_size: int = count(32)  # attention: the query and key size of each head and of the memory's keys


class Pointer(nn.Module):
    """Multi-head soft attention of queries [M, T, dq] over positions [M, S, dv] (padding: mask [M, S] False)
    -> one read per head [M, T, H, dv] (the heads share the values)."""

    def __init__(self, query_dim: int, value_dim: int, size: int, heads: int):
        super().__init__()
        self.query = nn.Sequential(nn.Linear(query_dim, query_dim), nn.Tanh(), nn.Linear(query_dim, size * heads))
        self.key = nn.Linear(value_dim, size * heads)
        self.size, self.heads = size, heads

    def forward(self, queries: Tensor, values: Tensor, mask: Tensor) -> Tensor:
        (m, t, _), s = queries.shape, values.shape[1]
        q = self.query(queries).view(m, t, self.heads, self.size).transpose(1, 2)  # [M, H, T, size]
        k = self.key(values).view(m, s, self.heads, self.size).transpose(1, 2)  # [M, H, S, size]
        scores = (q @ k.transpose(2, 3) / self.size**0.5).masked_fill(~mask[:, None, None, :], -1e9)
        return (scores.softmax(-1) @ values[:, None]).transpose(1, 2)  # [M, T, H, dv]


class MemorySeq2Seq(MetaLearner):
    task_types = ("seq2seq", "forecast")

    def __init__(self, learner, loss_fn, spec, cfg: MemorySeq2SeqConfig):
        super().__init__(learner, loss_fn)
        self.cfg = cfg
        self.tokens = spec["task_type"] == "seq2seq"  # else forecast: real-valued steps [L, d] in and out
        self.outputs = spec["output_dim"]
        self.output_length = spec["output_length"]  # decoding steps (at test, query_y may be a placeholder)
        self.max_length = max(spec["input_shape"][0], self.output_length)
        if self.tokens:  # token ids, then SEP, EOS and BOS
            self.sep, self.eos, self.bos = spec["vocab"], spec["vocab"] + 1, spec["vocab"] + 2
            self.embedding = nn.Embedding(spec["vocab"] + 3, cfg.embed)
        else:
            self.sep, self.eos, self.bos = 0, 1, 2
            self.embed_x, self.embed_y = nn.Linear(spec["input_shape"][1], cfg.embed), nn.Linear(self.outputs, cfg.embed)
            self.specials = nn.Embedding(3, cfg.embed)
        self.lstm = nn.LSTM(cfg.embed, cfg.hidden, batch_first=True)
        readout = cfg.hidden
        if cfg.attention:
            self.encoder = nn.LSTM(cfg.embed, cfg.hidden // 2, batch_first=True, bidirectional=True)
            # a step's embedding, the encoder's output there and its place from either end (one-hot)
            position = cfg.embed + 2 * (cfg.hidden // 2) + 2 * self.max_length
            self.heads = cfg.heads if cfg.pointer == "learned" else 2 * self.max_length
            if cfg.pointer == "learned":
                self.pointer = Pointer(cfg.hidden + 2 * self.max_length, position, cfg.head_size, cfg.heads)
            self.memory_key = nn.Linear(position, cfg.head_size)
            self.beta = nn.Parameter(torch.tensor(1.0))  # how sharply the support pairs' fit picks a head
            readout += position + self.outputs
        self.readout = nn.Linear(readout, self.outputs)

    # ------------------------------------------------------------------ tokens or real-valued steps

    def embed(self, seq: Tensor, side: str) -> Tensor:
        """An input (side "x") or target ("y") sequence [M, L] (tokens) or [M, L, d] -> [M, L, embed]."""
        if self.tokens:
            return self.embedding(seq)
        return (self.embed_x if side == "x" else self.embed_y)(seq)

    def special(self, which: int, rows: int, like: Tensor) -> Tensor:
        """SEP, EOS or BOS for ``rows`` sequences -> [rows, 1, embed]."""
        index = torch.full((rows, 1), which, dtype=torch.long, device=like.device)
        return self.embedding(index) if self.tokens else self.specials(index)

    def valid(self, seq: Tensor) -> Tensor:
        """[M, L, ...] -> [M, L]: the steps that are not padding (real-valued sequences have none)."""
        return seq != PAD if self.tokens else torch.ones(seq.shape[:2], dtype=torch.bool, device=seq.device)

    def target_values(self, y: Tensor) -> Tensor:
        """Targets [..., L] or [..., L, d] -> what the memory stores per step: one-hot tokens, or the values."""
        return nn.functional.one_hot(y, self.outputs).float() if self.tokens else y

    def next_input(self, output: Tensor) -> Tensor:
        """A decoding step's output [M, 1, outputs] -> the target it stands for (greedy: the likeliest token)."""
        return output.argmax(-1) if self.tokens else output

    # ------------------------------------------------------------------ reads

    def one_hot(self, index: Tensor) -> Tensor:
        return nn.functional.one_hot(index.clamp(0, self.max_length - 1), self.max_length).float()

    def positions(self, x: Tensor) -> Tensor:
        """Inputs [M, L(, d)] -> [M, L, position]: each step's embedding, the bidirectional encoder's output, and
        its place counted from the start and from the end of its sequence (one-hot)."""
        embedded, place = self.embed(x, "x"), torch.arange(x.shape[1], device=x.device)
        from_end = self.valid(x).sum(1, keepdim=True) - 1 - place
        return torch.cat([embedded, self.encoder(embedded)[0], self.one_hot(place).expand(len(x), -1, -1),
                          self.one_hot(from_end)], -1)

    def point(self, out: Tensor, inputs: tuple[Tensor, Tensor], first_step: int = 0) -> Tensor:
        """Decoder outputs [M, T, hidden] at steps first_step.. -> each head's read [M, T, H, position] of its
        sequence's input; the heads' queries see the step and the input's length (one-hot) beside o_t."""
        positions, mask = inputs
        (m, t, _), steps = out.shape, torch.arange(first_step, first_step + out.shape[1], device=out.device)
        if self.cfg.pointer == "cyclic":
            length, d = mask.sum(1).clamp(min=1)[:, None, None], torch.arange(self.max_length, device=out.device)
            shift = (steps[:, None] + d) % length  # [M, T, D]
            mirror = (length - 1 - steps[:, None] - d) % length
            index = torch.cat([shift, mirror], -1).flatten(1)  # [M, T * H]
            reads = positions.gather(1, index[..., None].expand(-1, -1, positions.shape[-1]))
            return reads.view(m, t, self.heads, -1)
        lengths = self.one_hot(mask.sum(1) - 1)[:, None].expand(-1, t, -1)
        return self.pointer(torch.cat([out, self.one_hot(steps).expand(m, -1, -1), lengths], -1), positions, mask)

    def decode_inputs(self, x: Tensor, state: tuple[Tensor, Tensor]) -> tuple[tuple[Tensor, Tensor], Tensor | None]:
        """x [M, L(, d)] inputs, each from the post-stream state [1, M, hidden] -> the state after x SEP, and x's
        positions [M, L, position] with their mask (for the pointer), or None without attention."""
        _, state = self.lstm(torch.cat([self.embed(x, "x"), self.special(self.sep, len(x), x)], 1), state)
        return state, ((self.positions(x), self.valid(x)) if self.cfg.attention else None)

    def teacher_inputs(self, y: Tensor) -> Tensor:
        """Targets [M, L(, d)] -> the decoder's inputs [M, L, embed]: BOS, then y_1 .. y_L-1."""
        return torch.cat([self.special(self.bos, len(y), y), self.embed(y[:, :-1], "y")], 1)

    def recall(self, keys: Tensor, memory: Tensor, values: Tensor, mask: Tensor) -> Tensor:
        """Keys [M, T, H, d] against memory keys [M, S, H, d] (mask [M, T, S] or [M, 1, S]) -> every head's
        recalled target [M, T, H, outputs] (a token distribution, or a value) from the values [M, S, outputs]."""
        scores = torch.einsum("mthd,mshd->mhts", keys, memory) / self.cfg.head_size**0.5
        weights = scores.masked_fill(~mask[:, None], -1e9).softmax(-1)  # [M, H, T, S]
        return (weights @ values[:, None]).transpose(1, 2)

    def support_memory(self, sx: Tensor, sy: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, ...]:
        """Decode the support pairs [B, k, L(, d)] teacher-forced -> memory keys [B, kL, H, d], target values
        [B, kL, outputs], mask [B, kL] and each head's weight per task [B, H], from how well it predicts each
        pair's targets out of the other pairs' memory (log-likelihood of tokens, or minus the squared error)."""
        (b, k, length), x, y = sy.shape[:3], sx.flatten(0, 1), sy.flatten(0, 1)
        s_state, inputs = self.decode_inputs(x, state)
        reads = self.point(self.lstm(self.teacher_inputs(y), s_state)[0], inputs)  # [B k, L, H, position]
        keys = self.memory_key(reads).reshape(b, k * length, self.heads, -1)
        values = self.target_values(sy).reshape(b, k * length, -1)
        mask = self.valid(y).reshape(b, k * length)
        pair = torch.arange(k, device=sy.device).repeat_interleave(length)
        other_pairs = (pair[:, None] != pair[None, :])[None] & mask[:, None, :]  # [B, kL, kL]
        recalled = self.recall(keys, keys, values, other_pairs)  # [B, kL, H, outputs]
        if self.tokens:
            fit = (recalled * values[:, :, None]).sum(-1).clamp(min=1e-6).log()  # [B, kL, H]
        else:
            fit = -(recalled - values[:, :, None]).pow(2).sum(-1)
        fit = (fit * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return keys, values, mask, (self.beta * fit).softmax(-1)

    def forward_tasks(self, batch: EpisodeBatch, teacher: bool) -> Tensor:
        """All query outputs [B, n, L, outputs]: teacher-forced on query_y, or decoded greedily."""
        sx, sy, qx, qy = batch
        (b, n), k, length = qx.shape[:2], sx.shape[1], self.output_length
        pairs = [self.embed(sx.flatten(0, 1), "x"), self.special(self.sep, b * k, sx),
                 self.embed(sy.flatten(0, 1), "y"), self.special(self.eos, b * k, sx)]
        _, (h, c) = self.lstm(torch.cat(pairs, 1).reshape(b, -1, self.cfg.embed))  # the stream: x SEP y EOS ...
        x = qx.flatten(0, 1)  # [B * n, L(, d)]
        state, inputs = self.decode_inputs(x, (h.repeat_interleave(n, 1), c.repeat_interleave(n, 1)))
        memory = None
        if self.cfg.attention:  # one memory per task; its n queries read it together
            memory = self.support_memory(sx, sy, (h.repeat_interleave(k, 1), c.repeat_interleave(k, 1)))

        def logits(out: Tensor, first_step: int = 0) -> Tensor:
            if memory is None:
                return self.readout(out)
            keys, values, mask, weights = memory
            reads = self.point(out, inputs, first_step)  # [B n, T, H, position]
            t = reads.shape[1]
            queries = self.memory_key(reads).reshape(b, n * t, self.heads, -1)  # a task's queries' steps together
            recalled = self.recall(queries, keys, values, mask[:, None]).reshape(b * n, t, self.heads, -1)
            mix = weights.repeat_interleave(n, 0)[:, None, :, None]
            return self.readout(torch.cat([out, (reads * mix).sum(2), (recalled * mix).sum(2)], -1))

        if teacher:  # one pass over [BOS, y_1 .. y_L-1]
            result = logits(self.lstm(self.teacher_inputs(qy.flatten(0, 1)), state)[0])
        else:
            steps, previous = [], self.special(self.bos, len(x), x)
            for step in range(length):
                out, state = self.lstm(previous, state)
                steps.append(logits(out, step))
                previous = self.embed(self.next_input(steps[-1]), "y")
            result = torch.cat(steps, 1)
        return result.view(b, n, length, -1)

    def meta_loss(self, batch: EpisodeBatch) -> MetaOutput:
        outputs = self.forward_tasks(batch, teacher=True)
        loss = torch.stack([self.loss_fn(o, y) for o, y in zip(outputs, batch.query_y)]).mean()
        return MetaOutput(loss, outputs.detach())

    def predict(self, batch: EpisodeBatch) -> Tensor:
        with torch.no_grad():
            return self.forward_tasks(batch, teacher=False)
