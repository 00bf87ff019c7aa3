"""Schedules, forward process, posterior, objectives and EMA against formulas and the
reference implementation's outputs (tests/fixtures/ldm-reference)."""
import functools
import math

import pytest
import torch
from torch import nn

from ldm.diffusion.ema import EMA
from ldm.diffusion.objective import (
    eps_x0_from_output,
    logvar_weighted,
    loss_simple,
    lvlb_weights,
    output_from_eps_x0,
    training_target,
    vlb_term,
)
from ldm.diffusion.schedule import (
    BUFFER_NAMES,
    DiffusionSchedule,
    make_betas,
    posterior_mean_variance,
    q_sample,
)
from ldm.utils.checkpoint import sub_state_dict

MODELS = ("txt_crossattn_f4", "uncond_selfattn_f4")


@functools.lru_cache
def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _ckpt(reference_dir, name):
    return _load(reference_dir / f"{name}.ckpt")["state_dict"]


def _io(reference_dir, name):
    return _load(reference_dir / f"{name}_io.pt")


def _schedule_of(io):
    cfg = io["config"]
    return DiffusionSchedule.from_name(cfg["beta_schedule"], cfg["timesteps"], cfg["linear_start"],
                                       cfg["linear_end"])


# ---------------------------------------------------------------- schedules

@pytest.mark.parametrize("schedule, ls, le, index, value", [
    ("linear", 0.00085, 0.012, 0, 0.99915),
    ("linear", 0.00085, 0.012, 999, 4.66010e-3),
    ("linear", 0.0015, 0.0195, 999, 1.42304e-4),
    ("linear", 0.0015, 0.0155, 999, 6.68665e-4),
    ("linear", 0.0015, 0.0205, 999, 9.69109e-5),
    ("sqrt_linear", 0.00085, 0.012, 999, 1.57896e-3),
    ("cosine", 0, 0, 999, 2.42877e-9),
])
def test_alphas_cumprod_check_values(schedule, ls, le, index, value):
    abar = DiffusionSchedule.from_name(schedule, 1000, ls, le).alphas_cumprod
    assert abar.dtype == torch.float64
    assert abar[index].item() == pytest.approx(value, rel=1e-5)


def test_cosine_first_beta():
    assert make_betas("cosine", 1000)[0].item() == pytest.approx(4.12842e-5, rel=1e-5)


def test_sqrt_schedule_formula():
    betas = make_betas("sqrt", 10, 0.01, 0.04)
    expected = [math.sqrt(0.01 + i * 0.03 / 9) for i in range(10)]
    assert betas.tolist() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("key", ["linear_0.00085_0.012", "linear_0.0015_0.0195",
                                 "sqrt_linear_0.00085_0.012", "cosine_0_0"])
def test_schedules_match_reference_tables(reference_dir, key):
    ref = _load(reference_dir / "tables.pt")["schedules"][key]
    name, ls, le = key.rsplit("_", 2)
    sched = DiffusionSchedule.from_name(name, 1000, float(ls), float(le))
    torch.testing.assert_close(sched.betas, ref["betas"], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(sched.alphas_cumprod, ref["alphas_cumprod"], rtol=1e-12, atol=1e-15)


def test_bad_schedule_inputs():
    with pytest.raises(ValueError, match="unknown beta schedule"):
        make_betas("quadratic")
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        DiffusionSchedule(torch.tensor([0.1, 1.0]))


def test_posterior_matches_gaussian_conditioning():
    """q(x_{t-1} | x_t, x0) from Bayes: precision = alpha/beta + 1/(1 - abar_prev),
    mean = var (sqrt(alpha)/beta x_t + sqrt(abar_prev)/(1 - abar_prev) x0)."""
    s = DiffusionSchedule.from_name("linear", 1000, 0.0015, 0.0155)
    t = torch.arange(1, 1000)
    alpha, beta, abar_prev = s.alphas[t], s.betas[t], s.alphas_cumprod_prev[t]
    var = 1 / (alpha / beta + 1 / (1 - abar_prev))
    torch.testing.assert_close(s.posterior_variance[t], var, rtol=1e-9, atol=0)
    torch.testing.assert_close(s.posterior_mean_coef1[t], var * abar_prev.sqrt() / (1 - abar_prev), rtol=1e-9, atol=0)
    torch.testing.assert_close(s.posterior_mean_coef2[t], var * alpha.sqrt() / beta, rtol=1e-9, atol=0)
    # t = 0: the posterior is a point mass at x0.
    assert s.posterior_variance[0] == 0 and s.posterior_mean_coef2[0] == 0
    assert s.posterior_mean_coef1[0].item() == pytest.approx(1.0, rel=1e-12)
    assert s.posterior_log_variance_clipped[0].item() == pytest.approx(math.log(1e-20))
    torch.testing.assert_close(s.posterior_log_variance_clipped[t], var.log(), rtol=1e-9, atol=0)

    x0, xt = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    tb = torch.tensor([0, 500])
    mean, variance, log_variance = posterior_mean_variance(s, x0, xt, tb)
    torch.testing.assert_close(mean[0], x0[0])
    expected = s.posterior_mean_coef1[500].item() * x0[1] + s.posterior_mean_coef2[500].item() * xt[1]
    torch.testing.assert_close(mean[1], expected)
    assert variance.shape == (2, 1, 1, 1) and log_variance[1].item() == pytest.approx(var[499].log().item(), rel=1e-6)


def test_derived_tables_formulas():
    s = DiffusionSchedule.from_name("cosine", 200)
    abar = torch.cumprod(1 - s.betas, 0)
    torch.testing.assert_close(s.sqrt_recip_alphas_cumprod * s.sqrt_alphas_cumprod,
                               torch.ones(200, dtype=torch.float64))
    torch.testing.assert_close(s.sqrt_recipm1_alphas_cumprod**2, 1 / abar - 1)
    torch.testing.assert_close(s.log_one_minus_alphas_cumprod.exp(), s.sqrt_one_minus_alphas_cumprod**2)
    torch.testing.assert_close(s.alphas_cumprod_prev[1:], abar[:-1])
    assert s.alphas_cumprod_prev[0] == 1 and s.num_timesteps == 200


@pytest.mark.parametrize("name", MODELS)
def test_schedule_buffers_match_reference_checkpoint(reference_dir, name):
    state = _ckpt(reference_dir, name)
    ours = _schedule_of(_io(reference_dir, name)).buffers()
    assert list(ours) == list(BUFFER_NAMES)
    for key, value in ours.items():
        assert value.dtype == state[key].dtype == torch.float32
        torch.testing.assert_close(value, state[key], rtol=1e-6, atol=1e-12, msg=key)
    rebuilt = DiffusionSchedule.from_state_dict(state)
    torch.testing.assert_close(rebuilt.alphas_cumprod, _schedule_of(_io(reference_dir, name)).alphas_cumprod,
                               rtol=1e-5, atol=0)


def test_from_state_dict_keeps_the_configured_float64_schedule_for_its_own_float32_buffers():
    # Rebuilt from the float32 betas a checkpoint stores, a dozen of the 1000 sqrt_alphas_cumprod
    # (and hundreds of posterior entries) move by a float32 rounding step: a resumed run would
    # noise its latents differently. The configured schedule is kept when the betas are its own.
    configured = DiffusionSchedule.from_name("linear", 1000, 0.0015, 0.0195)
    state = configured.buffers()
    rebuilt = DiffusionSchedule.from_state_dict(state)
    assert not torch.equal(rebuilt.buffers()["sqrt_alphas_cumprod"], state["sqrt_alphas_cumprod"])
    kept = DiffusionSchedule.from_state_dict(state, configured=configured)
    for name in BUFFER_NAMES:
        assert torch.equal(getattr(kept, name), getattr(configured, name)), name
    # other betas (a reference checkpoint's own schedule) still win over the config
    other = DiffusionSchedule.from_name("linear", 1000, 0.00085, 0.012)
    assert torch.equal(DiffusionSchedule.from_state_dict(other.buffers(), configured=configured).betas,
                       other.buffers()["betas"].double())


def test_from_state_dict_refuses_inconsistent_buffers():
    state = DiffusionSchedule.from_name("linear", 100).buffers()
    state["posterior_variance"] = state["posterior_variance"] * 1.1
    with pytest.raises(ValueError, match="posterior_variance"):
        DiffusionSchedule.from_state_dict(state)


@pytest.mark.parametrize("name", MODELS)
def test_q_sample_matches_reference(reference_dir, name):
    io = _io(reference_dir, name)
    ref = io["q_sample"]
    xt = q_sample(_schedule_of(io), ref["x0"], ref["t"], ref["noise"])
    torch.testing.assert_close(xt, ref["xt"], rtol=1e-6, atol=1e-6)


def test_q_sample_formula():
    s = DiffusionSchedule.from_name("linear", 1000, 0.00085, 0.012)
    x0, noise, t = torch.randn(3, 2, 5, 5), torch.randn(3, 2, 5, 5), torch.tensor([0, 10, 999])
    xt = q_sample(s, x0, t, noise)
    for b in range(3):
        abar = s.alphas_cumprod[t[b]].item()
        torch.testing.assert_close(xt[b], math.sqrt(abar) * x0[b] + math.sqrt(1 - abar) * noise[b])


# ---------------------------------------------------------------- objectives

@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_parameterisations_invert_each_other(parameterization):
    s = DiffusionSchedule.from_name("linear", 1000, 0.0015, 0.0195)
    x0, eps = torch.randn(4, 3, 6, 6, dtype=torch.float64), torch.randn(4, 3, 6, 6, dtype=torch.float64)
    t = torch.tensor([0, 1, 500, 999])
    xt = q_sample(s, x0, t, eps)
    target = training_target(parameterization, s, x0, eps, t)
    a, sig = s.gather("sqrt_alphas_cumprod", t, xt), s.gather("sqrt_one_minus_alphas_cumprod", t, xt)
    eps_back, x0_back = eps_x0_from_output(parameterization, target, xt, a, sig)
    torch.testing.assert_close(eps_back, eps, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(x0_back, x0, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(output_from_eps_x0(parameterization, eps_back, x0_back, a, sig), target)


def test_v_target_formula():
    s = DiffusionSchedule.from_name("cosine", 1000)
    x0, eps, t = torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2), torch.tensor([3, 700])
    v = training_target("v", s, x0, eps, t)
    for b in range(2):
        abar = s.alphas_cumprod[t[b]].item()
        torch.testing.assert_close(v[b], math.sqrt(abar) * eps[b] - math.sqrt(1 - abar) * x0[b])
    assert torch.equal(training_target("eps", s, x0, eps, t), eps)
    assert torch.equal(training_target("x0", s, x0, eps, t), x0)
    with pytest.raises(ValueError, match="parameterization"):
        training_target("score", s, x0, eps, t)


def test_loss_simple_l1_l2():
    out, target = torch.randn(3, 4, 5, 6), torch.randn(3, 4, 5, 6)
    l2 = loss_simple(out, target, "l2")
    l1 = loss_simple(out, target, "l1")
    assert l2.shape == l1.shape == (3,)
    for b in range(3):
        assert l2[b].item() == pytest.approx(((target[b] - out[b]) ** 2).sum().item() / 120, rel=1e-5)
        assert l1[b].item() == pytest.approx((target[b] - out[b]).abs().sum().item() / 120, rel=1e-5)
    with pytest.raises(ValueError, match="loss_type"):
        loss_simple(out, target, "huber")


def test_logvar_weighting():
    loss = torch.tensor([0.5, 2.0, 1.0])
    t = torch.tensor([0, 3, 3])
    logvar = torch.zeros(10)
    torch.testing.assert_close(logvar_weighted(loss, logvar, t), loss)
    logvar[3] = 0.7
    expected = torch.tensor([0.5, 2.0 / math.exp(0.7) + 0.7, 1.0 / math.exp(0.7) + 0.7])
    torch.testing.assert_close(logvar_weighted(loss, logvar, t), expected)
    learned = nn.Parameter(torch.zeros(10))
    logvar_weighted(loss, learned, t).sum().backward()
    # d/dl (L e^-l + l) = 1 - L at l = 0, summed over the two samples with t = 3.
    assert learned.grad[3].item() == pytest.approx((1 - 2.0) + (1 - 1.0))


def test_lvlb_weights():
    s = DiffusionSchedule.from_name("linear", 1000, 0.00085, 0.012)
    w_eps, w_x0, w_v = (lvlb_weights(s, p) for p in ("eps", "x0", "v"))
    # The reference's eps weights, computed as it does (float32 buffers).
    b, abar = s.betas.float(), s.alphas_cumprod.float()
    ref = b**2 / (2 * s.posterior_variance.float() * (1 - b) * (1 - abar))
    torch.testing.assert_close(w_eps[1:], ref[1:], rtol=1e-5, atol=0)
    assert w_eps[0] == w_eps[1] and torch.isfinite(w_eps).all()
    # An eps error e is an x0 error sqrt(1-abar)/sqrt(abar) e, and a v error d is an eps
    # error sqrt(abar) d: the KL must not depend on the parameterisation.
    abar32 = s.alphas_cumprod.float()
    torch.testing.assert_close(w_x0[1:] * ((1 - abar32) / abar32)[1:], w_eps[1:], rtol=1e-5, atol=0)
    torch.testing.assert_close(w_v[1:], (w_eps * abar32)[1:], rtol=1e-5, atol=0)
    ref_x0 = 0.5 * abar.sqrt() / (2 - abar)
    torch.testing.assert_close(lvlb_weights(s, "x0", compat=True)[1:], ref_x0[1:])
    with pytest.raises(ValueError, match="no v"):
        lvlb_weights(s, "v", compat=True)
    per_sample, t = torch.tensor([1.0, 2.0]), torch.tensor([5, 600])
    assert vlb_term(per_sample, w_eps, t).item() == pytest.approx((w_eps[5] + 2 * w_eps[600]).item() / 2)


# ---------------------------------------------------------------- EMA

class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)


def test_ema_update_sequence_by_hand():
    model = _Tiny()
    ema = EMA(model, decay=0.5)
    assert sorted(dict(ema.named_buffers())) == ["decay", "linbias", "linweight", "num_updates"]
    assert ema.decay.dtype == torch.float32 and ema.num_updates.dtype == torch.int32
    shadow = model.lin.weight.detach().clone().double()
    # n = 1, 2, 3: d = min(0.5, 2/11), min(0.5, 3/12), min(0.5, 4/13); n = 10: d = 0.5.
    for n in range(1, 11):
        with torch.no_grad():
            model.lin.weight.add_(torch.randn_like(model.lin.weight))
        ema.update(model)
        d = min(0.5, (1 + n) / (10 + n))
        shadow = shadow - (1 - d) * (shadow - model.lin.weight.detach().double())
        torch.testing.assert_close(ema.linweight.double(), shadow, rtol=1e-6, atol=1e-6)
    assert ema.num_updates.item() == 10


def test_ema_without_warmup_and_bad_decay():
    model = _Tiny()
    ema = EMA(model, decay=0.9, use_num_updates=False)
    start = model.lin.bias.detach().clone()
    with torch.no_grad():
        model.lin.bias.add_(1.0)
    ema(model)
    torch.testing.assert_close(ema.linbias, start + 0.1 * 1.0)
    assert ema.num_updates.item() == -1
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.5)


def test_ema_scope_swaps_and_restores():
    model = _Tiny()
    ema = EMA(model)
    with torch.no_grad():
        ema.linweight.fill_(3.0)
    live = model.lin.weight.detach().clone()
    with ema.ema_scope(model):
        assert (model.lin.weight == 3.0).all()
    assert torch.equal(model.lin.weight, live)
    with pytest.raises(RuntimeError, match="without a preceding store"):
        ema.restore(model)
    with pytest.raises(KeyError, match="differ"):
        ema.update(nn.Linear(3, 2))


def test_state_dict_taken_with_the_ema_swapped_in_gets_the_live_weights():
    holder = nn.Module()
    holder.net = _Tiny()
    ema = EMA(holder.net)
    with torch.no_grad():
        ema.linweight.fill_(3.0)
    live = holder.state_dict()
    with ema.ema_scope(holder.net):
        state = holder.state_dict()
        assert (state["net.lin.weight"] == 3.0).all()
        ema.put_live_weights(state, "net.")
        with pytest.raises(KeyError, match="prefix"):
            ema.put_live_weights(state, "other.")
    assert state.keys() == live.keys() and all(torch.equal(state[k], live[k]) for k in live)
    untouched = holder.state_dict()
    ema.put_live_weights(untouched, "net.")  # not swapped in: nothing to replace
    assert all(torch.equal(untouched[k], live[k]) for k in live)


def _module_with_params(named: dict) -> nn.Module:
    """An nn.Module tree holding a trainable parameter under each dotted name."""
    root = nn.Module()
    for name, value in named.items():
        *path, leaf = name.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        node.register_parameter(leaf, nn.Parameter(value.clone()))
    return root


@pytest.mark.parametrize("name", MODELS)
def test_ema_state_matches_reference_checkpoint(reference_dir, name):
    state = _ckpt(reference_dir, name)
    ref_ema = sub_state_dict(state, "model_ema.")
    live = sub_state_dict(state, "model.")  # the reference's DiffusionWrapper: diffusion_model.*
    model = _module_with_params(live)
    ema = EMA(model)
    assert set(ema.state_dict()) == set(ref_ema)
    ema.load_state_dict(ref_ema, strict=True)
    info = _io(reference_dir, name)["ema"]
    assert ema.num_updates.item() == info["num_updates"] == 3
    assert ema.decay.item() == pytest.approx(info["decay"], rel=0, abs=0)
    with ema.ema_scope(model):
        for pname, p in model.named_parameters():
            assert torch.equal(p, ref_ema[pname.replace(".", "")])
    # The next update continues the reference's sequence: n = 4, d = 5/14.
    ema.update(model)
    d = torch.tensor(5.0) / torch.tensor(14.0)
    for pname, p in list(model.named_parameters())[:20]:
        s = ref_ema[pname.replace(".", "")]
        torch.testing.assert_close(getattr(ema, pname.replace(".", "")), s - (1 - d) * (s - p))
    assert ema.num_updates.dtype == torch.int32 and ema.num_updates.item() == 4
