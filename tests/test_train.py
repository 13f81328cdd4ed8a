"""Specifications of the training step, the loop and its checkpoints (CPU, seeded, tiny
synthetic data)."""

import itertools
import logging
import math
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import saelab.train
from saelab.checkpoint import STATE_FILE, fingerprint, peek_checkpoint, save_checkpoint
from saelab.config import TrainConfig
from saelab.sae import SparseAutoencoder, SwitchSAE, build_sae, make_activation
from saelab.train import (
    auto_lr,
    autocast_dtype,
    auxk_loss,
    estimate_input_scale,
    fvu,
    geometric_median,
    lr_at,
    param_groups,
    train_sae,
    train_step,
)

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    """Tiny models run as fast on one thread, and far faster on a machine shared with others."""


class RecordingTracker:
    """Keeps every log_metrics call as (step, metrics), and the params and tags."""

    def __init__(self, run_id: str | None = None) -> None:
        self.run_id = run_id
        self.logged: list[tuple[int, dict[str, float]]] = []
        self.params: dict = {}
        self.tags: dict[str, str] = {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.logged.append((step, dict(metrics)))

    def log_params(self, params: dict) -> None:
        self.params.update(params)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update(tags)


def make_cfg(**overrides) -> TrainConfig:
    fields = dict(
        n_tokens=256 * 200,
        batch_size=256,
        lr=1e-2,
        adam_beta1=0.9,
        adam_beta2=0.999,
        warmup_steps=5,
        lr_decay_fraction=0.2,
        grad_clip=1.0,
        threshold_fraction=0.2,
        scale_tokens=1024,
        dead_tokens=256 * 10,
        k_aux=16,
        aux_coef=1 / 32,
        shuffle_chunks=1,
        log_every=10,
        checkpoint_every=0,
        seed=0,
        device="cpu",
        autocast="float32",
    )
    return TrainConfig(**(fields | overrides))


def synthetic_batches(
    d_in: int = 32, n_features: int = 64, k_true: int = 4, batch: int = 256, seed: int = 1
) -> Iterator[torch.Tensor]:
    """x = (sparse codes @ unit-norm dictionary + offset) * 10: k_true features per token with
    magnitudes in [0.5, 2.5); the offset and the factor 10 exercise b_dec and the input scale."""
    gen = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(n_features, d_in, generator=gen)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    offset = 2.0 * torch.randn(d_in, generator=gen)
    while True:
        idx = torch.rand(batch, n_features, generator=gen).argsort(dim=1)[:, :k_true]
        mags = 0.5 + 2.0 * torch.rand(batch, k_true, generator=gen)
        codes = torch.zeros(batch, n_features).scatter_(1, idx, mags)
        yield (codes @ dictionary + offset) * 10.0


def test_auto_lr_scaling_law():
    """2e-4 at d_sae = 2^14; 4x the latents halves it: 2e-4 / sqrt(4) = 1e-4."""
    assert auto_lr(2**14) == pytest.approx(2e-4)
    assert auto_lr(2**16) == pytest.approx(1e-4)


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.1),  # warm-up: (0 + 1) / 10
        (4, 0.5),  # (4 + 1) / 10
        (9, 1.0),  # end of warm-up
        (50, 1.0),  # constant
        (80, 1.0),  # decay starts at 100 - round(0.2 * 100) = 80: (100 - 80) / 20
        (90, 0.5),  # (100 - 90) / 20
        (99, 0.05),  # (100 - 99) / 20; 0 would be reached at step 100
    ],
)
def test_lr_schedule_known_values(step: int, expected: float):
    """n_steps 100, lr 1, 10 warm-up steps, decay over the last 20% of the steps."""
    assert lr_at(step, 100, 1.0, 10, 0.2) == pytest.approx(expected)


def test_lr_schedule_without_warmup_or_decay_is_constant():
    assert [lr_at(s, 10, 3e-4, 0, 0.0) for s in range(10)] == [3e-4] * 10


def test_estimate_input_scale_known_answer_and_consumption():
    """Only the first n_tokens count: 3 tokens of squared norm 1 in d_in 4 give c = sqrt(4 / 1).

    The second batch's second token (squared norm 100) lies past n_tokens = 3 and is ignored;
    the third batch is left in the iterator.
    """
    batches = iter(
        [
            torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]),
            torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 10.0]]),
            torch.zeros(2, 4),
        ]
    )
    assert estimate_input_scale(batches, 3) == pytest.approx(2.0)
    assert len(list(batches)) == 1


def test_estimate_input_scale_makes_mean_squared_norm_d_in():
    """After scaling by c, E||c x||^2 = d_in on the tokens used."""
    x = next(synthetic_batches())
    c = estimate_input_scale([x], x.shape[0])
    assert (c * x).pow(2).sum(dim=1).mean().item() == pytest.approx(32.0, rel=1e-5)


def test_geometric_median_known_answers():
    """Square corners -> its centre (2, 3); collinear 0, 1, 10 -> the middle point 1."""
    square = torch.tensor([[1.0, 2.0], [3.0, 2.0], [1.0, 4.0], [3.0, 4.0]])
    assert torch.allclose(geometric_median(square), torch.tensor([2.0, 3.0]), atol=1e-5)
    line = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]])
    assert torch.allclose(geometric_median(line), torch.tensor([1.0, 0.0]), atol=1e-3)


def test_geometric_median_resists_an_outlier():
    """99 points around the origin and one at 1000: the mean moves ~10, the median stays ~0."""
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(99, 8, generator=gen), torch.full((1, 8), 1000.0)])
    assert x.mean(dim=0).norm() > 25.0
    assert geometric_median(x).norm() < 1.0
    assert geometric_median(x).dtype == torch.float32


def test_fvu_known_answer():
    """x = [[1, 0], [-1, 0]] has total variance 2; predicting 0 leaves all of it, x none."""
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert fvu(x, torch.zeros_like(x)).item() == pytest.approx(1.0)
    assert fvu(x, x).item() == 0.0
    # recon [[0.5, 0], [-0.5, 0]] leaves squared error 0.25 + 0.25 = 0.5 of 2.
    assert fvu(x, 0.5 * x).item() == pytest.approx(0.25)


def _sae_and_batch(variant: str = "topk", seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(32, 96, make_activation(variant, 4), generator=gen)
    x = next(synthetic_batches(seed=seed)) * 0.05
    return sae, x


def test_auxk_is_zero_without_dead_latents():
    sae, x = _sae_and_batch()
    out = sae(x)
    dead = torch.zeros(96, dtype=torch.bool)
    assert auxk_loss(sae, x, (x - out.recon).detach(), dead, 16).item() == 0.0


def test_auxk_is_positive_with_dead_latents_and_trains_only_them():
    """With latents 0..47 dead, the loss is > 0 and its gradient reaches only their weights."""
    sae, x = _sae_and_batch()
    out = sae(x)
    dead = torch.zeros(96, dtype=torch.bool)
    dead[:48] = True
    loss = auxk_loss(sae, x, (x - out.recon).detach(), dead, 16)
    assert loss.item() > 0.0
    loss.backward()
    assert sae.W_dec.grad[:48].abs().sum() > 0 and not sae.W_dec.grad[48:].any()
    assert sae.W_enc.grad[:, :48].abs().sum() > 0 and not sae.W_enc.grad[:, 48:].any()


@pytest.mark.parametrize("variant", ["topk", "batchtopk"])
def test_train_step_keeps_decoder_unit_norm_and_reports(variant: str):
    """After a step the decoder rows have unit norm; metrics and the fired mask are consistent."""
    sae, x = _sae_and_batch(variant)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    dead = torch.zeros(96, dtype=torch.bool)
    dead[:10] = True
    result = train_step(sae, optimizer, x, dead, k_aux=16, aux_coef=1 / 32, grad_clip=1.0)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(96), atol=1e-6)
    assert set(result.metrics) == {"loss", "fvu", "aux_loss", "sparsity_loss", "l0"}
    assert result.metrics["l0"] == pytest.approx(4.0)  # TopK exactly; BatchTopK on average
    m = result.metrics
    assert m["loss"] == pytest.approx(m["fvu"] + m["aux_loss"], rel=1e-5) and m["aux_loss"] > 0
    assert m["sparsity_loss"] == 0.0
    assert result.fired.dtype == torch.bool and result.fired.shape == (96,)
    assert 4 <= int(result.fired.sum()) <= 96


@pytest.mark.parametrize("variant", ["topk", "batchtopk"])
def test_training_learns_synthetic_sparse_data(variant: str):
    """200 steps on x = sparse codes @ dictionary lower FVU below 0.25 (from ~0.7 in the first
    steps); the returned SAE (folded, eval mode) matches the training FVU on raw inputs and, for
    BatchTopK, its inference L0 lands within 25% of k."""
    torch.manual_seed(0)
    sae = SparseAutoencoder(32, 96, make_activation(variant, 4))
    tracker = RecordingTracker()
    summary = train_sae(sae, synthetic_batches(), make_cfg(), tracker, CPU)
    first_fvu = tracker.logged[0][1]["train/fvu"]
    assert first_fvu > 0.5
    assert summary["fvu"] < 0.25
    assert summary["inference_fvu_train"] == pytest.approx(summary["fvu"], abs=0.05)
    assert summary["steps"] == 200 and summary["tokens"] == 200 * 256
    assert summary["input_scale"] == pytest.approx(estimate_input_scale(synthetic_batches(), 1024))
    assert 3.0 <= summary["inference_l0_train"] <= 5.0
    assert not sae.training
    if variant == "batchtopk":
        assert summary["threshold"] == sae.activation.threshold.item() > 0
    else:
        assert "threshold" not in summary and summary["inference_l0_train"] == 4.0


def test_training_logs_every_log_every_steps():
    """25 steps with log_every 10: logs at steps 10, 20 and the last, 25, with the seven keys."""
    sae = SparseAutoencoder(32, 96, make_activation("topk", 4))
    tracker = RecordingTracker()
    train_sae(sae, synthetic_batches(), make_cfg(n_tokens=256 * 25), tracker, CPU)
    assert [step for step, _ in tracker.logged] == [10, 20, 25]
    keys = {"train/loss", "train/fvu", "train/aux_loss", "train/sparsity_loss", "train/l0"}
    keys |= {"train/dead_fraction"}
    assert set(tracker.logged[0][1]) == keys | {"train/lr"}
    assert tracker.logged[-1][1]["train/lr"] == pytest.approx(lr_at(24, 25, 1e-2, 5, 0.2))
    assert all(math.isfinite(v) for _, m in tracker.logged for v in m.values())


def test_training_sets_b_dec_to_the_scaled_geometric_median_before_training():
    """With lr tiny, b_dec ends at the first training batch's median, in raw units after folding.

    The first 1024 tokens (4 batches) go to the scale; the 5th batch sets b_dec = median(c x);
    folding divides b_dec by c, giving median(x) back.
    """
    sae = SparseAutoencoder(32, 96, make_activation("topk", 4))
    cfg = make_cfg(n_tokens=256, lr=1e-12, warmup_steps=0)
    train_sae(sae, synthetic_batches(), cfg, RecordingTracker(), CPU)
    it = synthetic_batches()
    for _ in range(4):
        next(it)
    assert torch.allclose(sae.b_dec, geometric_median(next(it)), rtol=1e-4, atol=1e-3)


def test_training_fails_clearly_when_batches_run_out():
    """5 batches: 4 go to the input scale, the 5th is step 0; step 1 finds none."""
    batches = iter([next(synthetic_batches())] * 5)
    sae = SparseAutoencoder(32, 96, make_activation("topk", 4))
    with pytest.raises(ValueError, match="ran out at step 1"):
        train_sae(sae, batches, make_cfg(), RecordingTracker(), CPU)


# --------------------------------------------------------------------------- new variants

HPARAMS = {
    "relu": {"l1_coef": 0.05, "init_b_enc": "zero"},
    "jumprelu": {
        "bandwidth": 0.001,
        "l0_coef": 1.0,
        "init_threshold": None,
        "threshold_lr_scale": 1,
    },
    "sampled": {"l": 16, "score": "l2", "pool": "sample", "seed": 0},
}


def _new_sae(variant: str, **hparams) -> SparseAutoencoder:
    torch.manual_seed(0)
    return SparseAutoencoder(
        32, 96, make_activation(variant, 4, **(HPARAMS.get(variant, {}) | hparams))
    )


@pytest.mark.parametrize("variant", ["relu", "jumprelu"])
def test_train_step_adds_the_sparsity_loss_and_no_auxk(variant: str):
    """ReLU and JumpReLU: loss = fvu + sparsity_loss (> 0), and no AuxK even with dead latents
    (their dead latents get gradient from the sparsity term / the threshold instead)."""
    sae, x = _new_sae(variant), next(synthetic_batches()) * 0.05
    sae.activation.init_from_batch_(sae.encode_pre(x))  # JumpReLU: L0 = k, so push it off k
    if variant == "jumprelu":
        with torch.no_grad():
            sae.activation.log_threshold.sub_(1.0)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    dead = torch.ones(96, dtype=torch.bool)
    m = train_step(sae, optimizer, x, dead, k_aux=16, aux_coef=1 / 32, grad_clip=1.0).metrics
    assert m["aux_loss"] == 0.0 and m["sparsity_loss"] > 0
    assert m["loss"] == pytest.approx(m["fvu"] + m["sparsity_loss"], rel=1e-5)


def test_param_groups_give_jumprelu_thresholds_their_lr_scale():
    """The SAE's weights get lr_scale 1; JumpReLU's log_threshold its threshold_lr_scale."""
    sae = _new_sae("jumprelu", threshold_lr_scale=5.0)
    groups = param_groups(sae)
    assert [g["lr_scale"] for g in groups] == [1.0, 5.0]
    assert groups[1]["params"] == [sae.activation.log_threshold]
    assert len(groups[0]["params"]) == 4
    assert [g["lr_scale"] for g in param_groups(_new_sae("relu"))] == [1.0]


def test_jumprelu_training_lands_near_target_l0():
    """200 steps with the target-L0 loss: train and inference L0 within 30% of k = 4, FVU
    below 0.3; θ is learned per latent (no longer the single first-batch value) and fp32."""
    sae = _new_sae("jumprelu")
    summary = train_sae(sae, synthetic_batches(), make_cfg(), RecordingTracker(), CPU)
    assert 2.8 <= summary["l0"] <= 5.2 and 2.8 <= summary["inference_l0_train"] <= 5.2
    assert summary["fvu"] < 0.3 and summary["sparsity_loss"] > 0 and summary["aux_loss"] == 0
    assert "threshold" not in summary
    theta = sae.activation.threshold
    assert theta.dtype == torch.float32 and theta.std() > 0.01 * theta.mean()


def test_relu_l1_lowers_l0():
    """60 steps: the L1 penalty gives a sparser code than l1_coef = 0 (plain ReLU)."""
    cfg = make_cfg(n_tokens=256 * 60)
    dense = train_sae(
        _new_sae("relu", l1_coef=0.0), synthetic_batches(), cfg, RecordingTracker(), CPU
    )
    sparse = train_sae(_new_sae("relu"), synthetic_batches(), cfg, RecordingTracker(), CPU)
    assert sparse["l0"] < 0.8 * dense["l0"] and sparse["sparsity_loss"] > 0
    assert dense["sparsity_loss"] == 0.0


def test_sampled_training_sets_a_threshold_like_batchtopk():
    """Sampled with a 64-feature pool trains like BatchTopK: L0 exactly k in training, a
    positive global threshold, inference L0 within 30% of k."""
    sae = _new_sae("sampled")
    summary = train_sae(sae, synthetic_batches(), make_cfg(), RecordingTracker(), CPU)
    assert summary["l0"] == 4.0 and summary["threshold"] == sae.activation.threshold.item() > 0
    assert 2.8 <= summary["inference_l0_train"] <= 5.2 and summary["fvu"] < 0.35


def test_relu_quantile_init_starts_at_l0_k():
    """init_b_enc "quantile": the first step's L0 is near k = 4, where b_enc = 0 starts with
    about half of the 96 latents active."""
    cfg = make_cfg(n_tokens=256 * 2, log_every=1)
    for init, low, high in (("quantile", 2.0, 8.0), ("zero", 30.0, 96.0)):
        tracker = RecordingTracker()
        train_sae(_new_sae("relu", init_b_enc=init), synthetic_batches(), cfg, tracker, CPU)
        assert low <= tracker.logged[0][1]["train/l0"] <= high, init


def test_switch_training_learns_and_uses_every_expert():
    """A Switch SAE (4 experts of 24 latents, k = 4) trained by the same loop: L0 exactly k,
    FVU falls by half, the load-balancing term is in the loss (>= α, its minimum) and, on the
    returned eval-mode SAE, every expert receives tokens."""
    torch.manual_seed(0)
    sae = SwitchSAE(32, 96, 4, n_experts=4, balance_coef=1.0)
    tracker = RecordingTracker()
    summary = train_sae(sae, synthetic_batches(), make_cfg(), tracker, CPU)
    assert summary["l0"] == 4.0 and summary["inference_l0_train"] == 4.0
    assert summary["fvu"] < 0.5 * tracker.logged[0][1]["train/fvu"]
    assert summary["sparsity_loss"] >= 1.0 - 1e-6
    _, expert = sae.route(next(synthetic_batches()))  # raw inputs: the folded router
    assert torch.bincount(expert, minlength=4).min() > 0


# --------------------------------------------------------------------------- checkpoints

RESUME_HPARAMS = {
    "topk": {},
    "batchtopk": {},
    "relu": HPARAMS["relu"],
    "jumprelu": HPARAMS["jumprelu"],
    "sampled": HPARAMS["sampled"],  # pool "sample", 64 of 96 latents: draws from its generator
    "switch": {"n_experts": 4, "balance_coef": 3.0},  # the router's parameters in Adam's state
}
RESUME_STEPS = 30  # with make_cfg's scale_tokens 1024: 4 scale batches, then 30 steps


def _resume_cfg(**overrides) -> TrainConfig:
    return make_cfg(**({"n_tokens": 256 * RESUME_STEPS, "checkpoint_every": 8} | overrides))


def _resume_sae(variant: str, k: int = 4) -> SparseAutoencoder:
    generator = torch.Generator().manual_seed(0)
    return build_sae(variant, 32, 96, k, RESUME_HPARAMS[variant], generator)


def _batches(seed: int = 1) -> list[torch.Tensor]:
    """The whole stream of a 30-step run, in memory: every pass replays the same batches."""
    return list(itertools.islice(synthetic_batches(seed=seed), 4 + RESUME_STEPS))


def _stopped_at(batches: list[torch.Tensor], step: int, exc: BaseException) -> Iterator:
    """``batches``, raising ``exc`` when step ``step``'s batch is asked for (after ``step``
    completed steps; step 0's batch is the 5th, taken with the scale batches)."""
    yield from batches[: 4 + step]
    raise exc


def _saved(directory: Path) -> dict:
    return torch.load(directory / STATE_FILE, weights_only=True)


def _assert_same_weights(a: SparseAutoencoder, b: SparseAutoencoder) -> None:
    """Bit for bit: W_enc, W_dec, b_enc, b_dec and the activation's state (thresholds)."""
    b_state = b.state_dict()
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b_state[name]), name


def _without_timing(summary: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in summary.items() if k not in ("seconds", "tokens_per_s")}


@pytest.mark.parametrize("variant", list(RESUME_HPARAMS))
def test_interrupted_and_resumed_training_equals_uninterrupted(tmp_path: Path, variant: str):
    """Specification of resume: 30 steps in one go, and 30 steps stopped by Ctrl-C when step 13's
    batch is asked for, then resumed from the checkpoint written on the interrupt, end with
    identical weights (torch.equal, not allclose: on CPU the same ops on the same inputs give
    the same bits, and the resumed run replays the same batches with the same Adam state, RNG
    states and book-keeping), the same summary but the timings, and together log exactly what
    the uninterrupted run logs (the log window spanning the interrupt included)."""
    batches, cfg = _batches(), _resume_cfg()
    straight, straight_log = _resume_sae(variant), RecordingTracker()
    summary = train_sae(straight, batches, cfg, straight_log, CPU)

    ckpt = tmp_path / "ckpt"
    first_log, second_log = RecordingTracker(), RecordingTracker()
    with pytest.raises(KeyboardInterrupt):
        stopped = _stopped_at(batches, 13, KeyboardInterrupt())
        train_sae(_resume_sae(variant), stopped, cfg, first_log, CPU, ckpt)
    saved = _saved(ckpt)
    assert saved["step"] == 13 and saved["tokens"] == 13 * 256
    assert (saved["rng"]["activation"] is not None) == (variant == "sampled")
    resumed = _resume_sae(variant)
    resumed_summary = train_sae(resumed, batches, cfg, second_log, CPU, ckpt)

    _assert_same_weights(straight, resumed)
    assert _without_timing(resumed_summary) == _without_timing(summary)
    assert second_log.tags == {"resumed_from_step": "13"}
    assert first_log.logged + second_log.logged == straight_log.logged
    assert not ckpt.exists()


def test_a_crash_resumes_from_the_last_periodic_checkpoint(tmp_path: Path):
    """An error that is no interrupt (or a kill -9) writes no checkpoint: the one of step 8
    (checkpoint_every 8) stays, and resuming from it still ends with the uninterrupted weights."""
    batches, cfg = _batches(), _resume_cfg()
    straight = _resume_sae("sampled")
    train_sae(straight, batches, cfg, RecordingTracker(), CPU)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(RuntimeError, match="disk on fire"):
        stopped = _stopped_at(batches, 13, RuntimeError("disk on fire"))
        train_sae(_resume_sae("sampled"), stopped, cfg, RecordingTracker(), CPU, ckpt)
    assert _saved(ckpt)["step"] == 8
    resumed = _resume_sae("sampled")
    train_sae(resumed, batches, cfg, RecordingTracker(), CPU, ckpt)
    _assert_same_weights(straight, resumed)


@pytest.fixture
def sigint_raises_keyboard_interrupt():
    """Python's own SIGINT handler for the test: a runner started as a background job (e.g.
    ``cmd &`` in a script) inherits SIGINT ignored, and an ignored signal never interrupts."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("sigint_raises_keyboard_interrupt")
def test_an_interrupt_signal_inside_a_step_takes_effect_after_it(tmp_path, monkeypatch):
    """SIGINT arriving in the middle of step 13 (after Adam's update, before the book-keeping)
    is held until the step is complete: the checkpoint is the state after 13 steps, never a
    half-applied update, and resuming from it ends with the uninterrupted weights."""
    batches, cfg = _batches(), _resume_cfg()
    straight = _resume_sae("topk")
    train_sae(straight, batches, cfg, RecordingTracker(), CPU)

    calls = []

    def step_then_sigint(*args, **kwargs):
        result = train_step(*args, **kwargs)
        calls.append(1)
        if len(calls) == 13:
            signal.raise_signal(signal.SIGINT)
        return result

    monkeypatch.setattr(saelab.train, "train_step", step_then_sigint)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        train_sae(_resume_sae("topk"), batches, cfg, RecordingTracker(), CPU, ckpt)
    assert _saved(ckpt)["step"] == 13
    monkeypatch.setattr(saelab.train, "train_step", train_step)
    resumed = _resume_sae("topk")
    train_sae(resumed, batches, cfg, RecordingTracker(), CPU, ckpt)
    _assert_same_weights(straight, resumed)


@pytest.mark.parametrize(("every", "expected"), [(8, [8, 16, 24]), (0, [])])
def test_checkpoints_every_checkpoint_every_steps_and_removed_after_success(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, every: int, expected: list[int]
):
    """30 steps, checkpoint_every 8: complete checkpoints (SAE + trainer state) after steps 8,
    16 and 24 (none at 30: the run is complete), then the directory is removed and no
    temporary sibling is left; checkpoint_every 0 writes none."""
    written = []

    def save_and_list(directory, sae, state):
        save_checkpoint(directory, sae, state)
        written.append((state.step, sorted(p.name for p in Path(directory).iterdir())))

    monkeypatch.setattr(saelab.train, "save_checkpoint", save_and_list)
    ckpt = tmp_path / "ckpt"
    cfg = _resume_cfg(checkpoint_every=every)
    train_sae(_resume_sae("topk"), _batches(), cfg, RecordingTracker(), CPU, ckpt)
    files = ["cfg.json", "sae.safetensors", STATE_FILE]
    assert written == [(step, files) for step in expected]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"cfg": {"lr": 2e-2}}, "other params"),
        ({"k": 5}, "other params"),
        ({"data_id": {"store": "another"}}, "other params"),
        ({"batches": 2}, "input scale"),
        ({"corrupt": True}, "unreadable"),
    ],
    ids=["lr", "k", "data_id", "other-batches", "corrupt"],
)
def test_a_checkpoint_that_does_not_match_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, change: dict, why: str
):
    """A checkpoint of a run with another lr, k or data identity (fingerprint), of other
    batches (input scale), or an unreadable one, is not resumed: a warning says why, and the
    run trains from scratch exactly as without it (same weights, no resumed_from_step tag)."""
    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        stopped = _stopped_at(_batches(), 13, KeyboardInterrupt())
        train_sae(_resume_sae("topk"), stopped, _resume_cfg(), RecordingTracker(), CPU, ckpt, None)
    if change.get("corrupt"):
        (ckpt / STATE_FILE).write_bytes(b"not a checkpoint")
    cfg = _resume_cfg(**change.get("cfg", {}))
    batches, data_id = _batches(change.get("batches", 1)), change.get("data_id")
    fresh = _resume_sae("topk", change.get("k", 4))
    train_sae(fresh, batches, cfg, RecordingTracker(), CPU, None, data_id)

    tracker, again = RecordingTracker(), _resume_sae("topk", change.get("k", 4))
    with caplog.at_level(logging.WARNING, logger="saelab"):
        train_sae(again, batches, cfg, tracker, CPU, ckpt, data_id)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("not resuming" in m and why in m and "starting fresh" in m for m in warnings)
    assert tracker.tags == {}
    _assert_same_weights(fresh, again)
    assert not ckpt.exists()


def test_peek_checkpoint_gives_the_run_id_to_a_matching_run_only(tmp_path: Path):
    """The checkpoint keeps the tracker's run id; peek_checkpoint returns it for the run that
    would resume it (same fingerprint) and None for another run or no checkpoint."""
    ckpt, cfg = tmp_path / "ckpt", _resume_cfg()
    assert peek_checkpoint(ckpt, "any") is None
    with pytest.raises(KeyboardInterrupt):
        stopped = _stopped_at(_batches(), 9, KeyboardInterrupt())
        train_sae(_resume_sae("topk"), stopped, cfg, RecordingTracker("run-1"), CPU, ckpt)
    sae = _resume_sae("topk")
    assert peek_checkpoint(ckpt, fingerprint(sae, cfg, CPU)) == "run-1"
    assert peek_checkpoint(ckpt, fingerprint(sae, _resume_cfg(seed=1), CPU)) is None
    # checkpoint_every, log_every and device do not change the weights: still the same run
    assert peek_checkpoint(ckpt, fingerprint(sae, _resume_cfg(log_every=3), CPU)) == "run-1"


def _train_both_precisions(variant: str) -> dict[str, dict[str, float]]:
    summaries = {}
    for autocast in ("float32", "bfloat16"):
        sae = _new_sae(variant)
        cfg = make_cfg(autocast=autocast)
        summaries[autocast] = train_sae(sae, synthetic_batches(), cfg, RecordingTracker(), CPU)
    return summaries


@pytest.mark.parametrize("variant", ["topk", "batchtopk", "relu", "sampled"])
def test_bfloat16_autocast_keeps_the_training_metrics(variant: str):
    """bf16 autocast (the default on CUDA and bf16-capable CPUs) trains to the fp32 run's FVU and
    L0: 200 steps on synthetic sparse data, final train FVU within 0.02 and L0 within 5%."""
    fp32, bf16 = _train_both_precisions(variant).values()
    assert fp32["fvu"] < 0.3
    assert bf16["fvu"] == pytest.approx(fp32["fvu"], abs=0.02)
    assert bf16["l0"] == pytest.approx(fp32["l0"], rel=0.05)
    assert bf16["inference_fvu_train"] == pytest.approx(fp32["inference_fvu_train"], abs=0.02)


def test_jumprelu_trains_in_float32_whatever_the_autocast():
    """JumpReLU is not autocast_safe (bf16 is coarser than its STE bandwidth): the bfloat16
    setting gives the float32 run exactly."""
    fp32, bf16 = _train_both_precisions("jumprelu").values()
    assert bf16["fvu"] == fp32["fvu"] and bf16["l0"] == fp32["l0"]


def test_autocast_dtype_resolution(monkeypatch: pytest.MonkeyPatch):
    """float32 -> None, bfloat16 -> bf16; auto: bf16 on a CUDA GPU with native bf16 (not
    emulated), on a CPU only with native bf16."""
    assert autocast_dtype("float32", torch.device("cuda")) is None
    assert autocast_dtype("bfloat16", CPU) is torch.bfloat16
    for native in (False, True):
        monkeypatch.setattr(
            torch.cuda, "is_bf16_supported", lambda including_emulation, v=native: v
        )
        expected = torch.bfloat16 if native else None
        assert autocast_dtype("auto", torch.device("cuda")) is expected
    for probe_says in (False, True):
        for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
            monkeypatch.setattr(torch.cpu, probe, lambda v=probe_says: v)
        assert autocast_dtype("auto", CPU) is (torch.bfloat16 if probe_says else None)
