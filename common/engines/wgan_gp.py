"""WGAN-GP training of a conditional generator (Gulrajani et al. 2017, arXiv:1704.00028, Algorithm 1), for the
optional adversarial training of the attention U-Net with AdaDM (methods.md §4: PatchGAN critic, n_critic 5,
penalty weight 10, Adam β (0, 0.9), critic lr 1e-4, generator adversarial weight 1e-2 to 0.2).

:class:`WGANGPTrainer` is a MONAI :class:`monai.engines.Trainer`, like MONAI's ``GanTrainer``, fed like the stock
``SupervisedTrainer``: ``prepare_batch`` returns ``(inputs, target, args, kwargs)`` and the generator is called
``g_network(inputs, *args, **kwargs)`` through ``g_inferer``. Every iteration updates the critic once on its batch,
and every ``n_critic``-th iteration (counted by ``engine.state.iteration``, so a resumed run keeps the rhythm) also
the generator once: Algorithm 1 with a fresh batch for each critic step.

- critic: ``L_D = D(fake) − D(real) + gp_weight·GP`` with the fake detached (:mod:`common.losses.gradient_penalty`);
- generator: ``L_G = content(fake, target) + adv_weight·(−D(fake))`` with the critic's parameters frozen, ``content``
  the bundle's L1 (+ perceptual) loss. The generator's forward pass of a generator iteration is the one the critic
  step used (the generator has not changed in between), so it runs once per iteration.

Handlers written for ``SupervisedTrainer`` keep working: ``engine.network`` / ``engine.optimizer`` are the
generator's, ``IterationEvents.FORWARD_COMPLETED`` follows the generator's forward pass, ``LOSS_COMPLETED`` and
``BACKWARD_COMPLETED`` fire around the generator's backward pass only (so
:class:`common.engines.GradientClipping` clips the generator's gradients before its step), ``MODEL_COMPLETED`` ends
every iteration. Checkpoints take any keys: give :class:`common.engines.ResumeFromLatest` and
:class:`common.engines.EngineCheckpointSaver` ``{"network": g, "optimizer": g_opt, "critic": d,
"critic_optimizer": d_opt}``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from monai.engines import Trainer
from monai.engines.utils import IterationEvents, default_metric_cmp_fn, default_prepare_batch
from monai.inferers import Inferer, SimpleInferer
from monai.utils.enums import CommonKeys as Keys
from torch import Tensor, nn
from torch.optim import Optimizer

from common.losses.gradient_penalty import (
    critic_score,
    gradient_penalty,
    wasserstein_critic_loss,
    wasserstein_generator_loss,
)
from common.utils import as_flag

__all__ = ["WGANGPTrainer"]

# the generator's loss terms, reported on every iteration (the last generator step's between two of them)
_G_KEYS = (Keys.LOSS, "g_loss", "content_loss", "adv_loss")


@contextlib.contextmanager
def _frozen(module: nn.Module):
    """``module``'s parameters without gradients for the duration (the generator step backpropagates through the
    critic but must neither update it nor pay for its parameter gradients)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p in params:
            p.requires_grad_(True)


class WGANGPTrainer(Trainer):
    """WGAN-GP training of a conditional generator against a critic (see the module docstring).

    ``engine.state.output`` holds ``image`` (generator inputs), ``label`` (target), ``pred`` (the generated images,
    detached), ``d_loss`` (critic loss with the penalty), ``gp`` (the penalty, unweighted), ``wasserstein``
    (``D(real) − D(fake)``, the critic's Wasserstein estimate), and the generator's ``content_loss``, ``adv_loss``
    (``−D(fake)``), ``g_loss`` = ``loss`` (``content_loss + adv_weight·adv_loss``), all detached. Critic-only
    iterations repeat the last generator step's values (NaN before the first one of a run or a resumed run), so
    handlers logging ``loss`` always find it.

    Args:
        device: device of the run.
        max_epochs: epochs to run.
        train_data_loader: training batches.
        g_network: the generator, called ``g_network(inputs, *args, **kwargs)``.
        g_optimizer: the generator's optimiser.
        g_loss_function: the content loss ``(pred, target) -> loss`` (e.g. L1 + λ_perc·perceptual), averaged.
        d_network: the critic (e.g. :func:`common.networks.patch_critic`), returning a score map or a list of maps
            whose last one is the score map; batch normalisation is refused (the penalty is per sample).
        d_optimizer: the critic's optimiser (Adam, lr 1e-4, betas (0, 0.9) in the paper and methods.md §4).
        n_critic: critic updates per generator update.
        gp_weight: λ, the weight of the gradient penalty.
        adv_weight: weight of the generator's adversarial loss next to the content loss.
        condition_critic: feed the critic ``cat([inputs, image], dim=1)`` (a conditional, pix2pix-style critic:
            needs ``inputs`` on the image's grid, and the critic's ``in_channels`` = inputs' channels + image's).
        epoch_length: iterations per epoch (default: the loader's length).
        non_blocking: non-blocking host-to-device copies.
        prepare_batch: ``(batchdata, device, non_blocking, **kwargs) -> (inputs, target[, args, kwargs])``, as for
            ``SupervisedTrainer``.
        g_inferer: runs the generator (e.g. :class:`common.inferers.AutocastInferer` for bf16 on CPU); default
            :class:`monai.inferers.SimpleInferer`.
        d_inferer: runs the critic on real and generated images (not for the penalty, which runs in float32);
            default :class:`monai.inferers.SimpleInferer`.
        iteration_update: replaces :meth:`_iteration` (ignite's process function).
        postprocessing: transform of the output at ``MODEL_COMPLETED``.
        key_train_metric: key metric over training iterations.
        additional_metrics: other metrics.
        metric_cmp_fn: comparison of key metric values.
        train_handlers: handlers with an ``attach(engine)`` method.
        amp: CUDA autocast with a gradient scaler (MONAI's ``amp``; the penalty stays in float32). For bf16 on CPU,
            pass an autocasting ``g_inferer`` instead.
        event_names: additional events to register.
        event_to_attr: event -> state attribute map of ignite's ``register_events``.
        decollate: decollate batch and output at ``MODEL_COMPLETED`` (as ``SupervisedTrainer`` does by default, so
            ``from_engine(["loss"], first=True)`` reads the output the same way).
        optim_set_to_none: ``zero_grad(set_to_none=...)``.
        to_kwargs: other ``prepare_batch`` arguments.
        amp_kwargs: ``torch.autocast("cuda", ...)`` arguments when ``amp``.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        g_network: nn.Module,
        g_optimizer: Optimizer,
        g_loss_function: Callable[[Tensor, Tensor], Tensor],
        d_network: nn.Module,
        d_optimizer: Optimizer,
        n_critic: int = 5,
        gp_weight: float = 10.0,
        adv_weight: float = 0.05,
        condition_critic: bool = False,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = default_prepare_batch,
        g_inferer: Inferer | None = None,
        d_inferer: Inferer | None = None,
        iteration_update: Callable | None = None,
        postprocessing: Callable | None = None,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        metric_cmp_fn: Callable = default_metric_cmp_fn,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        event_names: list | None = None,
        event_to_attr: dict | None = None,
        decollate: bool = True,
        optim_set_to_none: bool = False,
        to_kwargs: dict | None = None,
        amp_kwargs: dict | None = None,
    ) -> None:
        if int(n_critic) < 1:
            raise ValueError(f"n_critic must be >= 1, got {n_critic}")
        if gp_weight < 0 or adv_weight < 0:
            raise ValueError(f"gp_weight ({gp_weight}) and adv_weight ({adv_weight}) must be >= 0")
        batch_norms = [n for n, m in d_network.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if batch_norms:
            raise ValueError(
                f"the critic uses batch normalisation ({batch_norms[:3]}): the gradient penalty is per sample and "
                "batch statistics mix the samples; use instance, layer or no normalisation"
            )
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            iteration_update=iteration_update,
            postprocessing=postprocessing,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            metric_cmp_fn=metric_cmp_fn,
            handlers=train_handlers,
            amp=amp,
            event_names=event_names,
            event_to_attr=event_to_attr,
            decollate=decollate,
            to_kwargs=to_kwargs,
            amp_kwargs=amp_kwargs,
        )
        self.g_network, self.g_optimizer, self.g_loss_function = g_network, g_optimizer, g_loss_function
        self.d_network, self.d_optimizer = d_network, d_optimizer
        self.n_critic, self.gp_weight, self.adv_weight = int(n_critic), float(gp_weight), float(adv_weight)
        self.condition_critic = as_flag(condition_critic)
        self.g_inferer = SimpleInferer() if g_inferer is None else g_inferer
        self.d_inferer = SimpleInferer() if d_inferer is None else d_inferer
        self.optim_set_to_none = optim_set_to_none
        self._last_generator: dict[str, Tensor] = {}

    @property
    def network(self) -> nn.Module:
        """The generator (the name ``SupervisedTrainer``'s handlers, e.g. GradientClipping, look for)."""
        return self.g_network

    @property
    def optimizer(self) -> Optimizer:
        """The generator's optimiser."""
        return self.g_optimizer

    def is_generator_iteration(self, iteration: int) -> bool:
        """Whether the (1-based) ``iteration`` also updates the generator: every ``n_critic``-th one."""
        return iteration % self.n_critic == 0

    def _autocast(self):
        return torch.autocast("cuda", **self.amp_kwargs) if self.amp else contextlib.nullcontext()

    def _critic_input(self, images: Tensor, inputs: Tensor) -> Tensor:
        return torch.cat([inputs, images], dim=1) if self.condition_critic else images

    def _scores(self, images: Tensor, inputs: Tensor) -> Tensor:
        return critic_score(self.d_inferer(self._critic_input(images, inputs), self.d_network))

    def _step(self, loss: Tensor, optimizer: Optimizer, event: bool) -> None:
        """Backward pass and optimiser step, through the gradient scaler when ``amp``; ``event``: fire
        ``BACKWARD_COMPLETED`` between the two (gradient clipping of the generator)."""
        scaler = self.scaler if self.amp else None
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if event:
            self.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()

    def _iteration(self, engine: WGANGPTrainer, batchdata: Any) -> dict[str, Any]:
        """One critic update, plus one generator update on every ``n_critic``-th iteration.

        Args:
            engine: this trainer.
            batchdata: the loader's batch.
        """
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        inputs, targets, args, kwargs = batch if len(batch) == 4 else (*batch, (), {})
        generator_step = engine.is_generator_iteration(engine.state.iteration)
        engine.g_network.train()
        engine.d_network.train()
        engine.state.output = out = {Keys.IMAGE: inputs, Keys.LABEL: targets}

        # the generator's graph is kept only when the generator steps on this iteration
        with torch.set_grad_enabled(generator_step), engine._autocast():
            fake = engine.g_inferer(inputs, engine.g_network, *args, **kwargs)
        out[Keys.PRED] = fake.detach()
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)

        # critic: D(fake) - D(real) + λ·GP, the fake detached
        engine.d_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with engine._autocast():
            real_scores = engine._scores(targets, inputs)
            fake_scores = engine._scores(fake.detach(), inputs)
        condition = inputs if engine.condition_critic else None
        gp = gradient_penalty(engine.d_network, targets, fake.detach(), condition=condition)
        d_loss = wasserstein_critic_loss(real_scores, fake_scores) + engine.gp_weight * gp
        engine._step(d_loss, engine.d_optimizer, event=False)
        out.update(d_loss=d_loss.detach(), gp=gp.detach(), wasserstein=(real_scores - fake_scores).mean().detach())

        if generator_step:  # content + adv_weight·(−D(fake)) through the updated, frozen critic
            engine.g_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
            with _frozen(engine.d_network), engine._autocast():
                content = engine.g_loss_function(fake, targets).mean()
                adv = wasserstein_generator_loss(engine._scores(fake, inputs))
                g_loss = content + engine.adv_weight * adv
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
            engine._step(g_loss, engine.g_optimizer, event=True)
            values = (g_loss, g_loss, content, adv)
            engine._last_generator = {k: v.detach() for k, v in zip(_G_KEYS, values)}
        nan = torch.tensor(float("nan"), device=d_loss.device)
        out.update({k: engine._last_generator.get(k, nan) for k in _G_KEYS})
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
