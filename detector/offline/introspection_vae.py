"""Offline training of the self-introspection model (Pardo et al. 2019) and its export to ONNX.

The self-introspection system reads the concatenated hidden activations ``h`` of a trained classifier
and has three parts (the paper's Fig. 1 and Table 2):

* an InfoVAE encoder ``z = f_enc(h)`` and decoder ``h_hat = f_dec(z)``, MLPs with ELU units, trained on
  reconstruction + lambda * MMD(q(z), N(0, I));
* an error estimator ``f_est(z) ~ log10 e`` with ``e = 1/2 ||onehot(y) - softmax(logits)||^2``, an MLP
  with ELU units and one linear output, trained after the autoencoder with the encoder frozen
  (the paper's gradient stop between the bottleneck and the estimator).

This module imports torch and is only used offline, through :func:`fit_introspection`, which the
torch-free :class:`detector.introspection.IntrospectionScorer` imports lazily. Serving runs the ONNX
graph made by :func:`export_onnx` with ONNX Runtime.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

__all__ = [
    "IntrospectionConfig",
    "IntrospectionNet",
    "TrainingHistory",
    "ProgressCallback",
    "mmd",
    "train_vae",
    "train_estimator",
    "fit_introspection",
    "export_onnx",
    "INPUT_NAME",
    "OUTPUT_NAMES",
]

INPUT_NAME = "features"
OUTPUT_NAMES = ("z", "reconstruction_error", "log10_error")

#: ``progress(stage, epoch, train_loss, validation_loss)``, called once per epoch; stage is "vae" or "estimator".
ProgressCallback = Callable[[str, int, float, float], None]


@dataclass(frozen=True)
class IntrospectionConfig:
    """Hyper-parameters of the introspection model and of its training.

    Parameters
    ----------
    latent_dim : int, default=2
        Size of the code z (2 in the paper, which draws z as a map).
    hidden : tuple of int, default=(200, 200, 200)
        Widths of the ELU layers of the encoder; the decoder mirrors them (paper: 3 x 200).
    estimator_hidden : tuple of int, default=(200, 200, 200)
        Widths of the ELU layers of the error estimator (paper: 3 x 200).
    mmd_lambda : float, default=0.1
        Weight of the MMD term of the autoencoder loss.
    max_epochs : int, default=200
        Upper bound on epochs for each of the two stages.
    patience : int, default=15
        Early stopping: a stage stops after this many epochs without a better validation loss, and
        the weights of the best epoch are kept.
    batch_size : int, default=128
    learning_rate : float, default=1e-3
        Adam step size (the paper uses Adam with cyclic learning rates; a constant rate suffices here).
    weight_decay : float, default=0.0
        Adam's L2 penalty.
    validation_fraction : float, default=0.2
        Share of the fit rows held out for early stopping (the same rows in both stages).
    seed : int, default=0
        Seeds weight initialisation, the validation split, shuffling and the prior samples of the MMD.
    threads : int, default=1
        torch intra-op threads during training; fixed so that results do not depend on the machine.
    """

    latent_dim: int = 2
    hidden: tuple[int, ...] = (200, 200, 200)
    estimator_hidden: tuple[int, ...] = (200, 200, 200)
    mmd_lambda: float = 0.1
    max_epochs: int = 200
    patience: int = 15
    batch_size: int = 128
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    validation_fraction: float = 0.2
    seed: int = 0
    threads: int = 1


@dataclass
class TrainingHistory:
    """Per-epoch mean losses of both stages and the epoch whose weights were kept."""

    vae_train: list[float] = field(default_factory=list)
    vae_validation: list[float] = field(default_factory=list)
    vae_best_epoch: int = -1
    estimator_train: list[float] = field(default_factory=list)
    estimator_validation: list[float] = field(default_factory=list)
    estimator_best_epoch: int = -1


def _mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers of ``sizes`` with ELU between them and a linear last layer."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ELU())
    return nn.Sequential(*layers)


class IntrospectionNet(nn.Module):
    """Encoder, decoder and error estimator in one module, exported as one ONNX graph.

    Parameters
    ----------
    n_features : int
        Width D of the standardised activation vector h.
    config : IntrospectionConfig

    Notes
    -----
    The InfoVAE is used with alpha = 1 (the "MMD-VAE" of Zhao et al.): the KL term of the ELBO
    vanishes, so the encoder is deterministic and its output is the mean code z = mu(h).
    :meth:`forward` returns, for h of shape (N, D):

    * ``z``: ndarray (N, latent_dim), the code;
    * ``reconstruction_error``: (N,), mean_j (h_j - h_hat_j)^2 with h_hat = f_dec(z);
    * ``log10_error``: (N,), the estimator's f_est(z), an estimate of log10 e.
    """

    def __init__(self, n_features: int, config: IntrospectionConfig) -> None:
        super().__init__()
        hidden = list(config.hidden)
        self.encoder = _mlp([n_features, *hidden, config.latent_dim])
        self.decoder = _mlp([config.latent_dim, *reversed(hidden), n_features])
        self.estimator = _mlp([config.latent_dim, *config.estimator_hidden, 1])

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = self.encoder(features)
        reconstruction = self.decoder(z)
        reconstruction_error = torch.mean((features - reconstruction) ** 2, dim=1)
        log10_error = self.estimator(z)[:, 0]
        return z, reconstruction_error, log10_error


def mmd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared maximum mean discrepancy between samples ``a`` (n, d) and ``b`` (m, d).

    Notes
    -----
    MMD^2 = mean k(a, a') + mean k(b, b') - 2 mean k(a, b) (the biased V-statistic, always >= 0),
    with the Gaussian kernel k(x, y) = exp(-||x - y||^2 / d), i.e. bandwidth 2 sigma^2 = d, as in
    Zhao et al.'s InfoVAE (MMD-VAE) reference implementation.
    """
    d = a.shape[1]

    def kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        sq = (x[:, None, :] - y[None, :, :]).pow(2).sum(-1)
        return torch.exp(-sq / d)

    return kernel(a, a).mean() + kernel(b, b).mean() - 2.0 * kernel(a, b).mean()


@contextlib.contextmanager
def _deterministic(seed: int, threads: int) -> Iterator[None]:
    """Seed torch, use deterministic kernels and a fixed thread count; restore all of it afterwards."""
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.set_num_threads(previous_threads)
            torch.use_deterministic_algorithms(previous_deterministic)


def _split(n: int, validation_fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    n_validation = max(1, int(round(validation_fraction * n)))
    if n - n_validation < 1:
        raise ValueError(f"need at least 2 fit rows for a validation split, got {n}")
    return order[n_validation:], order[:n_validation]


class _Progress:
    """Forwards epoch losses to a callback, or draws a tqdm bar, or does nothing."""

    def __init__(self, progress: bool | ProgressCallback, stage: str, total: int) -> None:
        self.callback = progress if callable(progress) else None
        self.bar = None
        if progress is True:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=f"introspection {stage}", unit="epoch", leave=False)
        self.stage = stage

    def update(self, epoch: int, train_loss: float, validation_loss: float) -> None:
        if self.callback is not None:
            self.callback(self.stage, epoch, train_loss, validation_loss)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(train=f"{train_loss:.4g}", val=f"{validation_loss:.4g}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_stage(
    stage: str,
    modules: nn.Module,
    batch_loss: Callable[[torch.Tensor], torch.Tensor],
    validation_loss: Callable[[torch.Tensor], torch.Tensor],
    train_index: torch.Tensor,
    validation_index: torch.Tensor,
    config: IntrospectionConfig,
    generator: torch.Generator,
    progress: bool | ProgressCallback,
    train_log: list[float],
    validation_log: list[float],
) -> int:
    """Minibatch Adam on ``batch_loss`` with early stopping on ``validation_loss``; return the best epoch."""
    parameters = [p for p in modules.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    best = math.inf
    best_epoch = -1
    best_state = {k: v.detach().clone() for k, v in modules.state_dict().items()}
    bar = _Progress(progress, stage, config.max_epochs)
    try:
        for epoch in range(config.max_epochs):
            modules.train()
            order = train_index[torch.randperm(len(train_index), generator=generator)]
            total, count = 0.0, 0
            for start in range(0, len(order), config.batch_size):
                rows = order[start : start + config.batch_size]
                optimizer.zero_grad()
                loss = batch_loss(rows)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(rows)
                count += len(rows)
            modules.eval()
            with torch.no_grad():
                current = float(validation_loss(validation_index))
            train_log.append(total / count)
            validation_log.append(current)
            bar.update(epoch, total / count, current)
            if current < best:
                best, best_epoch = current, epoch
                best_state = {k: v.detach().clone() for k, v in modules.state_dict().items()}
            elif epoch - best_epoch >= config.patience:
                break
    finally:
        bar.close()
    modules.load_state_dict(best_state)
    modules.eval()
    return best_epoch


def train_vae(
    net: IntrospectionNet,
    features: torch.Tensor,
    train_index: torch.Tensor,
    validation_index: torch.Tensor,
    config: IntrospectionConfig,
    generator: torch.Generator,
    history: TrainingHistory,
    progress: bool | ProgressCallback = False,
) -> None:
    """Train ``net.encoder`` and ``net.decoder`` on reconstruction + lambda * MMD.

    Notes
    -----
    Per batch B of standardised activations h: loss = mean_{i in B, j} (h_ij - h_hat_ij)^2
    + lambda * MMD^2({z_i}, {s_i}) with |B| prior samples s_i ~ N(0, I) drawn from the seeded
    ``generator`` (Pardo et al. 2019, Sec. 2.5; Zhao et al., InfoVAE). The validation loss uses a
    fixed set of prior samples so that it is comparable between epochs.
    """
    autoencoder = nn.ModuleList([net.encoder, net.decoder])
    prior_validation = torch.randn(len(validation_index), config.latent_dim, generator=generator)

    def loss_on(rows: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        h = features[rows]
        z = net.encoder(h)
        reconstruction = net.decoder(z)
        return torch.mean((h - reconstruction) ** 2) + config.mmd_lambda * mmd(z, prior)

    def batch_loss(rows: torch.Tensor) -> torch.Tensor:
        return loss_on(rows, torch.randn(len(rows), config.latent_dim, generator=generator))

    history.vae_best_epoch = _run_stage(
        "vae",
        autoencoder,
        batch_loss,
        lambda rows: loss_on(rows, prior_validation),
        train_index,
        validation_index,
        config,
        generator,
        progress,
        history.vae_train,
        history.vae_validation,
    )


def train_estimator(
    net: IntrospectionNet,
    features: torch.Tensor,
    log10_error: torch.Tensor,
    train_index: torch.Tensor,
    validation_index: torch.Tensor,
    config: IntrospectionConfig,
    generator: torch.Generator,
    history: TrainingHistory,
    progress: bool | ProgressCallback = False,
) -> None:
    """Train ``net.estimator`` on the frozen encoder's codes: loss = mean (f_est(z) - log10 e)^2.

    The codes are computed once under ``no_grad``, which is the paper's gradient stop between the
    bottleneck and the estimator (Sec. 2.4): the autoencoder does not change in this stage.
    """
    with torch.no_grad():
        codes = net.encoder(features)

    def loss_on(rows: torch.Tensor) -> torch.Tensor:
        return torch.mean((net.estimator(codes[rows])[:, 0] - log10_error[rows]) ** 2)

    history.estimator_best_epoch = _run_stage(
        "estimator",
        net.estimator,
        loss_on,
        loss_on,
        train_index,
        validation_index,
        config,
        generator,
        progress,
        history.estimator_train,
        history.estimator_validation,
    )


def fit_introspection(
    features: np.ndarray,
    log10_error: np.ndarray,
    config: IntrospectionConfig,
    progress: bool | ProgressCallback = False,
) -> tuple[IntrospectionNet, TrainingHistory]:
    """Train the autoencoder, then the estimator, reproducibly.

    Parameters
    ----------
    features : ndarray of shape (n_samples, n_features)
        Standardised activation vectors h.
    log10_error : ndarray of shape (n_samples,)
        Targets log10 e of the classifier's error on the same rows.
    config : IntrospectionConfig
    progress : bool or callable, default=False
        True draws tqdm bars; a callable receives ``(stage, epoch, train_loss, validation_loss)``.

    Returns
    -------
    net : IntrospectionNet
        In eval mode, float32, on the CPU.
    history : TrainingHistory
    """
    features = np.asarray(features, dtype=np.float32)
    log10_error = np.asarray(log10_error, dtype=np.float32)
    if features.ndim != 2 or log10_error.shape != (features.shape[0],):
        raise ValueError(
            f"expected features (n, d) and log10_error (n,), got {features.shape} and {log10_error.shape}"
        )
    history = TrainingHistory()
    with _deterministic(config.seed, config.threads):
        generator = torch.Generator().manual_seed(config.seed)
        net = IntrospectionNet(features.shape[1], config)
        h = torch.from_numpy(features)
        target = torch.from_numpy(log10_error)
        train_index, validation_index = _split(len(h), config.validation_fraction, generator)
        train_vae(net, h, train_index, validation_index, config, generator, history, progress)
        for p in list(net.encoder.parameters()) + list(net.decoder.parameters()):
            p.requires_grad_(False)
        train_estimator(net, h, target, train_index, validation_index, config, generator, history, progress)
        for p in net.parameters():
            p.requires_grad_(True)
    net.eval()
    return net, history


def export_onnx(net: IntrospectionNet, n_features: int) -> bytes:
    """Export ``net`` as one ONNX graph and return its serialised bytes.

    The graph has one input ``features`` (float32, (N, n_features), N dynamic) and the outputs
    ``z`` (N, latent_dim), ``reconstruction_error`` (N,) and ``log10_error`` (N,). The estimator
    reads the tensor named ``z``, so the sub-graph z -> log10_error can be cut out of the same model
    (:class:`detector.introspection.IntrospectionRunner` does this to draw the activation map).

    Notes
    -----
    Uses the torch.export-based exporter (``dynamo=True``, the default since torch 2.9; the
    TorchScript one still works in 2.13 but is deprecated and announced for removal). Its console
    output is silenced.
    """
    net = net.eval()
    example = torch.zeros(2, n_features, dtype=torch.float32)
    onnx_logger = logging.getLogger("torch.onnx")
    previous_level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)  # "torchvision is not installed" and similar notices
    try:
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                net,
                (example,),
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                dynamo=True,
                verbose=False,
            )
    finally:
        onnx_logger.setLevel(previous_level)
    return program.model_proto.SerializeToString()
