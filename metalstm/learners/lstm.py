"""LSTM base learners: an encoder (sequence -> class or embedding) and an encoder-decoder (sequence ->
sequence), written from functional ops so MAML can differentiate through them twice.

cuDNN's and ATen's fused LSTM kernels have no double backward; ``LSTMLayer`` runs the recurrence
    [i, f, g, o] = x_t W_ih^T + h_{t-1} W_hh^T + b,   c_t = s(f) c_{t-1} + s(i) tanh(g),   h_t = s(o) tanh(c_t)
step by step, so every derivative is ordinary autograd on any device.

Inputs come from the data set's spec: token sequences x [n, L] (int, 0 = padding, ``vocab`` in the spec)
are embedded; real-valued sequences x [n, L, d] are projected. Padded steps (token 0) leave the state
unchanged, so variable-length sequences end in the state of their last real step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from metalstm.config import count
from metalstm.core import PAD
from metalstm.learners.base import BaseLearner, LearnerConfig, TaskSpec

State = tuple[Tensor, Tensor]


class LSTMLayer(nn.Module):
    """One LSTM layer from functional ops: x [n, T, d] -> outputs [n, T, h], final (h, c) each [n, h]."""

    def __init__(self, input_size: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        bound = hidden**-0.5  # torch.nn.LSTM's initialisation
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden, input_size).uniform_(-bound, bound))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden, hidden).uniform_(-bound, bound))
        bias = torch.empty(4 * hidden).uniform_(-bound, bound)
        bias[hidden : 2 * hidden] += 1.0  # forget gate starts open (Jozefowicz et al. 2015)
        self.bias = nn.Parameter(bias)

    def cell(self, projected: Tensor, state: State) -> State:
        """One step from x_t W_ih^T [n, 4h] and (h, c)."""
        h, c = state
        i, f, g, o = (projected + h @ self.weight_hh.T + self.bias).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    def step(self, x: Tensor, state: State) -> State:
        return self.cell(x @ self.weight_ih.T, state)

    def forward(self, x: Tensor, state: State | None = None, mask: Tensor | None = None) -> tuple[Tensor, State]:
        """mask [n, T] (bool): False steps keep the previous state (padding)."""
        if state is None:
            zeros = x.new_zeros(x.shape[0], self.hidden)
            state = (zeros, zeros)
        projected = x @ self.weight_ih.T  # every step's input projection at once; the recurrence is a loop
        outputs = []
        # unbind, not projected[:, t]: the backward of T selects writes T full-size zero tensors (quadratic in T)
        for t, step_input in enumerate(projected.unbind(1)):
            new = self.cell(step_input, state)
            if mask is not None:
                keep = mask[:, t, None]
                new = (torch.where(keep, new[0], state[0]), torch.where(keep, new[1], state[1]))
            state = new
            outputs.append(state[0])
        return torch.stack(outputs, 1), state


@dataclass
class LSTMEncoderConfig(LearnerConfig):
    hidden: int = count(128)
    input_dim: int = count(32)  # token embedding size, or the projection of real-valued steps


class SequenceInput(nn.Module):
    """Embeds tokens x [n, L] or projects real steps x [n, L, d] -> [n, L, input_dim]."""

    @staticmethod
    def refusal(spec: TaskSpec, group: str) -> str | None:
        shape, tokens = tuple(spec["input_shape"]), spec.get("vocab") is not None
        if (tokens and len(shape) == 1) or (not tokens and len(shape) == 2):
            return None
        return (f"base_learner={group} needs sequences (tokens [length] or real-valued steps [length, features]), "
                f"but this data set's examples have shape {list(shape)}; use base_learner=conv4 or mlp.")

    @staticmethod
    def one_output_refusal(spec: TaskSpec, group: str) -> str | None:
        """``refusal`` for a learner with one output per sequence (lstm_encoder, conv1d)."""
        if spec.get("output_length"):
            return (f"base_learner={group} predicts one output per sequence, but this data set's targets are "
                    "sequences; use base_learner=lstm_seq2seq.")
        return SequenceInput.refusal(spec, group)

    def __init__(self, spec: TaskSpec, input_dim: int):
        super().__init__()
        shape = tuple(spec["input_shape"])
        self.tokens = spec.get("vocab") is not None
        self.step_mask = bool(spec.get("step_mask"))  # the last feature of each step: 1 observed, 0 padding
        features = shape[1] - self.step_mask if len(shape) == 2 else None
        self.embed = nn.Embedding(spec["vocab"], input_dim) if self.tokens else nn.Linear(features, input_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """-> (inputs [n, L, input_dim], mask [n, L] or None)."""
        if self.tokens:
            return self.embed(x), x != PAD
        if self.step_mask:
            return self.embed(x[..., :-1]), x[..., -1] > 0.5
        return self.embed(x), None


class LSTMEncoder(BaseLearner):
    """x [n, L(, d)] -> outputs [n, output_dim]; the embedding is the final hidden state [n, hidden]."""

    @classmethod
    def refusal(cls, cfg: LSTMEncoderConfig, spec: TaskSpec) -> str | None:
        return SequenceInput.one_output_refusal(spec, "lstm_encoder")

    def __init__(self, cfg: LSTMEncoderConfig, spec: TaskSpec):
        super().__init__()
        self.check_spec(cfg, spec)
        self.input = SequenceInput(spec, cfg.input_dim)
        self.encoder = LSTMLayer(cfg.input_dim, cfg.hidden)
        self.embed_dim = cfg.hidden
        self.head = nn.Linear(cfg.hidden, spec["output_dim"])

    def forward(self, x: Tensor, embed: bool = False, targets: Tensor | None = None) -> Tensor:
        inputs, mask = self.input(x)
        features = self.encoder(inputs, mask=mask)[1][0]
        return features if embed else self.head(features)


@dataclass
class LSTMSeq2SeqConfig(LearnerConfig):
    hidden: int = count(128)
    input_dim: int = count(32)  # token embedding size, or the projection of real-valued steps


class LSTMSeq2Seq(BaseLearner):
    """x [n, L(, d)] -> outputs [n, H, output_dim]: the encoder's final state starts a decoder that
    runs ``output_length`` (H) steps. With ``targets`` [n, H(, d)] the decoder reads the previous
    target (teacher forcing); without, it reads its own previous prediction (greedy). The first
    decoder input is a learned start vector. For token outputs, target 0 (padding) ends a sequence."""

    @classmethod
    def refusal(cls, cfg: LSTMSeq2SeqConfig, spec: TaskSpec) -> str | None:
        if not spec.get("output_length"):
            return ("base_learner=lstm_seq2seq decodes target sequences, but this data set has one "
                    "target per example; use base_learner=lstm_encoder, mlp or conv4.")
        return SequenceInput.refusal(spec, "lstm_seq2seq")

    def __init__(self, cfg: LSTMSeq2SeqConfig, spec: TaskSpec):
        super().__init__()
        self.check_spec(cfg, spec)
        self.output_length = spec["output_length"]
        self.token_outputs = spec["task_type"] == "seq2seq"
        self.input = SequenceInput(spec, cfg.input_dim)
        self.encoder = LSTMLayer(cfg.input_dim, cfg.hidden)
        if self.token_outputs:
            self.target_input = nn.Embedding(spec["output_dim"], cfg.input_dim)
        else:
            self.target_input = nn.Linear(spec["output_dim"], cfg.input_dim)
        self.start = nn.Parameter(torch.zeros(cfg.input_dim))
        self.decoder = LSTMLayer(cfg.input_dim, cfg.hidden)
        self.embed_dim = cfg.hidden
        self.head = nn.Linear(cfg.hidden, spec["output_dim"])

    def forward(self, x: Tensor, embed: bool = False, targets: Tensor | None = None) -> Tensor:
        inputs, mask = self.input(x)
        state = self.encoder(inputs, mask=mask)[1]
        if embed:
            return state[0]
        start = self.start.expand(x.shape[0], 1, -1)
        if targets is not None:  # teacher forcing: one pass over [start, y_1 .. y_{H-1}]
            previous = torch.cat([start, self.target_input(targets[:, :-1])], 1)
            return self.head(self.decoder(previous, state)[0])
        outputs, step_input = [], start[:, 0]
        for _ in range(self.output_length):
            state = self.decoder.step(step_input, state)
            out = self.head(state[0])
            outputs.append(out)
            step_input = self.target_input(out.argmax(-1) if self.token_outputs else out)
        return torch.stack(outputs, 1)
