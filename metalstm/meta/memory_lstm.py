"""Memory-based meta-learning (Hochreiter et al. 2001; Santoro et al. 2016): learning in the activations.

The support set is read as a sequence of (embedding of x_t, label of the previous step y_{t-1}), the
papers' offset form (``labels: previous``): the LSTM must bind each label to the input it saw one
step earlier. The state after the support set holds what the task is. Each query x_q then takes one
step from that state, its label slot carrying the last support label y_N (which the LSTM has not
read yet), and that step is read out as its prediction — every query position is predicted, each
independently of the others. ``labels: current`` reads (x_t, y_t) pairs instead, with an empty
label slot for the queries (SNAIL's form). The embedding is the base learner's ``embed_with`` (Conv-4 for
images, the MLP's last hidden layer for sinusoid); no gradient step adapts anything at test time.
With ``attention`` a SNAIL-style (Mishra et al. 2018) soft attention lets each query also read every
support position; as in SNAIL's dense blocks, keys and values are the position's (embedding, label)
concatenated with the LSTM's output there. A key pairs x_t with its own label y_t, which in the offset
form arrives one step later: the key spans two input steps, as SNAIL's causal convolutions do.
``attention_score=cosine`` scores positions instead as MANN's memory does (Santoro et al. 2016): the cosine
similarity of the embeddings times a learned sharpness, beside a learned "none of these" score that reads zeros.

On stream tasks (Santoro et al.'s online episodes: no support set) the LSTM reads the query stream itself,
(x_t, y_t-1) at step t, and answers every step; the attention read at step t sees positions s < t only,
whose labels have been shown by then.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalstm.config import choice, count, setting
from metalstm.core import EpisodeBatch
from metalstm.errors import ConfigError
from metalstm.meta.base import MetaConfig, MetaLearner, MetaOutput


@dataclass
class MemoryLSTMConfig(MetaConfig):
    hidden: int = count(128)
    layers: int = count(1)
    # previous: (x_t, y_t-1), Hochreiter/Santoro | current: (x_t, y_t), SNAIL
    labels: str = choice("previous", ("previous", "current"))
    attention: bool = False  # SNAIL-style soft attention over the support positions
    # how a query scores a position: dense, SNAIL's learned projections of (input, LSTM output) | cosine, MANN's
    # content addressing: cosine similarity of the two embeddings times a learned sharpness
    attention_score: str = choice("dense", ("dense", "cosine"))
    # added to the forget gate's initial bias; 1 remembers longer early on (Jozefowicz et al. 2015)
    forget_bias: float = setting(0.0, minimum=0)
    shuffle_support: bool = True  # read the support set in random order (fixed per task at test)


def one_step_late(labels: Tensor) -> Tensor:
    """[B, n, d] -> the label slots of the offset form: step t holds y_t-1 (zeros at step 1)."""
    return torch.cat([torch.zeros_like(labels[:, :1]), labels[:, :-1]], 1)


class MemoryLSTM(MetaLearner):
    task_types = ("classification", "regression", "stream")  # one label per example fills the label slot
    running_norm = True

    def __init__(self, learner, loss_fn, spec, cfg: MemoryLSTMConfig):
        super().__init__(learner, loss_fn)
        self.cfg = cfg
        self.classification = spec["task_type"] in ("classification", "stream")
        if spec["task_type"] == "stream" and cfg.labels != "previous":
            raise ConfigError(f"meta_learner.labels={cfg.labels} shows each example's label with it, but a stream "
                              "task is answered before its label is shown; use meta_learner.labels=previous.")
        self.label_dim = spec["output_dim"]
        self.lstm = nn.LSTM(learner.embed_dim + self.label_dim, cfg.hidden, cfg.layers, batch_first=True)
        with torch.no_grad():  # PyTorch adds two biases; gates are ordered input, forget, cell, output
            for name, bias in self.lstm.named_parameters():
                if name.startswith("bias_ih"):
                    bias[cfg.hidden : 2 * cfg.hidden] += cfg.forget_bias
        readout = cfg.hidden
        if cfg.attention:
            dense = learner.embed_dim + self.label_dim + cfg.hidden  # [input, LSTM output] per position
            if cfg.attention_score == "dense":
                self.attend_query = nn.Linear(dense, cfg.hidden)
                self.attend_key = nn.Linear(dense, cfg.hidden)
            else:
                self.sharpness = nn.Parameter(torch.tensor(10.0))
                # the score of "none of these": weight it takes reads zeros, so a drawing unlike every earlier one
                # (a new class) is not answered with its nearest neighbour's label
                self.novelty = nn.Parameter(torch.tensor(7.0))
                readout += cfg.hidden  # the LSTM's output times the weight on "none of these": its guess for a new one
            readout += dense
        self.readout = nn.Linear(readout, spec["output_dim"])

    def embed(self, x: Tensor) -> Tensor:
        """[B, n, ...] -> [B, n, d], one forward per task so no statistics are shared across tasks."""
        return torch.stack([self.learner.embed_with(self.learner.params(), task) for task in x])

    def label_slot(self, y: Tensor) -> Tensor:
        return F.one_hot(y, self.label_dim).float() if self.classification else y.float()

    def forward_tasks(self, batch: EpisodeBatch, generator: torch.Generator | None) -> Tensor:
        """All query outputs [B, n_q, out] of a batch of tasks."""
        sx, sy, qx, _ = batch
        if self.cfg.shuffle_support:
            order = torch.rand(sy.shape[:2], generator=generator).argsort(1).to(sy.device)
            sx = sx.gather(1, order.view(*order.shape, *[1] * (sx.dim() - 2)).expand_as(sx))
            sy = sy.gather(1, order.view(*order.shape, *[1] * (sy.dim() - 2)).expand_as(sy))
        z = self.embed(torch.cat([sx, qx], 1))
        z_support, z_query = z[:, : sx.shape[1]], z[:, sx.shape[1] :]
        labels = self.label_slot(sy)  # [B, n_s, label_dim]
        b, n_q = z_query.shape[:2]
        if self.cfg.labels == "previous":  # shift by one step; the last label comes with the queries
            support_labels, query_labels = one_step_late(labels), labels[:, -1:].expand(b, n_q, -1)
        else:
            support_labels, query_labels = labels, labels.new_zeros(b, n_q, self.label_dim)
        support_in = torch.cat([z_support, support_labels], -1)
        support_out, (h, c) = self.lstm(support_in)
        # each query: one step from the state after the support set
        query_in = torch.cat([z_query, query_labels], -1)
        state = (h.repeat_interleave(n_q, 1), c.repeat_interleave(n_q, 1))
        read = self.lstm(query_in.reshape(b * n_q, 1, -1), state)[0].view(b, n_q, -1)
        if self.cfg.attention:
            keys = torch.cat([z_support, labels, support_out], -1)  # x_t with its own label y_t
            read = self.with_attention(read, torch.cat([query_in, read], -1), keys)
        return self.readout(read)

    def with_attention(self, read: Tensor, queries: Tensor, keys: Tensor, hidden: Tensor | None = None) -> Tensor:
        """The readout's features: the LSTM's output read [B, T, h], the attention read, and with cosine scores also
        read times the weight on "none of these", so the LSTM's answer counts most where nothing earlier matches."""
        attended, weights = self.attend(queries, keys, hidden)
        if self.cfg.attention_score == "dense":
            return torch.cat([read, attended], -1)
        return torch.cat([read, attended, (1 - weights.sum(-1, keepdim=True)) * read], -1)

    def attend(self, queries: Tensor, keys: Tensor, hidden: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The attention read: queries [B, T, dq] over positions keys [B, S, dk] -> [B, T, dk], and its weights
        [B, T, S]; both start with the embedding. ``hidden`` [T, S]: True where a position may not be read yet; a
        query with none readable reads zeros. Cosine scores compete with a learned ``novelty`` score whose weight
        also reads zeros."""
        cosine = self.cfg.attention_score == "cosine"
        if cosine:
            d = self.learner.embed_dim
            similarity = F.normalize(queries[..., :d], dim=-1) @ F.normalize(keys[..., :d], dim=-1).transpose(1, 2)
            scores = self.sharpness * similarity
        else:
            scores = self.attend_query(queries) @ self.attend_key(keys).transpose(1, 2) / self.cfg.hidden**0.5
        if hidden is not None:
            scores = scores.masked_fill(hidden, -1e9)  # exp(-1e9) = 0 exactly
        if cosine:
            scores = torch.cat([scores, self.novelty.expand(*scores.shape[:-1], 1)], -1)
        weights = scores.softmax(-1)[..., : keys.shape[1]]
        if hidden is not None and not cosine:
            weights = weights * ~hidden.all(-1, keepdim=True)
        return weights @ keys, weights

    def forward_stream(self, x: Tensor, y: Tensor) -> Tensor:
        """A stream x [B, n, ...] with labels y [B, n] -> outputs [B, n, out], step t answered from x_1..x_t and
        y_1..y_t-1 only."""
        z = self.embed(x)
        labels = self.label_slot(y)
        inputs = torch.cat([z, one_step_late(labels)], -1)  # y_t-1 arrives with x_t
        read, _ = self.lstm(inputs)
        if self.cfg.attention:
            keys = torch.cat([z, labels, read], -1)  # position s with its own label: usable from step s + 1 on
            n = y.shape[1]
            unlabelled = torch.ones(n, n, dtype=torch.bool, device=y.device).triu()  # s >= t: not yet labelled
            read = self.with_attention(read, torch.cat([inputs, read], -1), keys, unlabelled)
        return self.readout(read)

    def outputs(self, batch: EpisodeBatch, generator: torch.Generator | None) -> Tensor:
        if batch.support_x.shape[1] == 0:  # a stream task
            return self.forward_stream(batch.query_x, batch.query_y)
        return self.forward_tasks(batch, generator)

    def meta_loss(self, batch: EpisodeBatch) -> MetaOutput:
        outputs = self.outputs(batch, None)
        loss = torch.stack([self.loss_fn(o, y) for o, y in zip(outputs, batch.query_y)]).mean()
        return MetaOutput(loss, outputs.detach())

    def predict(self, batch: EpisodeBatch) -> Tensor:
        with torch.no_grad():
            return self.outputs(batch, torch.Generator().manual_seed(0))
